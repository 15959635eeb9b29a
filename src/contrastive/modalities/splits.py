"""Which data pretraining reads and which the evaluation trains and tests on, from a ``DataConfig``, for every
kind of data: a name or path is given to the registered modality that claims it (:func:`detect`).

- A named dataset: pretrain on its train split (stl10: train + unlabeled), evaluate on its train/test split.
- A folder with ``train/`` and ``test/`` (or ``val/``): pretrain and evaluation-train on train/, test on test/.
- A single labelled folder: a seeded, per-class held-out fraction (``data.holdout``) is the test side; the
  rest is both the pretraining data and the evaluation's train side.
- An unlabeled folder: no evaluation unless ``data.train_data`` / ``data.test_data`` name labelled data.
- No evaluation (``--no-eval``): the pretraining data as above, a single labelled folder whole (none held out).

A folder of WAV files (and no images) is audio data, with the same rules; a text file and a folder with a
captions file are evaluated on their own sets. Data with several labellings (spoken-digits: digit, speaker)
shows the one ``data.label`` names on every side.

``data.train_data`` alone: the evaluation uses that data's own split (official test split, test/ sub-folder
or held-out fraction). ``data.test_data`` alone: it is the test side, and the pretraining data's labelled
train side is the train side. Both: exactly those. Every evaluation side is read like the pretraining data
(images: decoded at its size), and a test folder's labels follow the train side's class list.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from contrastive.config import DataConfig
from contrastive.data.datasets import SampleDataset, Splits, hold_out
from contrastive.errors import ConfigError, DataError
from contrastive.modalities.base import Modality, split_layout
from contrastive.registry import lookup, names


def modalities() -> list[Modality]:
    """Every registered modality."""
    return [lookup("modalities", n) for n in names("modalities")]


def modality_named(name: str, what: str = "data") -> Modality:
    """The registered modality ``name``; a DataError naming the known ones otherwise."""
    if name not in names("modalities"):
        raise DataError(f"{what}: no support for {name!r} data (known: {', '.join(names('modalities'))})")
    return lookup("modalities", name)


def modality_of(dataset: SampleDataset) -> Modality:
    """The modality of a dataset (its ``modality``)."""
    return modality_named(dataset.modality, getattr(dataset, "name", repr(dataset)))


def detect(cfg: DataConfig) -> Modality:
    """The modality of the data ``cfg`` names, known without reading it: a named dataset's, or the one modality
    that claims the path (a text file, a folder with a captions file, a folder of WAV files), else the one that
    takes what no other claims (a folder of images). A registered name wins over a folder of that name (write
    ./digits for the folder)."""
    if cfg.name in names("datasets"):
        return modality_named(lookup("datasets", cfg.name).modality, cfg.name)
    path = Path(cfg.name).expanduser()
    if not path.exists():
        raise DataError(f"data {cfg.name!r} is neither a dataset name ({', '.join(names('datasets'))}) nor an "
                        f"existing path: {path.absolute()} does not exist")
    claims = [m for m in modalities() if not m.fallback and m.claims(path)]
    if len(claims) > 1:
        raise DataError(f"{path} could be {' or '.join(m.name for m in claims)} data; give each its own folder")
    claims = claims or [m for m in modalities() if m.fallback and m.claims(path)]
    if not claims:
        raise DataError(f"{path} is not data of a kind this package reads; give "
                        f"{', '.join(m.accepts for m in modalities() if m.accepts)}, or a dataset name")
    return claims[0]


def _open(source: str, cfg: DataConfig, *, like: SampleDataset | None = None,
          classes: list[str] | None = None) -> Splits:
    """A source's splits as they come: a single folder's ``eval_test`` is None (nothing held out yet), an
    unlabeled side is None. ``like``: the pretraining data an evaluation side is read like (images: decoded at its
    size); ``classes``: the class list a test folder's labels follow."""
    if like is not None and getattr(like, "image_size", None) is not None:
        cfg = dataclasses.replace(cfg, image_size=like.image_size)
    source_cfg = dataclasses.replace(cfg, name=source)
    modality = detect(source_cfg)
    if source in names("datasets"):
        return _with_label(lookup("datasets", source)(cfg), cfg.label)
    return _with_label(modality.open(Path(source).expanduser(), cfg, classes), cfg.label)


def _with_label(s: Splits, label: str | None) -> Splits:
    """``s`` showing the labelling ``label`` (``data.label``) on every side; ``s`` itself when None."""
    if label is None:
        return s
    chosen: dict[int, SampleDataset] = {}

    def pick(ds: SampleDataset | None) -> SampleDataset | None:
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
    if s.eval_train is None and not modality_of(s.pretrain).labelled_evaluation:
        return s  # evaluated on its own sets (sentences: STS and SentEval; image-caption pairs: retrieval)
    if s.eval_train is None:
        return Splits(s.pretrain, None, None,
                      note=f"{source} is unlabeled (no class sub-folders), so there is no evaluation: it needs "
                           f"labels; pass data.train_data / data.test_data (--train-data / --test-data)")
    if s.eval_test is not None:
        return s
    rest, held = hold_out(s.eval_train, cfg.holdout, cfg.split_seed)
    return Splits(rest, rest, held, note=f"held out {cfg.holdout * 100:g}% of {source} (seed {cfg.split_seed}, "
                                         f"{len(held)} images) for evaluation")


def resolve_dataset(name_or_path: str, cfg: DataConfig, *, like: SampleDataset | None = None) -> Splits:
    """The splits of one dataset name or folder on its own, the test side held out when it has none
    (``cfg.train_data`` / ``cfg.test_data`` are not consulted)."""
    return _complete(_open(name_or_path, cfg, like=like), name_or_path, cfg)


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
    like = base.pretrain
    if cfg.test_data is None:
        own = resolve_dataset(cfg.train_data, cfg, like=like)
        train, test = _needs_labels(own.eval_train, "data.train_data", cfg.train_data), own.eval_test
        how = f"evaluation on data.train_data: {own.note}"
    else:
        if cfg.train_data is None:
            train = _needs_labels(base.eval_train, "data.name", cfg.name)
        else:
            train = _needs_labels(_open(cfg.train_data, cfg, like=like).eval_train, "data.train_data",
                                  cfg.train_data)
        given = _open(cfg.test_data, cfg, like=like, classes=train.classes)
        test = _needs_labels(given.eval_test if given.eval_test is not None else given.eval_train,
                             "data.test_data", cfg.test_data)
        how = f"evaluation trains on {train.name} ({len(train)} images), tests on {test.name} ({len(test)} images)"
    for ds in (train, test):
        if ds.modality != base.pretrain.modality:
            raise DataError(f"{ds.name} holds {ds.modality} data but the pretraining data {cfg.name} holds "
                            f"{base.pretrain.modality}; the evaluation feeds both through the same encoder")
        modality_of(base.pretrain).check_same_input(base.pretrain, ds)
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


def _needs_labels(ds: SampleDataset | None, key: str, source: str) -> SampleDataset:
    if ds is None:
        raise DataError(f"{key}={source} has no labels (no class sub-folders), but the evaluation needs "
                        f"labelled data; pass labelled data as data.train_data / data.test_data "
                        f"(--train-data / --test-data)")
    return ds
