"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning").

Algorithm 1 of the paper, which this file follows::

    for x in loader:
        x1, x2 = aug(x), aug(x)                   # two random views
        z1, z2 = f(x1), f(x2)                     # projections, backbone + projector: N x 2048
        p1, p2 = h(z1), h(z2)                     # predictions: N x 2048
        L = D(p1, z2) / 2 + D(p2, z1) / 2         # symmetrised
        L.backward(); update(f, h)

    def D(p, z):                                  # negative cosine similarity
        z = z.detach()                            # stop gradient
        return -(normalize(p) * normalize(z)).sum(dim=1).mean()

No negatives and no momentum encoder: the stop-gradient is what keeps it from collapsing (Sec. 4.1), and
nothing is kept between steps. The heads follow facebookresearch/simsiam ``simsiam/builder.py``: the
projector is Linear-BN-ReLU layers whose last Linear ends in a BatchNorm without affine parameters, the
predictor a bottleneck Linear(2048, 512)-BN-ReLU-Linear(512, 2048). The predictor's learning rate stays
at its starting value while the schedule decays everything else (``--fix-pred-lr``, Sec. 4.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from contrastive.errors import ConfigError
from contrastive.losses import negative_cosine
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.heads import mlp
from contrastive.registry import register


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SimSiamConfig:
    projection_dim: int = _f(2048, "Output of the projector and of the predictor; 2048 (Sec. 3, --dim).")
    hidden_dim: int | None = _f(None, "Hidden width of the projector; None: the backbone's feature dimension, as "
                                "builder.py's prev_dim (2048 for ResNet-50, Sec. 3).")
    projection_layers: int = _f(3, "Linear layers of the projector; 3 on ImageNet (Sec. 3), 2 on CIFAR (App. D).")
    predictor_hidden_dim: int = _f(512, "Bottleneck of the predictor; 512, a quarter of its input (Sec. 3, "
                                   "--pred-dim).")
    fix_predictor_lr: bool = _f(True, "Keep the predictor's learning rate at its starting value, unscheduled "
                                "(--fix-pred-lr; Sec. 4.4: 68.1% against 67.7% with the schedule, Table 1).")


class SimSiam(Method):
    """One encoder f (backbone + projector) on both views and a predictor h; the other view's projection
    is the target, behind a stop-gradient."""

    collapse_advice = ("keep the predictor's learning rate fixed (method.fix_predictor_lr=true) and the projector's "
                       "output batch norm; lower optim.lr")

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SimSiamConfig):
        super().__init__()
        hidden = cfg.hidden_dim or feature_dim
        if cfg.projection_layers < 1 or min(cfg.projection_dim, hidden, cfg.predictor_hidden_dim) < 1:
            raise ConfigError(f"method.projection_layers={cfg.projection_layers}, method.projection_dim="
                              f"{cfg.projection_dim}, method.hidden_dim={cfg.hidden_dim} and method."
                              f"predictor_hidden_dim={cfg.predictor_hidden_dim} must be positive")
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        # BN on every layer, the output's without scale or shift (builder.py)
        self.projector = mlp([feature_dim] + [hidden] * (cfg.projection_layers - 1) + [cfg.projection_dim],
                             batch_norm=True, last_bn=True)
        self.predictor = mlp([cfg.projection_dim, cfg.predictor_hidden_dim, cfg.projection_dim], batch_norm=True)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        if len(batch.views) != 2:
            raise ConfigError(f"SimSiam compares exactly 2 views per image, got {len(batch.views)}; set "
                              f"views.n_views=2")
        x1, x2 = batch.views
        z1 = self.projector(self.backbone(x1))  # [n, projection_dim]
        z2 = self.projector(self.backbone(x2))  # [n, projection_dim]
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [n, projection_dim] each
        # negative_cosine detaches its second argument: the stop-gradient of Eq. 3
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
        return StepOutput(loss=loss, embedding=z1.detach())

    def param_groups(self) -> list[dict]:
        encoder = [*self.backbone.parameters(), *self.projector.parameters()]
        return [{"name": "encoder", "params": encoder},
                {"name": "predictor", "params": list(self.predictor.parameters()),
                 "fixed_lr": self.cfg.fix_predictor_lr}]

    def projection_head(self) -> nn.Sequential:
        return self.projector


def _build(ctx: BuildContext, cfg: SimSiamConfig) -> SimSiam:
    return SimSiam(*ctx.build_backbone(), cfg)


register("methods", "simsiam")(MethodSpec(config_class=SimSiamConfig, build=_build))
