"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning").

Sec. 3.1 and Fig. 2, which this file follows::

    ξ = θ                                         # the target starts as the online network
    for x in loader:
        v, v' = t(x), t'(x)                       # an asymmetric pair: t blurs always, t' solarises
        z1, z2 = g_θ(f_θ(v)), g_θ(f_θ(v'))        # online projections: N x 256
        p1, p2 = q_θ(z1), q_θ(z2)                 # online predictions: N x 256
        z1', z2' = g_ξ(f_ξ(v)), g_ξ(f_ξ(v'))      # target projections, no gradient: N x 256
        loss = L(p1, z2') + L(p2, z1')            # L(p, z) = 2 - 2 cos(p, z), symmetrised (Eq. 2)
        loss.backward(); update(θ)
        ξ = τ ξ + (1 - τ) θ                       # τ = 1 - (1 - τ_base)(cos(π k / K) + 1) / 2

Projector g and predictor q are the same MLP, Linear-BN-ReLU-Linear, 4096 hidden units and 256 outputs
(Sec. 3.3). The target is the EMA of backbone and projector; the predictor has no target counterpart. Each
view goes through the networks on its own, so batch norm sees one view at a time, as the official code's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.losses import byol_loss
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.ema import SCHEDULES, ema_update, momentum_at, momentum_copy
from contrastive.nn.heads import mlp
from contrastive.registry import register


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class BYOLConfig:
    projection_dim: int = _f(256, "Output of projector and predictor; 256 (Sec. 3.3).")
    hidden_dim: int = _f(4096, "Hidden width of projector and predictor; 4096 (Sec. 3.3).")
    momentum: float = _f(0.996, "τ_base, the target's EMA coefficient at the start; 0.996 (Sec. 3.3; 0.99 in "
                         "solo-learn's CIFAR recipe). Higher is a slower, steadier target: τ = 1 never moves it, "
                         "τ = 0 copies the online network and collapses (Table 5a).")
    momentum_schedule: str = _f("cosine", "cosine: τ rises from τ_base to 1 by a half cosine over the run "
                                "(Sec. 3.2); constant: τ_base throughout.")


def paper_view_groups(side: int) -> list[dict]:
    """BYOL's asymmetric pair (Table 6) as view groups: t blurs always and never solarises, t' blurs with
    p 0.1 and solarises with p 0.2; both jitter by (0.4, 0.4, 0.2, 0.1). The rest of Table 6 (crop (0.08, 1),
    flip 0.5, jitter p 0.8, grey 0.2, blur σ in [0.1, 2] with a 23 px kernel at 224) is the views
    section's defaults, which a recipe may change. Both views are global, at the run's side."""
    both = {"count": 1, "global": True, "jitter": [0.4, 0.4, 0.2, 0.1]}
    return [{**both, "blur_p": 1.0, "solarize_p": 0.0}, {**both, "blur_p": 0.1, "solarize_p": 0.2}]


class BYOL(Method):
    """Online network (backbone, projector, predictor) and its target (EMA of backbone and projector)."""

    collapse_advice = ("raise method.momentum (the target's EMA, e.g. 0.99 -> 0.996) or lower optim.lr; BYOL needs "
                       "its predictor and a target that moves slowly")

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: BYOLConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.projector = mlp([feature_dim, cfg.hidden_dim, cfg.projection_dim], batch_norm=True)
        self.predictor = mlp([cfg.projection_dim, cfg.hidden_dim, cfg.projection_dim], batch_norm=True)
        self.target_backbone = momentum_copy(backbone)
        self.target_projector = momentum_copy(self.projector)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        if len(batch.views) != 2:
            raise ConfigError(f"BYOL compares exactly 2 views per image (t and t'), got {len(batch.views)}; give "
                              f"views.groups two groups of count 1, or leave views.groups unset for BYOL's pair")
        x1, x2 = batch.views
        z1 = self.projector(self.backbone(x1))  # [n, projection_dim]
        z2 = self.projector(self.backbone(x2))  # [n, projection_dim]
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [n, projection_dim] each
        with torch.no_grad():  # ξ gets no gradient ("sg" in Fig. 2)
            t1 = self.target_projector(self.target_backbone(x1))  # [n, projection_dim]
            t2 = self.target_projector(self.target_backbone(x2))  # [n, projection_dim]
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return StepOutput(loss=loss, embedding=z1.detach())

    def momentum(self, step: StepInfo) -> float:
        """τ of the target update that follows optimiser step k = ``step.step`` of K: the official code's
        ``target_ema(global_step)``, taken after the online update of that step."""
        return momentum_at(self.cfg.momentum_schedule, self.cfg.momentum, step.step, step.total_steps)

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        # ξ <- τ ξ + (1 - τ) θ over backbone and projector. Batch-norm running statistics follow by the same
        # rule (nn/ema.py); in training the target normalises by the batch, so they never enter the loss.
        ema_update(nn.ModuleList([self.target_backbone, self.target_projector]),
                   nn.ModuleList([self.backbone, self.projector]), self.momentum(step))

    def projection_head(self) -> nn.Sequential:
        return self.projector


def _check(cfg: BYOLConfig) -> None:
    if cfg.momentum_schedule not in SCHEDULES:
        raise ConfigError(f"method.momentum_schedule={cfg.momentum_schedule!r}: choose {' or '.join(SCHEDULES)}")
    if not 0.0 <= cfg.momentum <= 1.0:
        raise ConfigError(f"method.momentum={cfg.momentum} is out of range: τ_base must lie in [0, 1]")
    if cfg.projection_dim < 1 or cfg.hidden_dim < 1:
        raise ConfigError(f"method.projection_dim={cfg.projection_dim} and method.hidden_dim={cfg.hidden_dim} "
                          f"must be positive")


def _build(ctx: BuildContext, cfg: BYOLConfig) -> BYOL:
    return BYOL(*ctx.build_backbone(), cfg)


register("methods", "byol")(MethodSpec(config_class=BYOLConfig, build=_build, view_groups=paper_view_groups))
