"""Global batches from a mixture of sharded sources: deterministic, resumable, world-size free.

Global batch g is a list of `global_batch_size` rows; row r is (source s, sample j of s),
decided by the mixture from the counts of samples each source has given so far. Data-parallel
rank k of K takes rows [k L, (k+1) L) with L = global_batch_size / K, split into micro-batches.
Nothing in a row depends on K, so a run resumed on another number of ranks sees the same
global batches. The position is `LoaderState`: the next global batch and samples per source.

Rows become training tensors by `collate_windows`: inputs and shifted labels, document ids
(attention stays inside a document), per-document positions, SFT loss masks, and no label
across a document boundary (an EOS does not predict the next, unrelated document).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ouro_train.data.manifest import DataError
from ouro_train.data.mixture import Mixture
from ouro_train.data.source import TokenSource, Window
from ouro_train.kernels.linear_cross_entropy import IGNORE_INDEX


@dataclass
class LoaderState:
    next_batch: int = 0
    samples: dict[str, int] = field(default_factory=dict)  # consumed samples per source
    # Where each source's stream starts, in tokens: non-zero when a stage continues the data
    # position of the previous stage (checkpoint.init_data_position), whatever its seq_len was.
    token_offsets: dict[str, int] = field(default_factory=dict)


def collate_windows(windows: list[Window], document_masking: bool = True, document_positions: bool = True) -> dict:
    tokens = np.stack([w.tokens for w in windows])  # (B, S+1)
    docs = np.stack([w.doc_index for w in windows])
    batch = {
        "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
        "labels": torch.from_numpy(tokens[:, 1:].copy()),
    }
    if document_masking:
        batch["doc_ids"] = torch.from_numpy(docs[:, :-1].copy())
        crosses = docs[:, 1:] != docs[:, :-1]
        batch["labels"][torch.from_numpy(crosses)] = IGNORE_INDEX
    if document_positions:
        batch["position_ids"] = torch.from_numpy(np.stack([w.position[:-1] for w in windows]))
    if windows[0].mask is not None:
        # The mask of the token being predicted: loss only where the label is an assistant token.
        batch["loss_mask"] = torch.from_numpy(np.stack([w.mask[1:] for w in windows]).astype(np.bool_))
    return batch


class GlobalBatchPlan:
    """Which (source, sample) each row of each global batch holds, and this rank's share."""

    def __init__(
        self, mixture: Mixture, global_batch_size: int, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"data-parallel rank {dp_rank} of {dp_size} is invalid")
        if global_batch_size % (dp_size * micro_batch_size):
            raise DataError(
                f"global batch of {global_batch_size} sequences does not split into {dp_size} data-parallel ranks x "
                f"micro-batches of {micro_batch_size}; choose a global batch divisible by {dp_size * micro_batch_size}"
            )
        self.mixture = mixture
        self.global_batch_size = global_batch_size
        self.rows_per_rank = global_batch_size // dp_size
        self.first_row = dp_rank * self.rows_per_rank
        self.micro_batch_size = micro_batch_size

    def rows(self, counts: list[int]) -> list[tuple[int, int]]:
        """This rank's rows of the next global batch; advances `counts` by the whole batch."""
        rows = self.mixture.assign(counts, self.global_batch_size)
        return rows[self.first_row : self.first_row + self.rows_per_rank]


