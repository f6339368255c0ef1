"""Mano: knowledge manipulation over the field F_23 (Scaling Latent Reasoning via Looped LMs, §6).

A sample is an expression tree with `ops` operations (+, -, * modulo p: 23 as in the paper, or
any smaller prime with `modulus`) written in prefix notation, and its value, answered without
chain of thought:

    <bos> <len_3> + * 4 7 - 2 19 <ans> 11 <|endoftext|> <pad> ...

`ops` is uniform in [1, L]. The tree's shape is random (the operations of a node are split
uniformly at random between its two children), operators and leaves are uniform. The answer is
computed (`evaluate`), never sampled. The vocabulary is fixed (`VOCAB`, 64 ids at most): the
numbers 0..22 as single tokens, the operators, <len_1>..<len_32>, <ans>, <bos>, EOS and <pad>.

Documents are padded with <pad> to one length, 2 L + 6 tokens (the longest sample), and trained
with seq_len equal to it: every row holds exactly one whole sample, so no sample is cut at a row
boundary (a cut one would train its answer from half an expression) and attention takes the
plain causal kernel instead of one call per packed document (slow on CPU). The loss mask is 1
on the answer token only (an SFT-kind manifest, ouro_train/data/sft.py's format).

The test set is drawn first, `test_per_length` distinct expressions per length; the training
set never contains an expression of the test set (rejected and redrawn).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODULUS = 23  # the paper's field; the vocabulary holds 0..22 whatever prime a data set uses
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23)
OPERATORS = ("+", "-", "*")
MAX_OPS = 32  # <len_1> .. <len_32>: the vocabulary does not depend on L
EOS, BOS, ANS, PAD = "<|endoftext|>", "<bos>", "<ans>", "<pad>"
VOCAB = [EOS, BOS, ANS, PAD, *OPERATORS, *(str(n) for n in range(MODULUS))]
VOCAB += [f"<len_{n}>" for n in range(1, MAX_OPS + 1)]
TOKEN_ID = {token: index for index, token in enumerate(VOCAB)}
MODEL_VOCAB_SIZE = 64  # >= len(VOCAB), a round number for the model's embedding


def doc_length(max_ops: int) -> int:
    """Tokens of the longest document: bos, len, 2 ops + 1 symbols, ans, answer, eos."""
    return 2 * max_ops + 6


def random_expression(rng: random.Random, ops: int, modulus: int = MODULUS) -> list[str]:
    """A random expression tree with `ops` operations, in prefix notation."""
    if ops == 0:
        return [str(rng.randrange(modulus))]
    left = rng.randrange(ops)  # operations in the left subtree: 0 .. ops-1
    return [
        rng.choice(OPERATORS),
        *random_expression(rng, left, modulus),
        *random_expression(rng, ops - 1 - left, modulus),
    ]


def evaluate(expression: list[str], modulus: int = MODULUS) -> int:
    """The value in F_p (p = `modulus`) of a prefix expression (read right to left with a stack)."""
    stack: list[int] = []
    for token in reversed(expression):
        if token in OPERATORS:
            a, b = stack.pop(), stack.pop()
            stack.append((a + b if token == "+" else a - b if token == "-" else a * b) % modulus)
        else:
            stack.append(int(token))
    if len(stack) != 1:
        raise ValueError(f"not one expression: {' '.join(expression)}")
    return stack[0]


@dataclass(frozen=True)
class Sample:
    ops: int
    expression: tuple[str, ...]
    answer: int

    @property
    def text(self) -> str:
        """What the tokenizer encodes (BOS and EOS are added by id, as `ouro-data tokenize` does)."""
        return f"<len_{self.ops}> {' '.join(self.expression)} {ANS} {self.answer}"

    def record(self) -> dict:
        return {"ops": self.ops, "expression": " ".join(self.expression), "answer": self.answer, "text": self.text}


def _draw(rng: random.Random, ops: int, modulus: int) -> Sample:
    expression = tuple(random_expression(rng, ops, modulus))
    return Sample(ops, expression, evaluate(list(expression), modulus))


# Binary trees with n internal nodes (Catalan numbers), for the count of distinct expressions.
CATALAN = (1, 1, 2, 5, 14, 42, 132, 429)


def generate(
    seed: int, max_ops: int, train_samples: int, test_per_length: int, modulus: int = MODULUS
) -> tuple[list[Sample], list[Sample]]:
    """-> (training samples, test samples). Deterministic in `seed`; no test expression in training.
    A length with few distinct expressions (1 op: 3 p^2) holds out at most a quarter of them."""
    if not 1 <= max_ops <= MAX_OPS:
        raise ValueError(f"max_ops must be in [1, {MAX_OPS}], got {max_ops}")
    if modulus not in PRIMES:
        raise ValueError(f"modulus must be a prime <= {MODULUS} (numbers are single tokens), got {modulus}")
    rng = random.Random(seed)
    test: list[Sample] = []
    held_out: set[tuple[str, ...]] = set()
    for ops in range(1, max_ops + 1):
        shapes = CATALAN[ops] if ops < len(CATALAN) else CATALAN[-1]
        distinct = shapes * len(OPERATORS) ** ops * modulus ** (ops + 1)
        drawn = 0
        while drawn < min(test_per_length, distinct // 4):
            sample = _draw(rng, ops, modulus)
            if sample.expression not in held_out:
                held_out.add(sample.expression)
                test.append(sample)
                drawn += 1
    train: list[Sample] = []
    while len(train) < train_samples:
        sample = _draw(rng, rng.randint(1, max_ops), modulus)
        if sample.expression not in held_out:
            train.append(sample)
    return train, test


def word_level_tokenizer(token_id: dict[str, int], specials: list[str]):
    """A WordLevel tokenizer over a fixed vocabulary (whitespace-separated symbols, ids as given);
    `specials` are skipped by decode. The synthetic tasks' tokenizer (Mano, data_tools/chains.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=dict(token_id), unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    tokenizer.add_special_tokens(specials)
    return tokenizer


