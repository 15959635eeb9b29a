"""A kind of data added from this file alone: rows of numbers (``.rows.npz`` files), their own backbone, views that
add noise and mask features, their own preprocessing, baseline and config fields. SimCLR pretrains on it through
the same trainer, evaluation, run files and embedding as every other kind, with nothing outside this file knowing
the kind exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from contrastive import api
from contrastive.config import Config, DataConfig
from contrastive.configure import resolve_config
from contrastive.data.datasets import SampleDataset, Splits
from contrastive.errors import ConfigError
from contrastive.evaluation import extract_features, knn_top1
from contrastive.methods import build_method
from contrastive.modalities import Modality, detect, load_splits, modality_of, register_modality
from contrastive.modalities.base import Baseline
from contrastive.nn.backbones import BackboneSpec
from contrastive.registry import register

CLASSES, PER_CLASS, DIM = 4, 100, 16


class Rows(SampleDataset):
    """Rows of numbers in memory: ``samples`` float32 [N, D]."""

    modality = "rows"

    def __init__(self, x: Tensor, labels: Tensor, *, name: str, classes: list[str] | None,
                 mean: Tensor | None = None, std: Tensor | None = None):
        self.samples, self.labels, self.name, self.classes = x, labels.long(), name, classes
        self.sample_shape = (x.shape[1],)
        self.mean = x.mean(0) if mean is None else mean
        self.std = x.std(0) if std is None else std

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.samples[i], int(self.labels[i]), i

    def take(self, indices: Tensor) -> "Rows":
        return Rows(self.samples[indices], self.labels[indices], name=self.name, classes=self.classes,
                    mean=self.mean, std=self.std)


@dataclass
class RowsConfig:
    noise: float = field(default=0.3, metadata={"help": "Std of the Gaussian noise added to every feature of a view."})
    mask_p: float = field(default=0.2, metadata={"help": "Chance that a view zeroes a feature."})


@dataclass(frozen=True)
class RowsPreprocess:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    modality: str = "rows"

    def __call__(self, x: Tensor) -> Tensor:
        return (x - torch.tensor(self.mean)) / torch.tensor(self.std)


class RowViews:
    """Each view: the standardised rows plus noise, with a random share of features zeroed."""

    n_global = None

    def __init__(self, preprocess: RowsPreprocess, n_views: int, noise: float, mask_p: float):
        self.preprocess, self.n_views, self.noise, self.mask_p = preprocess, n_views, noise, mask_p
        self.size = None

    def __call__(self, rows: Tensor, generator: torch.Generator, index: Tensor | None = None) -> list[Tensor]:
        x = self.preprocess(rows)
        return [(x + self.noise * torch.randn(x.shape, generator=generator))
                * (torch.rand(x.shape, generator=generator) >= self.mask_p) for _ in range(self.n_views)]


class RowsModality(Modality):
    name = "rows"
    reads = "rows"
    accepts = "a .rows.npz file"
    noun = "rows"
    config_class = RowsConfig
    baseline_key = "raw_rows"
    baseline_label = "raw-rows"

    def claims(self, path: Path) -> bool:
        return path.is_file() and path.name.endswith(".rows.npz")

    def open(self, path: Path, cfg: DataConfig, classes: list[str] | None) -> Splits:
        f = np.load(path)
        ds = Rows(torch.from_numpy(f["x"]), torch.from_numpy(f["y"]), name=str(path),
                  classes=[str(c) for c in range(int(f["y"].max()) + 1)])
        return Splits(ds, ds, None, note=str(path))  # the test side: a held-out fraction, as for a labelled folder

    def views(self, cfg: Config, dataset: SampleDataset) -> RowViews:
        s = self.settings(cfg)
        return RowViews(self.preprocess(cfg, dataset), cfg.views.n_views, s.noise, s.mask_p)

    def preprocess(self, cfg: Config, dataset: SampleDataset) -> RowsPreprocess:
        return RowsPreprocess(tuple(dataset.mean.tolist()), tuple(dataset.std.tolist()))

    def preprocess_from_dict(self, d: dict) -> RowsPreprocess:
        return RowsPreprocess(tuple(d["mean"]), tuple(d["std"]))

    def baseline(self, cfg: Config, preprocess: Any, device: torch.device) -> Baseline:
        return Baseline(self.baseline_key, "the kNN on the standardised rows", ("knn",),
                        lambda ds: (preprocess(ds.samples), ds.labels))


@dataclass
class RowMLPConfig:
    width: int = field(default=64, metadata={"help": "Hidden units."})


def _row_mlp(cfg: RowMLPConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    return nn.Sequential(nn.Linear(input_shape[0], cfg.width), nn.ReLU(), nn.Linear(cfg.width, 32)), 32


ROWS = register_modality(RowsModality())
register("backbones", "row_mlp")(BackboneSpec(RowMLPConfig, _row_mlp, reads="rows"))


def _data(path: Path) -> Path:
    """4 classes around random centres in 16 dimensions, 100 rows each, overlapping (the raw rows' kNN: 0.93)."""
    g = np.random.default_rng(0)
    centres = g.normal(0, 0.7, (CLASSES, DIM))
    y = np.repeat(np.arange(CLASSES), PER_CLASS)
    x = centres[y] + g.normal(0, 1, (len(y), DIM))
    np.savez(path, x=x.astype(np.float32), y=y)
    return path


def _cfg(data: Path, out: Path, *overrides: str) -> Config:
    tree = {"method": {"name": "simclr", "temperature": 0.5}, "backbone": {"name": "row_mlp"},
            "data": {"name": str(data), "holdout": 0.2},
            "optim": {"name": "adamw", "lr": 3e-3, "lr_scaling": "none", "warmup_epochs": 0, "weight_decay": 0.0},
            "train": {"batch_size": 64, "epochs": 10, "output": str(out), "device": "cpu", "progress": False,
                      "log_every": 5},
            "eval": {"knn_k": 20, "linear_epochs": 20}, "modalities": {"rows": {"noise": 0.3}}}
    return resolve_config(recipe={}, tree=tree, overrides=list(overrides))


def test_a_kind_of_data_registered_here_pretrains_evaluates_reloads_and_embeds(tmp_path):
    data = _data(tmp_path / "blobs.rows.npz")
    assert detect(DataConfig(name=str(data))) is ROWS  # found by its own claim, beside the built-in kinds
    cfg = _cfg(data, tmp_path / "run")
    res = api.pretrain(cfg)
    assert res["modality"] == "rows" and res["steps"] == 10 * (320 // 64)  # 400 rows, 80 held out
    assert 0 <= res["raw_rows_knn_top1"] <= 1 and res["linear_top1"] > 0.5  # chance: 0.25
    splits = load_splits(cfg.data)
    # it learned: the kNN of the encoder it started from (the same seed, untrained) is lower (measured: 0.775
    # against 0.863, 7 of the 80 held-out rows)
    torch.manual_seed(cfg.seed)
    untrained = build_method(cfg, ROWS.context(cfg, splits.pretrain)).encoder()
    before = api.evaluate_encoder(untrained, ROWS.preprocess(cfg, splits.pretrain), splits.eval_train,
                                  splits.eval_test, cfg, note="untrained", protocols=("knn",))
    assert res["knn_top1"] >= before["knn_top1"] + 0.05
    # the encoder read back from either file is the trained one: the same kNN on the same held-out rows
    for path in (tmp_path / "run", tmp_path / "run" / "encoder.pt"):
        encoder, info = api.load_encoder(path)
        assert info["preprocess"] == ROWS.preprocess(cfg, splits.pretrain)
        (xtr, ytr), (xte, yte) = (extract_features(encoder, ds, preprocess=info["preprocess"])
                                  for ds in (splits.eval_train, splits.eval_test))
        assert knn_top1(xtr, ytr, xte, yte, num_classes=CLASSES, k=20, temperature=0.07) == res["knn_top1"]
    # embed: one row of features per row of the file, the encoder applied to the standardised rows
    out = api.embed(tmp_path / "run", DataConfig(name=str(data), holdout=0.2), tmp_path / "e.npy", split="pretrain")
    feats, labels = np.load(tmp_path / "e.npy"), np.load(tmp_path / "e.labels.npy")
    assert out["images"] == 320 and feats.shape == (320, 32) and (labels == splits.pretrain.labels.numpy()).all()
    with torch.no_grad():
        expected = encoder(info["preprocess"](splits.pretrain.samples))
    np.testing.assert_allclose(feats, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert modality_of(splits.pretrain) is ROWS


def test_its_settings_are_its_own_section_and_another_kinds_are_refused(tmp_path):
    data = _data(tmp_path / "blobs.rows.npz")
    cfg = _cfg(data, tmp_path / "run", "modalities.rows.mask_p=0.5")
    assert ROWS.settings(cfg) == RowsConfig(noise=0.3, mask_p=0.5)
    with pytest.raises(ConfigError, match="unknown config key modalities.rows.mask; valid keys of modalities.rows: "
                                          "mask_p, noise"):
        _cfg(data, tmp_path / "run", "modalities.rows.mask=0.5")
    with pytest.raises(ConfigError, match="modalities.audio is set, but .* holds rows data"):
        api.pretrain(_cfg(data, tmp_path / "other", "modalities.audio.window=800"))
