"""`ouro-export` and `ouro-import`: the released Ouro Hugging Face layout <-> ouro-train weights.

ouro-export runs/x hf/ouro-mine [--dtype bfloat16]     # the run's newest complete checkpoint
ouro-export runs/x/checkpoints/step_00001000 hf/ouro-x-1000   # that checkpoint
ouro-export old/step_00000100 hf/ouro-old --tokenizer data/tok/tokenizer.json   # a checkpoint without one
ouro-import hf/Ouro-1.4B weights/ouro-1.4b      # then: ouro-train checkpoint.init_from=weights/ouro-1.4b

The exported directory is a whole model: weights, config.json, and the tokenizer the checkpoint
carries (tokenizer.json, tokenizer_config.json with the ChatML chat_template of a model trained on
SFT data, special_tokens_map.json, generation_config.json), with bos / eos / pad ids from it.
ouro-import refuses config fields this model cannot compute (naming the field), unties tied
embeddings, and copies the directory's tokenizer beside the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.hf import DTYPES, export_hf, import_hf
from ouro_train.checkpoint.locate import locate_model
from ouro_train.checkpoint.model_tokenizer import load_model_tokenizer
from ouro_train.checkpoint.tokenizer_record import (
    CHATML_TEMPLATE,
    TOKENIZER,
    TOKENIZER_INFO,
    chat_eos_ids,
    check_vocab_fits,
    write_record,
)
from ouro_train.checkpoint.weights import WEIGHTS, read_weights, save_weights
from ouro_train.config.schema import ConfigError, ModelConfig
from ouro_train.model.looplm import LoopLM


def describe_tokenizer(tokenizer) -> str:
    eos = ", ".join(f"{i} {tokenizer.token(i)}" for i in tokenizer.eos_ids)
    bos = "none" if tokenizer.bos_id is None else f"{tokenizer.bos_id} {tokenizer.token(tokenizer.bos_id)}"
    chat = "ChatML chat template" if tokenizer.is_chat else "no chat template"
    return f"tokenizer {tokenizer.name or tokenizer.path} ({tokenizer.vocab_size} ids; eos {eos}; bos {bos}; {chat})"


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ouro-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint, run directory or stage directory (its newest complete checkpoint), or "
        "ouro-import weights (or a model.safetensors)",
    )
    parser.add_argument("out", type=Path, help="output directory (safetensors, config.json, tokenizer files)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="the tokenizer.json (or a directory holding one) of a checkpoint that carries none (written before "
        "checkpoints recorded their tokenizer); checked against the sha256 the checkpoint records, if any",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="mark the model as a ChatML chat model (chat_template, <|im_end|> as a second eos) when its "
        "tokenizer source does not say so (a bare --tokenizer file)",
    )
    parser.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="export the weights and config.json only (bos/eos ids null): a directory no one can generate with",
    )
    args = parser.parse_args(argv)
    try:
        args.checkpoint = locate_model(args.checkpoint)
        state, raw_cfg = read_weights(args.checkpoint)
        if not raw_cfg:
            raise CheckpointError(f"{args.checkpoint}: the weights carry no model config")
        cfg = ModelConfig(**raw_cfg)
        tokenizer = None
        if args.no_tokenizer:
            if args.tokenizer or args.chat:
                raise CheckpointError("--no-tokenizer excludes --tokenizer and --chat")
        else:
            tokenizer = load_model_tokenizer(args.checkpoint, tokenizer=args.tokenizer)
            if args.chat and not tokenizer.is_chat:
                tokenizer.chat_template = CHATML_TEMPLATE
                tokenizer.eos_ids = chat_eos_ids(tokenizer.tokenizer, tokenizer.eos_ids)
            check_vocab_fits(tokenizer, cfg.vocab_size, args.checkpoint)
        export_hf(state, cfg, args.out, args.dtype, tokenizer)
    except (CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {sum(v.numel() for v in state.values()):,} parameters ({args.dtype}) -> {args.out}")
    print(describe_tokenizer(tokenizer) if tokenizer is not None else "no tokenizer files (--no-tokenizer)")
    return 0


def import_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ouro-import", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hf_dir", type=Path, help="a Hugging Face Ouro model directory")
    parser.add_argument("out", type=Path, help="output directory: model.safetensors usable as checkpoint.init_from")
    args = parser.parse_args(argv)
    try:
        imported = import_hf(args.hf_dir)
        cfg, state, dtype = imported.cfg, imported.state, imported.dtype
        with torch.device("meta"):  # shapes only, no memory
            expected = LoopLM(cfg).state_dict()
        bad = sorted(set(expected) ^ set(state)) + sorted(
            k for k in set(expected) & set(state) if expected[k].shape != state[k].shape
        )
        if bad:
            raise CheckpointError(f"{args.hf_dir}: tensors do not match its config.json: {bad[:6]}")
        tokenizer = load_model_tokenizer(args.hf_dir) if (args.hf_dir / TOKENIZER).is_file() else None
        if tokenizer is not None:
            check_vocab_fits(tokenizer, cfg.vocab_size, args.hf_dir)
        args.out.mkdir(parents=True, exist_ok=True)
        # Stored in fp32 (exact for bf16/fp16 sources): training keeps fp32 master weights.
        save_weights({k: v.float() for k, v in state.items()}, args.out / WEIGHTS, cfg)
        if tokenizer is not None:
            write_record(args.out, tokenizer, source=str(args.hf_dir))
        else:  # an earlier import's into this directory would describe another model's tokenizer
            for name in (TOKENIZER, TOKENIZER_INFO):
                (args.out / name).unlink(missing_ok=True)
        record = {"source": str(args.hf_dir), "dtype": dtype, "untied": imported.untied, "ignored": imported.ignored}
        (args.out / "imported_from.json").write_text(json.dumps(record) + "\n")
    except (CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"imported {sum(v.numel() for v in state.values()):,} parameters ({dtype}) of {cfg.num_layers} layers "
        f"x {cfg.recurrent_steps} steps -> {args.out / WEIGHTS}"
    )
    if imported.untied:
        print("tie_word_embeddings: true -> untied: lm_head.weight is a copy of model.embed_tokens.weight")
    if imported.ignored:
        print(f"ignored (no effect on this model's outputs): {json.dumps(imported.ignored)}")
    if tokenizer is not None:
        print(describe_tokenizer(tokenizer) + f", copied to {args.out}")
    else:
        print(
            f"warning: {args.hf_dir} has no {TOKENIZER}, so {args.out} holds no tokenizer (pass --tokenizer to the "
            "tools that need one)",
            file=sys.stderr,
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