def build_tokenizer():
    """A WordLevel tokenizer over `VOCAB`, ids in VOCAB's order (<ans> stays visible in decode)."""
    return word_level_tokenizer(TOKEN_ID, [EOS, BOS, PAD])


def encode(tokenizer, samples: list[Sample], max_ops: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens, loss mask), both (N, 2 L + 6): <bos> text <eos>, padded; mask 1 on the answer."""
    width = doc_length(max_ops)
    tokens = np.full((len(samples), width), TOKEN_ID[PAD], dtype=np.uint32)
    mask = np.zeros((len(samples), width), dtype=np.uint8)
    for row, encoding in enumerate(tokenizer.encode_batch([s.text for s in samples], add_special_tokens=False)):
        ids = [TOKEN_ID[BOS], *encoding.ids, TOKEN_ID[EOS]]
        tokens[row, : len(ids)] = ids
        mask[row, len(ids) - 2] = 1  # the answer, just before EOS
    return tokens, mask


def write_shards(
    out: Path, source: str, tokens: np.ndarray, mask: np.ndarray, tokenizer_path: Path, per_shard: int = 50_000
):
    """Token documents + loss masks -> webdataset shards and an SFT-kind manifest (the loader's format)."""
    from ouro_train.data.manifest import Manifest, dtype_for_vocab
    from ouro_train.data.tokenize import TokenizeOptions, _write_shard, copy_tokenizer, tokenizer_info

    options = TokenizeOptions(source=source, tokenizer_path=str(tokenizer_path), out_dir=str(out), bos_token=BOS)
    _, info = tokenizer_info(str(tokenizer_path), options)
    dtype = dtype_for_vocab(info.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(tokens), per_shard):
        rows = range(start, min(start + per_shard, len(tokens)))
        name = f"{source}-{len(shards):05d}.tar"
        shards.append(_write_shard(out, name, [tokens[r] for r in rows], dtype, [mask[r] for r in rows]))
    manifest = Manifest(source=source, tokenizer=info, dtype=dtype, kind="sft", shards=shards)
    copy_tokenizer(tokenizer_path, out, info.sha256)  # the checkpoints trained on it carry it
    manifest.save(out)
    return manifest


def write_records(out: Path, test: list, train: list | None) -> None:
    """test.jsonl (the evaluation's input) and, when given, train.jsonl: one `record()` per line."""
    for name, samples in (("test", test), ("train", train)):
        if samples is not None:
            with open(out / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(s.record()) + "\n" for s in samples)


def write_dataset(
    out: str | Path,
    seed: int,
    max_ops: int,
    train_samples: int,
    test_per_length: int,
    jsonl: bool = False,
    modulus: int = MODULUS,
) -> dict:
    """The whole data set under `out`: tokenizer.json, train/ and test/ shards, test.jsonl (the
    evaluation's input), train.jsonl with `jsonl`, and mano.json (the parameters and counts)."""
    from ouro_train.data.tokenizer import save_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = generate(seed, max_ops, train_samples, test_per_length, modulus)
    tokenizer_path = save_tokenizer(build_tokenizer(), out / "tokenizer.json")
    tokenizer = build_tokenizer()
    for name, samples in (("train", train), ("test", test)):
        tokens, mask = encode(tokenizer, samples, max_ops)
        write_shards(out / name, f"mano_{name}", tokens, mask, tokenizer_path)
    write_records(out, test, train if jsonl else None)
    info = {
        "seed": seed,
        "max_ops": max_ops,
        "modulus": modulus,
        "train_samples": len(train),
        "test_samples": len(test),
        "test_per_length": test_per_length,
        "doc_length": doc_length(max_ops),
        "train_tokens": len(train) * doc_length(max_ops),
        "vocab_size": len(VOCAB),
    }
    (out / "mano.json").write_text(json.dumps(info, indent=1))
    return info


def read_test(path: str | Path) -> list[Sample]:
    """test.jsonl -> samples."""
    samples = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            samples.append(Sample(record["ops"], tuple(record["expression"].split()), record["answer"]))
    return samples
