"""Losses: pure functions, one family per file."""

from contrastive.losses.distill import distillation_loss
from contrastive.losses.info_nce import info_nce_batch, info_nce_queue
from contrastive.losses.invariance_spread import invariance_spread
from contrastive.losses.nce import nce_loss, nce_normaliser, nonparametric_softmax
from contrastive.losses.nt_xent import nt_xent

__all__ = ["distillation_loss", "info_nce_batch", "info_nce_queue", "invariance_spread", "nce_loss", "nce_normaliser",
           "nonparametric_softmax", "nt_xent"]
