"""`ouro-data`: offline corpus tools.

ouro-data tokenize --source web --tokenizer tokenizer.json --out shards/web 'raw/*.jsonl'
ouro-data tokenize --source web --tokenizer tokenizer.json --out shards/web saved_dataset/ [--split train]
ouro-data sft --source chat --tokenizer tokenizer.json --out shards/chat chat.jsonl
ouro-data inspect shards/web [--tokenizer tokenizer.json] [--verify]
ouro-data train-tokenizer --out tok.json [--vocab-size N] [--input FILES...]
ouro-data demo-tokenizer [--vocab-size N]
ouro-data synth mano --out data/mano [--max-ops L] [--train-samples N] [--test-per-length M] [--seed S]
ouro-data synth chains --out data/chains [--chains C] [--depth H] [--train-samples N] [--test-per-hop M] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np

from ouro_train.data.manifest import DataError


def _train_tokenizer(args: argparse.Namespace) -> int:
    from ouro_train.data.demo_corpus import demo_documents
    from ouro_train.data.tokenize import expand_inputs, read_documents
    from ouro_train.data.tokenizer import save_tokenizer, train_bpe_tokenizer

    if args.input:
        docs = []
        for path in expand_inputs(args.input, args.split):
            try:
                docs.extend(doc for doc in read_documents(path, args.text_field) if doc)  # skip empty files
            except UnicodeDecodeError as error:  # the codec's message does not say which file
                raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
        if not docs:
            raise DataError(f"--input {' '.join(args.input)}: no documents found (empty files?)")
    else:
        docs = demo_documents()
    tokenizer = train_bpe_tokenizer(docs, args.vocab_size)
    path = save_tokenizer(tokenizer, args.out)
    print(f"trained a {tokenizer.get_vocab_size()}-id BPE tokenizer on {len(docs)} documents -> {path}")
    return 0


def _demo_tokenizer(args: argparse.Namespace) -> int:
    from ouro_train.data.tokenizer import demo_tokenizer_path, load_or_train_demo_tokenizer

    load_or_train_demo_tokenizer(args.vocab_size, args.cache_dir)
    print(demo_tokenizer_path(args.vocab_size, args.cache_dir))
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a stopped tokenize unwinds (its workers killed,
    its temporaries removed) instead of dying where it stands."""


def _raise_terminated(signum, frame) -> NoReturn:
    raise _Terminated


