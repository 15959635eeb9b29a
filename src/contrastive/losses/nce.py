"""InstDisc's objectives over a memory bank (Wu et al. 2018): the NCE approximation and the full
non-parametric softmax it approximates.

The non-parametric softmax P(i|v) = exp(v_i^T v / τ) / Σ_j exp(v_j^T v / τ) (Eq. 2) runs over all N
instances. NCE (Sec. 3.2) "cast[s] the multi-class classification problem into a set of binary
classification problems": with P(i|v) = exp(v^T f_i / τ) / Z (Eq. 4) and m noise samples from the uniform
P_n = 1/N, the posterior of sample i coming from the data is h(i, v) = P(i|v) / (P(i|v) + m P_n(i))
(Eq. 5), and the loss is J_NCE = -E_{P_d}[log h(i, v)] - m E_{P_n}[log(1 - h(i, v'))] (Eq. 6). Z is
estimated once by Monte Carlo, Z ≈ N E_j[exp(v_j^T f_i / τ)] (Eq. 7), and then kept fixed.

Bank rows carry no gradient (the official NCEFunction treats them and Z as constants). Every function
computes in float32 with autocast off; logs come from softplus of log-space differences, never exp then log.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from contrastive import distributed


def _scores(f: torch.Tensor, positive: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[n, 1 + m] inner products of each feature with its positive (column 0) and its m noise rows."""
    pos = torch.einsum("nd,nd->n", f, positive).unsqueeze(1)  # [n, 1]
    neg = torch.einsum("nd,nmd->nm", f, noise)  # [n, m]
    return torch.cat([pos, neg], dim=1)


@torch.no_grad()
def nce_normaliser(f: torch.Tensor, positive: torch.Tensor, noise: torch.Tensor, temperature: float,
                   dataset_size: int) -> torch.Tensor:
    """The Monte-Carlo estimate of Z from one batch: N times the mean of exp(score / τ) over the positive
    and noise scores of every process's batch (the official code's ``out.mean() * outputSize``).

    f [n, d] features, positive [n, d] and noise [n, m, d] bank rows. The local mean is averaged over
    processes (their batches are the same size), so every rank gets the single-process value. A scalar
    float32 tensor without gradient.
    """
    with torch.autocast(f.device.type, enabled=False):
        s = _scores(f.float(), positive.float(), noise.float()) / temperature  # [n, 1 + m]
        # mean of exp(s) as exp(logsumexp(s) - log count): no overflow before the mean is taken
        local_mean = torch.exp(torch.logsumexp(s.flatten(), dim=0) - math.log(s.numel()))
        return distributed.all_reduce_mean(local_mean) * dataset_size


def nce_loss(f: torch.Tensor, positive: torch.Tensor, noise: torch.Tensor, temperature: float, z: torch.Tensor,
             dataset_size: int) -> torch.Tensor:
    """Mean NCE loss (Eq. 6) of the features f [n, d] (L2-normalised) against their own bank rows
    positive [n, d] and m noise rows each, noise [n, m, d], drawn uniformly from the bank of
    ``dataset_size`` rows; ``z`` (a scalar tensor) is the fixed normaliser.

    -mean_i [log h(pos_i) + Σ_noise log(1 - h(noise))], with h = P / (P + m P_n) computed as
    log h = -softplus(log(m P_n) - log P) and log(1 - h) = -softplus(log P - log(m P_n)).
    The official NCECriterion adds eps = 1e-7 inside its divisions; the log-space form needs none.
    """
    m = noise.shape[1]
    with torch.autocast(f.device.type, enabled=False):
        s = _scores(f.float(), positive.float(), noise.float())  # [n, 1 + m]
        log_p = s / temperature - torch.log(z.float())  # log P(i|v) = v·f/τ - log Z
        log_m_pn = math.log(m / dataset_size)  # log(m P_n), P_n = 1/N
        log_h_pos = -F.softplus(log_m_pn - log_p[:, 0])  # [n]
        log_1mh_noise = -F.softplus(log_p[:, 1:] - log_m_pn)  # [n, m]
        return -(log_h_pos + log_1mh_noise.sum(dim=1)).mean()


def nonparametric_softmax(f: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of the full non-parametric softmax (Eq. 2): features f [n, d] against every
    bank row bank [N, d], each feature's target being its own dataset index ``index`` [n].

    The official LinearAverage + CrossEntropyLoss (``--nce-k 0``), practical when N is small (CIFAR-10).
    """
    with torch.autocast(f.device.type, enabled=False):
        logits = torch.einsum("nd,kd->nk", f.float(), bank.float()) / temperature  # [n, N]
        return F.cross_entropy(logits, index)
