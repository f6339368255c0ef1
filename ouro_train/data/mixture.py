"""Deterministic interleaving of sources by weight.

Row n of the global sample sequence goes to the source with the largest deficit
w_s (n + 1) - c_s (c_s: rows it already has; ties to the first source). After any prefix of
n rows every source holds within one row of w_s n: the weights are met over every window,
with no randomness to seed and nothing to save but the counts.
"""

from __future__ import annotations

import math

from ouro_train.data.manifest import DataError


class Mixture:
    def __init__(self, names: list[str], weights: list[float]) -> None:
        if not names:
            raise DataError("the data mixture has no sources; list at least one under data.sources")
        if len(set(names)) != len(names):
            raise DataError(f"data.sources: duplicate source names in {names}")
        for name, weight in zip(names, weights):
            if not math.isfinite(weight) or weight < 0:
                raise DataError(f"data.sources: source {name!r} has weight {weight}; weights must be >= 0")
        total = sum(weights)
        if not total > 0:
            raise DataError(f"data.sources: weights {dict(zip(names, weights))} do not sum to a positive number")
        self.names = names
        self.weights = [w / total for w in weights]

    def assign(self, counts: list[int], rows: int) -> list[tuple[int, int]]:
        """The next `rows` rows as (source, that source's sample index); advances `counts`."""
        out = []
        for _ in range(rows):
            n = sum(counts) + 1
            source = max(range(len(counts)), key=lambda s: (self.weights[s] * n - counts[s], -s))
            out.append((source, counts[source]))
            counts[source] += 1
        return out
