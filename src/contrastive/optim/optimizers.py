"""Optimisers: parameter groups that keep weight decay off biases and norm layers, and SGD / AdamW / LARS.

The trainer sets ``group["lr"]`` before every step from a pure schedule (``optim.schedules``), so the
``lr`` given here is only the starting value.
"""

from __future__ import annotations

import torch
from torch import nn

from contrastive.config import OptimConfig
from contrastive.errors import ConfigError
from contrastive.optim.lars import LARS

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
    """Split the trainable parameters into a decayed, LARS-adapted group and an exempt one, for each group the
    model declares (``Method.param_groups``: tags ``lr_scale``, ``fixed_lr``, ``lars``, ``decay``, ``name``).

    Biases and normalisation-layer parameters (any parameter with ndim <= 1, and every parameter of a
    BatchNorm / GroupNorm / LayerNorm / InstanceNorm module) get ``weight_decay=0, lars=False``, as
    SimCLR excludes them from weight decay and LARS adaptation; all other parameters (conv and linear
    weights) get ``weight_decay`` and ``lars=True`` unless their declared group says ``lars: False`` or
    ``decay: False``. Each trainable parameter appears exactly once; frozen ones (``requires_grad=False``,
    e.g. an EMA teacher) are left out. Empty groups are dropped. Every group carries its tags, so
    :func:`set_step_values` can schedule each one.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters()}
    hook = getattr(model, "param_groups", None)
    declared = [{**g, "params": list(g["params"])} for g in hook()] if callable(hook) else [
        {"params": list(model.parameters())}]
    _check_declared(declared, model)
    groups = []
    for group in declared:
        tags = {**DEFAULT_TAGS, **{k: v for k, v in group.items() if k != "params"}}
        decay, no_decay = [], []
        for p in group["params"]:
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or id(p) in norm_params else decay).append(p)
        decayed = tags["decay"]
        groups += [
            {**tags, "params": decay, "weight_decay": weight_decay if decayed else 0.0, "lars": tags["lars"],
             "decay": decayed},
            {**tags, "params": no_decay, "weight_decay": 0.0, "lars": False, "decay": False},
        ]
    return [g for g in groups if g["params"]]


# What a declared parameter group may say about itself (Method.param_groups), and the defaults.
DEFAULT_TAGS = {
    "name": "default",
    "lr_scale": 1.0,  # the scheduled learning rate times this
    "fixed_lr": False,  # the learning rate stays at its peak value, unscheduled (SimSiam's predictor)
    "lars": True,  # LARS adapts its weights (biases and norms never)
    "decay": True,  # its weights are decayed (biases and norms never)
}


def _check_declared(declared: list[dict], model: nn.Module) -> None:
    """Every trainable parameter in exactly one declared group; names unique; tags known."""
    names = [g.get("name", "default") for g in declared]
    if len(set(names)) != len(names):
        raise ValueError(f"param_groups: group names must be unique, got {names}")
    seen: dict[int, str] = {}
    for g in declared:
        unknown = set(g) - set(DEFAULT_TAGS) - {"params"}
        if unknown:
            raise ValueError(f"param_groups: unknown tags {sorted(unknown)}; known: {sorted(DEFAULT_TAGS)}")
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"param_groups: a parameter is in both {seen[id(p)]!r} and {g.get('name')!r}")
            seen[id(p)] = g.get("name", "default")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"param_groups: trainable parameters in no group: {missing[:5]}")


def set_step_values(optimizer: torch.optim.Optimizer, *, lr: float, peak_lr: float, weight_decay: float) -> None:
    """Before a step: every group's learning rate (the scheduled ``lr``, or ``peak_lr`` for a ``fixed_lr``
    group, times its ``lr_scale``) and the weight decay of decayed groups (``weight_decay``, which a schedule
    may move: DINO's 0.04 -> 0.4)."""
    for group in optimizer.param_groups:
        group["lr"] = (peak_lr if group.get("fixed_lr") else lr) * group.get("lr_scale", 1.0)
        if group.get("decay"):
            group["weight_decay"] = weight_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """``cfg.name`` over :func:`param_groups` of ``model``, starting at learning rate ``lr``.

    sgd: momentum ``cfg.momentum``, no Nesterov; adamw: ``cfg.betas`` with decoupled weight decay
    (Loshchilov & Hutter 2019); lars: :class:`~contrastive.optim.lars.LARS` with trust coefficient
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


def clip_gradients(model: nn.Module, max_norm: float, mode: str) -> None:
    """Clip gradients to ``max_norm``: their global norm (``global``, torch's ``clip_grad_norm_``), or each
    tensor's own norm (``per_parameter``, DINO's ``clip_gradients``), with foreach ops and no host sync."""
    if mode == "global":
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
