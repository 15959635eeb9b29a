"""CPC's InfoNCE (van den Oord et al. 2018, Eq. 4): score a prediction of a future latent against candidates.

"Given a set X = {x_1, ... x_N} of N random samples containing one positive sample from p(x_{t+k} | c_t) and
N - 1 negative samples from the 'proposal' distribution p(x_{t+k}), we optimize
L_N = - E_X [ log f_k(x_{t+k}, c_t) / sum_{x_j in X} f_k(x_j, c_t) ]", with f_k(x, c) = exp(z^T W_k c).

The same function serves the image grid (CPC v2, Henaff et al. 2019: the candidates are every patch latent
of the batch) and sequences (the audio setting: every time step of every sequence): the method flattens its
positions into rows and says which candidate row is each prediction's positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cpc_info_nce(predictions: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean InfoNCE of ``predictions [n, d]`` (W_k c_t, one row per predicted position) against
    ``candidates [m, d]`` (the latents z), where row ``i``'s positive is ``candidates[targets[i]]`` and every
    other candidate is a negative. Unnormalised dot products (the paper's log-bilinear score), one
    cross-entropy (log-sum-exp), computed in fp32 under autocast.
    """
    if predictions.ndim != 2 or candidates.ndim != 2 or predictions.shape[1] != candidates.shape[1]:
        raise ValueError(f"cpc_info_nce expects predictions [n, d] and candidates [m, d], got "
                         f"{tuple(predictions.shape)} and {tuple(candidates.shape)}")
    if targets.shape != predictions.shape[:1]:
        raise ValueError(f"one target per prediction: {tuple(targets.shape)} targets for {predictions.shape[0]} rows")
    with torch.autocast(predictions.device.type, enabled=False):
        logits = torch.einsum("nd,md->nm", predictions.float(), candidates.float())  # [n, m]
        return F.cross_entropy(logits, targets)


def cpc_accuracy(predictions: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of predictions whose highest-scoring candidate is their positive (a detached metric)."""
    with torch.no_grad(), torch.autocast(predictions.device.type, enabled=False):
        logits = torch.einsum("nd,md->nm", predictions.float(), candidates.float())  # [n, m]
        return (logits.argmax(1) == targets).float().mean()
