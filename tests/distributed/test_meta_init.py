"""Start-up that builds only this rank's share (parallel/materialize.py) against the plain build.

Initial weights are a function of (model seed, parameter name, shape) only, so the consolidated
weights of a TP=2 build and of a ZeRO-3 build are compared bit for bit with a single-process
`torch.manual_seed(s); LoopLM(cfg)`, and so are those of an `init_from` build with the file. Two
training steps after each build check that DeepSpeed takes the already-built (sharded or
partitioned) model, with activation checkpointing and freeze_for_objective applied; their losses
match the single process within test_parallel.py's tolerance (float summation order only). The
losses are what caught weight decay grouped by the shape of ZeRO-3's empty partitions (optim/optimizer.py).
"""

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from tiny_models import TRAINABLE, randomized, tiny_config

from ouro_train.checkpoint.errors import CheckpointError
from ouro_train.checkpoint.weights import WEIGHTS, SafetensorsWeights, full_state_dict, save_weights
from ouro_train.config import Config, ObjectiveConfig, OptimConfig, ParallelConfig, TrainConfig
from ouro_train.config.resolve import resolve
from ouro_train.model import LoopLM
from ouro_train.model.init import initial_value, parameter_seed
from ouro_train.parallel import build_model, destroy_parallel, init_parallel, parallelize
from ouro_train.parallel.materialize import InitialWeights
from ouro_train.parallel.testing import run_distributed
from ouro_train.train.trainer import Trainer

VOCAB, SEQ, ROWS, SEED = 64, 16, 4, 3


