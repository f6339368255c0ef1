"""Stage II (gate training: LM frozen, only the exit gate trains) vs a stage I training step.

For each objective, in a fresh subprocess (so one's allocations do not hide the other's), on a
small LoopLM on CPU with the single-process engine:
    optimizer-state bytes   every tensor AdamW holds (exp_avg, exp_avg_sq, step) after a step
    gradient bytes          every .grad after one backward (before the optimizer step clears them)
    peak RSS of a step      the process's resident-memory high-water mark over one training step
                            (reset just before it through /proc/self/clear_refs, Linux), whole
                            process; "model RSS" is the process after building model and trainer,
                            before any step (the same in both: the difference is the step's)
    step time               median of --steps steps after one warm-up step
Then the analytic figures for Ouro-1.4B (ouro_train/model/flops.py count_model): fp32 gradients
(4 bytes) and Adam moments (8 bytes) per trained parameter, under stage I and stage II.

    .venv/bin/python benchmarks/bench_gate_training.py [--hidden 256 --layers 2 --seq 256 --rows 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_objective(kind: str, args) -> dict:
    import torch

    from ouro_train.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig
    from ouro_train.config.resolve import resolve
    from ouro_train.model import LoopLM
    from ouro_train.train.trainer import Trainer

    torch.manual_seed(0)
    model_cfg = ModelConfig(
        name="bench",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 64,
        intermediate_size=args.hidden * 11 // 4,
        recurrent_steps=4,
        rope_theta=10000.0,
    )
    cfg = Config(
        model=model_cfg,
        objective=ObjectiveConfig(kind=kind),
        optim=OptimConfig(lr=1e-3),
        train=TrainConfig(steps=args.steps + 1, micro_batch_size=args.rows, seq_len=args.seq),
    )
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            tokens = torch.randint(0, args.vocab, (args.rows, args.seq + 1), generator=g)
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    model = LoopLM(model_cfg)
    trainer = Trainer(cfg, model, batches(), resolved=resolve(cfg))
    model_rss = rss_kib("VmRSS")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Gradients of one backward, read before the engine's step clears them.
    trainer._loss(next(trainer.train_batches)).loss_sum.backward()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    trainer.train_step()  # warm-up (also creates the optimizer state)
    optimizer = trainer.engine.optimizer
    state_bytes = sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )
    times, peaks = [], []
    for _ in range(args.steps):
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM (the peak RSS) to the current RSS
        started = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - started)
        peaks.append(rss_kib("VmHWM"))
    return {
        "kind": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": trained,
        "optimizer_state_bytes": state_bytes,
        "gradient_bytes": grad_bytes,
        "model_rss_mib": model_rss / 1024,
        "step_peak_rss_mib": statistics.median(peaks) / 1024,
        "step_time_s": statistics.median(times),
    }


def analytic_1p4b() -> list[dict]:
    from ouro_train.config.store import compose_config
    from ouro_train.model.flops import count_model

    cfg = compose_config(["model=ouro_1p4b"])
    total = count_model(cfg.model, 4096).total_params
    gate = cfg.model.hidden_size + 1
    return [
        {"kind": kind, "trained": n, "gradient_bytes": 4 * n, "moment_bytes": 8 * n, "parameters": total}
        for kind, n in (("stage1", total), ("gate", gate))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median), after one warm-up")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_objective(args.child, args)))
        return
    shape = (
        f"hidden {args.hidden}, {args.layers} layers x 4 recurrent steps, vocab {args.vocab}, "
        f"{args.rows} x {args.seq} tokens per step, fp32, CPU, single-process engine"
    )
    print(f"measured: {shape}")
    print(
        "objective  parameters  trained     optimizer state  gradients      model RSS  step peak RSS  "
        "step time (median)"
    )
    for kind in ("stage1", "gate"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, *sys.argv[1:]], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['kind']:<9}  {r['parameters']:>10,}  {r['trained_parameters']:>10,}  "
            f"{r['optimizer_state_bytes']:>13,} B  {r['gradient_bytes']:>11,} B  {r['model_rss_mib']:>7.1f} MiB  "
            f"{r['step_peak_rss_mib']:>9.1f} MiB  {r['step_time_s']:.3f} s",
            flush=True,
        )
    print("analytic, Ouro-1.4B (fp32 gradients, fp32 Adam moments; ZeRO divides these over data parallel):")
    for r in analytic_1p4b():
        print(
            f"{r['kind']:<9}  {r['parameters']:>13,} parameters, {r['trained']:>13,} trained: "
            f"gradients {r['gradient_bytes']:>14,} B ({r['gradient_bytes'] / 2**30:.2f} GiB), "
            f"Adam moments {r['moment_bytes']:>14,} B ({r['moment_bytes'] / 2**30:.2f} GiB)"
        )


if __name__ == "__main__":
    main()
