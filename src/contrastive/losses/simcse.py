"""SimCSE's contrastive objectives (Gao, Yao, Chen 2021), on cosine similarity over in-batch candidates.

Unsupervised (Eq. 1): "we simply feed the same input to the encoder twice" with independent dropout masks,
l_i = -log exp(sim(h_i, h_i+)/τ) / Σ_j exp(sim(h_i, h_j+)/τ), τ = 0.05. Supervised (Eq. 5): the positive is
an entailed sentence and a contradicting sentence of every row is an extra "hard negative",
l_i = -log exp(sim(h_i, h_i+)/τ) / Σ_j (exp(sim(h_i, h_j+)/τ) + exp(sim(h_i, h_j-)/τ)).

Candidates come from every process (``distributed.gather_with_grad``, as NT-Xent), so each rank's anchors see
the global batch and DDP's averaged gradient is the single-process gradient. MoCo v3's ``info_nce_batch`` is
not this loss: it detaches its keys (no gradient reaches the second view) and scales by 2τ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive import distributed


def _check(*zs: torch.Tensor) -> None:
    if zs[0].ndim != 2 or any(z.shape != zs[0].shape for z in zs):
        raise ValueError(f"SimCSE expects [n, d] tensors of one shape, got {[tuple(z.shape) for z in zs]}")


def _against_gathered(anchors: torch.Tensor, groups: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean cross-entropy of local anchors [n, d] over the gathered candidates of every group (the global
    batch's [N, d] each, concatenated), the positive being the first group's row of the same sentence."""
    with torch.autocast(anchors.device.type, enabled=False):  # cosines / 0.05 in bf16 err by ~0.1
        n = anchors.shape[0]
        h = F.normalize(anchors.float(), dim=1)
        candidates = torch.cat([distributed.gather_with_grad(F.normalize(g.float(), dim=1)) for g in groups])  # [kN, d]
        logits = torch.einsum("nd,md->nm", h, candidates) / temperature  # [n, kN]
        labels = torch.arange(n, device=h.device) + distributed.rank() * n  # the positive's global row
        return F.cross_entropy(logits, labels)


def simcse_unsup(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Unsupervised SimCSE: z1, z2 [n, d], two encodings (two dropout masks) of this process's n sentences.

    Each z1 row's positive is the same sentence's z2 row, its negatives the other N - 1 z2 rows of the global
    batch; both sides carry gradients. τ = 0.05 as the paper.
    """
    _check(z1, z2)
    return _against_gathered(z1, [z2], temperature)


def simcse_sup(anchor: torch.Tensor, positive: torch.Tensor, hard_negative: torch.Tensor,
               temperature: float = 0.05) -> torch.Tensor:
    """Supervised SimCSE (Eq. 5): anchor (premise), positive (entailment) and hard_negative (contradiction),
    each [n, d]. The logits of an anchor run over [positives; hard negatives] of the global batch, [2N]."""
    _check(anchor, positive, hard_negative)
    return _against_gathered(anchor, [positive, hard_negative], temperature)