class _RankBatches(IterableDataset):
    """Yields, for each global batch from `state.next_batch`, this rank's micro-batches.
    With W workers, worker w builds batches g = w, w + W, ... and DataLoader interleaves them
    back in order; every worker replays the (cheap) mixture arithmetic for all batches."""

    def __init__(
        self,
        sources: list[TokenSource],
        plan: GlobalBatchPlan,
        state: LoaderState,
        document_masking: bool,
        document_positions: bool,
    ) -> None:
        self.sources = sources
        self.plan = plan
        self.state = state
        self.document_masking = document_masking
        self.document_positions = document_positions

    def __iter__(self) -> Iterator[list[dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        counts = [self.state.samples.get(s.name, 0) for s in self.sources]
        batch = self.state.next_batch
        while True:
            rows = self.plan.rows(counts)
            if batch % workers == worker:
                offsets = [self.state.token_offsets.get(source.name, 0) for source in self.sources]
                windows = [self.sources[s].window(j, offsets[s]) for s, j in rows]
                micro = self.plan.micro_batch_size
                yield [
                    collate_windows(windows[i : i + micro], self.document_masking, self.document_positions)
                    for i in range(0, len(windows), micro)
                ]
            batch += 1


class ShardedLoader:
    """Iterator of micro-batches for one data-parallel rank, with a resumable position."""

    def __init__(
        self,
        sources: list[TokenSource],
        weights: list[float],
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        document_masking: bool = True,
        document_positions: bool = True,
        state: LoaderState | None = None,
    ) -> None:
        self.sources = sources
        self.mixture = Mixture([s.name for s in sources], weights)
        self.plan = GlobalBatchPlan(self.mixture, global_batch_size, dp_rank, dp_size, micro_batch_size)
        self.num_workers = num_workers
        self.document_masking = document_masking
        self.document_positions = document_positions
        self.state = state or LoaderState(samples={s.name: 0 for s in sources})
        self._micro: Iterator[dict] | None = None
        self._pending: list[dict] = []

    def _batches(self) -> Iterator[list[dict]]:
        dataset = _RankBatches(self.sources, self.plan, self.state, self.document_masking, self.document_positions)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=False,
                prefetch_factor=4,
            )
        )

    def __iter__(self) -> ShardedLoader:
        return self

    def __next__(self) -> dict:
        if self._micro is None:
            self._micro = self._batches()
        if not self._pending:
            self._pending = list(next(self._micro))
        batch = self._pending.pop(0)
        if not self._pending:
            # The global batch is fully handed out: advance the position past all of it.
            counts = [self.state.samples[s.name] for s in self.sources]
            self.mixture.assign(counts, self.plan.global_batch_size)
            samples = {s.name: c for s, c in zip(self.sources, counts, strict=True)}
            self.state = LoaderState(self.state.next_batch + 1, samples, self.state.token_offsets)
        return batch

    def state_dict(self) -> dict:
        if self._pending:
            raise RuntimeError("loader state asked for in the middle of a global batch; save at step boundaries")
        return {
            "next_batch": self.state.next_batch,
            "samples": dict(self.state.samples),
            "token_offsets": dict(self.state.token_offsets),
            "seq_len": self.sources[0].seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        if set(self.state.samples) != set(state["samples"]):
            raise DataError(
                f"saved loader position is for sources {sorted(state['samples'])}, this mixture has "
                f"{sorted(self.state.samples)}; a stage that changes its mixture must reset the data position"
            )
        samples = {s.name: int(state["samples"][s.name]) for s in self.sources}
        self.state = LoaderState(state["next_batch"], samples, dict(state.get("token_offsets", {})))
        self._micro, self._pending = None, []

    def continue_from(self, state: dict) -> dict[str, int]:
        """Start where a previous stage's loader stopped: each source this mixture shares with it
        continues after the tokens that stage consumed (at its own seq_len); new sources start at 0.
        The mixture's own counts start at zero. -> the token offset per source."""
        seq_len = int(state.get("seq_len", self.sources[0].seq_len))
        previous = state.get("token_offsets", {})
        offsets = {
            s.name: int(previous.get(s.name, 0)) + int(state["samples"].get(s.name, 0)) * seq_len
            for s in self.sources
            if s.name in state["samples"]
        }
        self.state = LoaderState(0, {s.name: 0 for s in self.sources}, offsets)
        self._micro, self._pending = None, []
        return offsets

    def report(self) -> dict[str, dict]:
        """Tokens seen per source (input tokens of consumed samples) and epochs."""
        return {
            s.name: {
                "samples": self.state.samples[s.name],
                "tokens": self.state.samples[s.name] * s.seq_len,
                "epochs": s.epochs_seen(self.state.samples[s.name]),
            }
            for s in self.sources
        }
