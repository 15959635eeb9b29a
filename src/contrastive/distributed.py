"""Rank, world size and the collectives methods use; every function is a no-op in a single process.

``gather_with_grad`` (negatives that carry gradients), ``all_gather`` (keys, bank rows: no gradient),
``all_reduce_sum``, ``all_reduce_mean`` and ``broadcast`` keep state equal on every rank.

The trainer runs under ``torchrun`` (DistributedDataParallel over NCCL or gloo); nothing here starts
processes.
"""

from __future__ import annotations

import gc
import os
from collections import deque
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

# The tensors handed to this module's last few collectives, kept referenced from Python. Gloo's worker
# threads release a finished operation's tensors on their own; a tensor whose Python object is gone by
# then needs the GIL to be freed, and if that happens while the interpreter is exiting, the process
# aborts ("terminate called without an active exception"; pytorch/pytorch#179291). Holding the recent
# ones here means a worker thread never frees a Python object; older operations finished long ago.
_recent: deque[torch.Tensor] = deque(maxlen=16)


def _hold(*tensors: torch.Tensor) -> None:
    _recent.extend(tensors)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (a reduce-scatter).

    With DDP averaging parameter gradients over ranks, a loss that is the mean over local anchors
    against globally gathered candidates then gets exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        xc = x.contiguous()
        _hold(xc, *out)
        dist.all_gather(out, xc)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([g.contiguous() for g in grads])  # [W, *x.shape]
        _hold(stacked)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world_size * n, ...] in rank order, differentiable; ``x`` alone when single."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world_size * n, ...] in rank order, without gradient (keys to enqueue,
    features to write into a memory bank); ``x`` itself when single."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    xc = x.contiguous()
    _hold(xc, *out)
    dist.all_gather(out, xc)
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of ``x``, in place (a statistic every rank must agree on); ``x`` itself when single."""
    if is_distributed() and dist.get_world_size() > 1:
        _hold(x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def all_reduce_min(x: torch.Tensor) -> torch.Tensor:
    """Minimum over ranks of ``x``, in place (the first step at which any rank saw something); ``x`` itself
    when single."""
    if is_distributed() and dist.get_world_size() > 1:
        _hold(x)
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks of ``x``, in place (a shift every rank must agree on, as Sinkhorn's before exp);
    ``x`` itself when single."""
    if is_distributed() and dist.get_world_size() > 1:
        _hold(x)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` overwritten in place by rank ``src``'s value; ``x`` itself when single."""
    if is_distributed() and dist.get_world_size() > 1:
        _hold(x)
        dist.broadcast(x, src=src)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a (detached) tensor, for logging; ``x`` itself when single."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    _hold(y)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (a download, a file write), the other ranks after it is done."""
    if is_distributed() and not is_main():
        dist.barrier()
    yield
    if is_distributed() and is_main():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on any rank, so that every rank takes the same branch (stop or go on)."""
    if not is_distributed():
        return flag
    t = torch.tensor(float(flag), device=device)
    _hold(t)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def init_from_env(device: torch.device, *, timeout_s: float = 3600.0) -> bool:
    """Join the process group that ``torchrun`` describes in the environment, on ``device``.

    NCCL on a CUDA device, bound to it (``device_id``: the communicator is made for this GPU at once, and
    never guessed from the current device); gloo otherwise. ``timeout_s`` is how long a collective may wait
    for a slow rank (rank 0 downloading a dataset, writing a checkpoint) before the run fails (the default is
    ``train.dist_timeout_s``'s); torch's NCCL default of 10 minutes is too short for a large download.

    True when this call created the group (its caller then owns it and ends it with :func:`shutdown`);
    False when not launched by torchrun or when a group already exists.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or is_distributed():
        return False
    cuda = device.type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device if cuda else None)
    return True


def shutdown() -> None:
    """Leave the process group for good, before the interpreter exits; a no-op when there is none.

    Collecting garbage first frees what still refers to the group, so that ``destroy_process_group``
    can join its worker threads. A group that DistributedDataParallel used stays alive in C++ even
    then (torch 2.14), which is why this module also holds its recent tensors (see ``_recent``).
    """
    if not is_distributed():
        return
    gc.collect()
    dist.destroy_process_group()
