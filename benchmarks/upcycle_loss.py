"""Held-out loss of a LoopLM before and right after upcycling to 2N layers, for both orders.

    .venv/bin/python benchmarks/upcycle_loss.py runs/demo/checkpoints/step_00000500

Uses the checkpoint's consolidated weights (and its model config) and the demo corpus's
validation windows: the checkpoint should come from the demo recipe (any model size). With a
one-layer source both orders give the same [1, 1]; use 2+ layers to compare them, e.g.
`ouro-train --config-name demo model.num_layers=2 run_dir=runs/demo2`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ouro_train.checkpoint.upcycle import upcycle_config, upcycle_state_dict
from ouro_train.checkpoint.weights import read_weights
from ouro_train.config import ModelConfig
from ouro_train.config.resolve import resolve
from ouro_train.config.store import compose_config
from ouro_train.data.demo import build_demo_data
from ouro_train.model import LoopLM, looplm_loss


@torch.no_grad()
def evaluate(model: LoopLM, batches: list[dict]) -> tuple[list[float], float]:
    ce_sum, loss_sum, tokens = None, 0.0, 0
    for batch in batches:
        out = looplm_loss(model(batch["input_ids"]), model.lm_head, batch["labels"], beta=0.1, chunk_size=512)
        ce_sum = out.ce_per_step if ce_sum is None else ce_sum + out.ce_per_step
        loss_sum += out.loss_sum.item()
        tokens += int(out.num_tokens)
    return (ce_sum / tokens).tolist(), loss_sum / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    state, raw_cfg = read_weights(args.checkpoint)
    cfg = compose_config(config_name="demo")
    cfg.model = ModelConfig(**raw_cfg)  # the checkpoint's own shape (e.g. a 2-layer demo variant)
    _, batches, _ = build_demo_data(cfg, resolve(cfg))
    source = LoopLM(cfg.model)
    source.load_state_dict(state)
    rows = [("original", source)]
    for order in ("stack", "interleave"):
        for steps in (cfg.model.recurrent_steps // 2, cfg.model.recurrent_steps):
            grown = LoopLM(upcycle_config(cfg.model, order, steps))
            grown.load_state_dict(upcycle_state_dict(state, cfg.model.num_layers, order))
            rows.append((f"{order}, R={steps}", grown))
    print(f"{args.checkpoint}: held-out demo windows ({sum(b['input_ids'].numel() for b in batches):,} tokens)")
    for label, model in rows:
        ce, loss = evaluate(model, batches)
        layers = model.config.num_layers
        print(
            f"  {label:16s} {layers} layers x {model.config.recurrent_steps} steps: loss {loss:.4f}, "
            f"CE per step {' '.join(f'{c:.3f}' for c in ce)}"
        )


if __name__ == "__main__":
    main()
