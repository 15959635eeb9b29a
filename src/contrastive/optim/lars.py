"""LARS: layer-wise adaptive rate scaling (You et al. 2017), as SimCLR trains with it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor step is scaled by a trust ratio (You et al. 2017).

    The update of SimCLR's TensorFlow ``LARSOptimizer`` (classic momentum, no Nesterov), for each
    parameter w with gradient g in a group with learning rate lr, momentum m, weight decay wd and trust
    coefficient eta::

        g     <- g + wd * w
        trust <- eta * ||w|| / ||g||   if the group has lars=True and ||w|| > 0 and ||g|| > 0, else 1
        v     <- m * v + lr * trust * g        (v starts at 0)
        w     <- w - v

    Norms are L2 over the whole tensor. The learning rate sits inside the momentum buffer, as in the
    TensorFlow code; solo-learn's LARS leaves it to torch's SGD (v <- m * v + trust * g; w <- w - lr * v),
    which is the same update while lr is constant and differs only while the schedule moves it.
    Groups with ``lars=False`` (biases and norm layers, see ``training.optim.param_groups``) get plain
    momentum SGD with the same lr-inside convention: SimCLR's code excludes BN and bias parameters from
    both LARS adaptation and weight decay. The momentum buffers live in ``state`` and so in
    ``state_dict()``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        lars: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=lars)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                g = p.grad.add(p, alpha=wd) if wd != 0 else p.grad
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    # torch.where rather than a Python branch: no device-to-host sync per tensor.
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    g = g * (trust * lr)
                else:
                    g = g * lr
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                v = state["momentum_buffer"]
                v.mul_(m).add_(g)
                p.sub_(v)
        return loss
