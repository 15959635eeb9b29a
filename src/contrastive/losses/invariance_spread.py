"""The instance-wise softmax embedding loss of InvaSpread (Ye et al. 2019, Sec. 3.1).

The probability of the augmented x̂_i being recognised as instance i is
P(i|x̂_i) = exp(f_i^T f̂_i / τ) / Σ_k exp(f_k^T f̂_i / τ) (Eq. 3), and of another image x_j being recognised
as instance i, P(i|x_j) = exp(f_i^T f_j / τ) / Σ_k exp(f_k^T f_j / τ) (Eq. 4). Assuming the events
independent, the joint probability of x̂_i being recognised as i and no other x_j being recognised as i
is P(i|x̂_i) Π_{j≠i} (1 - P(i|x_j)) (Eq. 5), and its negative log-likelihood
J = -Σ_i log P(i|x̂_i) - Σ_i Σ_{j≠i} log(1 - P(i|x_j)) (Eq. 6) is minimised.

As the official ``BatchCriterion`` computes it (the paper's sums run over the m original-view features;
the code's over every other feature of the batch): each of the 2B features of a batch (two views of B
images) is an anchor; its candidates are the other 2B - 1 features, its positive the other view of the
same image and every feature of another image a negative. The loss is the mean over the 2B anchors of
-[log P(positive | anchor) + Σ_negatives log(1 - P(negative | anchor))], with P the softmax of the anchor's
scores over its 2B - 1 candidates.

Gradient flows through the anchor side only: the official code multiplies the features by
``x.t().data`` (and the reordered features' ``.data``), so the candidates are constants. Under DDP the
candidates are all-gathered without gradient and the anchors are this process's, which then gives the
single-process loss and, once DDP averages parameter gradients, the single-process gradient.
"""

from __future__ import annotations

import math

import torch

from contrastive import distributed

_LOG_HALF = -math.log(2.0)


def _log_not(logits: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - P) of every entry of a row-wise softmax, from its logits [r, c] and log P [r, c].

    Where P <= 1/2 (every entry but, at most, the row's largest), log1p(-exp(log P)) is accurate. The
    largest entry's P may round to 1 (a near-duplicate negative at a low temperature); its log(1 - P) is
    computed as the log-sum-exp of the row without it minus that of the whole row, which stays finite.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    top = logits.argmax(dim=1)  # [r]
    minus_inf = logits.new_full((), float("-inf"))  # made on the device: no host-to-device copy
    without_top = torch.logsumexp(logits.index_put((rows, top), minus_inf), dim=1)  # [r]
    log_top = without_top - torch.logsumexp(logits, dim=1)  # [r] log(1 - P) of the largest entry
    # clamped so that the replaced top entry's exp(0) never makes an infinite (then NaN) gradient
    small = torch.log1p(-torch.exp(log_p.clamp(max=_LOG_HALF)))  # [r, c]
    return small.index_put((rows, top), log_top)


def invariance_spread(f1: torch.Tensor, f2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InvaSpread loss over the 2n local anchors, with candidates from every process.

    f1, f2: [n, d] L2-normalised features of the two views of this process's n images. The 2N
    candidates (N = world_size * n) are both views of every process's images, without gradient.
    """
    if f1.shape != f2.shape or f1.ndim != 2:
        raise ValueError(f"invariance_spread expects two [n, d] tensors of one shape, got {tuple(f1.shape)} "
                         f"and {tuple(f2.shape)}")
    n = f1.shape[0]
    with torch.autocast(f1.device.type, enabled=False):
        f1, f2 = f1.float(), f2.float()
        c1 = distributed.all_gather(f1.detach())  # [N, d]
        c2 = distributed.all_gather(f2.detach())  # [N, d]
        big_n = c1.shape[0]
        candidates = torch.cat([c1, c2])  # [2N, d]
        anchors = torch.cat([f1, f2])  # [2n, d]
        logits = torch.einsum("ad,cd->ac", anchors, candidates) / temperature  # [2n, 2N]

        local = torch.arange(n, device=f1.device) + distributed.rank() * n  # global index of each image
        self_idx = torch.cat([local, local + big_n])  # [2n] where each anchor sits among the candidates
        pos_idx = torch.cat([local + big_n, local])  # [2n] the other view of the same image
        rows = torch.arange(2 * n, device=f1.device)
        minus_inf = logits.new_full((), float("-inf"))  # made on the device: no host-to-device copy
        logits = logits.index_put((rows, self_idx), minus_inf)  # an anchor is never its own candidate
        log_p = torch.log_softmax(logits, dim=1)  # [2n, 2N]; -inf at the anchor itself

        negative = torch.ones_like(log_p, dtype=torch.bool)
        negative[rows, self_idx] = False
        negative[rows, pos_idx] = False
        log_not = _log_not(logits, log_p).masked_fill(~negative, 0.0)  # [2n, 2N] log(1 - P) at the negatives
        return -(log_p[rows, pos_idx] + log_not.sum(dim=1)).mean()
