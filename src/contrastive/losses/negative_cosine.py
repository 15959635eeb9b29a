"""Prediction against a target that carries no gradient: BYOL's normalised mean squared error and SimSiam's
negative cosine similarity, one direction each (a method symmetrises by adding the swapped call).

BYOL (Grill et al. 2020, Eq. 2): "we define the following mean squared error between the normalized
predictions and target projections, L = ||q̄(z) - z̄'||² = 2 - 2 <q(z), z'> / (||q(z)|| ||z'||)", minimised
"with respect to θ only, but not ξ" (the target network).
SimSiam (Chen & He 2021, Eq. 1): "we minimize their negative cosine similarity: D(p1, z2) = - p1/||p1|| ·
z2/||z2||", with the stop-gradient of Eq. 3 and Algorithm 1, D(p, z) = -cos(p, z.detach()).

Both compute in float32 with autocast off: bf16 keeps about 3 significant digits, and 2 - 2 cos cancels
as the two views come to agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[n] cosine similarity of the rows of p [n, d] and of z [n, d] (detached here), in float32."""
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(f"expected two [n, d] tensors of one shape, got {tuple(p.shape)} and {tuple(z.shape)}")
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    return torch.einsum("nd,nd->n", p, z)  # [n]


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||p/|p| - z/|z| ||² = 2 - 2 cos(p, z): 0 when aligned, 4 when opposite.

    p: [n, d] the online network's predictions; z: [n, d] the target network's projections of the other
    view, detached here so that no gradient reaches the target. A scalar float32 tensor.
    """
    with torch.autocast(p.device.type, enabled=False):
        return (2 - 2 * _cosine(p, z)).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, stopgrad(z)) = -cos(p, z), the mean over the batch: -1 when aligned.

    p: [n, d] the predictor's outputs; z: [n, d] the encoder's projections of the other view, detached
    here (the stop-gradient). A scalar float32 tensor.
    """
    with torch.autocast(p.device.type, enabled=False):
        return -_cosine(p, z).mean()
