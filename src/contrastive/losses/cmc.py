"""CMC's in-batch objective between two views (Tian et al. 2019, Eq. 2-3, with the batch as the negatives).

"Given a dataset of V1 and V2 [...] we learn to select the single positive sample out of the set
S = {x1, y1, y2, ..., yk}": L^{V1,V2} = -E log h(v1_i, v2_i) / Σ_j h(v1_i, v2_j) with h = exp(v1 · v2 / τ)
(Eq. 2), and "the full objective [...] L(V1, V2) = L^{V1,V2} + L^{V2,V1}" (Eq. 3). Here the k candidates
of each anchor are the other view's features of every image of the global batch (CMC's softmax variant,
NCESoftmaxLoss, without a memory bank); the memory-bank NCE variant is losses/nce.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive import distributed


def _one_way(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of each anchor [n, d] over every candidate of the global batch [N, d]; its
    positive is the candidate of the same image (global row rank * n + i)."""
    logits = torch.einsum("nd,md->nm", anchors, candidates) / temperature  # [n, N]
    labels = torch.arange(anchors.shape[0], device=anchors.device) + distributed.rank() * anchors.shape[0]
    return F.cross_entropy(logits, labels)


def cmc_info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """L(V1, V2) = L^{V1,V2} + L^{V2,V1}: the mean InfoNCE of view 1's features z1 [n, d] against view 2's
    features of the global batch, plus the same from view 2 to view 1.

    z1 and z2 are this process's rows, L2-normalised already (row i of both is image i). The candidates are
    all-gathered with their gradient (``distributed.gather_with_grad``, as NT-Xent), so with DDP's gradient
    averaging the gradient is the single-process one. Computed as cross-entropies in float32, autocast off.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"cmc_info_nce expects two [n, d] tensors of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        all1, all2 = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)  # [N, d] each
        return _one_way(z1, all2, temperature) + _one_way(z2, all1, temperature)
