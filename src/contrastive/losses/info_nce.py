"""InfoNCE with a momentum encoder's keys: against a queue (MoCo v1/v2) or against the batch (MoCo v3).

"a contrastive loss ... whose value is low when q is similar to its positive key k+ and dissimilar to all
other keys (considered negative keys for q)": L_q = -log exp(q·k+/τ) / Σ_i exp(q·k_i/τ) (He et al. 2020,
Eq. 1), computed as one cross-entropy over the logits (log-sum-exp, never exp then log), in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive import distributed


def info_nce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of queries q [n, d] whose positive is k [n, d] and negatives the queue [K, d].

    All three are L2-normalised already; k and the queue carry no gradient. Logits are [n, 1 + K] with the
    positive in column 0, as MoCo's Algorithm 1 builds them.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(1)  # [n, 1]
        l_neg = torch.einsum("nc,kc->nk", q, queue)  # [n, K]
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # [n, 1 + K]
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
        return F.cross_entropy(logits, labels)


def info_nce_batch(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's loss: queries q [n, d] against the keys of every process's batch, k [n, d] here
    (Chen et al. 2021, Algorithm 1: ``ctr(q, k)``), times 2τ.

    q and k are normalised here; k carries no gradient and is all-gathered, so each query's negatives
    are the other N - 1 keys of the global batch and its positive is the key of the same image. The
    factor 2τ is MoCo v3's: its loss is "scaled by 2τ" so that the gradient's size does not change with
    the temperature (a softmax cross-entropy's gradient scales with 1/τ), which keeps the learning rate
    transferable across temperatures; the 2 accounts for the loss being summed over the two directions.
    """
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        keys = distributed.all_gather(k.detach())  # [N, d], N = world_size * n
        logits = torch.einsum("nc,mc->nm", q, keys) / temperature  # [n, N]
        labels = torch.arange(q.shape[0], device=q.device) + distributed.rank() * q.shape[0]
        return F.cross_entropy(logits, labels) * (2 * temperature)
