"""Optimisers: parameter groups that keep weight decay off biases and norm layers, and SGD / AdamW / LARS.

The trainer sets ``group["lr"]`` before every step from a pure schedule (``training.schedules``), so the
``lr`` given here is only the starting value.
"""

from __future__ import annotations

import torch
from torch import nn

from contrastive.config import OptimConfig
from contrastive.errors import ConfigError
from contrastive.training.lars import LARS

_NORM_LAYERS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


class AdamW(torch.optim.AdamW):
    """torch's AdamW, except that a step whose parameters are all on the CPU leaves CUDA alone.

    torch's Adam and AdamW begin every ``step()`` by asking the current accelerator stream whether it is being
    captured into a CUDA graph (``Optimizer._accelerator_graph_capture_health_check`` in torch 2.14,
    ``_cuda_graph_capture_health_check`` in earlier releases) whenever CUDA is available, whatever the
    parameters' device; asking initialises CUDA, so a CPU run on a machine with a GPU would make a CUDA context
    there. No argument or context of torch skips the check. CPU parameters cannot be in a CUDA graph, so for
    them it is skipped; parameters anywhere else get torch's check. The arithmetic is torch's own.
    """

    def _on_cpu(self) -> bool:
        return all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])

    def _accelerator_graph_capture_health_check(self) -> None:
        if not self._on_cpu():
            super()._accelerator_graph_capture_health_check()

    def _cuda_graph_capture_health_check(self) -> None:  # the check's name before torch 2.14's
        if not self._on_cpu():
            super()._cuda_graph_capture_health_check()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters into a decayed, LARS-adapted group and an exempt one.

    Biases and normalisation-layer parameters (any parameter with ndim <= 1, and every parameter of a
    BatchNorm / GroupNorm / LayerNorm / InstanceNorm module) get ``weight_decay=0, lars=False``, as
    SimCLR excludes them from weight decay and LARS adaptation; all other parameters (conv and linear
    weights) get ``weight_decay`` and ``lars=True``. Each trainable parameter appears exactly once;
    frozen ones (``requires_grad=False``, e.g. an EMA teacher) are left out. Empty groups are dropped.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or id(p) in norm_params else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """``cfg.name`` over :func:`param_groups` of ``model``, starting at learning rate ``lr``.

    sgd: momentum ``cfg.momentum``, no Nesterov; adamw: ``cfg.betas`` with decoupled weight decay
    (Loshchilov & Hutter 2019); lars: :class:`~contrastive.training.lars.LARS` with trust coefficient
    ``cfg.lars_eta``. The ``lars`` flag of each group only matters to LARS.
    """
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=False)
    if cfg.name == "adamw":
        return AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    raise ConfigError(f"optim.name: unknown optimiser {cfg.name!r}; choose sgd, adamw or lars")
