"""`ouro-export` and `ouro-import`: the released Ouro Hugging Face layout <-> ouro-train weights.

ouro-export runs/x/checkpoints/step_00001000 hf/ouro-mine [--dtype bfloat16]
ouro-import hf/Ouro-1.4B weights/ouro-1.4b      # then: ouro-train checkpoint.init_from=weights/ouro-1.4b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ouro_train.checkpoint.hf import DTYPES, export_hf, import_hf
from ouro_train.checkpoint.store import CheckpointError
from ouro_train.checkpoint.weights import WEIGHTS, read_weights, save_weights
from ouro_train.config.schema import ConfigError, ModelConfig
from ouro_train.model.looplm import LoopLM


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ouro-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (or its model.safetensors)")
    parser.add_argument("out", type=Path, help="output directory (safetensors + config.json)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    try:
        state, raw_cfg = read_weights(args.checkpoint)
        if not raw_cfg:
            raise CheckpointError(f"{args.checkpoint}: the weights carry no model config")
        cfg = ModelConfig(**raw_cfg)
        export_hf(state, cfg, args.out, args.dtype)
    except (CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {sum(v.numel() for v in state.values()):,} parameters ({args.dtype}) -> {args.out}")
    return 0


def import_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ouro-import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hf_dir", type=Path, help="a Hugging Face Ouro model directory")
    parser.add_argument("out", type=Path, help="output directory: model.safetensors usable as checkpoint.init_from")
    args = parser.parse_args(argv)
    try:
        cfg, state, dtype = import_hf(args.hf_dir)
        with torch.device("meta"):  # shapes only, no memory
            expected = LoopLM(cfg).state_dict()
        bad = sorted(set(expected) ^ set(state)) + sorted(
            k for k in set(expected) & set(state) if expected[k].shape != state[k].shape
        )
        if bad:
            raise CheckpointError(f"{args.hf_dir}: tensors do not match its config.json: {bad[:6]}")
        args.out.mkdir(parents=True, exist_ok=True)
        # Stored in fp32 (exact for bf16/fp16 sources): training keeps fp32 master weights.
        save_weights({k: v.float() for k, v in state.items()}, args.out / WEIGHTS, cfg)
        (args.out / "imported_from.json").write_text(json.dumps({"source": str(args.hf_dir), "dtype": dtype}) + "\n")
    except (CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"imported {sum(v.numel() for v in state.values()):,} parameters ({dtype}) of {cfg.num_layers} layers "
        f"x {cfg.recurrent_steps} steps -> {args.out / WEIGHTS}"
    )
    return 0


def upcycle_main(argv: list[str] | None = None) -> int:
    """`ouro-upcycle`: N layers -> 2N layers by duplication (see ouro_train/checkpoint/upcycle.py).

    ouro-upcycle runs/stage1a/checkpoints/step_N weights/upcycled [--order stack|interleave]
    ouro-upcycle --dry-run --model ouro_1p4b        # the plan and counts for a model recipe
    """
    from ouro_train.checkpoint.upcycle import layer_order, upcycle_config, write_upcycled
    from ouro_train.model.flops import count_model

    parser = argparse.ArgumentParser(
        prog="ouro-upcycle", description=upcycle_main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint (or weights) directory to grow")
    parser.add_argument("out", type=Path, nargs="?", help="output directory for the 2N-layer weights")
    parser.add_argument("--order", choices=("stack", "interleave"), default="stack")
    parser.add_argument(
        "--recurrent-steps",
        type=int,
        default=None,
        help="recurrent steps of the grown model (default: half of the source's)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("duplicate", "reset"),
        default="duplicate",
        help="Adam moments: duplicated with the layers (default; needs the source's optimizer.safetensors, "
        "written with a stage's final checkpoint) or reset (the next stage starts a fresh optimizer)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and parameter counts only")
    parser.add_argument("--model", help="with --dry-run and no checkpoint: a model recipe name (e.g. ouro_1p4b)")
    args = parser.parse_args(argv)
    try:
        if args.checkpoint is not None:
            state, raw_cfg = read_weights(args.checkpoint)
            source = ModelConfig(**raw_cfg)
        elif args.dry_run and args.model:
            from ouro_train.config.store import compose_config

            state, source = None, compose_config([f"model={args.model}"]).model
        else:
            parser.error("give a checkpoint (and an output directory), or --dry-run --model NAME")
        target = upcycle_config(source, args.order, args.recurrent_steps)
        before, after = count_model(source, 4096).total_params, count_model(target, 4096).total_params
        plan = layer_order(source.num_layers, args.order)
        print(
            f"upcycle ({args.order}): {source.num_layers} layers x {source.recurrent_steps} steps -> "
            f"{target.num_layers} layers x {target.recurrent_steps} steps"
        )
        print(f"new layer i copies source layer: {plan[:8]}{' ...' if len(plan) > 8 else ''}")
        print(f"parameters: {before:,} -> {after:,}; optimizer moments: {args.optimizer}")
        if args.dry_run:
            return 0
        if args.out is None:
            parser.error("an output directory is needed (or --dry-run)")
        write_upcycled(args.checkpoint, args.out, state, source, target, args.order, args.optimizer)
        print(
            f"wrote {args.out}; continue with checkpoint.init_from={args.out} "
            f"model.num_layers={target.num_layers} model.recurrent_steps={target.recurrent_steps}"
        )
    except (CheckpointError, ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
