"""Losses: pure functions, one family per file."""

from contrastive.losses.nt_xent import nt_xent

__all__ = ["nt_xent"]
