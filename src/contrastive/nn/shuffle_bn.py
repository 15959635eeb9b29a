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
    variance; the running statistics move by the mean over chunks of what each chunk's BatchNorm would have
    contributed (the MoCo demo's rule). Evaluation: plain batch norm with the running statistics.
    The groups are formed by views, never copies: [s, N/s * H * W, C] for a channels-last image batch,
    [s, N/s, C, rest] otherwise; one reduction gives every group's statistics and one fused multiply-add
    normalises the whole batch.
    """

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, n, c = self.num_splits, x.shape[0], x.shape[1]
        if not self.training:
            return super().forward(x)
        # one group takes the same code as several: a process holding one group computes bit for bit what a
        # process holding two computes for each of them
        if n % s:
            raise ValueError(f"a batch of {n} cannot be split into {s} batch-norm groups")
        nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if nhwc:
            grouped, reduce, shape = x.permute(0, 2, 3, 1).reshape(s, -1, c), (1,), (s, 1, c)  # [s, N/s*H*W, C]
        else:
            grouped, reduce, shape = x.reshape(s, n // s, c, -1), (1, 3), (s, 1, c, 1)  # [s, N/s, C, rest]
        var, mean = torch.var_mean(grouped.float(), dim=reduce, correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.view(shape[1:])
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias.view(shape[1:])
        y = torch.addcmul(shift.to(x.dtype), grouped, scale.to(x.dtype))
        y = y.view(n, x.shape[2], x.shape[3], c).permute(0, 3, 1, 2) if nhwc else y.view_as(x)
        if self.track_running_stats:
            with torch.no_grad():
                count = grouped.numel() // (s * c)  # values per channel in a group
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                unbiased = var.reshape(s, c) * (count / max(count - 1, 1))
                self.running_mean.mul_(1 - m).add_(mean.reshape(s, c).mean(0).to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.mean(0).to(self.running_var.dtype), alpha=m)
                self.num_batches_tracked.add_(1)
        return y

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
