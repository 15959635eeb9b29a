"""Shuffling BN (He et al. 2020, Sec. 3.3): batch statistics that cannot leak which key matches which query.

"The model appears to 'cheat' the pretext task ... the intra-batch communication among samples (caused by
BN) leaks information. ... For the key encoder f_k, we shuffle the sample order in the current mini-batch
before distributing it among GPUs (and shuffle back after encoding)."

Batch norm is computed over ``bn_splits`` groups of the global batch, as MoCo's 8 GPUs each normalise
their own 32 images. Under DDP every process is one or more groups; on one device :class:`SplitBatchNorm`
emulates the groups, as the MoCo CIFAR-10 demo does ("SplitBatchNorm: simulate multi-gpu behavior of
BatchNorm in one gpu"). Groups are contiguous chunks of a process's batch, which is exactly how the
trainer splits a global batch over processes, so one process with ``bn_splits=2`` computes what two
processes with one group each compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from contrastive import distributed


class SplitBatchNorm(_BatchNorm):
    """Batch norm over ``num_splits`` contiguous chunks of the batch, each with its own statistics.

    Training: [N, C, ...] -> each chunk of N / num_splits samples normalised by its own mean and (biased)
    variance, by torch's own batch-norm kernel on that chunk (a view, never a copy), forward and backward;
    the running statistics move by the mean over chunks of what each chunk's BatchNorm would have contributed
    (the MoCo demo's rule: each chunk updates a copy of them, and the copies are averaged). Evaluation: plain
    batch norm with the running statistics.
    """

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, n = self.num_splits, x.shape[0]
        if not self.training:
            return super().forward(x)
        # one group takes the same code as several: a process holding one group computes bit for bit what a
        # process holding two computes for each of them
        if n % s:
            raise ValueError(f"a batch of {n} cannot be split into {s} batch-norm groups")
        track = self.track_running_stats
        if track:
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            means = self.running_mean.expand(s, -1).clone()  # [s, C]: a copy per group, averaged after
            variances = self.running_var.expand(s, -1).clone()
        chunks = [F.batch_norm(chunk, means[j] if track else None, variances[j] if track else None, self.weight,
                               self.bias, True, m if track else 0.0, self.eps)
                  for j, chunk in enumerate(x.chunk(s))]
        if track:
            with torch.no_grad():
                self.running_mean.copy_(means.mean(0))
                self.running_var.copy_(variances.mean(0))
        return chunks[0] if s == 1 else torch.cat(chunks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """``module`` with every BatchNorm replaced in place by a :class:`SplitBatchNorm` of ``num_splits``
    groups holding the same parameters and statistics; returns the module (or its replacement)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SplitBatchNorm):
        bn = SplitBatchNorm(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                            affine=module.affine, track_running_stats=module.track_running_stats,
                            device=_device(module))
        bn.load_state_dict(module.state_dict())
        if module.affine:
            bn.weight.requires_grad_(module.weight.requires_grad)
            bn.bias.requires_grad_(module.bias.requires_grad)
        return bn
    for name, child in module.named_children():
        setattr(module, name, split_batchnorm(child, num_splits))
    return module


def _device(module: nn.Module) -> torch.device:
    t = next(iter(module.state_dict().values()), None)
    return t.device if t is not None else torch.device("cpu")


@torch.no_grad()
def shuffled_forward(encoder: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``encoder(x)`` [n, ...] -> [n, D] computed on a batch shuffled over every process, then unshuffled.

    All processes' inputs are gathered ([N, ...], N = world_size * n), permuted by one permutation that
    every rank draws alike from ``generator`` (seeded the same on every rank), and this rank encodes its
    chunk of the shuffled batch; the keys are gathered back and un-permuted, and each rank keeps its own
    images' keys. Within a process the encoder's SplitBatchNorm makes the groups; with one process the
    shuffle alone decides which images share a batch-norm group.
    """
    world, rank, n = distributed.world_size(), distributed.rank(), x.shape[0]
    everyone = distributed.all_gather(x)  # [N, ...]
    perm = torch.randperm(everyone.shape[0], generator=generator, device=generator.device).to(x.device)  # [N]
    mine = everyone[perm[rank * n:(rank + 1) * n]]  # [n, ...] this rank's chunk of the shuffled batch
    keys = distributed.all_gather(encoder(mine))  # [N, D] in shuffled order
    unshuffled = torch.empty_like(keys)
    unshuffled[perm] = keys  # back to the original order
    return unshuffled[rank * n:(rank + 1) * n] if world > 1 else unshuffled
