"""Distillation: a student, of the same or a smaller architecture, learns a fine-tuned teacher's softened
predictions on the unlabeled training images (SimCLR v2, Chen et al. 2020b, Sec. 2, Eq. 2 and 3).

"We use the fine-tuned network as a teacher to impute labels for training a student network ... the
teacher network, which produces P^T(y|x_i), is fixed during the distillation; only the student network,
which produces P^S(y|x_i), is trained." With ground-truth labels, "a weighted combination" of the label
loss on the labelled images and the distillation loss: here ``(1 - label_weight) * distill +
label_weight * cross-entropy``, the labelled images of each step drawn in their share of the data.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from contrastive.config import DataConfig, OptimConfig, to_dict
from contrastive.data.labels import LabelSubset, labels_sha256
from contrastive.device import resolve_device
from contrastive.errors import ConfigError, DataError
from contrastive.files import atomic_write_text
from contrastive.losses import distillation_loss
from contrastive.methods.base import STREAM_LOADER, step_seed
from contrastive.modalities import load_splits
from contrastive.nn.backbones import build_backbone
from contrastive.plots import training_curves
from contrastive.runs import claimed, write_results
from contrastive.stages import supervised
from contrastive.stages.classifier import (
    Classifier,
    backbone_source,
    count_parameters,
    load_classifier,
    save_classifier,
    stage_config,
    stage_recipe,
)

log = logging.getLogger("contrastive.distill")


def _pretraining_optim() -> OptimConfig:
    return OptimConfig(name="lars", lr=0.1, lr_scaling="sqrt", weight_decay=1e-4, warmup_epochs=10.0)


@dataclass
class DistillConfig:
    epochs: int = field(default=400, metadata={"help": "Epochs over the unlabeled images; SimCLR v2 distils "
                        "with its pretraining schedule (Sec. 4)."})
    batch_size: int = field(default=4096, metadata={"help": "Images per step; SimCLR v2's pretraining batch."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of teacher and student; 1.0 in "
                               "SimCLR v2's results (0.1 was also tried, Sec. 4)."})
    label_weight: float = field(default=0.0, metadata={"help": "Weight alpha of the labelled cross-entropy in "
                                "(1 - alpha) distill + alpha CE; 0: distillation loss only, as SimCLR v2's main "
                                "results."})
    optim: OptimConfig = field(default_factory=_pretraining_optim, metadata={"help": "LARS, 0.1 x sqrt(batch), "
                               "weight decay 1e-4, 10 warm-up epochs: SimCLR v2's pretraining schedule."})
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0], metadata={"help": "Random resized crop area "
                             "range; teacher and student see the same crop-and-flip view."})
    hflip_p: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    eval_batch_size: int = field(default=512, metadata={"help": "Batch size of evaluation."})


def check(cfg: DistillConfig) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise ConfigError(f"distill.epochs={cfg.epochs}, distill.batch_size={cfg.batch_size}: train at least 1 "
                          f"epoch with at least 2 images per batch")
    if cfg.temperature <= 0:
        raise ConfigError(f"distill.temperature={cfg.temperature}: must be > 0 (1.0 in SimCLR v2)")
    if not 0 <= cfg.label_weight <= 1:
        raise ConfigError(f"distill.label_weight={cfg.label_weight}: a weight in [0, 1]")


def distill(teacher: str | Path, student: dict, data: DataConfig, output: str | Path, *,
            recipe: str | Path | None = None, overrides: list[str] = (), seed: int = 0,
            device: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Train a ``student`` (a backbone section: name and fields) with a linear classifier to match the fine-tuned
    ``teacher`` (a classifier.pt, or its run folder) on ``data``'s pretraining images, then score student and
    teacher on the test side.

    Writes into ``output``: classifier.pt (the student), metrics.csv, curves.png, stage.yaml and results.json
    (``top1`` the student's, ``teacher_top1``, ``margin`` = teacher - student). A folder holding another run is
    refused unless ``overwrite`` (``runs.claimed``).
    """
    with claimed(output, overwrite=overwrite, data=data) as out:
        return _distill(teacher, student, data, out, recipe=recipe, overrides=overrides, seed=seed, device=device)


