"""Momentum (EMA) encoders: MoCo's key encoder, BYOL's target, DINO's teacher.

"θ_k ← m θ_k + (1 − m) θ_q" (He et al. 2020, Eq. 2): the target's parameters follow the online ones, and
its float buffers (batch-norm running statistics) follow theirs by the same rule; integer buffers (batch
counts) are copied. The coefficient comes from :func:`momentum_at`, a pure function of the step.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from contrastive.errors import ConfigError

SCHEDULES = ("constant", "cosine")


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` to be its EMA: same weights and buffers, no gradient ("initialised as
    θ_k = θ_q", MoCo Algorithm 1)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def momentum_at(schedule: str, base: float, step: int, total_steps: int) -> float:
    """The EMA coefficient for the update that follows optimiser step ``step`` (0-based) of ``total_steps``.

    constant: ``base`` (MoCo v1/v2). cosine: from ``base`` at step 0 to 1 at the end,
    ``1 - (1 - base) (cos(pi step / total) + 1) / 2`` (BYOL Sec. 3.2; MoCo v3 ``adjust_moco_momentum``).
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
    raise ConfigError(f"momentum schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` over parameters and float buffers, with
    foreach ops (one kernel per op for all tensors); integer buffers are copied."""
    t_params, o_params = list(target.parameters()), list(online.parameters())
    t_buffers, o_buffers = list(target.buffers()), list(online.buffers())
    if len(t_params) != len(o_params) or len(t_buffers) != len(o_buffers):
        raise ValueError("ema_update: target and online modules differ in structure")
    floats_t = t_params + [b for b in t_buffers if b.is_floating_point()]
    floats_o = o_params + [b for b, t in zip(o_buffers, t_buffers) if t.is_floating_point()]
    torch._foreach_mul_(floats_t, momentum)
    torch._foreach_add_(floats_t, floats_o, alpha=1.0 - momentum)
    for t, o in zip(t_buffers, o_buffers):
        if not t.is_floating_point():
            t.copy_(o)
