"""Build the trainer's data from `cfg.data`: the demo corpus or a mixture of shard sources."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ouro_train.config.resolve import Resolved
from ouro_train.config.schema import Config, SourceConfig
from ouro_train.data.loader import ShardedLoader
from ouro_train.data.manifest import DataError
from ouro_train.data.source import TokenSource


def _sources(cfg: Config, specs: list[SourceConfig], seed: int) -> list[TokenSource]:
    return [
        TokenSource(
            s.name, s.path, cfg.train.seq_len, seed, cfg.model.vocab_size, verify_checksums=cfg.data.verify_checksums
        )
        for s in specs
    ]


def check_same_tokenizer(sources: list[TokenSource]) -> None:
    """Token ids only mean something under one tokenizer: a mixture must not mix tokenizers."""
    first = sources[0]
    for other in sources[1:]:
        if other.manifest.tokenizer.sha256 != first.manifest.tokenizer.sha256:
            raise DataError(
                f"source {other.name!r} ({other.directory}) was tokenized with {other.manifest.tokenizer.name!r} "
                f"(sha256 {other.manifest.tokenizer.sha256[:12]}…), source {first.name!r} with "
                f"{first.manifest.tokenizer.name!r} (sha256 {first.manifest.tokenizer.sha256[:12]}…); "
                "re-tokenize them with one tokenizer"
            )


def build_data(
    cfg: Config, resolved: Resolved, dp_rank: int = 0
) -> tuple[Iterator[dict], Callable[[], Iterable[dict]] | None]:
    """-> (training micro-batches for this rank, evaluation batches or None); `resolved`: what start-up
    derived (config/resolve.py), at the launch's data-parallel size."""
    dp_size = resolved.dp_size
    if cfg.data.source == "demo":
        from ouro_train.data.demo import build_demo_data

        train, evaluation, _ = build_demo_data(cfg, resolved, dp_rank)
        return train, lambda: evaluation
    data, train_cfg = cfg.data, cfg.train
    common = dict(
        micro_batch_size=train_cfg.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        document_masking=data.document_masking,
        document_positions=data.document_positions,
    )
    train_sources = _sources(cfg, data.sources, train_cfg.seed)
    check_same_tokenizer(train_sources)
    train = ShardedLoader(
        train_sources,
        [s.weight for s in data.sources],
        global_batch_size=resolved.global_batch_rows,
        num_workers=data.num_workers,
        **common,
    )
    if not data.eval_sources:
        return train, None
    eval_sources = _sources(cfg, data.eval_sources, train_cfg.seed)
    check_same_tokenizer(train_sources + eval_sources)
    eval_weights = [s.weight for s in data.eval_sources]

    def evaluation() -> Iterable[dict]:
        # The same fixed batches every time: a fresh loader from position 0.
        loader = ShardedLoader(
            eval_sources, eval_weights, global_batch_size=train_cfg.micro_batch_size * dp_size, **common
        )
        return [next(loader) for _ in range(train_cfg.eval_batches)]

    return train, evaluation
