"""A siamese network trained with the margin contrastive loss (Hadsell, Chopra & LeCun 2006, "Dimensionality
Reduction by Learning an Invariant Mapping", DrLIM).

One network G_W maps both sides of a pair; similar pairs are pulled together and dissimilar ones pushed
apart up to a margin (Eq. 4). The pairs here: every ordered pair (i, j), i != j, of the embeddings of every
view of the global batch, similar when the two share a label (an image's own views always do). Pseudocode
of one step:

    g = head(backbone(cat(aug(x), aug(x))))          # [2B, 128], unit-normalised with method.normalize
    for every pair (i, j), i != j: D = ||g_i - g_j||; Y = 0 if y_i = y_j else 1
    loss = mean (1 - Y) 1/2 D² + Y 1/2 max(0, m - D)²
    loss.backward(); optimizer.step()

A process's embeddings are paired with those of every process (losses/metric.py pairwise_margin_loss). The
head is dropped after training; the backbone is evaluated. Nothing is kept between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.data.samplers import check_classes_per_batch, labelled_batch_order, require_labels
from contrastive.errors import ConfigError
from contrastive.losses.metric import pairwise_margin_loss
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.heads import mlp
from contrastive.registry import register


@dataclass
class SiameseConfig:
    margin: float = field(default=1.0, metadata={"help": "m: dissimilar pairs farther apart than m cost nothing "
                          "(Eq. 4, 'm > 0 is a margin'); 1.0, the scale the head's unnormalised output starts at."})
    embedding_dim: int = field(default=128, metadata={"help": "Width of G_W's output. DrLIM maps to 2 or 3 "
                               "dimensions to draw them; 128 as the other methods' heads, since the backbone below "
                               "it is what is evaluated."})
    hidden_dim: int | None = field(default=None, metadata={"help": "Hidden width of the 2-layer head; None: the "
                                   "backbone's width."})
    normalize: bool = field(default=False, metadata={"help": "L2-normalise G_W's output, so distances lie in [0, 2] "
                            "and the margin has a fixed scale; DrLIM does not (its margin sets the scale)."})
    classes_per_batch: int | None = field(default=None, metadata={"help": "P of batches of P classes x K = "
                                          "batch / P images, so every class has similar pairs in a batch; None: "
                                          "random batches, whose similar pairs are an image's views and the "
                                          "same-class images that happen to share the batch."})


class Siamese(Method):
    """Backbone and a 2-layer head G_W; Hadsell's margin loss over every pair of the batch's views."""

    min_batch = 2  # the loss compares pairs of the batch

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SiameseConfig):
        super().__init__()
        if cfg.margin <= 0:
            raise ConfigError(f"method.margin={cfg.margin} must be > 0")
        check_classes_per_batch(cfg.classes_per_batch)
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.head = mlp([feature_dim, cfg.hidden_dim or feature_dim, cfg.embedding_dim], batch_norm=True)

    def projection_head(self) -> nn.Sequential:
        return self.head

    def batch_order(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                    name: str) -> list[torch.Tensor] | None:
        return labelled_batch_order(labels, batch_size, generator, name, "siamese", self.cfg.classes_per_batch)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        views = batch.views
        if len({tuple(v.shape) for v in views}) != 1:
            raise ConfigError("the siamese method encodes every view in one pass, so they must share one size; use "
                              "views of one recipe (views.n_views) or views.groups of one size")
        n = views[0].shape[0]
        g = self.head(self.backbone(torch.cat(views))).float()  # [V n, embedding_dim]
        g = F.normalize(g, dim=1) if self.cfg.normalize else g
        labels = batch.label.repeat(len(views))  # [V n]
        return StepOutput(loss=pairwise_margin_loss(g, labels, self.cfg.margin), embedding=g[:n].detach())


def _build(ctx: BuildContext, cfg: SiameseConfig) -> Siamese:
    require_labels(ctx.num_classes, "siamese")
    return Siamese(*ctx.build_backbone(), cfg)


register("methods", "siamese")(MethodSpec(config_class=SiameseConfig, build=_build))
