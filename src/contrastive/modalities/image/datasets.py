"""Image datasets: the image side of the dataset contract, images held in memory, and the views over image
datasets read per item (subset, concatenation).

An item is ``(image uint8 [C, S, S], label, index)``, one shape per dataset (S = ``image_size``). Augmentation
happens later, batched on the training device (``views.py``).
"""

from __future__ import annotations

import bisect
import logging
from functools import cached_property
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.data.datasets import SampleDataset

# Normalisation statistics of a folder come from at most this many images, evenly spaced in dataset order
# so the sample (and so the statistics) is the same on every run.
STATS_SAMPLE = 2000
# With data.in_memory unset, a dataset is decoded into memory when it takes at most this fraction of the
# memory available: the rest is for training (a step of a ResNet-50 at batch 256 takes tens of GiB).
IN_MEMORY_FRACTION = 0.5

log = logging.getLogger("contrastive.data")


class ImageDataset(SampleDataset):
    """A dataset of images: ``channels`` and ``image_size`` (every item is ``[channels, image_size, image_size]``),
    and ``mean`` and ``std`` per channel, in [0, 1] pixel units, which normalise the views and evaluation."""

    modality = "image"
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def take(self, indices: Tensor) -> "ImageDataset":
        """A view of the items ``indices`` (their images read as they are served)."""
        return Subset(self, indices)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {len(self)} images, "
                f"{self.channels}x{self.image_size}x{self.image_size}, classes={self.num_classes})")


class MeasuredStats:
    """``mean``/``std`` read from a ``_stats`` pair ``(mean, std)`` that the dataset computes once, lazily."""

    _stats: tuple[tuple[float, ...], tuple[float, ...]]

    @property
    def mean(self) -> tuple[float, ...]:
        return self._stats[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._stats[1]


class TensorImages(MeasuredStats, ImageDataset):
    """Images held as one uint8 tensor ``pixels [N, C, H, H]``, served at ``size`` (resized per item when
    ``H != size``, which lets a dataset defer resizing instead of holding every image at a larger size).

    ``pixels`` may be backed by a memory-mapped file: items are then read from disk as they are served.
    ``mean``/``std`` None: computed from the images (an evenly spaced sample of at most STATS_SAMPLE).
    """

    def __init__(self, pixels: Tensor, labels: Tensor, *, name: str, classes: list[str] | None,
                 size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != pixels.shape[-2]:
            raise ValueError(f"pixels must be uint8 [N, C, H, H], got {pixels.dtype} {list(pixels.shape)}")
        if len(labels) != len(pixels):
            raise ValueError(f"{len(labels)} labels for {len(pixels)} images")
        self.pixels = pixels
        self.labels = labels.long()
        self.name = name
        self.classes = classes
        self.channels = pixels.shape[1]
        self.image_size = size or pixels.shape[-1]
        self.samples = pixels if pixels.shape[-1] == self.image_size else None
        if mean is not None and std is not None:
            self.__dict__["_stats"] = (tuple(mean), tuple(std))

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        # A clone, not a view: a view would carry the whole storage through DataLoader worker queues.
        image = resize_images(self.pixels[i : i + 1], self.image_size)[0].clone()
        return image, int(self.labels[i]), i

    def take(self, indices: Tensor) -> "TensorImages":
        """A copy of the images ``indices`` (so the trainer can still index them, and the parent can be freed)."""
        return TensorImages(self.pixels[indices], self.labels[indices], name=self.name, classes=self.classes,
                            size=self.image_size, mean=self.mean, std=self.std)

    @cached_property
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        idx = stats_indices(len(self))
        return channel_stats(resize_images(self.pixels[idx[s : s + 256]], self.image_size)
                             for s in range(0, len(idx), 256))


class Subset(ImageDataset):
    """Items ``indices`` of ``dataset`` re-numbered 0..len-1, with the dataset's attributes (labels
    subsetted, normalisation statistics shared). Items of ``None`` (skipped corrupt images) pass through."""

    def __init__(self, dataset: ImageDataset, indices: Tensor):
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.labels = dataset.labels[self.indices]
        self.name = dataset.name
        self.classes = dataset.classes
        self.channels = dataset.channels
        self.image_size = dataset.image_size

    def __getitem__(self, i: int) -> tuple[Tensor, int, int] | None:
        item = self.dataset[int(self.indices[i])]
        return None if item is None else (item[0], item[1], i)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.dataset.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.dataset.std


class Concat(ImageDataset):
    """``parts`` one after another, numbered 0..len-1; statistics are the first part's."""

    def __init__(self, parts: Sequence[ImageDataset], *, name: str):
        first = parts[0]
        if any((p.channels, p.image_size) != (first.channels, first.image_size) for p in parts):
            raise ValueError("parts of a Concat must share channels and image size")
        self.parts = list(parts)
        self.starts = [0]
        for p in self.parts[:-1]:
            self.starts.append(self.starts[-1] + len(p))
        self.labels = torch.cat([p.labels for p in self.parts])
        self.name = name
        self.classes = first.classes
        self.channels = first.channels
        self.image_size = first.image_size

    def __getitem__(self, i: int) -> tuple[Tensor, int, int] | None:
        k = bisect.bisect_right(self.starts, i) - 1
        item = self.parts[k][i - self.starts[k]]
        return None if item is None else (item[0], item[1], i)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.parts[0].mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.parts[0].std


def resize_images(images: Tensor, size: int) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, size, size]``, bilinear with antialiasing; ``images`` itself
    when already that size. Each image is resized on its own, so a batch gives the same pixels as one by
    one; batches go in chunks to bound the float copy."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty(*images.shape[:2], size, size, dtype=torch.uint8)
    for s in range(0, len(images), 512):
        chunk = F.interpolate(images[s : s + 512].float(), size=(size, size), mode="bilinear",
                              align_corners=False, antialias=True)
        out[s : s + 512] = chunk.round_().clamp_(0, 255)
    return out


def decide_in_memory(setting: bool | None, decoded_bytes: int, what: str) -> bool:
    """``data.in_memory`` when set; unset (None), whether ``decoded_bytes`` fits in IN_MEMORY_FRACTION of the
    host memory available now (the log says when it does not, and what the data will do instead)."""
    if setting is not None:
        return setting
    from contrastive.machine import available_memory, gib

    available, source = available_memory(torch.device("cpu"))
    if decoded_bytes <= IN_MEMORY_FRACTION * available:
        return True
    log.warning("%s: decoded, the images take %s, more than %d%% of the %s available (%s): they are decoded "
                "per batch instead (data.in_memory=false); data.in_memory=true holds them in memory anyway",
                what, gib(decoded_bytes), round(IN_MEMORY_FRACTION * 100), gib(available), source)
    return False


def stats_indices(n: int) -> Tensor:
    """At most STATS_SAMPLE indices of 0..n-1, evenly spaced; all of them when n <= STATS_SAMPLE."""
    k = min(n, STATS_SAMPLE)
    return torch.arange(k) * n // k


def channel_stats(batches: Iterable[Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std, in [0, 1] pixel units, over uint8 batches ``[n, C, H, W]``."""
    total = squares = None
    count = 0
    for batch in batches:
        x = batch.to(torch.float64).div_(255)
        s, q = x.sum((0, 2, 3)), x.square().sum((0, 2, 3))  # [C] each
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += x.numel() // x.shape[1]
    if total is None:
        raise ValueError("no images to compute normalisation statistics from")
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