def make_config(tp: int = 1, zero: int = 0, checkpointing: str = "none", objective: str = "stage1") -> Config:
    world = int(os.environ.get("WORLD_SIZE", 1))
    return Config(
        model=tiny_config(**TRAINABLE, vocab_size=VOCAB),
        optim=OptimConfig(lr=1e-2, grad_clip=1.0),
        objective=ObjectiveConfig(kind=objective),
        train=TrainConfig(steps=2, micro_batch_size=ROWS * tp // world, seq_len=SEQ, seed=SEED),
        parallel=ParallelConfig(tensor_parallel=tp, zero_stage=zero, activation_checkpointing=checkpointing),
    )


def batch(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(ROWS, SEQ, dtype=torch.bool)}


def single_process(objective: str = "stage1", init_from: Path | None = None) -> tuple[dict, list[float]]:
    """The reference: the plain build (and load), its weights and 2 training losses."""
    cfg = make_config(objective=objective)
    torch.manual_seed(SEED)
    model = LoopLM(cfg.model)
    if init_from is not None:
        from ouro_train.checkpoint.weights import load_into, read_weights

        load_into(model, read_weights(init_from)[0], init_from)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(cfg, model, (batch(s) for s in range(2)), resolved=resolve(cfg))
    return weights, [trainer.train_step()["loss"] for _ in range(2)]


def held_elements(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions, its TP shards, replicated ones."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def start_up(tp: int, builds: list[tuple[int, str, str, str | None]]) -> dict:
    """For each (ZeRO stage, checkpointing, objective, init_from): build_model + parallelize as
    run_stage does; -> rank 0's consolidated weights before training, the elements this rank held,
    which parameters train, and 2 training losses. One process group for all builds."""
    out = {}
    try:
        for zero, checkpointing, objective, init_from in builds:
            cfg = make_config(tp, zero, checkpointing, objective)
            layout = init_parallel(cfg.parallel, cfg.model, "cpu")
            init = Path(init_from) if init_from else None
            model, weights = build_model(cfg, layout, resolve(cfg, layout.dp), init)
            meta = all(p.is_meta for p in model.parameters())
            from ouro_train.train.trainer import freeze_for_objective

            freeze_for_objective(model, cfg.objective.kind)
            engine = parallelize(model, cfg, layout, resolve(cfg, layout.dp), weights)
            held = held_elements(model)
            state = full_state_dict(model)  # rank 0: replicated parameters alias the model's: copy
            state = {k: v.clone() for k, v in state.items()} if state is not None else None
            trains = sorted(name for name, p in model.named_parameters() if p.requires_grad)
            rows = ROWS // layout.dp
            batches = (
                {k: v[layout.dp_rank * rows : (layout.dp_rank + 1) * rows] for k, v in batch(s).items()}
                for s in range(2)
            )
            trainer = Trainer(
                cfg, model, batches, engine=engine, resolved=resolve(cfg, engine.dp_size if engine is not None else 1)
            )
            losses = [trainer.train_step()["loss"] for _ in range(2)]
            out[f"zero{zero}-{checkpointing}-{objective}-{'init_from' if init else 'seed'}"] = {
                "meta": meta,
                "held": held,
                "weights": state,
                "trains": trains,
                "losses": losses,
            }
        return out
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def source_weights(tmp_path_factory) -> Path:
    """A previous stage's consolidated weights: norms and gate bias not 1 / 0, so they are really read."""
    cfg = make_config().model
    path = tmp_path_factory.mktemp("stage") / WEIGHTS
    save_weights(randomized(cfg, seed=11).state_dict(), path, cfg)
    return path


def check_builds(results: list[dict], reference: dict, label: str) -> None:
    full = sum(v.numel() for v in LoopLM(make_config().model).parameters())
    for rank, by_build in enumerate(results):
        for build, got in by_build.items():
            kind = build.split("-")[-2] + "-" + build.split("-")[-1]
            weights, losses = reference[kind]
            # Never the full model on a rank: about half of it (replicated norms and gate, ZeRO padding).
            assert got["held"] < 0.6 * full, f"{label} {build} rank {rank}: holds {got['held']} of {full}"
            assert got["losses"] == pytest.approx(losses, rel=5e-5), f"{label} {build} rank {rank}"
            expected_trains = sorted(n for n in weights if kind.startswith("stage1") or "early_exit_gate" in n)
            assert got["trains"] == expected_trains, f"{label} {build}"
            if rank == 0:
                assert got["weights"].keys() == weights.keys()
                for name, value in weights.items():
                    assert torch.equal(got["weights"][name], value), f"{label} {build}: {name} differs"


@pytest.fixture(scope="module")
def references(source_weights) -> dict:
    return {
        "stage1-seed": single_process(),
        "stage1-init_from": single_process(init_from=source_weights),
        "gate-seed": single_process("gate"),
        "gate-init_from": single_process("gate", init_from=source_weights),
    }


@pytest.mark.slow
def test_tensor_parallel_builds_on_meta_and_equals_the_single_process_build(references, source_weights):
    builds = [(1, "none", "stage1", None), (3, "step", "gate", str(source_weights))]
    results = run_distributed(start_up, 2, 2, builds)
    assert all(build["meta"] for by_build in results for build in by_build.values())
    check_builds(results, references, "tp2")


@pytest.mark.slow
def test_zero3_builds_partitioned_and_equals_the_single_process_build(references, source_weights):
    builds = [
        (3, "step", "stage1", None),
        (3, "layer", "gate", str(source_weights)),
        (3, "none", "stage1", str(source_weights)),
    ]
    results = run_distributed(start_up, 2, 1, builds)
    check_builds(results, references, "zero3")


def test_initial_values_depend_on_seed_name_and_shape_only():
    cfg = tiny_config()
    plain = LoopLM(cfg, seed=5).state_dict()
    torch.manual_seed(123)  # another global stream, another construction order, the meta device
    torch.randn(10)
    with torch.device("meta"):
        meta = LoopLM(cfg, seed=5)
    source = InitialWeights(meta)
    for name in reversed(list(plain)):
        assert torch.equal(source.get(name), plain[name]), name
    # A shard is the slice of the full value, whichever rank asks first.
    weight = "model.layers.1.mlp.down_proj.weight"
    halves = [source.get(weight, dim=1, rank=r, parts=2) for r in (1, 0)]
    assert torch.equal(torch.cat(halves[::-1], dim=1), plain[weight])
    # The distributions are the reference's.
    assert torch.equal(plain["model.early_exit_gate.bias"], torch.zeros(1))
    assert torch.equal(plain["model.layers.0.input_layernorm.weight"], torch.ones(cfg.hidden_size))
    embedding = initial_value("model.embed_tokens.weight", (4096, 64), ("normal", 0.02), 5)
    assert embedding.mean().abs() < 1e-3 and embedding.std().item() == pytest.approx(0.02, rel=0.02)
    # A stable hash, not Python's salted one, and torch's CPU generator: these numbers fix every
    # seed's weights; if a change (ours or torch's) moves them, a seed no longer gives its weights.
    assert parameter_seed(0, "lm_head.weight") == 204870285910561070
    pinned = initial_value("lm_head.weight", (20,), ("normal", 1.0), 0)[:3]
    torch.testing.assert_close(pinned, torch.tensor([1.5101603269577026, -0.08456794172525406, 0.9325374364852905]))


def test_embedding_std_and_branch_norm_init_options():
    """`embed_init_std` and `branch_norm_init` (recipes/model/mano.yaml) reach the plain build and the
    sharded one alike; only the embedding and the two branch-closing norms of each layer change."""
    cfg = dataclasses.replace(tiny_config(), embed_init_std=1.0, branch_norm_init=0.1)
    plain = LoopLM(cfg, seed=5).state_dict()
    reference = LoopLM(tiny_config(), seed=5).state_dict()
    with torch.device("meta"):
        source = InitialWeights(LoopLM(cfg, seed=5))
    changed = set()
    for name, value in plain.items():
        assert torch.equal(source.get(name), value), name
        if not torch.equal(value, reference[name]):
            changed.add(name)
    branch_norms = {
        f"model.layers.{i}.{n}_2.weight"
        for i in range(cfg.num_layers)
        for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert changed == branch_norms | {"model.embed_tokens.weight"}
    for name in branch_norms:
        assert torch.equal(plain[name], torch.full((cfg.hidden_size,), 0.1)), name
    assert plain["model.embed_tokens.weight"].std().item() == pytest.approx(1.0, rel=0.05)
    # The same draw, scaled: the seed still fixes the embedding.
    torch.testing.assert_close(
        plain["model.embed_tokens.weight"] * cfg.init_std, reference["model.embed_tokens.weight"]
    )
    with pytest.raises(ValueError, match="model.branch_norm_init"):
        dataclasses.replace(cfg, branch_norm_init=0.0)


def test_the_global_seed_still_chooses_the_weights():
    cfg = tiny_config()
    torch.manual_seed(0)
    a = LoopLM(cfg)
    after_plain = torch.get_rng_state()
    torch.manual_seed(0)
    with torch.device("meta"):
        b = LoopLM(cfg)
    assert a.init_seed == b.init_seed and torch.equal(torch.get_rng_state(), after_plain)  # one draw, any device
    torch.manual_seed(0)
    again = LoopLM(cfg)
    torch.manual_seed(1)
    other = LoopLM(cfg)
    assert torch.equal(again.lm_head.weight, a.lm_head.weight)
    assert not torch.equal(other.lm_head.weight, a.lm_head.weight)


def test_lazy_init_from_names_every_mismatch(tmp_path):
    cfg = tiny_config()
    state = LoopLM(cfg, seed=1).state_dict()
    state.pop("model.norm.weight")
    state["model.extra.weight"] = torch.zeros(2)
    state["lm_head.weight"] = torch.zeros(3, 3)
    save_weights(state, tmp_path / WEIGHTS, cfg)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LoopLM(cfg).state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        SafetensorsWeights(tmp_path, expected)
    message = str(error.value)
    assert "missing ['model.norm.weight']" in message and "unexpected ['model.extra.weight']" in message
    assert "shape lm_head.weight: (3, 3) vs model (64, 32)" in message
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        SafetensorsWeights(tmp_path / "bad.safetensors", expected)


def test_exit_gate_bias_init_option():
    """`exit_gate_bias_init` (recipes/model/demo.yaml) sets the exit gate's bias, in the plain and the
    sharded build alike, and nothing else: p(t) at init then puts most weight on the last step."""
    from ouro_train.model.objective import exit_log_distribution

    cfg = dataclasses.replace(tiny_config(), exit_gate_bias_init=-2.0)
    plain = LoopLM(cfg, seed=5).state_dict()
    reference = LoopLM(tiny_config(), seed=5).state_dict()
    with torch.device("meta"):
        source = InitialWeights(LoopLM(cfg, seed=5))
    changed = {name for name, value in plain.items() if not torch.equal(value, reference[name])}
    assert changed == {"model.early_exit_gate.bias"}
    assert torch.equal(plain["model.early_exit_gate.bias"], torch.tensor([-2.0]))
    assert torch.equal(source.get("model.early_exit_gate.bias"), torch.tensor([-2.0]))
    # The gate's input at init is a norm's output times weights of std 0.02: the bias decides p(t).
    steps = cfg.recurrent_steps
    p = exit_log_distribution(torch.full((steps, 1), -2.0)).exp().squeeze(1)
    assert p[-1] > 0.5 and p[0] < 0.15
    p_reference = exit_log_distribution(torch.zeros(steps, 1)).exp().squeeze(1)
    assert p_reference[0] == 0.5 and p_reference[-1] == 0.5 ** (steps - 1)
