"""Variable chains: a depth-bound task, the number of sequential look-ups set by a knob (`make repro-depth`).

A sample binds `chains` x `depth` variables. Each chain starts at a digit and goes on through
`depth` variables, each assigned the previous one; the statements of all chains are listed in a
random order, then one variable is asked for, and the answer is the digit at the root of its
chain, without chain of thought:

    <bos> q 7 ; x k ; k 2 ; m q ; c x ; f m ; ? c 2 <|endoftext|>
          (q = 7, m = q, f = m;  k = 2, x = k, c = x;  c -> x -> k -> 2: 3 hops)

`hops` (h) is the queried variable's depth in its chain: the answer needs h look-ups in a row
(find the statement whose left side is the variable, read its right side, repeat until a digit).
A transformer does one look-up per layer after the first (the first layer gathers each
statement's left side onto its right side), so a flat model of k layers answers at most k - 1
hops, while a k-layer stack looped R times has k R layer applications: the task separates depth
from parameters. The other chains are distractors; their roots are distinct digits, so a model
that only learned which digits are roots scores 1 / `chains`. Variables are distinct letters
drawn per sample, and `hops` is uniform in [1, `depth`].

The vocabulary is fixed (`VOCAB`, 64 ids at most): the digits, the letters a..z, `;`, `?`,
<bos>, EOS and <pad>. Every document has the same length, 3 C H + 5 tokens, trained with
seq_len equal to it (one whole sample per row); the loss mask is 1 on the answer token only. The
test set is drawn first, `test_per_hop` distinct samples per hop count; the training set never
contains a sample of the test set. Shards are written as for Mano (data_tools/mano.py).
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.mano import word_level_tokenizer, write_records, write_shards

EOS, BOS, PAD, QUERY, END = "<|endoftext|>", "<bos>", "<pad>", "?", ";"
DIGITS = tuple(str(d) for d in range(10))
NAMES = tuple(string.ascii_lowercase)
VOCAB = [EOS, BOS, PAD, QUERY, END, *DIGITS, *NAMES]
TOKEN_ID = {token: index for index, token in enumerate(VOCAB)}
MODEL_VOCAB_SIZE = 64  # >= len(VOCAB): the Mano model (recipes/model/mano.yaml) fits it


def doc_length(chains: int, depth: int) -> int:
    """Tokens of every document: <bos>, 3 per statement, ? variable answer, EOS."""
    return 3 * chains * depth + 5


@dataclass(frozen=True)
class Sample:
    hops: int
    statements: tuple[tuple[str, str], ...]  # (left, right) in the order listed
    query: str
    answer: str

    @property
    def text(self) -> str:
        """What the tokenizer encodes (BOS and EOS are added by id, as `ouro-data tokenize` does)."""
        listed = " ".join(f"{left} {right} {END}" for left, right in self.statements)
        return f"{listed} {QUERY} {self.query} {self.answer}"

    def record(self) -> dict:
        return {"hops": self.hops, "text": self.text, "query": self.query, "answer": self.answer}


def resolve_chain(statements: tuple[tuple[str, str], ...], variable: str) -> tuple[str, int]:
    """-> (the digit `variable` is bound to, the look-ups it took), by following the statements."""
    binding = dict(statements)
    hops = 0
    while variable not in DIGITS:
        variable = binding[variable]
        hops += 1
    return variable, hops


def draw(rng: random.Random, chains: int, depth: int, hops: int) -> Sample:
    names = rng.sample(NAMES, chains * depth)
    roots = rng.sample(DIGITS, chains)
    statements = []
    for c in range(chains):
        previous = roots[c]
        for variable in names[c * depth : (c + 1) * depth]:
            statements.append((variable, previous))
            previous = variable
    chain = rng.randrange(chains)
    query = names[chain * depth + hops - 1]
    rng.shuffle(statements)
    return Sample(hops, tuple(statements), query, roots[chain])


def check_settings(chains: int, depth: int) -> None:
    if not 2 <= chains <= len(DIGITS):
        raise ValueError(f"chains must be in [2, {len(DIGITS)}] (distinct root digits), got {chains}")
    if depth < 1 or chains * depth > len(NAMES):
        raise ValueError(f"chains x depth must be in [1, {len(NAMES)}] (distinct letters), got {chains} x {depth}")


def generate(
    seed: int, chains: int, depth: int, train_samples: int, test_per_hop: int
) -> tuple[list[Sample], list[Sample]]:
    """-> (training samples, test samples). Deterministic in `seed`; no test sample in training."""
    check_settings(chains, depth)
    rng = random.Random(seed)
    test: list[Sample] = []
    held_out: set[str] = set()
    for hops in range(1, depth + 1):
        drawn = 0
        while drawn < test_per_hop:
            sample = draw(rng, chains, depth, hops)
            if sample.text not in held_out:
                held_out.add(sample.text)
                test.append(sample)
                drawn += 1
    train: list[Sample] = []
    while len(train) < train_samples:
        sample = draw(rng, chains, depth, rng.randint(1, depth))
        if sample.text not in held_out:
            train.append(sample)
    return train, test


def build_tokenizer():
    """A WordLevel tokenizer over `VOCAB` (whitespace-separated symbols), ids in VOCAB's order."""
    return word_level_tokenizer(TOKEN_ID, [EOS, BOS, PAD])


def encode(samples: list[Sample], chains: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens, loss mask), both (N, 3 C H + 5): <bos> text <eos>; mask 1 on the answer."""
    width = doc_length(chains, depth)
    tokens = np.empty((len(samples), width), dtype=np.uint32)
    for row, sample in enumerate(samples):
        ids = [TOKEN_ID[BOS], *(TOKEN_ID[t] for t in sample.text.split()), TOKEN_ID[EOS]]
        if len(ids) != width:
            raise ValueError(f"sample of {len(ids)} tokens, expected {width}: {sample.text}")
        tokens[row] = ids
    mask = np.zeros((len(samples), width), dtype=np.uint8)
    mask[:, width - 2] = 1  # the answer, just before EOS
    return tokens, mask


def write_dataset(
    out: str | Path, seed: int, chains: int, depth: int, train_samples: int, test_per_hop: int, jsonl: bool = False
) -> dict:
    """The whole data set under `out`: tokenizer.json, train/ and test/ shards, test.jsonl (the
    evaluation's input), train.jsonl with `jsonl`, and chains.json (the parameters and counts)."""
    from ouro_train.data.tokenizer import save_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = generate(seed, chains, depth, train_samples, test_per_hop)
    tokenizer_path = save_tokenizer(build_tokenizer(), out / "tokenizer.json")
    for name, samples in (("train", train), ("test", test)):
        tokens, mask = encode(samples, chains, depth)
        write_shards(out / name, f"chains_{name}", tokens, mask, tokenizer_path)
    write_records(out, test, train if jsonl else None)
    info = {
        "seed": seed,
        "chains": chains,
        "depth": depth,
        "train_samples": len(train),
        "test_samples": len(test),
        "test_per_hop": test_per_hop,
        "doc_length": doc_length(chains, depth),
        "train_tokens": len(train) * doc_length(chains, depth),
        "vocab_size": len(VOCAB),
    }
    (out / "chains.json").write_text(json.dumps(info, indent=1))
    return info


def read_test(path: str | Path) -> list[Sample]:
    """test.jsonl -> samples."""
    samples = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            words = record["text"].split()
            listed = words[: words.index(QUERY)]
            statements = tuple((listed[i], listed[i + 1]) for i in range(0, len(listed), 3))
            samples.append(Sample(record["hops"], statements, record["query"], record["answer"]))
    return samples
