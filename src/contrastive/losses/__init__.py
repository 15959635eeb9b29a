"""Losses: pure functions, one family per file."""

from contrastive.losses.info_nce import info_nce_batch, info_nce_queue
from contrastive.losses.nt_xent import nt_xent

__all__ = ["info_nce_batch", "info_nce_queue", "nt_xent"]
