"""InvaSpread (Ye et al. 2019, "Unsupervised Embedding Learning via Invariant and Spreading Instance Feature").

One encoder trained end to end on the batch's real-time features instead of a memory bank (Fig. 2: a
"Siamese network" whose two branches share their weights). Pseudocode of one step (the official demo_seen.py):

    f, f_hat = normalise(fc(backbone(cat(aug(x), aug(x))))).chunk(2)   # [B, 128] each, one forward pass
    loss = invariance_spread(f, f_hat, τ)    # positive: the other view; negatives: every other image's views
    loss.backward(); optimizer.step()

The two terms of the loss make the features "data augmentation invariant" (an image's two views agree)
and "instance spread-out" (different images are pushed apart; abstract). Nothing is kept between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.errors import ConfigError
from contrastive.losses.invariance_spread import invariance_spread
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.registry import register


@dataclass
class InvaSpreadConfig:
    temperature: float = field(default=0.1, metadata={"help": "τ of the instance-wise softmax; 0.1 in the paper's "
                               "CIFAR-10 experiments and the official command (--batch-t 0.1, '0.05-0.1')."})
    embedding_dim: int = field(default=128, metadata={"help": "Width of the fc layer's L2-normalised output; "
                               "128 in the paper and the official code (--low-dim 128)."})


class InvaSpread(Method):
    """Backbone, fc to ``embedding_dim``, L2 normalisation; the two views of every image contrasted in-batch."""

    min_batch = 2  # every other view of the batch is a negative

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: InvaSpreadConfig):
        super().__init__()
        if cfg.temperature <= 0:
            raise ConfigError(f"method.temperature={cfg.temperature} must be > 0")
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, cfg.embedding_dim)

    def projection_head(self) -> nn.Sequential:
        return nn.Sequential(self.fc)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [n, C, S, S] -> L2-normalised float32 features [n, embedding_dim]."""
        return F.normalize(self.fc(self.backbone(x)).float(), dim=1)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        views = batch.views
        if len(views) != 2:
            raise ConfigError(f"InvaSpread contrasts an image's augmented view with another view of it, so it needs "
                              f"exactly 2 views per image, got {len(views)}; set views.n_views=2")
        n = views[0].shape[0]
        f = self.embed(torch.cat(views))  # [2n, d]: one pass, batch norm over both views as in the official code
        return StepOutput(loss=invariance_spread(f[:n], f[n:], self.cfg.temperature), embedding=f[:n].detach())


def _build(ctx: BuildContext, cfg: InvaSpreadConfig) -> InvaSpread:
    return InvaSpread(*ctx.build_backbone(), cfg)


register("methods", "invaspread")(MethodSpec(config_class=InvaSpreadConfig, build=_build))
