"""Run a function in N gloo processes as torchrun would, for tests that compare N processes with one."""

import os
import socket

import torch.multiprocessing as mp

from contrastive import distributed


def _worker(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        fn(*args)
    finally:
        distributed.shutdown()


def run_as_torchrun(fn, *args, world: int = 2) -> None:
    """``fn(*args)`` in ``world`` spawned processes with torchrun's environment variables (``fn`` must be a
    module-level function); each ends its process group. Raises if any process fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, fn, args), nprocs=world, join=True)
