"""SwAV's codes and swapped prediction (Caron et al. 2020).

"we predict the code of a view from the representation of another view": ℓ(z_t, q_s) = -Σ_k q_s^(k) log
p_t^(k), with p_t^(k) = softmax_k(z_t^T c_k / τ) (Eq. 2), summed over every crop v ≠ i for each crop i that
has a code (multi-crop, Eq. 4). The codes are the equal-partition optimal transport Q* = Diag(u) exp(C^T Z
/ ε) Diag(v), whose "renormalization vectors are computed using a small number of matrix multiplications
using the iterative Sinkhorn-Knopp algorithm"; "using only 3 iterations is fast and sufficient".
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from contrastive import distributed


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Codes [B, K] of this process's B samples from their prototype scores [B, K], over the global batch.

    The official ``distributed_sinkhorn`` (facebookresearch/swav, main_swav.py), in float32 without
    gradient: Q = exp(scores / ε) normalised to total 1 over every process's samples; then ``iterations``
    times each prototype's column divided by its global sum and by K, each sample's row by its sum and by
    B_global = B * world_size (every process holds an equal share, as the trainer splits it); finally each
    sample's code is scaled to sum to 1. The global maximum of scores / ε is subtracted before exp so that
    it cannot overflow (exp(89) is inf in float32): that multiplies Q by one constant, which the first
    normalisation removes, so the codes are the official ones.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn expects prototype scores [B, K], got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"sinkhorn needs epsilon > 0 and iterations >= 1, got {epsilon} and {iterations}")
    with torch.autocast(scores.device.type, enabled=False):
        logits = scores.detach().float() / epsilon  # [B, K]
        q = torch.exp(logits - distributed.all_reduce_max(logits.max()))  # [B, K], every entry <= 1
        n_samples, n_prototypes = q.shape[0] * distributed.world_size(), q.shape[1]
        q /= distributed.all_reduce_sum(q.sum())
        for _ in range(iterations):
            q /= distributed.all_reduce_sum(q.sum(dim=0, keepdim=True)) * n_prototypes  # each prototype: 1/K
            q /= q.sum(dim=1, keepdim=True) * n_samples  # each sample: 1/B_global
        return q * n_samples  # each sample's code sums to 1


def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """Swapped prediction: the mean over coded crops i of the mean over the other crops v of
    -mean_b Σ_k codes[i][b, k] log softmax(scores[v][b] / τ)[k] (main_swav.py's ``subloss / (nmb_crops - 1)``,
    then ``/ len(crops_for_assign)``).

    scores: one [B, K] tensor of prototype scores per crop, crops in order; codes: [B, K] codes of the first
    len(codes) crops (SwAV's ``crops_for_assign``, the full-resolution ones), detached here. A scalar float32
    tensor.
    """
    if not 1 <= len(codes) <= len(scores) or len(scores) < 2:
        raise ValueError(f"swav_loss needs at least 2 crops and 1 to {len(scores)} codes, got {len(scores)} crops "
                         f"and {len(codes)} codes")
    with torch.autocast(scores[0].device.type, enabled=False):
        log_p = F.log_softmax(torch.stack([s.float() for s in scores]) / temperature, dim=2)  # [V, B, K]
        q = torch.stack([c.detach().float() for c in codes])  # [A, B, K]
        n_crops, batch = log_p.shape[0], log_p.shape[1]
        cross = -torch.einsum("abk,vbk->av", q, log_p) / batch  # [A, V] mean over b of -Σ_k q log p
        other = ~torch.eye(len(codes), n_crops, dtype=torch.bool, device=cross.device)  # [A, V] v != i
        return (cross * other).sum(dim=1).mean() / (n_crops - 1)
