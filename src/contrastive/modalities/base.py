"""The contract every kind of data keeps: one registered :class:`Modality` that owns all that is particular to it.

A modality says which paths and dataset names are its data and reads them, makes the training views, gives the
memory check its trial batch, saves the preprocessing an encoder reads, evaluates a frozen encoder (with the
baseline features must beat), holds its own config fields (``modalities.<name>``) and derives the settings of a
run on data without a recipe. The trainer, the commands and the other modalities ask only through these hooks;
the defaults below are what a kind of data does when it has nothing special to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from contrastive.config import Config, DataConfig, TrainConfig, build_dataclass
from contrastive.data.datasets import SampleDataset, Splits, is_labelled
from contrastive.errors import ConfigError, DataError
from contrastive.evaluation import evaluate_frozen, extract_features, save_embeddings
from contrastive.methods import method_spec
from contrastive.methods.base import BuildContext, Method
from contrastive.nn.backbones import backbone_spec
from contrastive.registry import lookup, names, register
from contrastive.trees import read_yaml, recipe_dir

log = logging.getLogger("contrastive.data")


@dataclass(frozen=True)
class Trial:
    """What the memory check (``training.budget.measure_step``) runs a method's trial steps on."""

    make: Callable[[int, torch.Generator], list[Tensor]]  # (n, generator) -> the views of n samples, on the device
    input_bytes: int  # bytes a sample holds besides what autograd saves: its views and what they were cut from
    what: str  # what a step reads, for messages ("32 px views", "sentences of up to 32 tokens")
    n_global: int | None = None  # the first n_global views are global (views.groups); None: all


@dataclass(frozen=True)
class DataShape:
    """What pretraining on a DataConfig will read, known before reading the data itself."""

    samples: int  # pretraining samples (a single labelled folder: less the held-out fraction)
    size: int  # a sample's typical length: an image's side, a clip's samples, a sentence's tokens
    channels: int
    how: str  # one line: where the numbers come from
    classes: int | None = None  # classes of labelled data; None: unlabeled
    memory: int = 0  # bytes the data takes in memory as served


class Reasons(dict):
    """Each derived setting's reason by key (what ``config.auto`` records), and the choices every kind of data
    makes alike."""

    def note(self, key: str, value: Any, reason: str, flag: str) -> None:
        self[key] = f"{value}: {reason} ({flag} or {key}=... to change)"

    def recipe(self, method: str, preferred: list[str], fallback: list[str], what: str) -> tuple[dict, str]:
        """The first of the ``preferred`` recipe files that exists, else of ``fallback``; (its tree, how the
        choices after it call its values)."""
        folder = recipe_dir()
        found = next((n for n in preferred if (folder / n).is_file()), None)
        why = f"the method's {what}"
        if found is None:
            found = next((n for n in fallback if (folder / n).is_file()), None)
            why = f"{method} has no {what.split(',')[0]}, so its other one"
        self["recipe"] = (f"{found}: {why} (--config to pick another)" if found else
                          f"none: {method} has no recipe, so its own defaults (--config to pick one)")
        return (read_yaml(folder / found) if found else {}), ("the recipe's" if found else "the default")

    def epochs(self, layer: dict, recipe: dict, tree: dict, cap: int | None, kept: str, why: str) -> None:
        """The recipe's epochs, at most ``cap`` (the device's limit, ``why``) unless the user set them."""
        if get_key(layer, "train.epochs") is not None:
            return
        epochs = get_key(recipe, "train.epochs") or TrainConfig().epochs
        if cap is not None and epochs > cap:
            tree.setdefault("train", {})["epochs"] = cap
            self.note("train.epochs", cap, f"{why}, not {kept} {epochs}", "--epochs")
        else:
            self.note("train.epochs", epochs, kept, "--epochs")


