"""SupCon (Khosla et al. 2020, "Supervised Contrastive Learning").

SimCLR's batch contrast with the labels added: every other view of an image of the same class is a
positive. Pseudocode of one step (Sec. 3, the authors' SupContrast main_supcon.py):

    z = normalise(proj(backbone(cat(aug(x), aug(x)))))   # [2B, 128]: two views of every image, one pass
    loss = supcon(z, cat(y, y), τ)                       # L^sup_out (Eq. 2): the mean over every positive
    loss.backward(); optimizer.step()

"Clusters of points belonging to the same class are pulled together in embedding space, while simultaneously
pushing apart clusters of samples from different classes" (abstract). The anchors of a process are contrasted
with the views of every process (losses/metric.py). The projection head is dropped after training; the
backbone is evaluated. Nothing is kept between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive.data.samplers import check_classes_per_batch, labelled_batch_order, require_labels
from contrastive.errors import ConfigError
from contrastive.losses.metric import supcon_loss
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.heads import mlp
from contrastive.registry import register


@dataclass
class SupConConfig:
    temperature: float = field(default=0.1, metadata={"help": "τ of the softmax over the batch; 0.1 in the paper "
                               "(Sec. 4, 'low temperatures benefit training more than high ones') and the authors' "
                               "command (--temp 0.1)."})
    projection_dim: int = field(default=128, metadata={"help": "Width of the normalised projection z; D_P = 128 "
                                "(Sec. 3.1)."})
    hidden_dim: int | None = field(default=None, metadata={"help": "Hidden width of the 2-layer MLP projection "
                                   "network; None: the backbone's width, 2048 for ResNet-50 as in the paper (Sec. 3.1) "
                                   "and the authors' head (Linear(dim_in, dim_in), ReLU, Linear(dim_in, 128))."})
    classes_per_batch: int | None = field(default=None, metadata={"help": "P of batches of P classes x K = "
                                          "batch / P images; None: random batches, as the paper, whose positives "
                                          "come from the two views and same-class images that happen to share the "
                                          "batch. Set it on data with few images per class in a batch."})


class SupCon(Method):
    """Backbone, 2-layer MLP projection to ``projection_dim``, SupCon over every view of the batch."""

    min_batch = 2  # every other view of the batch is a positive or a negative

    collapse_advice = "raise method.temperature or lower optim.lr"

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SupConConfig):
        super().__init__()
        if cfg.temperature <= 0:
            raise ConfigError(f"method.temperature={cfg.temperature} must be > 0")
        check_classes_per_batch(cfg.classes_per_batch)
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.projector = mlp([feature_dim, cfg.hidden_dim or feature_dim, cfg.projection_dim], batch_norm=False)

    def projection_head(self) -> nn.Sequential:
        return self.projector

    def batch_order(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                    name: str) -> list[torch.Tensor] | None:
        return labelled_batch_order(labels, batch_size, generator, name, "supcon", self.cfg.classes_per_batch)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        views = batch.views
        if len({tuple(v.shape) for v in views}) != 1:
            raise ConfigError("SupCon encodes every view in one pass, so they must share one size; use views of one "
                              "recipe (views.n_views) or views.groups of one size")
        n = views[0].shape[0]
        z = self.projector(self.backbone(torch.cat(views)))  # [V n, projection_dim], normalised by the loss
        labels = batch.label.repeat(len(views))  # [V n]: each view has its image's label
        return StepOutput(loss=supcon_loss(z, labels, self.cfg.temperature), embedding=z[:n].detach())


def _build(ctx: BuildContext, cfg: SupConConfig) -> SupCon:
    require_labels(ctx.num_classes, "supcon")
    return SupCon(*ctx.build_backbone(), cfg)


register("methods", "supcon")(MethodSpec(config_class=SupConConfig, build=_build))