def _tokenize(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ouro_train.data.tokenize import TokenizeOptions, tokenize, work_directory

    options = TokenizeOptions(
        source=args.source,
        tokenizer_path=args.tokenizer,
        out_dir=args.out,
        text_field=args.text_field,
        tokens_per_shard=args.tokens_per_shard,
        append_eos=not args.no_eos,
        eos_token=args.eos_token,
        bos_token=args.bos_token,
        split=args.split,
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        manifest = tokenize(args.inputs, options, workers=args.workers)
    except (KeyboardInterrupt, _Terminated) as stop:
        work = work_directory(Path(args.out).resolve())
        kept = f"; what was finished is kept in {work}, and the same command goes on from it" if work.is_dir() else ""
        print(f"ouro-data tokenize: stopped; nothing was written to {args.out}{kept}", file=sys.stderr)
        return 130 if isinstance(stop, KeyboardInterrupt) else 128 + signal.SIGTERM
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(
        f"{manifest.source}: {manifest.documents:,} documents, {manifest.tokens:,} tokens in "
        f"{len(manifest.shards)} shards -> {Path(args.out) / 'manifest.json'}"
    )
    return 0


def _sft(args: argparse.Namespace) -> int:
    from ouro_train.data.sft import build_sft_shards

    manifest = build_sft_shards(
        args.inputs, args.tokenizer, args.out, args.source, thinking=args.thinking, split=args.split
    )
    print(
        f"{manifest.source}: {manifest.documents:,} conversations, {manifest.tokens:,} tokens in "
        f"{len(manifest.shards)} shards -> {Path(args.out) / 'manifest.json'}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ouro_train.data.manifest import load_manifest
    from ouro_train.data.source import ShardReader

    directory = Path(args.directory)
    manifest = load_manifest(directory)
    tok = manifest.tokenizer
    print(
        f"source {manifest.source} ({manifest.kind}): {manifest.documents:,} documents, {manifest.tokens:,} tokens, "
        f"{len(manifest.shards)} shards, {manifest.dtype}"
    )
    print(
        f"tokenizer {tok.name} sha256 {tok.sha256[:12]}… vocab {tok.vocab_size}, eos {tok.eos_id} "
        f"(appended: {tok.append_eos}), bos {tok.bos_id}, max token id {manifest.max_token_id}"
    )
    lengths = []
    for shard in manifest.shards:
        path = directory / shard.name
        expected = shard.sha256 if args.verify else None
        reader = ShardReader(path, shard.documents, manifest.dtype, tok.vocab_size, False, shard.bytes, expected)
        lengths.append(reader.lengths())
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    if args.verify:
        print(f"verified sha256 of {len(manifest.shards)} shards")
    if lengths.size:
        print(f"document length: mean {lengths.mean():.1f}, median {int(np.median(lengths))}, max {lengths.max()}")
        edges = [0, 16, 64, 256, 1024, 4096, 16384, 65536, np.inf]
        counts, _ = np.histogram(lengths, bins=edges)
        for low, high, count in zip(edges[:-1], edges[1:], counts):
            bar = "#" * int(40 * count / max(counts.max(), 1))
            upper = str(high) if high != np.inf else "inf"
            print(f"  [{low:>6}, {upper:>6}) {count:>9,} {bar}")
    if args.tokenizer and manifest.documents:
        from ouro_train.data.tokenizer import load_tokenizer

        shard = manifest.shards[0]
        reader = ShardReader(
            directory / shard.name, shard.documents, manifest.dtype, tok.vocab_size, manifest.kind == "sft"
        )
        tokens, _ = reader.read(0)
        print("first document:", repr(load_tokenizer(args.tokenizer).decode(tokens[:200].tolist())[:500]))
    return 0


def _synth_mano(args: argparse.Namespace) -> int:
    from data_tools.mano import write_dataset

    info = write_dataset(
        args.out, args.seed, args.max_ops, args.train_samples, args.test_per_length, args.jsonl, args.modulus
    )
    print(
        f"mano (F_{info['modulus']}, 1..{info['max_ops']} ops, seed {info['seed']}): "
        f"{info['train_samples']:,} training samples ({info['train_tokens']:,} tokens), "
        f"{info['test_samples']:,} held-out test samples -> {args.out}"
    )
    return 0


def _synth_chains(args: argparse.Namespace) -> int:
    from data_tools.chains import write_dataset

    info = write_dataset(
        args.out, args.seed, args.chains, args.depth, args.train_samples, args.test_per_hop, args.jsonl
    )
    print(
        f"chains ({info['chains']} chains of depth {info['depth']}, seed {info['seed']}): "
        f"{info['train_samples']:,} training samples ({info['train_tokens']:,} tokens), "
        f"{info['test_samples']:,} held-out test samples -> {args.out}"
    )
    return 0


SPLIT_HELP = "the split of a saved DatasetDict input (default: train)"


class _Parser(argparse.ArgumentParser):
    # One line instead of argparse's usage dump; --help has the rest. Subparsers inherit this class.
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ouro-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenize", help="corpus files -> webdataset token shards + manifest")
    p.add_argument(
        "inputs",
        nargs="+",
        help=".jsonl/.jsonl.gz/.parquet/.txt files or globs, or directories of datasets saved with the "
        "`datasets` library's save_to_disk",
    )
    p.add_argument("--source", required=True, help="source name (used in shard names and mixtures)")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokens-per-shard", type=int, default=50_000_000)
    p.add_argument("--workers", type=int, default=1, help="processes (one input file or saved Arrow file each)")
    p.add_argument("--split", default=None, help=SPLIT_HELP)
    p.add_argument("--eos-token", default="<|endoftext|>")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to documents")
    p.add_argument("--bos-token", default=None, help="prepend this token to every document")
    p.set_defaults(run=_tokenize)

    p = sub.add_parser("sft", help="chat jsonl -> ChatML token shards with assistant loss masks")
    p.add_argument("inputs", nargs="+", help="jsonl files or globs, or saved datasets, with 'messages'")
    p.add_argument("--split", default=None, help=SPLIT_HELP)
    p.add_argument("--source", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--thinking",
        choices=("keep", "drop"),
        default="keep",
        help="render assistant 'reasoning' inside <think></think> (keep) or omit it (drop)",
    )
    p.set_defaults(run=_sft)

    p = sub.add_parser("inspect", help="counts, length histogram, sample, integrity")
    p.add_argument("directory")
    p.add_argument("--tokenizer", help="decode the first document with this tokenizer.json")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument(
        "--input",
        nargs="+",
        help=".txt (one document per file), .jsonl (one per line), .parquet files or globs; "
        "default: the embedded demo corpus",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--split", default=None, help=SPLIT_HELP)
    p.set_defaults(run=_train_tokenizer)

    p = sub.add_parser("demo-tokenizer", help="print the cached demo tokenizer's path (training it if needed)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(run=_demo_tokenizer)

    p = sub.add_parser("synth", help="synthetic data sets (exact answers, fixed vocabularies)")
    synth = p.add_subparsers(dest="task", required=True)
    p = synth.add_parser("mano", help="Mano: prefix arithmetic over F_23 (Ouro paper, section 6)")
    p.add_argument("--out", required=True, help="output directory (tokenizer.json, train/, test/, test.jsonl)")
    p.add_argument("--max-ops", type=int, default=8, help="L: operations per expression uniform in [1, L]")
    p.add_argument("--train-samples", type=int, default=100_000)
    p.add_argument("--test-per-length", type=int, default=200, help="held-out expressions per number of ops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modulus", type=int, default=23, help="the prime p of F_p (<= 23: numbers are single tokens)")
    p.add_argument("--jsonl", action="store_true", help="also write train.jsonl")
    p.set_defaults(run=_synth_mano)
    p = synth.add_parser("chains", help="variable chains: answers that need 1..depth look-ups in a row")
    p.add_argument("--out", required=True, help="output directory (tokenizer.json, train/, test/, test.jsonl)")
    p.add_argument("--chains", type=int, default=3, help="chains per sample, each rooted at its own digit")
    p.add_argument("--depth", type=int, default=2, help="variables per chain: the query needs 1..depth hops")
    p.add_argument("--train-samples", type=int, default=100_000)
    p.add_argument("--test-per-hop", type=int, default=300, help="held-out samples per number of hops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jsonl", action="store_true", help="also write train.jsonl")
    p.set_defaults(run=_synth_chains)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed --help or a one-line error
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args.run(args)
    except (DataError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
