"""Losses: pure functions, one family per file."""

from contrastive.losses.clip import clip_loss
from contrastive.losses.cmc import cmc_info_nce
from contrastive.losses.cpc import cpc_accuracy, cpc_info_nce
from contrastive.losses.dino import center_update, dino_loss
from contrastive.losses.distill import distillation_loss
from contrastive.losses.info_nce import info_nce_batch, info_nce_queue
from contrastive.losses.invariance_spread import invariance_spread
from contrastive.losses.metric import contrastive_margin_loss, pairwise_margin_loss, supcon_loss, triplet_loss
from contrastive.losses.nce import nce_loss, nce_normaliser, nonparametric_softmax
from contrastive.losses.negative_cosine import byol_loss, negative_cosine
from contrastive.losses.nt_xent import nt_xent
from contrastive.losses.simcse import simcse_sup, simcse_unsup
from contrastive.losses.swav import sinkhorn, swav_loss

__all__ = ["byol_loss", "center_update", "clip_loss", "cmc_info_nce", "contrastive_margin_loss", "cpc_accuracy", "cpc_info_nce", "dino_loss", "distillation_loss",
           "info_nce_batch", "info_nce_queue", "invariance_spread", "nce_loss", "nce_normaliser", "negative_cosine",
           "nonparametric_softmax", "nt_xent", "pairwise_margin_loss", "simcse_sup", "simcse_unsup", "sinkhorn", "supcon_loss", "swav_loss", "triplet_loss"]
