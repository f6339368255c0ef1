"""The Mano generator (data_tools/mano.py): exact answers, held-out test set, determinism, the
shards the trainer reads, and the recipes of the three models."""

import json

import numpy as np
import pytest

from data_tools import mano
from data_tools.cli import main as ouro_data
from ouro_train.config.store import compose_config


def value_over_integers(tokens: list[str]) -> tuple[int, list[str]]:
    """An independent evaluator: recursive descent over Python integers, reduced mod 23 only at
    the end (reduction is a ring homomorphism for +, -, *). -> (value, tokens left)."""
    head, rest = tokens[0], tokens[1:]
    if head not in ("+", "-", "*"):
        return int(head), rest
    a, rest = value_over_integers(rest)
    b, rest = value_over_integers(rest)
    return {"+": a + b, "-": a - b, "*": a * b}[head], rest


@pytest.mark.parametrize("modulus", [23, 7])
def test_answers_are_exact_and_lengths_as_stated(modulus):
    train, test = mano.generate(seed=3, max_ops=7, train_samples=3000, test_per_length=20, modulus=modulus)
    for sample in train + test:
        value, rest = value_over_integers(list(sample.expression))
        assert rest == [] and sample.answer == value % modulus
        assert all(int(t) < modulus for t in sample.expression if t not in "+-*")
        assert sum(token in "+-*" for token in sample.expression) == sample.ops
        assert len(sample.expression) == 2 * sample.ops + 1
    assert {s.ops for s in train} == set(range(1, 8))
    assert [sum(s.ops == n for s in test) for n in range(1, 8)] == [20] * 7


def test_held_out_expressions_never_in_training_and_determinism():
    train, test = mano.generate(seed=0, max_ops=2, train_samples=6_000, test_per_length=100)
    held_out = {s.expression for s in test}
    assert len(held_out) == len(test)  # distinct
    # ops = 1 has only 3 x 23 x 23 expressions: ~3,000 draws would hit the 100 held-out ones often.
    assert not held_out & {s.expression for s in train}
    again = mano.generate(seed=0, max_ops=2, train_samples=6_000, test_per_length=100)
    assert again == (train, test)
    other = mano.generate(seed=1, max_ops=2, train_samples=6_000, test_per_length=100)
    assert other[1] != test


def test_encoding_fixed_vocabulary_and_answer_mask():
    tokenizer = mano.build_tokenizer()
    assert tokenizer.get_vocab_size() == len(mano.VOCAB) <= mano.MODEL_VOCAB_SIZE
    sample = mano.Sample(2, ("+", "*", "4", "7", "22"), (4 * 7 + 22) % 23)
    tokens, mask = mano.encode(tokenizer, [sample], max_ops=4)
    words = [mano.VOCAB[i] for i in tokens[0]]
    assert words == ["<bos>", "<len_2>", "+", "*", "4", "7", "22", "<ans>", "4", "<|endoftext|>", *["<pad>"] * 4]
    assert tokens.shape == (1, mano.doc_length(4)) and mask[0].tolist() == [0] * 8 + [1] + [0] * 5
    assert tokenizer.decode(tokens[0].tolist()) == "<len_2> + * 4 7 22 <ans> 4"


