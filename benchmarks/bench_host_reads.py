"""What the training step's host reads cost: counted, and A/B in one process.

A training step reads the device back on the host once (train/trainer.py: the guard's verdict needs
the step's loss and ||w|| before the optimizer applies the update; the loss-token count, the
metrics and the gradient norm travel in the same read). Before, it also read the device as the step
began (the loss-token count), before the optimizer step (the gradient norm) and after it (the
metrics, the ranks' stop/save agreement). On a GPU each read waits for everything queued: the GPU
idles while the host then prepares the next launches.

  1. the host reads of one step, by caller (ouro_train/utils/host_reads.py), on any device;
  2. on CUDA, the synchronisations of one step (torch.cuda.set_sync_debug_mode);
  3. A: the step as shipped; B: the same trainer with a device synchronisation at each place the
     old step read the device (after fetching the batch, before and after the optimizer step), and
     its objective over the loss tokens selected with `nonzero` (an all-true loss mask: the old
     objective's path, a sync per micro-batch, where A's takes every position, masked).
     Blocks of --block steps alternate A, B, A, B...; each block is timed from one synchronisation
     to the next, so the steps inside it run as they would in training. Medians printed.

    .venv/bin/python benchmarks/bench_host_reads.py [--hidden 256 --layers 4 --seq 256 --rows 4 --steps 12]
"""

from __future__ import annotations

import collections
import statistics
import time

import step_ab
import torch

from ouro_train.train.trainer import Trainer
from ouro_train.utils.host_reads import counting_host_reads, cuda_synchronisations


def synchronising(trainer: Trainer, device: torch.device):
    """Variant B's hooks: (on, off) functions adding a synchronisation where the old step read."""
    step, batches = trainer.engine.step, trainer.train_batches

    def step_with_syncs(skip=False, grad_norm=None):
        boundary = trainer.engine.is_gradient_accumulation_boundary()
        if boundary:
            step_ab.synchronize(device)  # the gradient norm, read before the update
        step(skip=skip, grad_norm=grad_norm)
        if boundary:
            step_ab.synchronize(device)  # the metrics and the stop/save agreement, read after it

    def batches_with_sync():
        for batch in batches:
            step_ab.synchronize(device)  # the loss-token count, read as the step began
            # The objective's selected form (model/objective.py), as every step took it before.
            yield {**batch, "loss_mask": torch.ones_like(batch["labels"], dtype=torch.bool)}

    synced = batches_with_sync()

    def on():
        trainer.engine.step, trainer.train_batches = step_with_syncs, synced

    def off():
        trainer.engine.step, trainer.train_batches = step, batches

    return on, off


def main() -> None:
    parser = step_ab.parser(__doc__)
    parser.add_argument("--block", type=int, default=4, help="steps per timed block")
    args = parser.parse_args()
    cfg = step_ab.config(args)
    device = torch.device(args.device)
    trainer = step_ab.trainer(args, cfg)
    for _ in range(2):
        trainer.train_step()
    with counting_host_reads() as reads:
        trainer.train_step()
    by_caller = collections.Counter(f"{method} at {where}" for method, where in reads)
    print(f"host reads in one step: {len(reads)}")
    for caller, count in by_caller.most_common():
        print(f"  {count} x {caller}")
    if device.type == "cuda":
        syncs = cuda_synchronisations(trainer.train_step)
        print(f"CUDA synchronisations in one step: {len(syncs)}")
        for where in syncs:
            print(f"  {where}")

    on, off = synchronising(trainer, device)
    times: dict[str, list[float]] = {"A": [], "B": []}
    blocks = -(-args.steps // args.block)
    for index in range(2 * (blocks + 1)):
        variant = "AB"[index % 2]
        (on if variant == "B" else off)()
        step_ab.synchronize(device)
        started = time.perf_counter()
        for _ in range(args.block):
            trainer.train_step()
        step_ab.synchronize(device)
        if index >= 2:  # one warm-up block each
            times[variant].append((time.perf_counter() - started) / args.block)
    off()
    params = sum(p.numel() for p in trainer.model.parameters())
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    print(
        f"device {args.device}, {params:,} parameters, {args.rows} x {args.seq} tokens per step, "
        f"median of {blocks} blocks of {args.block} steps each"
    )
    print(f"A one host read per step: {a * 1e3:.2f} ms/step")
    print(f"B with syncs where the old step read (and its objective's nonzero): {b * 1e3:.2f} ms/step")
    print(f"A/B: {a / b:.4f}")


if __name__ == "__main__":
    main()
