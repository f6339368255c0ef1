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
