"""CLIP's symmetric contrastive loss (Radford et al. 2021, Fig. 3).

"Given a batch of N (image, text) pairs, CLIP is trained to predict which of the N x N possible (image, text)
pairings across a batch actually occurred": logits = exp(t) · I_e T_eᵀ over L2-normalised embeddings, and the
loss is the mean of the cross-entropy over texts for each image and over images for each text. "The learnable
temperature parameter τ was initialized to the equivalent of 0.07 ... and clipped to prevent scaling the
logits by more than 100": ``logit_scale`` holds log(1/τ) and its exponential is clamped at 100 here, where
the gradient then stops, so it cannot grow further.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive import distributed

MAX_LOGIT_SCALE = 100.0


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropies; image, text [n, d] (this process's n pairs, not yet
    normalised), logit_scale a scalar tensor, log of the inverse temperature (learnable).

    Each rank's images are scored against every rank's texts and its texts against every rank's images
    (gathered with gradient), so DDP's averaged gradient is the single-process gradient. Symmetric:
    ``clip_loss(image, text, s) == clip_loss(text, image, s)``.
    """
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"clip_loss expects two [n, d] tensors of one shape, got {tuple(image.shape)} and "
                         f"{tuple(text.shape)}")
    with torch.autocast(image.device.type, enabled=False):  # logits up to 100: fp32
        n = image.shape[0]
        img = F.normalize(image.float(), dim=1)
        txt = F.normalize(text.float(), dim=1)
        scale = logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)
        per_image = scale * torch.einsum("nd,md->nm", img, distributed.gather_with_grad(txt))  # [n, N]
        per_text = scale * torch.einsum("nd,md->nm", txt, distributed.gather_with_grad(img))  # [n, N]
        labels = torch.arange(n, device=img.device) + distributed.rank() * n  # the pair's global row
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
