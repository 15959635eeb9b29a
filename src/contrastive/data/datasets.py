"""The dataset contract, the in-memory dataset and the views over datasets (subset, concatenation).

Datasets here only decode. Item ``i`` is ``(sample, label, i)``: ``sample`` a sample of the dataset's modality
(``modality``; images: uint8 ``[C, H, W]``, one shape per dataset, H = W = ``image_size``; audio: a float32 clip
``[1, T]``, see ``data/audio.py``), ``label`` an int (-1 when unlabeled), ``i`` the item's position in the dataset
actually served, which memory-bank methods use as the sample's identity. Augmentation happens later, batched on
the training device, by the transform the modality chooses (``data/modality.py``).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, default_collate

# Normalisation statistics of a folder come from at most this many images, evenly spaced in dataset order
# so the sample (and so the statistics) is the same on every run.
STATS_SAMPLE = 2000
# With data.in_memory unset, a dataset is decoded into memory when it takes at most this fraction of the
# memory available: the rest is for training (a step of a ResNet-50 at batch 256 takes tens of GiB).
IN_MEMORY_FRACTION = 0.5

log = logging.getLogger("contrastive.data")


class ImageDataset(Dataset):
    """What every dataset of this package exposes, besides ``len`` and ``(sample, label, index)`` items.

    ``modality`` names the kind of sample ("image" unless a dataset says otherwise). ``labels`` is int64 ``[N]``
    (-1 where unlabeled); ``mean`` and ``std`` are per channel, in [0, 1] pixel units. ``images`` is the whole
    dataset as one tensor when it is held in memory as served (images: uint8 ``[N, C, S, S]`` at ``image_size``;
    the trainer then indexes it directly), else None.
    """

    modality: str = "image"
    name: str
    channels: int
    image_size: int
    classes: list[str] | None
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    images: Tensor | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {len(self)} images, "
                f"{self.channels}x{self.image_size}x{self.image_size}, classes={self.num_classes})")


def is_labelled(ds: ImageDataset | None) -> bool:
    """True when ``ds`` has a class list and every item has a class (label >= 0)."""
    return ds is not None and ds.classes is not None and len(ds) > 0 and bool((ds.labels >= 0).all())


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
        self.images = pixels if pixels.shape[-1] == self.image_size else None
        if mean is not None and std is not None:
            self.__dict__["_stats"] = (tuple(mean), tuple(std))

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        # A clone, not a view: a view would carry the whole storage through DataLoader worker queues.
        image = resize_images(self.pixels[i : i + 1], self.image_size)[0].clone()
        return image, int(self.labels[i]), i

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
        self.modality = dataset.modality
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
        self.modality = first.modality
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


def subset(ds: ImageDataset, indices: Tensor) -> ImageDataset:
    """Items ``indices`` of ``ds`` as a dataset of their own, numbered 0..len-1.

    A dataset held in memory is copied into a new TensorImages (so the trainer can still index its
    ``images``, and the parent can be freed), or by its own ``take`` (audio clips); any other gets a Subset view.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    if hasattr(ds, "take"):
        return ds.take(indices)
    if isinstance(ds, TensorImages):
        return TensorImages(ds.pixels[indices], ds.labels[indices], name=ds.name, classes=ds.classes,
                            size=ds.image_size, mean=ds.mean, std=ds.std)
    return Subset(ds, indices)


@dataclass
class Splits:
    """The datasets of one run.

    ``pretrain``: what self-supervised training reads (labels unused). ``eval_train``: the labelled side
    the kNN bank and linear probe train on; ``eval_test``: the labelled side they are scored on (both None
    when there are no labels). ``note``: one line saying where the evaluation split came from.
    """

    pretrain: ImageDataset
    eval_train: ImageDataset | None
    eval_test: ImageDataset | None
    note: str


def collate_skip_corrupt(batch: list[tuple[Tensor, int, int] | None]) -> tuple[list[Tensor] | None, int]:
    """Collate for streaming datasets with ``skip_corrupt``: drops the ``None`` items unreadable images give.

    Returns ``(collated, skipped)``: ``collated`` is ``default_collate`` of the readable items, i.e.
    ``[images uint8 [B, C, H, W], labels int64 [B], indices int64 [B]]``, or None when every item of the
    batch was unreadable; ``skipped`` is how many items were dropped.
    """
    kept = [item for item in batch if item is not None]
    return (default_collate(kept) if kept else None), len(batch) - len(kept)


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