def _distill(teacher: str | Path, student: dict, data: DataConfig, out: Path, *, recipe: str | Path | None,
             overrides: list[str], seed: int, device: str) -> dict[str, Any]:
    dev = resolve_device(device)
    tree, recipe_path = stage_recipe(data.name, recipe)
    cfg = stage_config(DistillConfig, tree, "distill", list(overrides))
    check(cfg)
    teacher_model, tinfo = load_classifier(teacher)
    pre = tinfo["preprocess"]
    if data.image_size is None:
        data = DataConfig(**{**to_dict(data), "image_size": pre.size})
    splits = load_splits(data)
    unlabeled, test = splits.pretrain, splits.eval_test
    if test is None:
        raise DataError(f"distillation scores the student on labelled test data, and {data.name} has none "
                        f"({splits.note}); pass --test-data")
    if test.classes != tinfo["classes"]:
        raise DataError(f"the teacher classifies {tinfo['classes']}, but the test data's classes are {test.classes}")
    atomic_write_text(out / "stage.yaml", yaml.safe_dump({"distill": to_dict(cfg)}, sort_keys=False))

    torch.manual_seed(seed)
    enc, dim = build_backbone(student, input_shape=(pre.channels, pre.size, pre.size))
    model = Classifier(enc, dim, len(tinfo["classes"])).to(dev)
    teacher_model = teacher_model.to(dev).eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    images = supervised.pixels(unlabeled)
    subset = LabelSubset(**tinfo["labels"])  # the labels the teacher was fine-tuned on
    labelled = _labelled_side(cfg, splits, subset)
    views = supervised.crop_flip_views(pre, images.shape[-1], cfg.crop_scale, cfg.hflip_p)
    batch = min(cfg.batch_size, len(images))
    # a step's labelled batch: the labelled images' share of a batch (at least one image)
    per_step = 0 if labelled is None else labelled_share(len(labelled[0]), len(images), batch)

    rows = None if labelled is None else supervised.DeviceRows(*labelled, device=dev)

    def loss_fn(x: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
        with torch.no_grad():
            t = teacher_model(x)  # [n, classes], on the very view the student sees
        loss = distillation_loss(model(x), t, cfg.temperature)
        if rows is None:
            return loss
        lx, ly = labelled_batch(rows, per_step, views, seed, step)
        ce = F.cross_entropy(model(lx), ly)
        return (1 - cfg.label_weight) * loss + cfg.label_weight * ce

    log.info("distilling into %s on %d unlabeled images of %s, %d epochs, temperature %g", student["name"],
             len(images), data.name, cfg.epochs, cfg.temperature)
    fit = supervised.train_loop(model, images, loss_fn, epochs=cfg.epochs, batch_size=batch, optim=cfg.optim,
                                views=views, seed=seed, device=dev, metrics=out / "metrics.csv")
    t0 = time.perf_counter()
    test_images = supervised.pixels(test)
    student_top1 = supervised.top1(supervised.predict(model, test_images, pre, batch_size=cfg.eval_batch_size,
                                                      device=dev), test.labels)
    teacher_top1 = supervised.top1(supervised.predict(teacher_model, test_images, pre,
                                                      batch_size=cfg.eval_batch_size, device=dev), test.labels)
    results: dict[str, Any] = {
        "stage": "distill", "dataset": data.name, "classes": test.classes, "split": splits.note,
        "teacher": str(teacher), "teacher_source": _describe(tinfo["source"]),
        "backbone": dict(student), "feature_dim": dim, "parameters": count_parameters(model),
        "teacher_parameters": count_parameters(teacher_model),
        "labels": subset.summary(),
        "unlabeled_images": len(images), "test_images": len(test), "recipe": str(recipe_path),
        "temperature": cfg.temperature, "label_weight": cfg.label_weight,
        "top1": student_top1, "teacher_top1": teacher_top1, "margin": teacher_top1 - student_top1,
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "budget": {"epochs": fit.epochs, "steps": fit.steps, "batch_size": batch, "optimizer": cfg.optim.name,
                   "lr": cfg.optim.lr, "lr_scaling": cfg.optim.lr_scaling, "weight_decay": cfg.optim.weight_decay,
                   "train_seconds": fit.seconds, "images_per_s": fit.images_per_s,
                   "views": "random resized crop + horizontal flip, the same view for teacher and student",
                   "seed": seed, "device": str(dev)},
    }
    results["classifier"] = str(save_classifier(model.cpu(), out / "classifier.pt",
                                                source=backbone_source(student, pre.channels, pre.size),
                                                preprocess=pre, classes=test.classes, labels=tinfo["labels"]))
    results["curves"] = str(training_curves(out / "metrics.csv", out / "curves.png",
                                            title=f"distillation into {student['name']}"))
    write_results(results, out)
    return results


def _labelled_side(cfg: DistillConfig, splits, subset: LabelSubset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) of the teacher's labelled subset when the labelled loss is on, else None."""
    if cfg.label_weight == 0:
        return None
    train = splits.eval_train
    if train is None or len(train) != subset.dataset_size or labels_sha256(train.labels) != subset.labels_sha256:
        raise DataError(f"distill.label_weight={cfg.label_weight} needs the labelled images the teacher was "
                        f"fine-tuned on, but this data's training side is not the data of its labels "
                        f"({subset.dataset}); distil with --data {subset.dataset} or label_weight=0")
    index = torch.tensor(subset.indices)
    return supervised.pixels(train)[index], train.labels[index]


def _describe(source: dict) -> dict:
    if source["kind"] == "pretrained":
        cfg = source["config"]
        return {"kind": "pretrained", "method": cfg["method"]["name"], "backbone": cfg["backbone"],
                "from_layer": source["from_layer"]}
    return {"kind": "backbone", "backbone": source["section"]}


def labelled_batch(rows: supervised.DeviceRows, size: int, views, seed: int,
                   step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's labelled batch on ``rows.device``: one crop-and-flip view each of ``size`` labelled images and
    their labels, drawn without replacement from a generator seeded by (seed, step) where the rows are kept
    (``rows.home``), so drawing them copies nothing between host and device."""
    g = torch.Generator(device=rows.home).manual_seed(step_seed(seed, step, 0, STREAM_LOADER))
    pick = torch.randperm(len(rows), generator=g, device=rows.home)[:size]
    images, labels = rows.take(pick)
    (x,) = views(images, torch.Generator(device=rows.device).manual_seed(step_seed(seed, step, 1, STREAM_LOADER)))
    return x, labels


def labelled_share(n_labelled: int, n_unlabeled: int, batch: int) -> int:
    """Labelled images per step: their share of the data times the batch, at least one."""
    return max(1, math.floor(batch * n_labelled / n_unlabeled + 0.5))
