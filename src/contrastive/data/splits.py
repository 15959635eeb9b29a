"""Which images pretraining reads and which the evaluation trains and tests on, from a ``DataConfig``.

- A named dataset: pretrain on its train split (stl10: train + unlabeled), evaluate on its train/test split.
- A folder with ``train/`` and ``test/`` (or ``val/``): pretrain and evaluation-train on train/, test on test/.
- A single labelled folder: a seeded, per-class held-out fraction (``data.holdout``) is the test side; the
  rest is both the pretraining data and the evaluation's train side.
- An unlabeled folder: no evaluation unless ``data.train_data`` / ``data.test_data`` name labelled data.
- No evaluation (``--no-eval``): the pretraining data as above, a single labelled folder whole (none held out).

A folder of WAV files (and no images) is audio data, read by ``data/audio.py``, with the same rules. Data with
several labellings (spoken-digits: digit, speaker) shows the one ``data.label`` names on every side.

``data.train_data`` alone: the evaluation uses that data's own split (official test split, test/ sub-folder
or held-out fraction). ``data.test_data`` alone: it is the test side, and the pretraining data's labelled
train side is the train side. Both: exactly those. Every evaluation side is decoded at the pretraining
data's image size, and a test folder's labels follow the train side's class list.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from contrastive.config import DataConfig
from contrastive.data import audio, captions, named, text_data  # noqa: F401  (fill the dataset registry)
from contrastive.data.datasets import ImageDataset, Splits, is_labelled, subset
from contrastive.data.folder import open_folder, scan_folder, survey_sizes
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
        return _with_label(lookup("datasets", source)(cfg), cfg.label)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data {source!r} is neither a dataset name ({', '.join(names('datasets'))}) nor an "
                        f"existing path: {path.absolute()} does not exist")
    if text_data.is_text_file(path):
        return text_data.open_text_file(path)
    if not path.is_dir():
        raise DataError(f"{path} is a file; give a folder of images (class sub-folders optional), a text file "
                        f"({', '.join(text_data.TEXT_SUFFIXES)}) or a dataset name")
    if captions.is_caption_folder(path):
        ds = captions.open_caption_folder(path, cfg)
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.split_seed))
        held = round(cfg.holdout * len(ds))
        if held < 1 or held >= len(ds):
            raise DataError(f"{path}: data.holdout={cfg.holdout} of {len(ds)} images leaves no images to "
                            f"{'test retrieval on' if held < 1 else 'train on'}; change data.holdout")
        test, train = ds.take(perm[:held].sort().values), ds.take(perm[held:].sort().values)
        return Splits(train, None, test, note=f"{path}: {len(train):,} images with captions to pretrain on, "
                                              f"{held:,} ({cfg.holdout:.0%}, seed {cfg.split_seed}) held out to "
                                              f"test retrieval on")
    opener = audio.open_wav_folder if audio.is_audio_folder(path) else open_folder
    layout = split_layout(path)
    if layout is None:
        ds = opener(path, cfg, classes)
        return _with_label(Splits(ds, ds if is_labelled(ds) else None, None, note=str(path)), cfg.label)
    train_dir, test_dir = layout
    train = opener(train_dir, cfg, classes)
    test = opener(test_dir, dataclasses.replace(cfg, image_size=train.image_size), train.classes)
    return _with_label(Splits(train, train if is_labelled(train) else None, test if is_labelled(test) else None,
                              note=f"{path}: {train_dir.name}/ for pretraining and evaluation training, "
                                   f"{test_dir.name}/ for evaluation testing"), cfg.label)


def _with_label(s: Splits, label: str | None) -> Splits:
    """``s`` showing the labelling ``label`` (``data.label``) on every side; ``s`` itself when None."""
    if label is None:
        return s
    chosen: dict[int, ImageDataset] = {}

    def pick(ds: ImageDataset | None) -> ImageDataset | None:
        if ds is None:
            return None
        if id(ds) not in chosen:  # one object for sides that were one (pretraining = evaluation training)
            labelings = getattr(ds, "labelings", None) or {}
            if label not in labelings:
                have = (f"the labellings {', '.join(labelings)}" if labelings else
                        "a single labelling (its classes); leave data.label unset")
                raise ConfigError(f"data.label={label}: {ds.name} has {have}")
            chosen[id(ds)] = ds.with_label(label)
        return chosen[id(ds)]

    return Splits(pick(s.pretrain), pick(s.eval_train), pick(s.eval_test), note=f"{s.note}; label {label}")


def _complete(s: Splits, source: str, cfg: DataConfig) -> Splits:
    """Fill a missing test side by holding out part of the labelled train side."""
    if s.eval_train is None and s.pretrain.modality in ("text", "image-text"):
        return s  # evaluated on their own sets (STS and SentEval; retrieval on the held-out images)
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


def load_splits(cfg: DataConfig, *, evaluate: bool = True) -> Splits:
    """The run's pretraining data and evaluation sides (see the module docstring for the rules).

    ``evaluate`` off (``--no-eval``): nothing is held out, so a single folder is pretrained on whole, and the
    evaluation sides are None.
    """
    base = _open(cfg.name, cfg)
    if not evaluate:
        held = "" if base.eval_test is not None or base.eval_train is None else ", none held out"
        return Splits(base.pretrain, None, None,
                      note=f"pretraining on {len(base.pretrain)} images of {cfg.name} (no evaluation{held})")
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
        if ds.modality != base.pretrain.modality:
            raise DataError(f"{ds.name} holds {ds.modality} data but the pretraining data {cfg.name} holds "
                            f"{base.pretrain.modality}; the evaluation feeds both through the same encoder")
        if ds.channels != base.pretrain.channels:
            raise DataError(f"{ds.name} has {ds.channels}-channel images but the pretraining data {cfg.name} has "
                            f"{base.pretrain.channels}; the evaluation feeds both through the same encoder")
    if test.classes != train.classes:
        raise DataError(f"the evaluation's train data {train.name} and test data {test.name} have different "
                        f"classes ({train.classes} vs {test.classes}); their labels must mean the same")
    return Splits(base.pretrain, train, test, note=f"pretraining on {cfg.name}; {how}")


def seen_in_pretraining(pretrained: DataConfig, pretrain_evaluated: bool, data: DataConfig) -> str | None:
    """Why the test side ``load_splits(data)`` gives holds images that pretraining on ``pretrained`` read,
    or None when it holds none. ``pretrain_evaluated``: whether that run evaluated (``--no-eval`` off), and
    so held its test fraction out of pretraining. Folders only: a named dataset's test split is never
    pretrained on."""
    def same(a: str, b: str) -> bool:
        return a not in names("datasets") and b not in names("datasets") and \
            Path(a).expanduser().resolve() == Path(b).expanduser().resolve()

    source, own_split = (data.test_data, False) if data.test_data is not None else (data.train_data or data.name, True)
    if not same(source, pretrained.name) or split_layout(Path(source).expanduser()) is not None:
        return None  # another folder, or one with a test/ side that pretraining does not read
    held_before = pretrain_evaluated and pretrained.train_data is None and pretrained.test_data is None
    if own_split and held_before and (data.holdout, data.split_seed) == (pretrained.holdout, pretrained.split_seed):
        return None  # the very images pretraining held out
    test = (f"the {data.holdout:.0%} held out of {source} (seed {data.split_seed})" if own_split else
            f"all of {source}")
    if not held_before:
        read = f"pretraining read every image of {pretrained.name}" + ("" if pretrain_evaluated else
                                                                      " (it ran with --no-eval)")
    else:
        read = (f"pretraining held out {pretrained.holdout:.0%} of it with seed {pretrained.split_seed}, "
                f"not the same images")
    return (f"the test images ({test}) were seen, unlabelled, during pretraining: {read}. The accuracy overstates "
            f"what the encoder does on new images; name a separate test side with --test-data")


@dataclass(frozen=True)
class DataShape:
    """What pretraining on a DataConfig will read, known before decoding anything."""

    images: int  # pretraining images (a single labelled folder: less the held-out fraction)
    size: int  # typical side: a named dataset's native one, a folder's median shorter side
    channels: int
    how: str  # one line: where the numbers come from
    classes: int | None = None  # classes of a labelled dataset or folder; None: unlabeled


def probe(cfg: DataConfig, *, evaluate: bool = True) -> DataShape:
    """The shape of ``cfg``'s pretraining data from the dataset's known shape or a folder's listing and image
    headers (``survey_sizes``); ``evaluate``: as in ``load_splits`` (whether a fraction is held out)."""
    if cfg.name in names("datasets"):
        if cfg.name not in named.SHAPES:
            raise ConfigError(f"no shape known for dataset {cfg.name!r}; pass a recipe with --config")
        channels, size, images = named.SHAPES[cfg.name]
        return DataShape(images, size, channels, f"{cfg.name}: {images:,} pretraining images, {channels} "
                                                 f"channel(s), {size} px", named.CLASSES.get(cfg.name))
    path = Path(cfg.name).expanduser()
    if not path.is_dir():
        _open(cfg.name, cfg)  # the same error as loading would give
    if audio.is_audio_folder(path):
        raise ConfigError(f"{cfg.name} holds audio, and settings are derived for images only; pass a recipe with "
                          f"--config (e.g. configs/cpc-audio-spoken-digits.yaml)")
    layout = split_layout(path)
    folder = layout[0] if layout else path
    files, labels, classes = scan_folder(folder, log_ignored=False)
    survey = survey_sizes(files)
    images = len(files)
    held = evaluate and layout is None and classes is not None and cfg.train_data is None and cfg.test_data is None
    if held:
        images -= round(cfg.holdout * images)
    return DataShape(images, survey.typical, 3, f"{folder}: {len(files):,} images"
                                                f"{f' ({images:,} for pretraining)' if held else ''}, "
                                                f"{survey.describe()}", None if classes is None else len(classes))


def _needs_labels(ds: ImageDataset | None, key: str, source: str) -> ImageDataset:
    if ds is None:
        raise DataError(f"{key}={source} has no labels (no class sub-folders), but the evaluation needs "
                        f"labelled data; pass labelled data as data.train_data / data.test_data "
                        f"(--train-data / --test-data)")
    return ds
