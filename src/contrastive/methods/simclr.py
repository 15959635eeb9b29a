"""SimCLR v1 (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations")
and v2 (Chen et al. 2020b, "Big Self-Supervised Models are Strong Semi-Supervised Learners").

Pseudocode (v1, Algorithm 1): for a minibatch of N images, draw two augmentations of each, encode
h = f(x), project z = g(h), and minimise NT-Xent over the 2N projections. v2 differs in the head: "we
make the projection head deeper, 3 layers instead of 2" and fine-tunes from its first layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.losses import nt_xent
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.heads import projection_head
from contrastive.registry import register


@dataclass
class SimCLRConfig:
    temperature: float = field(default=0.1, metadata={"help": "NT-Xent temperature; 0.1 is best for "
                               "ImageNet at batch 4096 (Table 5), 0.5 for CIFAR-10 (Appendix B.9)."})
    projection_dim: int = field(default=128, metadata={"help": "Output of g(.); 128 in the paper (Sec 2.1)."})
    hidden_dim: int | None = field(default=None, metadata={"help": "Hidden width of g(.); None uses the "
                                   "backbone's feature dimension, as the paper does (2048 for ResNet-50)."})
    projection_layers: int = field(default=2, metadata={"help": "Linear layers in g(.): 2 in v1, 3 in v2."})
    projection_bn: bool = field(default=True, metadata={"help": "Batch norm after the hidden layers of g(.), "
                                "as the official implementation does."})


@dataclass
class SimCLRV2Config(SimCLRConfig):
    temperature: float = field(default=0.1, metadata={"help": "NT-Xent temperature; 0.1 in SimCLR v2 (Sec 3)."})
    projection_layers: int = field(default=3, metadata={"help": "3 layers: 'we make the projection head "
                                   "deeper' (SimCLR v2, Sec 2)."})


class SimCLR(Method):
    """Backbone f, projection head g, and NT-Xent between the two views of every image."""

    min_batch = 2  # the 2N - 2 other views of the batch are the negatives

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SimCLRConfig):
        super().__init__()
        if cfg.projection_layers < 1:
            raise ConfigError(f"method.projection_layers={cfg.projection_layers}: the head needs at least 1 layer")
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.projector = projection_head(
            feature_dim,
            cfg.hidden_dim or feature_dim,
            cfg.projection_dim,
            cfg.projection_layers,
            cfg.projection_bn,
        )

    def projection_head(self) -> nn.Sequential:
        return self.projector

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        views = batch.views
        if len(views) != 2:
            raise ConfigError(f"SimCLR contrasts exactly 2 views per image, got {len(views)}; set views.n_views=2")
        n = views[0].shape[0]
        h = self.backbone(torch.cat(views))  # [2n, feature_dim]: one pass, batch norm over both views
        z = self.projector(h)  # [2n, projection_dim]
        return StepOutput(loss=nt_xent(z[:n], z[n:], self.cfg.temperature), embedding=z[:n].detach())


def _build(ctx: BuildContext, cfg: SimCLRConfig) -> SimCLR:
    return SimCLR(*ctx.build_backbone(), cfg)


register("methods", "simclr")(MethodSpec(config_class=SimCLRConfig, build=_build))
register("methods", "simclr-v2")(MethodSpec(config_class=SimCLRV2Config, build=_build))