def test_cli_writes_shards_the_loader_reads(tmp_path, capsys):
    out = tmp_path / "mano"
    args = ["synth", "mano", "--out", str(out), "--max-ops", "4", "--train-samples", "300"]
    assert ouro_data([*args, "--test-per-length", "5", "--seed", "7", "--jsonl"]) == 0
    assert "300 training samples (4,200 tokens), 20 held-out test samples" in capsys.readouterr().out
    info = json.loads((out / "mano.json").read_text())
    assert info["doc_length"] == 14 and info["vocab_size"] == len(mano.VOCAB)
    test = mano.read_test(out / "test.jsonl")
    assert len(test) == 20 and all(s.answer == mano.evaluate(list(s.expression)) for s in test)
    assert len((out / "train.jsonl").read_text().splitlines()) == 300
    cfg = compose_config(
        ["experiment=mano_looped", f"data_root={out}", "train.seq_len=14", "train.global_batch_size=4"]
        + ["train.micro_batch_size=4"],
        "repro_mano",
    )
    from ouro_train.config.resolve import resolve
    from ouro_train.data.build import build_data

    train, evaluation = build_data(cfg, resolve(cfg))
    batch = next(train)
    # One whole sample per row: it starts with <bos>, and the loss is on its answer token only.
    assert (batch["input_ids"][:, 0] == mano.TOKEN_ID["<bos>"]).all()
    assert batch["loss_mask"].sum(1).tolist() == [1, 1, 1, 1]
    answer_at = batch["loss_mask"].int().argmax(1)
    assert (batch["input_ids"][np.arange(4), answer_at] == mano.TOKEN_ID["<ans>"]).all()
    labels = batch["labels"][np.arange(4), answer_at]
    rows = [[mano.VOCAB[i] for i in row] for row in batch["input_ids"].tolist()]
    for row, label in zip(rows, labels.tolist()):
        end = row.index("<ans>")
        assert int(mano.VOCAB[label]) == mano.evaluate(row[2:end])
    assert len(evaluation()) == cfg.train.eval_batches
    # A checkpoint of these (loss-masked, not ChatML) shards keeps the Mano tokenizer as a plain
    # one: no chat template, EOS only (it has no <|im_end|>).
    from ouro_train.checkpoint.model_tokenizer import load_model_tokenizer
    from ouro_train.checkpoint.training_tokenizer import save_checkpoint_tokenizer

    (tmp_path / "ckpt").mkdir()
    save_checkpoint_tokenizer(tmp_path / "ckpt", cfg)
    found = load_model_tokenizer(tmp_path / "ckpt")
    assert (found.eos_ids, found.chat_template) == ([mano.TOKEN_ID[mano.EOS]], None)


def test_recipes_compose_same_data_same_budget():
    cfgs = {
        e: compose_config([f"experiment={e}"], "repro_mano") for e in ("mano_flat", "mano_looped", "mano_flat_deep")
    }
    shape = {e: (c.model.num_layers, c.model.recurrent_steps) for e, c in cfgs.items()}
    k, r = shape["mano_looped"]
    assert r > 1 and shape["mano_flat"] == (k, 1) and shape["mano_flat_deep"] == (k * r, 1)
    budget = {(c.train.total_steps, c.train.global_batch_rows, c.train.seq_len, c.train.seed) for c in cfgs.values()}
    assert len(budget) == 1
    assert len({str(c.data) for c in cfgs.values()}) == 1
    assert cfgs["mano_flat"].model.vocab_size == mano.MODEL_VOCAB_SIZE
    assert len({c.run_dir for c in cfgs.values()}) == 3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_ops"):
        mano.generate(0, 40, 1, 1)
    with pytest.raises(ValueError, match="prime"):
        mano.generate(0, 3, 1, 1, modulus=9)


def test_the_gpu_recipe_is_the_cpu_one_at_gpu_size():
    """`make repro-mano DEVICE=cuda`: recipes/repro_mano_gpu.yaml keeps the comparison (same data,
    budget and parameters' ratio for the three models) and sizes it for one GPU; its sequence
    length is that of the data the driver writes for it."""
    from data_tools.repro_mano import GPU

    names = ("mano_flat", "mano_looped", "mano_flat_deep")
    cfgs = {e: compose_config([f"experiment={e}"], "repro_mano_gpu") for e in names}
    cpu = compose_config(["experiment=mano_looped"], "repro_mano")
    budget = {(c.train.total_steps, c.train.global_batch_rows, c.train.seq_len) for c in cfgs.values()}
    assert len(budget) == 1 and next(iter(budget))[2] == mano.doc_length(GPU.max_ops)
    assert {(c.train.device, c.train.precision) for c in cfgs.values()} == {("cuda", "bf16")}
    assert cfgs["mano_looped"].model.hidden_size > cpu.model.hidden_size
    assert cfgs["mano_looped"].train.total_steps * cfgs["mano_looped"].train.global_batch_rows > 10 * (
        cpu.train.total_steps * cpu.train.global_batch_rows
    )
    assert (GPU.modulus, GPU.recipe) == (23, "repro_mano_gpu")
    assert len({str(c.data) for c in cfgs.values()}) == 1
