"""What the training-step A/B benchmarks share (bench_guard.py, bench_optimizer.py, ...): the model
size options, the LoopLM config they build from them, random token batches and a trainer. Imported as a
sibling module (the scripts run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import argparse
import time

import torch

from ouro_train.config import Config, ModelConfig, OptimConfig, TrainConfig

VOCAB = 4096


def parser(doc: str) -> argparse.ArgumentParser:
    """The size options of a step A/B: width, depth, tokens per step, steps, device."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def config(args: argparse.Namespace, **optim) -> Config:
    """A LoopLM of the given size (4 recurrent steps) trained at lr 3e-4 (+ `optim` settings)."""
    return Config(
        model=ModelConfig(
            name="bench",
            vocab_size=VOCAB,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.hidden // 64,
            num_kv_heads=max(1, args.hidden // 128),
            intermediate_size=int(args.hidden * 2.75),
        ),
        optim=OptimConfig(lr=3e-4, **optim),
        train=TrainConfig(steps=10_000, micro_batch_size=args.rows, seq_len=args.seq, device=args.device),
    )


def batches(args: argparse.Namespace, seed: int = 0):
    """Endless random batches of `rows` x `seq` tokens (seeded)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, VOCAB, (args.rows, args.seq + 1), generator=g)
        yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def trainer(args: argparse.Namespace, cfg: Config | None = None):
    """A single-process Trainer of `cfg` (default: `config(args)`) on a LoopLM seeded 0 and `batches(args)`."""
    from ouro_train.config.resolve import resolve
    from ouro_train.model import LoopLM
    from ouro_train.train.trainer import Trainer

    cfg = cfg or config(args)
    torch.manual_seed(0)
    return Trainer(cfg, LoopLM(cfg.model), batches(args), resolved=resolve(cfg))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(trainer, device: torch.device) -> tuple[dict, float]:
    """One `trainer.train_step()` -> (its metrics, its seconds from one device sync to the next)."""
    synchronize(device)
    started = time.perf_counter()
    metrics = trainer.train_step()
    synchronize(device)
    return metrics, time.perf_counter() - started
