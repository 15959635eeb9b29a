"""Where negatives are kept between steps: MoCo's queue of keys and InstDisc's memory bank.

Both are fixed-shape persistent buffers created at construction, so a checkpoint restores them exactly and
strict loading works at any step. Both are written only from ``after_step`` with what every process
computed (gathered beforehand), so every rank holds the same contents; evaluation never writes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Queue(nn.Module):
    """A FIFO of ``size`` L2-normalised keys of width ``dim`` (He et al. 2020, Sec. 3.1: "the dictionary
    as a queue of data samples ... the current mini-batch is enqueued and the oldest is dequeued").

    ``keys`` [size, dim] starts as random unit vectors, as MoCo's does; ``ptr`` is where the next key goes.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Write ``keys`` [b, dim] (b <= size) after the newest, wrapping around the end; the pointer moves on.

        Index arithmetic on the device: no host synchronisation.
        """
        size, b = self.keys.shape[0], keys.shape[0]
        if b > size:
            raise ValueError(f"cannot enqueue {b} keys into a queue of {size}")
        slots = (torch.arange(b, device=self.keys.device) + self.ptr) % size  # [b]
        self.keys.index_copy_(0, slots, keys.to(self.keys.dtype))
        self.ptr.add_(b).remainder_(size)

    def extra_repr(self) -> str:
        return f"size={self.keys.shape[0]}, dim={self.keys.shape[1]}"


class MemoryBank(nn.Module):
    """One L2-normalised feature per training sample (Wu et al. 2018, Sec. 3.2), indexed by dataset index.

    ``rows`` [size, dim] starts uniformly at random on the unit sphere. ``update`` applies the proximal
    rule ``v_i <- normalise(m v_i + (1 - m) f_i)`` ("the memory bank ... updated with momentum", Sec. 3.3).
    """

    def __init__(self, size: int, dim: int, momentum: float):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory bank momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("rows", F.normalize(torch.randn(size, dim), dim=1))

    def __len__(self) -> int:
        return self.rows.shape[0]

    def sample(self, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
        """[n, k] indices drawn uniformly with replacement (the paper's uniform noise distribution)."""
        return torch.randint(len(self), (n, k), generator=generator, device=self.rows.device)

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: torch.Tensor) -> None:
        """Rows ``index`` [b] (distinct) move towards ``features`` [b, dim] and are re-normalised."""
        m = self.momentum
        mixed = self.rows[index].mul(m).add_(features.to(self.rows.dtype), alpha=1.0 - m)
        self.rows.index_copy_(0, index, F.normalize(mixed, dim=1))

    def extra_repr(self) -> str:
        return f"size={self.rows.shape[0]}, dim={self.rows.shape[1]}, momentum={self.momentum}"
