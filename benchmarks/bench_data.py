"""Data pipeline throughput: packed tokens/s of one loader process, and tokenize speed per core.

1. Loader: synthetic shards (random token documents, log-normal lengths around 1K tokens,
   vocabulary 49,152 like SmolLM2's) read by ShardedLoader at sequence length 4096 with
   document masks and positions, in this one process (num_workers=0). Target >= 2M tokens/s,
   about 50x what one H100 consumes training the 1.4B model.
2. Tokenize: `ouro-data tokenize` (1 worker) against a plain `tokenizers` encode_batch loop
   over the same documents, both on one core (RAYON_RS_NUM_CPUS=1), same run.

    .venv/bin/python benchmarks/bench_data.py [--tokens 20000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_shards(directory: Path, total_tokens: int, vocab: int = 49152, seed: int = 0) -> None:
    from ouro_train.data.manifest import Manifest, TokenizerInfo
    from ouro_train.data.tokenize import _write_shard

    rng = np.random.default_rng(seed)
    shards, docs, count = [], [], 0
    while count < total_tokens:
        length = int(min(max(rng.lognormal(6.5, 1.0), 8), 32768))
        docs.append(rng.integers(0, vocab, length, dtype=np.uint32))
        count += length
        if sum(len(d) for d in docs) >= 2_000_000:
            shards.append(_write_shard(directory, f"synth-{len(shards):05d}.tar", docs, "uint16", None))
            docs = []
    if docs:
        shards.append(_write_shard(directory, f"synth-{len(shards):05d}.tar", docs, "uint16", None))
    Manifest(source="synth", tokenizer=TokenizerInfo("synthetic", "-", vocab, 0), dtype="uint16", shards=shards).save(
        directory
    )


def bench_loader(directory: Path, batches: int, seq_len: int, micro: int) -> float:
    from ouro_train.data.loader import ShardedLoader
    from ouro_train.data.source import TokenSource

    source = TokenSource("synth", directory, seq_len=seq_len, seed=0, model_vocab_size=49152)
    loader = ShardedLoader([source], [1.0], global_batch_size=micro, micro_batch_size=micro)
    next(loader)  # open shards, build the first epoch's order
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(loader)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def tokenize_worker(mode: str, corpus: Path, tokenizer: Path, out: Path) -> dict:
    from tokenizers import Tokenizer

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    size = sum(len(t.encode()) for t in texts)
    imported = time.perf_counter()
    if mode != "baseline":
        # A fixed per-process cost (webdataset imports torch): measured apart from throughput.
        import webdataset  # noqa: F401

        import ouro_train.data.tokenize  # noqa: F401
    import_seconds = time.perf_counter() - imported
    start = time.perf_counter()
    if mode == "baseline":
        tok = Tokenizer.from_file(str(tokenizer))
        count = 0
        for i in range(0, len(texts), 512):
            count += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 512], add_special_tokens=False))
    else:
        from ouro_train.data.tokenize import TokenizeOptions, tokenize

        manifest = tokenize([str(corpus)], TokenizeOptions("bench", str(tokenizer), str(out)), progress=False)
        count = manifest.tokens
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "mb_per_s": size / seconds / 1e6,
        "tokens_per_s": count / seconds,
        "import_s": import_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000_000, help="synthetic corpus size for the loader")
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--corpus-copies", type=int, default=20, help="demo corpus repeats for tokenize (~465 KB each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, corpus, tokenizer, out = args.worker
        print(json.dumps(tokenize_worker(mode, Path(corpus), Path(tokenizer), Path(out))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"
        shards.mkdir()
        make_shards(shards, args.tokens)
        rates = [bench_loader(shards, args.batches, args.seq_len, args.micro_batch) for _ in range(args.repeats)]
        print(
            f"loader: {args.tokens / 1e6:.0f}M synthetic tokens, seq {args.seq_len}, micro-batch {args.micro_batch}, "
            f"1 process: median {statistics.median(rates) / 1e6:.2f}M packed tokens/s "
            f"(runs: {', '.join(f'{r / 1e6:.2f}M' for r in rates)}; target >= 2M)"
        )

        from ouro_train.data.demo_corpus import demo_documents
        from ouro_train.data.tokenizer import save_tokenizer, train_bpe_tokenizer

        docs = demo_documents()
        tokenizer = save_tokenizer(train_bpe_tokenizer(docs, 8192), tmp / "tok.json")
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for _ in range(args.corpus_copies) for d in docs))
        env = os.environ | {"RAYON_RS_NUM_CPUS": "1", "TOKENIZERS_PARALLELISM": "true"}
        results: dict[str, list[dict]] = {"baseline": [], "ouro-data": []}
        for run in range(args.repeats):
            for mode in results:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    mode,
                    str(corpus),
                    str(tokenizer),
                    str(tmp / f"o{run}"),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        size_mb = corpus.stat().st_size / 1e6
        print(f"tokenize, one core, {size_mb:.1f} MB of text, 8192-id BPE, median of {args.repeats}:")
        medians = {}
        for mode, runs in results.items():
            medians[mode] = statistics.median(r["tokens_per_s"] for r in runs)
            mb = statistics.median(r["mb_per_s"] for r in runs)
            startup = statistics.median(r["import_s"] for r in runs)
            print(
                f"  {mode:10s} {mb:6.2f} MB/s  {medians[mode] / 1e6:5.2f}M tokens/s"
                + (f"  (+{startup:.1f} s one-time import)" if startup > 0.05 else "")
            )
        print(
            f"  ouro-data / baseline: {medians['ouro-data'] / medians['baseline']:.2f}x "
            "(ouro-data also writes shards, hashes them and commits the manifest)"
        )


if __name__ == "__main__":
    main()
