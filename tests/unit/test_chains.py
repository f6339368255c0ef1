"""The variable-chains generator (data_tools/chains.py): exact answers by an independent
resolver, hop counts as stated, a held-out test set, determinism, the shards the trainer reads,
and the recipes of the three models of `make repro-depth`."""

import json

import numpy as np
import pytest

from data_tools import chains
from data_tools.cli import main as ouro_data
from ouro_train.config.store import compose_config


def resolve_by_rewriting(text: str) -> tuple[str, int]:
    """An independent resolver: substitute right sides into the query until a digit remains,
    counting the substitutions (no dict of the statements, no reuse of chains.resolve_chain)."""
    words = text.split()
    query = words[words.index("?") + 1]
    triples = [words[i : i + 3] for i in range(0, words.index("?"), 3)]
    assert all(t[2] == ";" for t in triples)
    count = 0
    while not query.isdigit():
        (right,) = [t[1] for t in triples if t[0] == query]  # exactly one statement binds it
        query, count = right, count + 1
    return query, count


@pytest.mark.parametrize("shape", [(3, 2), (2, 5), (4, 3)])
def test_answers_are_exact_and_hops_as_stated(shape):
    n_chains, depth = shape
    train, test = chains.generate(seed=3, chains=n_chains, depth=depth, train_samples=2000, test_per_hop=30)
    for sample in train + test:
        answer, hops = resolve_by_rewriting(sample.text)
        assert (answer, hops) == (sample.answer, sample.hops)
        assert chains.resolve_chain(sample.statements, sample.query) == (answer, hops)
        # Every chain is rooted at its own digit; every variable is bound once.
        lefts = [left for left, _ in sample.statements]
        roots = [right for _, right in sample.statements if right.isdigit()]
        assert len(set(lefts)) == len(lefts) == n_chains * depth and len(set(roots)) == len(roots) == n_chains
    assert sorted({s.hops for s in train}) == list(range(1, depth + 1))
    assert [sum(s.hops == h for s in test) for h in range(1, depth + 1)] == [30] * depth
    assert not {s.text for s in test} & {s.text for s in train}
    assert len({s.text for s in test}) == len(test)


def test_deterministic_in_the_seed():
    first = chains.generate(seed=5, chains=3, depth=2, train_samples=50, test_per_hop=5)
    again = chains.generate(seed=5, chains=3, depth=2, train_samples=50, test_per_hop=5)
    other = chains.generate(seed=6, chains=3, depth=2, train_samples=50, test_per_hop=5)
    assert first == again and first != other


def test_statement_order_does_not_give_the_answer_away():
    # The chains' statements are shuffled: the queried variable's statement is not always last
    # nor always next to its chain's root.
    train, _ = chains.generate(seed=0, chains=3, depth=3, train_samples=600, test_per_hop=1)
    last_binds_query = np.mean([s.statements[-1][0] == s.query for s in train])
    assert 0.05 < last_binds_query < 0.25


def test_cli_writes_shards_the_loader_reads(tmp_path, capsys):
    out = tmp_path / "chains"
    args = ["synth", "chains", "--out", str(out), "--chains", "3", "--depth", "2", "--train-samples", "300"]
    assert ouro_data([*args, "--test-per-hop", "5", "--seed", "7", "--jsonl"]) == 0
    assert "300 training samples (6,900 tokens), 10 held-out test samples" in capsys.readouterr().out
    info = json.loads((out / "chains.json").read_text())
    assert info["doc_length"] == 23 and info["vocab_size"] == len(chains.VOCAB) <= chains.MODEL_VOCAB_SIZE
    test = chains.read_test(out / "test.jsonl")
    assert len(test) == 10 and all(chains.resolve_chain(s.statements, s.query) == (s.answer, s.hops) for s in test)
    assert len((out / "train.jsonl").read_text().splitlines()) == 300
    cfg = compose_config(
        ["experiment=depth_looped", f"data_root={out}", "train.global_batch_size=4", "train.micro_batch_size=4"],
        "repro_depth",
    )
    from ouro_train.config.resolve import resolve
    from ouro_train.data.build import build_data

    train, evaluation = build_data(cfg, resolve(cfg))
    batch = next(train)
    # One whole sample per row: it starts with <bos>, and the loss is on its answer token only.
    assert (batch["input_ids"][:, 0] == chains.TOKEN_ID["<bos>"]).all()
    assert batch["loss_mask"].sum(1).tolist() == [1, 1, 1, 1]
    answer_at = batch["loss_mask"].int().argmax(1)
    for row, at, label in zip(batch["input_ids"].tolist(), answer_at.tolist(), batch["labels"].tolist()):
        words = [chains.VOCAB[i] for i in row]
        assert words[at - 1] == "?"
        assert chains.VOCAB[label[at]] == resolve_by_rewriting(" ".join(words[1 : at + 1]) + " x")[0]
    assert len(evaluation()) == cfg.train.eval_batches


def test_recipes_compose_same_data_same_budget():
    names = ("depth_flat", "depth_looped", "depth_flat_deep")
    cfgs = {e: compose_config([f"experiment={e}"], "repro_depth") for e in names}
    shape = {e: (c.model.num_layers, c.model.recurrent_steps) for e, c in cfgs.items()}
    k, r = shape["depth_looped"]
    assert r > 1 and shape["depth_flat"] == (k, 1) and shape["depth_flat_deep"] == (k * r, 1)
    budget = {(c.train.total_steps, c.train.global_batch_rows, c.train.seq_len, c.train.seed) for c in cfgs.values()}
    assert len(budget) == 1
    assert next(iter(budget))[2] == chains.doc_length(3, 2)  # the recipe's seq_len is the default data's
    assert len({str(c.data) for c in cfgs.values()}) == 1
    assert cfgs["depth_flat"].model.vocab_size == chains.MODEL_VOCAB_SIZE
    assert len({c.run_dir for c in cfgs.values()}) == 3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="chains"):
        chains.generate(0, 1, 3, 1, 1)
    with pytest.raises(ValueError, match="distinct letters"):
        chains.generate(0, 5, 6, 1, 1)
