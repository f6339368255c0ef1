from ouro_train.model.looplm import LoopLM, LoopOutput
from ouro_train.model.objective import LossOutput, exit_log_distribution, gate_loss, looplm_loss

__all__ = ["LoopLM", "LoopOutput", "LossOutput", "exit_log_distribution", "gate_loss", "looplm_loss"]
