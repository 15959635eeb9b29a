"""Schedules as pure functions of the optimiser step (0-based): learning rate, EMA momentum, etc.

The trainer writes the value into ``group["lr"]`` before each step; methods receive plain numbers.
Convention for a run of ``total_steps`` steps: the value at step ``s`` is the one used by the ``s``-th
update (``s = 0 .. total_steps - 1``), and the last update uses exactly the final value.
"""

from __future__ import annotations

import math

from contrastive.errors import ConfigError


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at step ``total - 1``; clamped outside that range.

    value(s) = end + (start - end) * (1 + cos(pi * s / (total - 1))) / 2. A schedule of one step is its
    last step and gives ``end``. Usable for BYOL's EMA momentum (Grill et al. 2020, Sec. 3.2).
    """
    if total <= 1:
        return end
    progress = min(max(step, 0), total - 1) / (total - 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base: float, final: float) -> float:
    """Linear warm-up to ``base``, then cosine decay to ``final`` (SimCLR, Appendix B.1).

    - step s < warmup_steps: base * (s + 1) / warmup_steps, so the first update already moves the weights
      and step warmup_steps - 1 reaches ``base``;
    - step s >= warmup_steps: ``cosine(s - warmup_steps, total_steps - warmup_steps, base, final)``, which
      starts at ``base`` and is exactly ``final`` at step total_steps - 1 (and after).

    ``warmup_steps = 0`` gives a pure cosine; ``warmup_steps >= total_steps`` gives warm-up only.
    """
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, base, final)


def warmup_step(step: int, warmup_steps: int, base: float, milestone_steps: list[int], gamma: float) -> float:
    """Linear warm-up to ``base`` as in :func:`warmup_cosine`, then ``base * gamma ** (milestones passed)``:
    the step schedule of InstDisc and MoCo v1 ("multiplied by 0.1 at 120 and 160 epochs")."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    return base * gamma ** sum(step >= m for m in milestone_steps)


def lr_at(step: int, *, total_steps: int, steps_per_epoch: int, optim, peak: float) -> float:
    """The learning rate of optimiser step ``step`` under ``optim`` (an OptimConfig) with peak ``peak``."""
    warmup = round(optim.warmup_epochs * steps_per_epoch)
    if optim.schedule == "cosine":
        return warmup_cosine(step, total_steps, warmup, peak, peak * optim.min_lr_ratio)
    if optim.schedule == "step":
        return warmup_step(step, warmup, peak, [round(m * steps_per_epoch) for m in optim.milestones], optim.gamma)
    raise ConfigError(f"optim.schedule: unknown schedule {optim.schedule!r}; choose cosine or step")


def scaled_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """The learning rate for a batch size: ``linear`` lr * batch / 256 (SimCLR, Appendix B.1, after Goyal
    et al. 2017), ``sqrt`` lr * sqrt(batch) (SimCLR v2 and SimCLR Appendix B.1 for small batches),
    ``none`` lr unchanged."""
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return base_lr
    raise ConfigError(f"optim.lr_scaling: unknown scaling {scaling!r}; choose linear, sqrt or none")


def weight_decay_at(step: int, *, total_steps: int, optim) -> float:
    """The weight decay of step ``step``: ``optim.weight_decay``, or a cosine from it to
    ``optim.weight_decay_end`` over the run (DINO's ``cosine_scheduler(weight_decay, weight_decay_end, ...)``)."""
    if optim.weight_decay_end is None:
        return optim.weight_decay
    return cosine(step, total_steps, optim.weight_decay, optim.weight_decay_end)
