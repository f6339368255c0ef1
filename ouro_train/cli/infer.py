"""`ouro-generate` and `ouro-eval`: sample from a model, and measure its early exit.

ouro-generate runs/demo_pipeline/sft --chat --prompt "What is a list?"
ouro-generate hf/ouro-mine --prompt "def fib(n):" --exit q:0.5 --kv-policy last --max-new-tokens 64
ouro-eval runs/demo_pipeline/gate_training --data runs/demo_pipeline/data/pretrain_val --out eval/

MODEL is a checkpoint, run directory or stage directory (then its newest complete checkpoint,
named on stderr), an `ouro-import` weights directory or an exported Hugging Face directory; its
tokenizer comes with it (or --tokenizer tokenizer.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.locate import locate_model
from ouro_train.config.schema import ConfigError
from ouro_train.data.manifest import DataError

ERRORS = (CheckpointError, ConfigError, DataError, ValueError, FileNotFoundError)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        type=Path,
        help="a checkpoint, run directory or stage directory (its newest complete checkpoint), "
        "ouro-import weights or an exported HF directory",
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer.json (or a directory with one), when the model directory has none"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--kv-policy", default="full", help="full | last | avg | first (ouro_train/inference/kv_cache.py)"
    )


def _tokenizer(args):
    from ouro_train.checkpoint.model_tokenizer import load_model_tokenizer

    return load_model_tokenizer(args.model, args.tokenizer)


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """ChatML as the SFT data renders it, ending with the assistant header to generate after.
    Special tokens by id: text that spells "<|im_end|>" stays text."""
    from ouro_train.data.sft import ROLES, special_ids

    ids = special_ids(tokenizer, False, "chat prompt")
    # No post-processor specials (an exported tokenizer.json adds a BOS): SFT data has none.
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    tokens: list[int] = []
    previous, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    try:
        for message in messages:
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise ValueError(f"chat message {message!r:.80}: needs role in {ROLES} and string content")
            tokens += [ids.im_start, *encode(f"{message['role']}\n")]
            tokens += [*encode(message["content"]), ids.im_end, *encode("\n")]
        tokens += [ids.im_start, *encode("assistant\n")]
    finally:
        tokenizer.encode_special_tokens = previous
    return tokens


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def generate_main(argv: list[str] | None = None) -> int:
    from ouro_train.inference.generate import Sampling, generate
    from ouro_train.inference.loading import load_model

    parser = argparse.ArgumentParser(
        prog="ouro-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _model_arguments(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    parser.add_argument("--prompts", type=Path, help='jsonl: {"prompt": "..."} or {"messages": [...]} per line')
    parser.add_argument("--chat", action="store_true", help="wrap --prompt as a ChatML user turn (SFT models)")
    parser.add_argument("--system", help="with --chat: a system message first")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--exit", default="all", help="all | step:N | q:Q (Q-exit skips the remaining steps)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON line per prompt (ids, exit steps)")
    args = parser.parse_args(argv)
    try:
        args.model = locate_model(args.model)
        tok = _tokenizer(args)
        rows, shown = _prompts(args, tok)
        model = load_model(args.model, args.dtype, args.device)
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tok.vocab_size} ids but the model's vocabulary is {model.config.vocab_size}"
            )
        ids, mask = left_pad(rows, tok.pad_id if tok.pad_id is not None else tok.eos_ids[0])
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        began = time.perf_counter()
        out = generate(
            model,
            ids.to(args.device),
            mask.to(args.device),
            max_new_tokens=args.max_new_tokens,
            exit_policy=args.exit,
            kv_policy=args.kv_policy,
            sampling=sampling,
            eos_ids=tok.eos_ids,
            pad_id=tok.eos_ids[0],
            generator=generator,
        )
        seconds = time.perf_counter() - began
    except ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    steps = model.config.recurrent_steps
    for row, prompt in enumerate(shown):
        n = int(out.lengths[row])
        new = out.tokens[row, :n].tolist()
        text_ids = [t for t in new if t not in tok.eos_ids]
        exits = [int(e) + 1 for e in out.exit_steps[row, :n]]
        text = tok.tokenizer.decode(text_ids)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": new, "exit_steps": exits}))
        else:
            print(f"### {prompt}\n{text}\n")
    total = int(out.lengths.sum())
    print(
        f"[{total} tokens in {seconds:.2f} s ({total / max(seconds, 1e-9):.1f} tok/s); exit {args.exit}, "
        f"KV {args.kv_policy}: mean {out.mean_steps():.2f} of {steps} recurrent steps]",
        file=sys.stderr,
    )
    return 0


def _prompts(args, tok) -> tuple[list[list[int]], list[str]]:
    """-> (token ids per prompt, how each is shown)."""
    from ouro_train.checkpoint.tokenizer_record import prompt_ids
    from ouro_train.data.tokenize import iter_jsonl

    records: list[dict] = [{"prompt": p} for p in args.prompt]
    if args.prompts:
        records += [record for _, record in iter_jsonl(args.prompts)]
    if not records:
        raise ValueError("nothing to generate from: give --prompt TEXT or --prompts FILE.jsonl")
    rows, shown = [], []
    for record in records:
        if "messages" in record:
            rows.append(chat_prompt(tok.tokenizer, record["messages"]))
            shown.append(record["messages"][-1].get("content", ""))
        elif isinstance(record.get("prompt"), str):
            text = record["prompt"]
            if args.chat:
                messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": text}
                ]
                rows.append(chat_prompt(tok.tokenizer, messages))
            else:
                rows.append(prompt_ids(tok, text))
            shown.append(text)
        else:
            raise ValueError(f"prompt record {record!r:.80}: needs a 'prompt' string or a 'messages' list")
        if not rows[-1]:
            raise ValueError(f"prompt {shown[-1]!r}: encodes to no tokens")
    return rows, shown


def eval_main(argv: list[str] | None = None) -> int:
    from ouro_train.inference.documents import jsonl_documents, shard_documents
    from ouro_train.inference.eval_report import best_q_within, write_outputs
    from ouro_train.inference.evaluate import DEFAULT_Q, evaluate
    from ouro_train.inference.loading import load_model

    parser = argparse.ArgumentParser(
        prog="ouro-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a held-out shard directory (manifest.json + shards)")
    source.add_argument("--prompts", type=Path, help='jsonl: {"text": ...} or {"messages": [...]} per line')
    parser.add_argument("--out", type=Path, required=True, help="writes eval.json, eval.md, eval.png here")
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per document (cut)")
    parser.add_argument("--q", default=",".join(f"{q:g}" for q in DEFAULT_Q), help="Q-exit thresholds, comma-separated")
    parser.add_argument("--kv-policies", default="full,last", help="comma-separated; the first is the baseline")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        qs = tuple(float(q) for q in args.q.split(","))
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"--q {q:g}: thresholds are in [0, 1]")
        args.model = locate_model(args.model)
        model = load_model(args.model, args.dtype, args.device)
        if args.data:
            docs = shard_documents(args.data, args.documents, args.max_tokens, model.config.vocab_size)
        else:
            tok = _tokenizer(args)
            docs = jsonl_documents(args.prompts, tok.tokenizer, args.documents, args.max_tokens, tok.bos_id)
        result = evaluate(model, docs, qs, tuple(args.kv_policies.split(",")), args.batch_size)
        result["source"] = {"model": str(args.model), "data": str(args.data or args.prompts)}
        write_outputs(result, args.out, f"Exit evaluation of {args.model}")
    except ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((args.out / "eval.md").read_text())
    best = best_q_within(result)
    print(f"[wrote {args.out}/eval.json, eval.md, eval.png]" + ("" if best else "; no Q-exit within 1% perplexity"))
    return 0
