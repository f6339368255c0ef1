"""Concurrent launches never meet at the same port: run_distributed serves the rendezvous store
on a port the kernel picks as it binds (no free-port probe that another launch can race), and a
single process with a process group serves its own the same way, whatever MASTER_PORT says."""

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist
from tiny_models import tiny_config

from ouro_train.config import ParallelConfig
from ouro_train.parallel import destroy_parallel, init_parallel
from ouro_train.parallel.testing import run_distributed


def meet() -> tuple[int, int, float]:
    """-> (world size, the rendezvous port, the sum of rank + 1 over the ranks)."""
    layout = init_parallel(ParallelConfig(), tiny_config(), "cpu", group=True)
    try:
        total = torch.tensor([layout.rank + 1.0])
        dist.all_reduce(total)
        return layout.world_size, int(os.environ["MASTER_PORT"]), total.item()
    finally:
        destroy_parallel()


@pytest.mark.slow
def test_two_concurrent_launches_each_get_their_own_rendezvous():
    with ThreadPoolExecutor(2) as pool:
        launches = list(pool.map(lambda _: run_distributed(meet, 2), range(2)))
    for ranks in launches:
        assert [(world, total) for world, _, total in ranks] == [(2, 3.0), (2, 3.0)]  # both ranks met
        assert ranks[0][1] == ranks[1][1]  # at one port
    assert launches[0][0][1] != launches[1][0][1]


def test_a_single_process_group_serves_its_own_store(monkeypatch):
    with socket.socket() as taken:  # the port in the environment is held by another program
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("MASTER_PORT", str(taken.getsockname()[1]))
        world, port, total = meet()
        assert (world, total) == (1, 1.0) and port != taken.getsockname()[1]
