"""The dataset contract every kind of data keeps, and what every kind shares: labels, splits and skipped items.

Datasets here only read. Item ``i`` is ``(sample, label, i)``: ``sample`` one sample of the dataset's kind of data
(``modality``, the name of a registered modality: an image uint8 ``[C, S, S]``, an audio clip ``[1, T]``, token
ids ``[L]``), ``label`` an int (-1 when unlabeled), ``i`` the item's position in the dataset actually served,
which memory-bank methods use as the sample's identity. Augmentation happens later, batched on the training
device, by the views the modality makes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from contrastive.errors import ConfigError, DataError


class SampleDataset(Dataset):
    """What every dataset exposes, besides ``len`` and ``(sample, label, index)`` items.

    ``modality`` names the kind of data; ``sample_shape`` is the shape of one sample as served; ``samples`` is
    the whole dataset as one tensor ``[N, *sample_shape]`` when it is held in memory as served (the trainer then
    indexes it directly), else None. ``labels`` is int64 ``[N]`` (-1 where unlabeled); ``classes`` names them.
    Each kind adds what is true of it (images: ``channels``, ``image_size``, ``mean``, ``std``).
    """

    modality: str
    name: str
    sample_shape: tuple[int, ...]
    classes: list[str] | None
    labels: Tensor
    samples: Tensor | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Tensor) -> "SampleDataset":
        """Items ``indices`` as a dataset of their own, numbered 0..len-1."""
        raise NotImplementedError


def is_labelled(ds: SampleDataset | None) -> bool:
    """True when ``ds`` has a class list and every item has a class (label >= 0)."""
    return ds is not None and ds.classes is not None and len(ds) > 0 and bool((ds.labels >= 0).all())


def subset(ds: SampleDataset, indices: Tensor) -> SampleDataset:
    """Items ``indices`` of ``ds`` as a dataset of their own, numbered 0..len-1 (the dataset's own ``take``: a
    dataset held in memory copies its rows, so the parent can be freed)."""
    return ds.take(torch.as_tensor(indices, dtype=torch.long))


def hold_out(ds: SampleDataset, fraction: float, seed: int) -> tuple[SampleDataset, SampleDataset]:
    """``(rest, held)``: a seeded random ``fraction`` of each class of the labelled ``ds`` held out.

    Each class gives round(fraction * n) samples, but at least one and never all of a class with two or
    more, so every such class is on both sides; a class of one sample stays in ``rest``. Both sides keep
    ``ds``'s order and are numbered 0..len-1.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"data.holdout={fraction} must be strictly between 0 and 1")
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in ds.labels.unique().tolist():
        members = (ds.labels == c).nonzero().flatten()
        n = len(members)
        k = min(max(math.floor(fraction * n + 0.5), 1), n - 1) if n > 1 else 0
        held.append(members[torch.randperm(n, generator=gen)[:k]])
    held_idx = torch.cat(held).sort().values
    if len(held_idx) == 0:
        raise DataError(f"{ds.name}: too few samples per class to hold any out for evaluation; pass "
                        f"data.test_data=<labelled data> (--test-data)")
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[held_idx] = False
    return subset(ds, keep.nonzero().flatten()), subset(ds, held_idx)


@dataclass
class Splits:
    """The datasets of one run.

    ``pretrain``: what self-supervised training reads (labels unused). ``eval_train``: the labelled side
    the kNN bank and linear probe train on; ``eval_test``: the labelled side they are scored on (both None
    when there are no labels). ``note``: one line saying where the evaluation split came from.
    """

    pretrain: SampleDataset
    eval_train: SampleDataset | None
    eval_test: SampleDataset | None
    note: str


def collate_skip_corrupt(batch: list[tuple[Tensor, int, int] | None]) -> tuple[list[Tensor] | None, int]:
    """Collate for datasets read per item with ``skip_corrupt``: drops the ``None`` items unreadable files give.

    Returns ``(collated, skipped)``: ``collated`` is ``default_collate`` of the readable items, i.e.
    ``[samples [B, ...], labels int64 [B], indices int64 [B]]``, or None when every item of the batch was
    unreadable; ``skipped`` is how many items were dropped.
    """
    kept = [item for item in batch if item is not None]
    return (default_collate(kept) if kept else None), len(batch) - len(kept)


class PerItemViews(Dataset):
    """``base``'s items ``(sample, label, index)`` as ``(views(sample), label, index)``: views made per item in the
    loader's workers (``views.per_item``), a list of float tensors."""

    def __init__(self, base: Dataset, views: Callable[[Tensor], list[Tensor]]):
        self.base = base
        self.views = views

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[list[Tensor], Any, Any] | None:
        item = self.base[i]
        if item is None:  # unreadable under data.skip_corrupt: collate_skip_corrupt drops and counts it
            return None
        sample, label, index = item
        return self.views(sample), label, index
