"""The stages the runner runs in its own process rather than as a child: `run_upcycle` grows the
input checkpoint (N -> 2N layers, committed by one rename: ouro_train/checkpoint/upcycle.py) and
`run_eval` runs ouro-eval's evaluation of the input checkpoint on held-out shards, writing
eval.json last (ouro_train/inference/eval_report.py), which marks the stage finished.
"""

from __future__ import annotations

from pathlib import Path

from ouro_train.pipeline.plan import PlannedStage


def run_upcycle(stage: PlannedStage) -> None:
    from ouro_train.checkpoint.upcycle import upcycle_config, write_upcycled
    from ouro_train.checkpoint.weights import read_weights
    from ouro_train.config.schema import ModelConfig

    state, raw = read_weights(stage.input)
    source = ModelConfig(**raw)
    target = upcycle_config(source, stage.spec.order, stage.recurrent_steps)
    write_upcycled(stage.input, stage.output, state, source, target, stage.spec.order, stage.spec.optimizer)
    print(
        f"[pipeline] {stage.spec.name}: {source.num_layers} layers x {source.recurrent_steps} -> "
        f"{target.num_layers} x {target.recurrent_steps} ({stage.spec.order}, moments {stage.spec.optimizer}) "
        f"in {stage.output}",
        flush=True,
    )


def run_eval(stage: PlannedStage) -> None:
    from ouro_train.inference.documents import shard_documents
    from ouro_train.inference.eval_report import write_outputs
    from ouro_train.inference.evaluate import evaluate
    from ouro_train.inference.loading import load_model

    spec = stage.spec
    print(f"[pipeline] {spec.name}: evaluating {stage.input} on {spec.data}", flush=True)
    model = load_model(stage.input)
    docs = shard_documents(Path(spec.data), spec.documents, spec.max_tokens, model.config.vocab_size)
    result = evaluate(model, docs, tuple(spec.q), tuple(spec.kv_policies))
    result["source"] = {"model": str(stage.input), "data": spec.data}
    write_outputs(result, stage.directory, f"Exit evaluation ({spec.name}) of {stage.input}")
    print(f"[pipeline] {spec.name}: {stage.directory / 'eval.md'}", flush=True)
