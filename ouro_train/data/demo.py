"""Batches from the embedded demo corpus (the Python docs in `pydoc_data`), all in memory.

This feeds the foundation's trainer and demo; the sharded, packed, resumable pipeline of
`ouro_train.data` (webdataset) replaces it for real corpora. Documents are joined into one
token stream separated by EOS; a training batch is `batch_size` random windows whose
positions are a pure function of (seed, batch index), so the stream's position is one number.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ouro_train.config.resolve import Resolved
from ouro_train.config.schema import Config, ConfigError
from ouro_train.data.demo_corpus import demo_documents, split_documents
from ouro_train.data.tokenizer import encode_documents, load_or_train_demo_tokenizer


class RandomWindowBatches(Iterator[dict[str, torch.Tensor]]):
    """Optimizer step i draws one global batch of B x accum x dp_size windows; this rank takes its
    contiguous B x accum rows, as `accum` micro-batches of B. The rows of a step therefore do not
    depend on how they are split over ranks and accumulation (the elastic-resume invariant)."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        grad_accum_steps: int = 1,
    ) -> None:
        if len(tokens) < seq_len + 2:
            raise ValueError(f"token stream of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.index = start
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grad_accum_steps = grad_accum_steps
        self._pending: list[np.ndarray] = []  # micro-batches left of the current global batch

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            rng = np.random.default_rng([self.seed, self.index])
            rows = self.batch_size * self.grad_accum_steps
            starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=rows * self.dp_size)
            starts = starts[self.dp_rank * rows : (self.dp_rank + 1) * rows]
            self._pending = [starts[i : i + self.batch_size] for i in range(0, rows, self.batch_size)]
            self.index += 1
        starts = self._pending.pop(0)
        windows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts])  # (B, S+1)
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}

    def state_dict(self) -> dict:
        """The next global batch; saved at optimizer-step boundaries, where nothing is pending."""
        return {"index": self.index}

    def continue_from(self, state: dict) -> dict[str, int]:
        """Continue a previous stage's stream of random windows (its next global batch)."""
        self.index = int(state["index"])
        self._pending = []
        return {"demo": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])
        self._pending = []


def contiguous_windows(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int) -> list[dict]:
    """Fixed evaluation batches: consecutive non-overlapping windows from the start of the stream."""
    stream = torch.from_numpy(tokens.astype(np.int64))
    count = min(batch_size * num_batches, (len(stream) - 1) // seq_len)
    if count == 0:
        raise ValueError(f"validation stream of {len(stream)} tokens is shorter than one window of {seq_len + 1}")
    windows = torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)])
    return [
        {"input_ids": chunk[:, :-1].contiguous(), "labels": chunk[:, 1:].contiguous()}
        for chunk in windows.split(batch_size)
    ]


def build_demo_data(cfg: Config, resolved: Resolved, dp_rank: int = 0) -> tuple[RandomWindowBatches, list[dict], int]:
    """-> (this rank's training batches, its evaluation batches, tokenizer vocabulary size);
    `resolved`: what start-up derived (config/resolve.py), at the launch's data-parallel size."""
    dp_size = resolved.dp_size
    tokenizer = load_or_train_demo_tokenizer(cfg.data.tokenizer_vocab_size, cache_dir=cfg.data.cache_dir)
    vocab = tokenizer.get_vocab_size()
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"config key 'model.vocab_size': the demo tokenizer has {vocab} ids but the model only "
            f"{cfg.model.vocab_size}; raise model.vocab_size or lower data.tokenizer_vocab_size"
        )
    train_docs, val_docs = split_documents(demo_documents(), val_fraction=cfg.data.val_fraction)
    join = lambda docs: np.concatenate(encode_documents(tokenizer, docs, append_eos=True))  # noqa: E731
    train_tokens, val_tokens = join(train_docs), join(val_docs)
    fraction = cfg.data.val_fraction
    for split, tokens, share in (("training", train_tokens, 1 - fraction), ("validation", val_tokens, fraction)):
        if len(tokens) <= cfg.train.seq_len:
            raise ConfigError(
                f"config key 'train.seq_len': the embedded demo corpus's {split} split ({share:.0%} of its "
                f"documents, data.val_fraction={fraction:g}) has {len(tokens)} tokens, fewer than one window of "
                f"{cfg.train.seq_len + 1}; lower train.seq_len, change data.val_fraction, or train on shards "
                f"(data.source=shards)"
            )
    micro = cfg.train.micro_batch_size
    train = RandomWindowBatches(
        train_tokens,
        cfg.train.seq_len,
        micro,
        cfg.train.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        grad_accum_steps=resolved.grad_accum_steps,
    )
    evaluation = contiguous_windows(val_tokens, cfg.train.seq_len, micro * dp_size, cfg.train.eval_batches)
    rows = slice(dp_rank * micro, (dp_rank + 1) * micro)
    evaluation = [{k: v[rows] for k, v in batch.items()} for batch in evaluation]
    return train, [batch for batch in evaluation if len(batch["input_ids"])], vocab
