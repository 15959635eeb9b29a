"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

Algorithm 1::

    f_k.params = f_q.params                       # initialise
    for x in loader:
        x1, x2 = aug(x), aug(x)                   # two random views
        q1, q2 = f_q(x1), f_q(x2)                 # queries: backbone + projector + predictor, [N, C] each
        k1, k2 = f_k(x1), f_k(x2)                 # keys: momentum backbone + projector, no gradient
        loss = ctr(q1, k2) + ctr(q2, k1)          # symmetrised
        loss.backward(); update(f_q)
        f_k.params = m * f_k.params + (1 - m) * f_q.params

    def ctr(q, k):                                # InfoNCE against the batch's keys, no queue
        logits = mm(q, k.t())                     # [N, N] of L2-normalised q, k: positives on the diagonal
        return 2 * tau * CrossEntropyLoss(logits / tau, arange(N))

The heads follow facebookresearch/moco-v3 ``moco/builder.py``: every Linear without bias, BatchNorm and
ReLU between layers, a BatchNorm without affine parameters after the projector's last layer; the
predictor of a ResNet ends without it, the predictor of a ViT with it. ``m`` rises from 0.99 to 1 by a
half cosine over the run (``--moco-m-cos``). Each view goes through the encoders on its own, so batch
norm sees one view at a time, as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.losses import info_nce_batch
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.ema import SCHEDULES, ema_update, momentum_at, momentum_copy
from contrastive.nn.heads import mlp
from contrastive.nn.vit import is_vision_transformer
from contrastive.registry import register


@dataclass
class MoCoV3Config:
    temperature: float | None = field(default=None, metadata={"help": "tau of ctr(q, k); None: 0.2 for a ViT "
                                      "backbone, 1.0 otherwise (the official commands: --moco-t=.2 for ViT, "
                                      "the default 1.0 for ResNet-50)."})
    momentum: float = field(default=0.99, metadata={"help": "Starting EMA coefficient m of the key encoder; "
                            "0.99 for ViT and ResNet at batch 4096 (MoCo v3, Sec. 5; 0.996 for the 1000-epoch "
                            "ResNet)."})
    momentum_schedule: str = field(default="cosine", metadata={"help": "cosine: m rises to 1 by a half cosine "
                                   "over the run (--moco-m-cos in every official command); constant: m throughout."})
    projection_dim: int = field(default=256, metadata={"help": "Output of projector and predictor; 256 "
                                "(--moco-dim)."})
    hidden_dim: int = field(default=4096, metadata={"help": "Hidden width of projector and predictor; 4096 "
                            "(--moco-mlp-dim)."})
    projection_layers: int | None = field(default=None, metadata={"help": "Linear layers of the projector; "
                                          "None: 3 for a ViT, 2 for a ResNet or other ConvNet (builder.py)."})
    predictor_layers: int = field(default=2, metadata={"help": "Linear layers of the predictor; 2 (builder.py)."})
    predictor_last_bn: bool | None = field(default=None, metadata={"help": "BatchNorm after the predictor's "
                                           "last layer; None: on for a ViT, off for a ConvNet (builder.py)."})


class MoCoV3(Method):
    """Query encoder f_q = predictor(projector(backbone)), key encoder f_k = its momentum copy without the
    predictor; the loss contrasts each view's queries with the other view's keys of the global batch.

    ``vit`` picks the architecture-dependent defaults (None fields of the config); a method built
    from a run config finds it from the backbone.
    """

    min_batch = 2  # the keys of the batch's other images are the negatives

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MoCoV3Config, *, vit: bool = False):
        super().__init__()
        if cfg.momentum_schedule not in SCHEDULES:
            raise ConfigError(f"method.momentum_schedule={cfg.momentum_schedule!r}: choose {' or '.join(SCHEDULES)}")
        if not 0 <= cfg.momentum <= 1:
            raise ConfigError(f"method.momentum={cfg.momentum} is out of range: it must lie in [0, 1]")
        if cfg.temperature is not None and cfg.temperature <= 0:
            raise ConfigError(f"method.temperature={cfg.temperature} is out of range: it must be > 0")
        proj_layers = cfg.projection_layers or (3 if vit else 2)
        if proj_layers < 1 or cfg.predictor_layers < 1:
            raise ConfigError(f"method.projection_layers={cfg.projection_layers} and method.predictor_layers="
                              f"{cfg.predictor_layers}: each head needs at least 1 layer")
        self.cfg = cfg
        self.temperature = cfg.temperature if cfg.temperature is not None else (0.2 if vit else 1.0)
        self.feature_dim = feature_dim
        hidden, out = cfg.hidden_dim, cfg.projection_dim
        self.backbone = backbone
        self.projector = mlp([feature_dim] + [hidden] * (proj_layers - 1) + [out], batch_norm=True, last_bn=True)
        last_bn = cfg.predictor_last_bn if cfg.predictor_last_bn is not None else vit
        self.predictor = mlp([out] + [hidden] * (cfg.predictor_layers - 1) + [out], batch_norm=True,
                             last_bn=last_bn, bias_last=False)
        self.momentum_backbone = momentum_copy(backbone)
        self.momentum_projector = momentum_copy(self.projector)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        if len(batch.views) != 2:
            raise ConfigError(f"MoCo v3 contrasts exactly 2 views per image, got {len(batch.views)}; set "
                              f"views.n_views=2")
        x1, x2 = batch.views
        q1 = self.predictor(self.projector(self.backbone(x1)))  # [n, projection_dim]
        q2 = self.predictor(self.projector(self.backbone(x2)))  # [n, projection_dim]
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(x1))  # [n, projection_dim]
            k2 = self.momentum_projector(self.momentum_backbone(x2))  # [n, projection_dim]
        loss = info_nce_batch(q1, k2, self.temperature) + info_nce_batch(q2, k1, self.temperature)
        return StepOutput(loss=loss, embedding=q1.detach())

    def projection_head(self) -> nn.Sequential:
        return self.projector

    def momentum(self, step: StepInfo) -> float:
        """m of the key update that follows ``step``: the m the official code uses at the start of the next
        iteration."""
        return momentum_at(self.cfg.momentum_schedule, self.cfg.momentum, step.step + 1, step.total_steps)

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        # f_k <- m f_k + (1 - m) f_q over backbone and projector, the predictor excluded. Batch-norm running
        # statistics follow by the same rule (nn/ema.py); the official code leaves them to the key encoder's
        # own forward passes. Neither matters to training: the key encoder always normalises by the batch.
        ema_update(nn.ModuleList([self.momentum_backbone, self.momentum_projector]),
                   nn.ModuleList([self.backbone, self.projector]), self.momentum(step))


def _build(ctx: BuildContext, cfg: MoCoV3Config) -> MoCoV3:
    backbone, feature_dim = ctx.build_backbone()
    return MoCoV3(backbone, feature_dim, cfg, vit=is_vision_transformer(backbone))


register("methods", "moco-v3")(MethodSpec(config_class=MoCoV3Config, build=_build))
