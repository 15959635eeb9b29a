"""The triplet loss with in-batch mining (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss for
Person Re-Identification"; the loss of Schroff et al. 2015, FaceNet).

Batches of P classes x K images (data/samplers.py), so every anchor has K - 1 positives. Pseudocode of one
step with batch-hard mining (Sec. 2, Eq. 5):

    f = head(backbone(aug(x)))                       # [PK, 128]
    for each anchor a: p = its farthest positive, n = its nearest negative, both in the batch
    loss = mean_a max(0, m + D(f_a, f_p) - D(f_a, f_n))
    loss.backward(); optimizer.step()

"Batch hard" selects "the hardest positive and the hardest negative samples within the batch" for each
anchor; batch-all and FaceNet's semi-hard mining are the other choices (losses/metric.py). With several
views, every view is an anchor and an image's other views are among its positives. A process's anchors are
mined among the embeddings of every process. The head is dropped after training; the backbone is evaluated.
Nothing is kept between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.data.samplers import check_classes_per_batch, labelled_batch_order, require_labels
from contrastive.errors import ConfigError
from contrastive.losses.metric import MINING, triplet_loss
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.heads import mlp
from contrastive.registry import register


@dataclass
class TripletConfig:
    mining: str = field(default="batch-hard", metadata={"help": "batch-hard (the paper's best with a hard margin, "
                        "Table 1), batch-all (every valid triplet, averaged over the active ones), or semi-hard "
                        "(FaceNet Sec. 3.2: the nearest negative farther than the positive)."})
    margin: float = field(default=0.2, metadata={"help": "m of max(0, m + D(a, p) - D(a, n)); 0.2 as FaceNet's α "
                          "(Sec. 3), on unit-normalised embeddings."})
    embedding_dim: int = field(default=128, metadata={"help": "Width of the embedding the loss reads; 128 in the "
                               "paper's TriNet (Sec. 3.2) and FaceNet."})
    hidden_dim: int = field(default=1024, metadata={"help": "Hidden width of the head; TriNet's 'two fully "
                            "connected layers, the first having 1024 units, followed by batch normalization and ReLU, "
                            "the second going down to 128 units' (Sec. 3.2)."})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise the embedding, as FaceNet ('||f(x)||_2 = 1'), "
                            "so the margin has a fixed scale; Hermans et al. leave it unnormalised with the soft margin."})
    classes_per_batch: int | None = field(default=18, metadata={"help": "P of the P x K batches (K = batch / P); "
                                          "P = 18, K = 4 in the paper's Market-1501 runs (Sec. 4.4: batch 72). "
                                          "null: random batches."})


class Triplet(Method):
    """Backbone, 2-layer head to ``embedding_dim``, the triplet loss mined over every view of the batch."""

    min_batch = 2  # a triplet needs another image of the batch

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: TripletConfig):
        super().__init__()
        if cfg.mining not in MINING:
            raise ConfigError(f"method.mining={cfg.mining!r}; choose one of {', '.join(MINING)}")
        if cfg.margin <= 0:
            raise ConfigError(f"method.margin={cfg.margin} must be > 0")
        check_classes_per_batch(cfg.classes_per_batch)
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.head = mlp([feature_dim, cfg.hidden_dim, cfg.embedding_dim], batch_norm=True)

    def projection_head(self) -> nn.Sequential:
        return self.head

    def batch_order(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                    name: str) -> list[torch.Tensor] | None:
        return labelled_batch_order(labels, batch_size, generator, name, "triplet", self.cfg.classes_per_batch)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [n, C, S, S] -> float32 embeddings [n, embedding_dim], unit-normalised with ``normalize``."""
        f = self.head(self.backbone(x)).float()
        return F.normalize(f, dim=1) if self.cfg.normalize else f

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        views = batch.views
        if len({tuple(v.shape) for v in views}) != 1:
            raise ConfigError("the triplet method encodes every view in one pass, so they must share one size; use "
                              "views of one recipe (views.n_views) or views.groups of one size")
        n = views[0].shape[0]
        f = self.embed(torch.cat(views))  # [V n, embedding_dim]
        labels = batch.label.repeat(len(views))  # [V n]
        loss = triplet_loss(f, labels, margin=self.cfg.margin, mining=self.cfg.mining)
        return StepOutput(loss=loss, embedding=f[:n].detach())


def _build(ctx: BuildContext, cfg: TripletConfig) -> Triplet:
    require_labels(ctx.num_classes, "triplet")
    return Triplet(*ctx.build_backbone(), cfg)


register("methods", "triplet")(MethodSpec(config_class=TripletConfig, build=_build))
