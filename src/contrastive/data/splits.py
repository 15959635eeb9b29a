"""Which images pretraining reads and which the evaluation trains and tests on, from a ``DataConfig``.

- A named dataset: pretrain on its train split (stl10: train + unlabeled), evaluate on its train/test split.
- A folder with ``train/`` and ``test/`` (or ``val/``): pretrain and evaluation-train on train/, test on test/.
- A single labelled folder: a seeded, per-class held-out fraction (``data.holdout``) is the test side; the
  rest is both the pretraining data and the evaluation's train side.
- An unlabeled folder: no evaluation unless ``data.train_data`` / ``data.test_data`` name labelled data.

``data.train_data`` alone: the evaluation uses that data's own split (official test split, test/ sub-folder
or held-out fraction). ``data.test_data`` alone: it is the test side, and the pretraining data's labelled
train side is the train side. Both: exactly those. Every evaluation side is decoded at the pretraining
data's image size, and a test folder's labels follow the train side's class list.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from contrastive.config import DataConfig
from contrastive.data import named  # noqa: F401  (fills the dataset registry)
from contrastive.data.datasets import ImageDataset, Splits, is_labelled, subset
from contrastive.data.folder import open_folder
from contrastive.errors import ConfigError, DataError
from contrastive.registry import lookup, names


def hold_out(ds: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """``(rest, held)``: a seeded random ``fraction`` of each class of the labelled ``ds`` held out.

    Each class gives round(fraction * n) images, but at least one and never all of a class with two or
    more, so every such class is on both sides; a class of one image stays in ``rest``. Both sides keep
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
        raise DataError(f"{ds.name}: too few images per class to hold any out for evaluation; pass "
                        f"data.test_data=<labelled data> (--test-data)")
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[held_idx] = False
    return subset(ds, keep.nonzero().flatten()), subset(ds, held_idx)


def split_layout(path: Path) -> tuple[Path, Path] | None:
    """``(train/, test/ or val/)`` when ``path`` is laid out that way, else None."""
    test = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    return (path / "train", test) if (path / "train").is_dir() and test is not None else None


def _open(source: str, cfg: DataConfig, *, image_size: int | None = None,
          classes: list[str] | None = None) -> Splits:
    """A source's splits as they come: a single folder's ``eval_test`` is None (nothing held out yet), an
    unlabeled side is None. A registered name wins over a folder of that name (write ./digits for the
    folder). ``image_size`` overrides ``cfg.image_size``; ``classes``: see ``scan_folder``."""
    if image_size is not None:
        cfg = dataclasses.replace(cfg, image_size=image_size)
    if source in names("datasets"):
        return lookup("datasets", source)(cfg)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data {source!r} is neither a dataset name ({', '.join(names('datasets'))}) nor an "
                        f"existing path: {path.absolute()} does not exist")
    if not path.is_dir():
        raise DataError(f"{path} is a file; give a folder of images (class sub-folders optional) or a dataset name")
    layout = split_layout(path)
    if layout is None:
        ds = open_folder(path, cfg, classes)
        return Splits(ds, ds if is_labelled(ds) else None, None, note=str(path))
    train_dir, test_dir = layout
    train = open_folder(train_dir, cfg, classes)
    test = open_folder(test_dir, dataclasses.replace(cfg, image_size=train.image_size), train.classes)
    return Splits(train, train if is_labelled(train) else None, test if is_labelled(test) else None,
                  note=f"{path}: {train_dir.name}/ for pretraining and evaluation training, {test_dir.name}/ "
                       f"for evaluation testing")


def _complete(s: Splits, source: str, cfg: DataConfig) -> Splits:
    """Fill a missing test side by holding out part of the labelled train side."""
    if s.eval_train is None:
        return Splits(s.pretrain, None, None,
                      note=f"{source} is unlabeled (no class sub-folders), so there is no evaluation: it needs "
                           f"labels; pass data.train_data / data.test_data (--train-data / --test-data)")
    if s.eval_test is not None:
        return s
    rest, held = hold_out(s.eval_train, cfg.holdout, cfg.split_seed)
    return Splits(rest, rest, held, note=f"held out {cfg.holdout * 100:g}% of {source} (seed {cfg.split_seed}, "
                                         f"{len(held)} images) for evaluation")


def resolve_dataset(name_or_path: str, cfg: DataConfig, *, image_size: int | None = None) -> Splits:
    """The splits of one dataset name or folder on its own, the test side held out when it has none
    (``cfg.train_data`` / ``cfg.test_data`` are not consulted)."""
    return _complete(_open(name_or_path, cfg, image_size=image_size), name_or_path, cfg)


def load_splits(cfg: DataConfig) -> Splits:
    """The run's pretraining data and evaluation sides (see the module docstring for the rules)."""
    base = _open(cfg.name, cfg)
    if cfg.train_data is None and cfg.test_data is None:
        return _complete(base, cfg.name, cfg)
    size = base.pretrain.image_size
    if cfg.test_data is None:
        own = resolve_dataset(cfg.train_data, cfg, image_size=size)
        train, test = _needs_labels(own.eval_train, "data.train_data", cfg.train_data), own.eval_test
        how = f"evaluation on data.train_data: {own.note}"
    else:
        if cfg.train_data is None:
            train = _needs_labels(base.eval_train, "data.name", cfg.name)
        else:
            train = _needs_labels(_open(cfg.train_data, cfg, image_size=size).eval_train, "data.train_data",
                                  cfg.train_data)
        given = _open(cfg.test_data, cfg, image_size=size, classes=train.classes)
        test = _needs_labels(given.eval_test if given.eval_test is not None else given.eval_train,
                             "data.test_data", cfg.test_data)
        how = f"evaluation trains on {train.name} ({len(train)} images), tests on {test.name} ({len(test)} images)"
    for ds in (train, test):
        if ds.channels != base.pretrain.channels:
            raise DataError(f"{ds.name} has {ds.channels}-channel images but the pretraining data {cfg.name} has "
                            f"{base.pretrain.channels}; the evaluation feeds both through the same encoder")
    if test.classes != train.classes:
        raise DataError(f"the evaluation's train data {train.name} and test data {test.name} have different "
                        f"classes ({train.classes} vs {test.classes}); their labels must mean the same")
    return Splits(base.pretrain, train, test, note=f"pretraining on {cfg.name}; {how}")


def _needs_labels(ds: ImageDataset | None, key: str, source: str) -> ImageDataset:
    if ds is None:
        raise DataError(f"{key}={source} has no labels (no class sub-folders), but the evaluation needs "
                        f"labelled data; pass labelled data as data.train_data / data.test_data "
                        f"(--train-data / --test-data)")
    return ds
