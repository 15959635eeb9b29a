"""Colour spaces, batched on the tensor's device: sRGB -> CIE L*a*b* (D65), as ``skimage.color.rgb2lab`` computes it.

CMC (Tian et al. 2019, Sec. 4.2) splits an image into the L and ab channels of Lab. The official code converts each
PIL image with ``skimage.color.rgb2lab`` in the loader; here whole batches are converted on the training device:

    linear = c / 12.92                     if c <= 0.04045   (sRGB's inverse companding, IEC 61966-2-1)
             ((c + 0.055) / 1.055) ** 2.4  otherwise
    [X, Y, Z] = M [R, G, B]                  (sRGB's primaries, D65 white; skimage's ``xyz_from_rgb``)
    f(t) = t ** (1/3)                      if t > 0.008856   (CIE 1976, skimage's constants)
           7.787 t + 16 / 116              otherwise
    L = 116 f(Y / Yn) - 16;  a = 500 (f(X / Xn) - f(Y / Yn));  b = 200 (f(Y / Yn) - f(Z / Zn))

Every constant is a Python number, so no tensor is made from Python data (a blocking copy on a GPU).
"""

from __future__ import annotations

from typing import Sequence

import torch

# skimage.color.colorconv.xyz_from_rgb (sRGB primaries, D65)
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
# the D65 white point of the 2-degree observer (skimage's default illuminant and observer)
_D65 = (0.95047, 1.0, 1.08883)

# The official CMC code's Lab normalisation (train_CMC.py, get_train_loader): each channel's range mapped to
# about [-1, 1], mean = (min + max) / 2 and std = (max - min) / 2 of L in [0, 100], a in [-86.183, 98.233]
# and b in [-107.857, 94.478].
LAB_MEAN = ((0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = ((100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)


def _f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0.008856, t.clamp_min(0.008856).pow(1.0 / 3.0), t * 7.787 + 16.0 / 116.0)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] sRGB in [0, 1] -> float32 [B, 3, H, W] Lab: L in [0, 100], a and b about [-128, 127].

    Values outside [0, 1] (rounding after un-normalising) are clipped first.
    """
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_lab expects [B, 3, H, W] RGB, got {tuple(rgb.shape)}")
    c = rgb.float().clamp(0.0, 1.0)
    linear = torch.where(c > 0.04045, ((c + 0.055) / 1.055).pow(2.4), c / 12.92)
    r, g, b = linear.unbind(1)  # [B, H, W] each
    x, y, z = ((r * m[0] + g * m[1] + b * m[2]) / white for m, white in zip(_XYZ_FROM_RGB, _D65))
    fx, fy, fz = _f(x), _f(y), _f(z)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def affine_channels(x: torch.Tensor, scale: Sequence[float], shift: Sequence[float]) -> torch.Tensor:
    """[B, C, H, W] -> x[:, c] * scale[c] + shift[c] per channel, with Python numbers (no constant tensors):
    un-normalising is ``affine_channels(x, std, mean)``, normalising ``affine_channels(x, 1 / std, -mean / std)``."""
    return torch.stack([x[:, c] * s + t for c, (s, t) in enumerate(zip(scale, shift))], dim=1)


def normalised_lab(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Images normalised by the data's per-channel ``mean`` and ``std`` [B, 3, H, W] -> Lab normalised as the
    official CMC code does (``LAB_MEAN``, ``LAB_STD``: each channel about [-1, 1]), float32 [B, 3, H, W]."""
    lab = rgb_to_lab(affine_channels(x.float(), std, mean))
    return affine_channels(lab, [1.0 / s for s in LAB_STD], [-m / s for m, s in zip(LAB_MEAN, LAB_STD)])
