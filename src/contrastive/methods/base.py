"""The contract every method keeps, and the registry entry that builds one from a config.

A method is a plain ``nn.Module``: ``forward(views, step=...)`` returns the loss and metrics and changes
no state; ``after_step(step)`` makes the after-step updates (EMA, queue, memory bank). Anyone can drive it
from their own loop; the trainer does nothing method-specific.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class StepInfo:
    """Where training is: schedules are pure functions of these numbers."""

    step: int  # optimiser steps done before this one
    epoch: int
    total_steps: int  # optimiser steps of the whole run


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars; read only when logged


@dataclass(frozen=True)
class MethodSpec:
    """Registry entry: the method's typed config and a builder ``(backbone, feature_dim, cfg) -> module``."""

    config_class: type
    build: Callable[[torch.nn.Module, int, Any], torch.nn.Module]