def get_key(tree: dict, key: str) -> Any:
    """``tree``'s value at a dotted ``key`` (``train.epochs``), None where it has none."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def split_layout(path: Path) -> tuple[Path, Path] | None:
    """``(train/, test/ or val/)`` when ``path`` is laid out that way, else None."""
    test = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    return (path / "train", test) if (path / "train").is_dir() and test is not None else None


def open_tree(path: Path, cfg: DataConfig, classes: list[str] | None,
              opener: Callable[[Path, DataConfig, list[str] | None, SampleDataset | None], SampleDataset]) -> Splits:
    """A folder of one kind of files as it comes: ``train/`` and ``test/`` (or ``val/``) sides, or one folder,
    class sub-folders being labels either way. ``opener(folder, cfg, classes, like)`` reads one folder (``like``:
    the train side a test side is read like)."""
    layout = split_layout(path)
    if layout is None:
        ds = opener(path, cfg, classes, None)
        return Splits(ds, ds if is_labelled(ds) else None, None, note=str(path))
    train_dir, test_dir = layout
    train = opener(train_dir, cfg, classes, None)
    test = opener(test_dir, cfg, train.classes, train)
    return Splits(train, train if is_labelled(train) else None, test if is_labelled(test) else None,
                  note=f"{path}: {train_dir.name}/ for pretraining and evaluation training, {test_dir.name}/ for "
                       f"evaluation testing")


@dataclass(frozen=True)
class Baseline:
    """The features a learned encoder must beat, under the same probes (``evaluation.evaluate_frozen``)."""

    key: str  # results keys: f"{key}_knn_top1", f"{key}_linear_top1" (the modality's ``baseline_key``)
    description: str
    protocols: tuple[str, ...]  # which of the probes run on it: knn, linear
    features: Callable[[SampleDataset], tuple[Tensor, Tensor]]  # dataset -> (features [N, D], labels [N])


class Modality:
    """Defaults for every hook; a modality overrides what is particular to it."""

    name: str  # registered name, what datasets say in ``modality``
    reads: str  # the kind of input its encoders read (``BackboneSpec.reads``): image-caption pairs are read by an
    #            image backbone beside a method's own text tower
    config_class: type | None = None  # its own fields (``modalities.<name>``); None: it has none
    labelled_evaluation = True  # evaluation reads labelled train and test sides of the data (text: its own sets)
    baseline_key: str | None = None  # the baseline's results keys: f"{baseline_key}_knn_top1", ..._linear_top1
    baseline_label = ""  # its name in what the command prints ("raw-pixel")
    fallback = False  # claims what no other modality claims (a folder of images)
    accepts = ""  # the paths it reads, for messages ("a folder of WAV files (class sub-folders optional)")
    noun = "samples"  # what one sample is called in messages ("images", "clips")

    # -------------------------------------------------------------- detection and reading

    def claims(self, path: Path) -> bool:
        """Whether ``path`` (a file or folder the user gave) holds this kind of data."""
        return False

    def open(self, path: Path, cfg: DataConfig, classes: list[str] | None) -> Splits:
        """The splits of a path it claims, as they come: a single folder's ``eval_test`` None (the caller holds a
        fraction out), an unlabeled side None. ``classes``: the training side's class list, which a test folder's
        labels follow."""
        raise DataError(f"{path}: {self.name} data is read from named datasets only ({', '.join(self.datasets())})")

    def datasets(self) -> list[str]:
        """The named datasets of this kind."""
        return [n for n in names("datasets") if lookup("datasets", n).modality == self.name]

    def probe(self, cfg: DataConfig, *, evaluate: bool = True) -> DataShape:
        """The shape of ``cfg``'s pretraining data without reading all of it (settings derived for it start here)."""
        raise ConfigError(f"no settings are derived for {self.name} data ({cfg.name}); pass a recipe with --config")

    def check_same_input(self, pretrain: SampleDataset, other: SampleDataset) -> None:
        """A DataError when ``other`` (an evaluation side from elsewhere) cannot go through the encoder trained on
        ``pretrain``."""

    # -------------------------------------------------------------- training

    def settings(self, cfg: Config) -> Any:
        """This modality's own typed config (``modalities.<name>``, defaults for what it does not set)."""
        if self.config_class is None:
            if cfg.modalities.get(self.name):
                raise ConfigError(f"modalities.{self.name}: {self.name} data has no settings of its own")
            return None
        return build_dataclass(self.config_class, dict(cfg.modalities.get(self.name) or {}), f"modalities.{self.name}")

    def prepare(self, dataset: SampleDataset, cfg: Config) -> SampleDataset:
        """The run's training data as its encoder reads it (text: tokenised by the encoder's tokenizer)."""
        return dataset

    def check_backbone(self, cfg: Config) -> None:
        """A ConfigError when the run's backbone does not read this kind of data."""
        reads = backbone_spec(cfg.backbone).reads
        if reads != self.reads:
            takers = [n for n in names("backbones") if lookup("backbones", n).reads == self.reads]
            methods = methods_for(self.name)
            raise ConfigError(f"backbone.name={cfg.backbone.get('name')} reads {reads} data, and this data is "
                              f"{self.name} data; pick a backbone that reads {self.reads} data ({', '.join(takers)})"
                              + (f" and a method for it ({', '.join(methods)})" if methods else ""))

    def input_shape(self, cfg: Config, dataset: SampleDataset) -> tuple[int, ...]:
        """One global view as the encoder reads it, without the batch dimension."""
        return tuple(dataset.sample_shape)

    def context(self, cfg: Config, dataset: SampleDataset, world_size: int = 1) -> BuildContext:
        """What a method is built from for training ``cfg`` on ``dataset`` over ``world_size`` processes."""
        mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        return BuildContext(input_shape=self.input_shape(cfg, dataset), dataset_size=len(dataset),
                            num_classes=dataset.num_classes, batch_size=cfg.train.batch_size, world_size=world_size,
                            steps_per_epoch=max(len(dataset) // cfg.train.batch_size, 1), epochs=cfg.train.epochs,
                            backbone_section=dict(cfg.backbone), modality=self.name,
                            mean=None if mean is None else tuple(mean), std=None if std is None else tuple(std))

    def views(self, cfg: Config, dataset: SampleDataset) -> Callable[..., list[Tensor]]:
        """The training views: ``views(samples, generator, index=...) -> [view, ...]`` on the samples' device, with
        ``n_global`` (how many come first and are global; None: all) and ``size``. A views object with
        ``per_item`` true is applied to each item in the loader's workers instead (``views(sample)``)."""
        raise NotImplementedError

    def trial(self, cfg: Config, dataset: SampleDataset, views: Any, device: torch.device) -> Trial:
        """The memory check's trial batches: the run's own views of the first samples."""
        rows = dataset.samples if dataset.samples is not None else None
        if rows is None:
            raise ConfigError(f"the memory check needs {dataset.name} in memory; set train.memory_check=false")

        def make(n: int, generator: torch.Generator) -> list[Tensor]:
            index = torch.arange(n) % len(dataset)
            return views(rows[index].to(device), generator, index=index.to(device))

        one = make(1, torch.Generator(device=device).manual_seed(0))
        per_sample = sum(v[0].numel() * v.element_size() for v in one)
        return Trial(make, 2 * per_sample, f"{self.name} samples of shape {tuple(dataset.sample_shape)}",
                     getattr(views, "n_global", None))

    # -------------------------------------------------------------- what an encoder reads

    def preprocess(self, cfg: Config, dataset: SampleDataset) -> Any:
        """How an encoder trained on ``dataset`` wants its input, saved in every checkpoint (a frozen dataclass
        with a ``modality`` field, made back by :meth:`preprocess_from_dict`)."""
        raise NotImplementedError

    def preprocess_from_dict(self, d: dict) -> Any:
        raise NotImplementedError

    def data_for(self, data: DataConfig, preprocess: Any) -> DataConfig:
        """``data`` read as an encoder saved with ``preprocess`` reads it (images: decoded at its input size)."""
        return data

    def for_encoder(self, dataset: SampleDataset, preprocess: Any) -> SampleDataset:
        """``dataset`` as an encoder saved with ``preprocess`` reads it; a DataError when it cannot."""
        if getattr(preprocess, "modality", None) != self.name:
            raise DataError(f"the encoder was trained on {getattr(preprocess, 'modality', 'other')} data; "
                            f"{dataset.name} holds {self.name} data")
        return dataset

    def exported_input(self, preprocess: Any) -> tuple[tuple[int, ...], dict]:
        """(one input's shape, its description in the JSON beside an exported file) of an encoder that reads
        ``preprocess``'s input; a ConfigError when this kind of encoder is not exported."""
        raise ConfigError(f"export writes encoders of images; this encoder reads {self.name} data, which export does "
                          f"not support yet; use `contrastive embed` for its features")

    # -------------------------------------------------------------- evaluation

    def check_evaluation(self, cfg: Config) -> None:
        """Before the first step: a ContrastiveError when what the evaluation after training reads is missing (so
        it is not found out after hours of training)."""

    def can_evaluate(self, splits: Splits, cfg: Config) -> bool:
        """Whether :meth:`evaluate` has something to evaluate on (by default a labelled test side)."""
        return splits.eval_test is not None

    def baseline(self, cfg: Config, preprocess: Any, device: torch.device) -> Baseline | None:
        """The features the encoder must beat (images: raw pixels); None: none."""
        return None

    def evaluate(self, method: Method, preprocess: Any, splits: Splits | None, cfg: Config, *, note: str,
                 device: torch.device) -> dict[str, Any]:
        """After pretraining: the method's evaluated encoder, frozen (:meth:`evaluate_encoder`)."""
        return self.evaluate_encoder(method.encoder(), preprocess, splits, cfg, note=note, device=device)

    def evaluate_encoder(self, encoder: nn.Module, preprocess: Any, splits: Splits | None, cfg: Config, *,
                         note: str, device: torch.device, protocols: tuple[str, ...] | None = None
                         ) -> dict[str, Any]:
        """The kNN and linear probe of a frozen encoder on the labelled sides, beside the modality's baseline."""
        e = cfg.eval
        sides = [(splits.eval_train, "training"), (splits.eval_test, "test")] if splits is not None else []
        for ds, side in sides or [(None, "training")]:
            if ds is None or not bool((ds.labels >= 0).all()):
                raise DataError(f"evaluation needs labelled {side} data ({note}); pass --train-data/--test-data "
                                f"with class sub-folders")
            self.for_encoder(ds, preprocess)
        baseline = self.baseline(cfg, preprocess, device) if e.baseline else None
        return evaluate_frozen(encoder, preprocess, splits.eval_train, splits.eval_test, e, seed=cfg.seed,
                               device=device, note=note, protocols=protocols, baseline=baseline)

    def summary(self, results: dict[str, Any]) -> list[tuple[str, str]]:
        """(label, value) lines of the headline numbers in ``results``, as the command prints them."""
        lines = [(label, f"{results[key]:.4f}") for key, label in (("knn_top1", "kNN top-1"),
                                                                    ("linear_top1", "linear top-1"))
                 if key in results]
        if f"{self.baseline_key}_knn_top1" in results:
            lines.append((f"{self.baseline_label} kNN top-1 (baseline)",
                          f"{results[f'{self.baseline_key}_knn_top1']:.4f}"))
        return lines

    # -------------------------------------------------------------- embedding

    def embed(self, encoder: nn.Module, method: Method | None, preprocess: Any, sets: list[SampleDataset],
              output: Path, *, batch_size: int, device: torch.device) -> dict[str, Any]:
        """Write the embeddings of ``sets`` to ``output`` (.npy; their labels beside when known) and say what was
        written: ``features`` (the paths), ``images`` (rows), ``dim``."""
        xs, ys = zip(*(extract_features(encoder.to(device), self.for_encoder(s, preprocess), preprocess=preprocess,
                                        batch_size=batch_size, device=device) for s in sets))
        feats = torch.cat(xs)
        paths = save_embeddings(feats, torch.cat(ys), output)
        return {"features": [str(p) for p in paths], "images": int(feats.shape[0]), "dim": int(feats.shape[1])}

    # -------------------------------------------------------------- settings for data without a recipe

    def derive(self, method: str, data: DataConfig, layer: dict, device: torch.device
               ) -> tuple[dict, Reasons, DataShape]:
        """``(tree, reasons, shape)``: the settings of ``method`` on ``data`` when no recipe is written for them,
        derived from the data and the device, each with its reason, and the shape of the data as it will be
        served; ``layer`` is what the user set (flags, overrides), which wins. The batch size is left to
        ``autoconfig``, which fits it to the memory through :meth:`planned`."""
        raise ConfigError(f"{data.name} holds {self.name} data, for which no settings are derived; pass a recipe "
                          f"with --config")

    def own_recipe(self, method: str, data: DataConfig, reasons: Reasons) -> dict:
        """``configs/<method>.yaml`` of a method that trains on this kind of data (``MethodSpec.data``): where
        nothing but the batch is derived from the data. A ConfigError names the methods that do train on it."""
        takers = methods_for(self.name)
        if method not in takers:
            raise ConfigError(f"{data.name} holds {self.name} data, and {method} does not train on it; methods for "
                              f"{self.name} data: {', '.join(takers)}")
        recipe, _ = reasons.recipe(method, [f"{method}.yaml"], [], f"recipe for {self.name} data")
        if not recipe:
            raise ConfigError(f"{data.name} holds {self.name} data and {method} has no recipe for it "
                              f"(configs/{method}.yaml); pass a recipe with --config")
        return recipe

    def planned(self, cfg: Config, shape: DataShape, device: torch.device) -> tuple[tuple[int, ...], Trial]:
        """(the encoder's input shape, the memory check's trial) of ``cfg`` on data of ``shape``, before reading
        it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<modality {self.name}>"


def register_modality(modality: Modality) -> Modality:
    """``modality`` in the registry under its name."""
    return register("modalities", modality.name)(modality)


def register_dataset(name: str, modality: str) -> Callable[[Callable[[DataConfig], Splits]], Callable]:
    """Decorator: a named dataset's loader ``(cfg: DataConfig) -> Splits``, registered as ``datasets/<name>``
    with the kind of data it holds (known before it is loaded)."""
    def wrap(fn: Callable[[DataConfig], Splits]) -> Callable[[DataConfig], Splits]:
        fn.modality = modality  # type: ignore[attr-defined]
        return register("datasets", name)(fn)

    return wrap


def methods_for(modality: str) -> list[str]:
    """The methods that declare they train on ``modality`` (``MethodSpec.data``)."""
    return [n for n in names("methods") if modality in (method_spec(n).data or ())]

