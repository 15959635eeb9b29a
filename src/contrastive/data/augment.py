"""Batched augmentation kernels with one random parameter per sample.

Each colour kernel takes float images in [0, 1] of shape [n, C, H, W] (C = 1 or 3) and a factor per
sample of shape [n], and matches the ``torchvision.transforms.functional`` op of the same name applied
to each image on its own, clamping included. The geometric kernels turn crop boxes into one
``grid_sample`` call. Nothing here draws random numbers: the image views (``modalities/image/views.py``) draw
them from a caller's generator, so these kernels are plain functions that tests compare against torchvision.

Nothing here waits for the device: no ``nonzero``, ``.item()`` or tensor built from Python data on an
accelerator, so the host queues a whole view without synchronising (see :func:`apply_where`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# torchvision's rgb_to_grayscale weights (0.2989, not the textbook 0.299), so that contrast and
# saturation match torchvision to float precision.
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)


def _per_sample(factor: Tensor) -> Tensor:
    """[n] -> [n, 1, 1, 1], to broadcast one factor over each image."""
    return factor.view(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """Luma of RGB images [n, 3, H, W] -> [n, 1, H, W]; grey images [n, 1, H, W] pass through."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (r * _GREY_WEIGHTS[0] + g * _GREY_WEIGHTS[1] + b * _GREY_WEIGHTS[2]).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = _per_sample(factor)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """[n, C, H, W] scaled by factor [n], clamped to [0, 1] (blend with black)."""
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """[n, C, H, W] blended with each image's mean grey level by factor [n]."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """[n, 3, H, W] blended with its own grey image by factor [n]; grey images are returned as they are."""
    if x.shape[1] == 1:
        return x
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """[n, 3, H, W] with the HSV hue rotated by shift [n] (in turns, within [-0.5, 0.5]); grey passes through.

    The same HSV round trip as torchvision, in fewer passes: hue in sextants h6 by Pillow's case split
    (which channel is the maximum), and back with the closed form v - chroma * clamp(2 - |k - 2|, 0, 1),
    k = (m + h6) mod 6 for m = 5, 3, 1 (R, G, B), since v * s is the chroma. The case split uses float
    masks, not ``torch.where``: on data-dependent masks the branchy select is ~10x slower on CPU.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r = (maxc == r).to(x.dtype)
    is_g = (maxc == g).to(x.dtype).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h6 = is_r * (g - b) + is_g * (b - r).add_(chroma, alpha=2) + is_b * (r - g).add_(chroma, alpha=4)
    # Grey pixels have chroma 0 and numerator 0: the tiny floor makes their hue 0 instead of 0/0.
    h6 = h6.div_(chroma.clamp(min=torch.finfo(x.dtype).tiny)).add_(6.0 * shift.view(-1, 1, 1))
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = offsets + h6.unsqueeze(1)
    k = k.sub_(torch.floor(k / 6.0).mul_(6.0))
    ramp = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return ramp.mul_(chroma.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1)).clamp_(0.0, 1.0)


def to_grayscale(x: Tensor) -> Tensor:
    """[n, C, H, W] -> [n, C, H, W] with every channel the luma (RandomGrayscale keeps C)."""
    return grayscale(x).expand_as(x).contiguous()


def solarize(x: Tensor, threshold: float = 0.5) -> Tensor:
    """[n, C, H, W] with every value >= threshold inverted (1 - x)."""
    return torch.where(x >= threshold, 1.0 - x, x)


# Jitter ops in ColorJitter's numbering (fn_idx): 0 brightness, 1 contrast, 2 saturation, 3 hue.
JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def by_index(x: Tensor) -> bool:
    """Whether :func:`apply_where` indexes the selected samples (True on the CPU) or selects with masks.

    Indexing runs an op on just the selected samples, the cheaper path on a CPU, but needs their count on
    the host (``nonzero``): on an accelerator each such call waits for every queued kernel. Masks cost a
    pass over every sample and never wait. Both paths give bitwise-identical results (tested).
    """
    return x.device.type == "cpu"


def apply_where(x: Tensor, mask: Tensor, op: Callable[..., Tensor], *params: Tensor) -> Tensor:
    """``x`` [B, ...] with ``op(x, *params)`` on the samples where ``mask`` [B] holds, the others unchanged.

    ``params`` are per-sample parameters [B, ...] (a factor, a sigma); ``op`` treats each sample on its own.
    On the CPU the selected samples are indexed, transformed and written back into ``x``; elsewhere ``op``
    runs on the whole batch and ``torch.where`` keeps its result where ``mask`` holds (a new tensor).
    Callers use the return value.
    """
    if by_index(x):
        idx = mask.nonzero().squeeze(1)
        if idx.numel():
            x[idx] = op(x[idx], *(p[idx] for p in params))
        return x
    return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), op(x, *params), x)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, apply: Tensor) -> Tensor:
    """ColorJitter with each sample's own factors and op order, on the samples where ``apply`` holds.

    x [B, C, H, W] in [0, 1]; factors [B, 4] (brightness, contrast, saturation, hue shift); order [B, 4]
    a permutation of 0..3 per sample (slot -> op); apply [B] bool. At each of the 4 slots every op runs
    once, on the samples whose permutation puts it there (:func:`apply_where`: just those samples on the
    CPU, writing into x; every sample, then a select, on an accelerator). Returns the jittered batch.
    """
    for slot in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            if x.shape[1] == 1 and op_index >= 2:
                continue  # saturation and hue leave grey images unchanged
            x = apply_where(x, (order[:, slot] == op_index) & apply, op, factors[:, op_index])
    return x


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """One normalised 1-D Gaussian per sigma: [n] -> [n, kernel_size] (torchvision's taps)."""
    taps = torch.arange(kernel_size, device=sigma.device, dtype=sigma.dtype) - (kernel_size - 1) / 2
    return torch.softmax(-0.5 * (taps / sigma.view(-1, 1)) ** 2, dim=1)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """[n, C, H, W] blurred by a separable Gaussian of odd side ``kernel_size`` and sigma [n] per sample.

    Reflect padding as torchvision's gaussian_blur; the per-sample kernels become one depthwise
    (grouped) convolution over the n*C planes per direction.
    """
    n, c, h, w = x.shape
    kernel = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # [n*C, k]
    pad = kernel_size // 2
    planes = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    planes = F.conv2d(planes, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return planes.view(n, c, h, w)


def sample_crop_boxes(
    u_area: Tensor, u_log_ratio: Tensor, u_top: Tensor, u_left: Tensor,
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
) -> Tensor:
    """RandomResizedCrop's box per sample from uniform draws, without a Python loop over samples.

    u_area, u_log_ratio [B, T] are T tries (torchvision makes 10); the first try whose box fits is used,
    and a sample with none falls back to torchvision's centre crop. u_top, u_left [B] place the box.
    Returns float boxes [B, 4] as (top, left, box height, box width) in whole pixels.
    """
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    top = torch.floor(u_top * (height - h + 1)).clamp_(max=height - h)
    left = torch.floor(u_left * (width - w + 1)).clamp_(max=width - w)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    # the centre crop as Python numbers: a tensor built from them would be a blocking copy to an accelerator
    fallback = ((height - fh) // 2, (width - fw) // 2, fh, fw)
    return torch.stack([torch.where(found, v, float(f)) for v, f in zip((top, left, h, w), fallback)], dim=1)


def resized_crop(x: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop each image [B, C, H, W] to its box [B, 4] (top, left, h, w), resize to size x size, and
    mirror it horizontally where flip [B] holds: one bilinear ``grid_sample`` for the whole batch.

    The affine map sends output pixel centres to input pixel centres as torchvision's resize of the
    crop does (align_corners=False); border padding stands in for its edge clamping. No antialiasing:
    crops are upsampled whenever the output side is the input side.
    Returns [B, C, size, size].
    """
    b, c, height, width = x.shape
    top, left, h, w = boxes.unbind(dim=1)
    sign = 1.0 - 2.0 * flip.to(x.dtype)
    # Output pixel centres in normalised coordinates, then the per-sample affine map x_in = a x_out + t,
    # built by broadcasting rather than affine_grid's batched matmul (the grid is separable).
    base = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1  # [S]
    gx = (sign * w / width).unsqueeze(1) * base + ((2 * left + w) / width - 1).unsqueeze(1)  # [B, S]
    gy = (h / height).unsqueeze(1) * base + ((2 * top + h) / height - 1).unsqueeze(1)  # [B, S]
    grid = torch.stack([gx.unsqueeze(1).expand(b, size, size), gy.unsqueeze(2).expand(b, size, size)], dim=3)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
