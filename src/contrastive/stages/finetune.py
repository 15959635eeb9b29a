"""Fine-tuning a pretrained encoder on a few labels, and the supervised baseline on the same labels
(SimCLR v2, Chen et al. 2020b, Sec. 2: "unsupervised pretraining, supervised fine-tuning, distillation").

"We fine-tune the whole network ... on 1% and 10% of the labeled ImageNet training images in a
class-balanced way", from the first layer of the projection head, with "random crop with resize and
random flip" as the only augmentation. The supervised baseline is the same run from a randomly
initialised backbone, with its own optimiser settings (``scratch:`` in the recipe).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from contrastive.config import DataConfig, OptimConfig, to_dict
from contrastive.data import labels as label_subsets
from contrastive.device import resolve_device
from contrastive.errors import ConfigError, DataError
from contrastive.evaluation.features import extract_features
from contrastive.evaluation.linear import linear_probe
from contrastive.files import atomic_write_text
from contrastive.modalities import load_splits
from contrastive.modalities.image.datasets import TensorImages
from contrastive.modalities.image.preprocess import Preprocess
from contrastive.nn.backbones import build_backbone
from contrastive.plots import training_curves
from contrastive.runs import claimed, load_run, write_results
from contrastive.stages import supervised
from contrastive.stages.classifier import (
    Classifier,
    backbone_source,
    count_parameters,
    encoder_from,
    plain_batchnorm,
    pretrained_source,
    save_classifier,
    stage_config,
    stage_recipe,
)

log = logging.getLogger("contrastive.finetune")


def _simclr_v2_optim() -> OptimConfig:
    return OptimConfig(name="lars", lr=0.005, lr_scaling="sqrt", weight_decay=0.0, warmup_epochs=0.0)


@dataclass
class FinetuneConfig:
    epochs: int | None = field(default=None, metadata={"help": "Epochs over the labelled images; None: by "
                               "epochs_by_fraction."})
    epochs_by_fraction: list = field(default_factory=lambda: [[0.01, 60], [1.0, 30]], metadata={"help": "[[largest "
                                     "label fraction, epochs], ...]: the first pair whose fraction is not below the "
                                     "run's gives its epochs; SimCLR v2 (Sec. 4) fine-tunes 60 epochs on 1% of the "
                                     "labels and 30 on 10%."})
    batch_size: int = field(default=1024, metadata={"help": "Images per step; 1024 in SimCLR v2 (Sec. 4). A subset "
                            "smaller than this trains in one batch per epoch."})
    optim: OptimConfig = field(default_factory=_simclr_v2_optim, metadata={"help": "LARS at 0.005 x sqrt(batch) "
                               "(0.16 at 1024), no weight decay, no warm-up, cosine decay: SimCLR v2's fine-tuning "
                               "(official command for 1% of ImageNet)."})
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0], metadata={"help": "Random resized crop area "
                             "range; fine-tuning uses crop and flip only (SimCLR v2, Sec. 4)."})
    hflip_p: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    zero_init_classifier: bool = field(default=True, metadata={"help": "Start the linear classifier at zero, as "
                                       "SimCLR's zero_init_logits_layer=True, so the pretrained encoder's first "
                                       "updates come from a uniform prediction."})
    linear_probe: bool = field(default=True, metadata={"help": "Also train a linear probe on the frozen encoder "
                               "with the same labels (the report's linear-probe row); cheap, on cached features."})
    linear_epochs: int = field(default=100, metadata={"help": "Epochs of that linear probe over cached features."})
    linear_lr: float = field(default=0.01, metadata={"help": "AdamW learning rate of the probe on standardised "
                             "features (the pretraining evaluation's)."})
    eval_batch_size: int = field(default=512, metadata={"help": "Batch size of evaluation."})

    def epochs_for(self, fraction: float) -> int:
        """The epochs of a run on ``fraction`` of the labels."""
        if self.epochs is not None:
            return self.epochs
        for limit, epochs in self.epochs_by_fraction:
            if fraction <= limit * (1 + 1e-9):
                return int(epochs)
        raise ConfigError(f"finetune.epochs_by_fraction={self.epochs_by_fraction} has no entry for a label fraction "
                          f"of {fraction:.4g}; end it with [1.0, <epochs>] or set epochs")


def check(cfg: FinetuneConfig, where: str) -> None:
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ConfigError(f"{where}.epochs={cfg.epochs}: train at least 1 epoch")
    if cfg.batch_size < 2:
        raise ConfigError(f"{where}.batch_size={cfg.batch_size}: batch norm needs at least 2 images per batch")
    pairs = cfg.epochs_by_fraction
    if not all(isinstance(p, list) and len(p) == 2 and p[0] > 0 and int(p[1]) >= 1 for p in pairs):
        raise ConfigError(f"{where}.epochs_by_fraction={pairs!r}: expected [[fraction, epochs], ...] with fractions "
                          f"> 0 and epochs >= 1")


def finetune(data: DataConfig, labels: str, output: str | Path, *, checkpoint: str | Path | None = None,
             scratch: dict | None = None, from_layer: int = 0, recipe: str | Path | None = None,
             overrides: list[str] = (), seed: int = 0, labels_seed: int = 0, device: str = "auto",
             overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune ``checkpoint``'s encoder (``from_layer`` head layers on top) with a classifier on the labelled
    subset ``labels`` of ``data``'s training side, or with ``scratch`` (a backbone section) train the same
    classifier from random weights; score on the test side.

    Writes into ``output``: labels.json (the subset, reusable with ``labels=<that file>``), classifier.pt,
    metrics.csv, curves.png, stage.yaml (the resolved stage config) and results.json (``top1``; with a
    checkpoint also ``linear_top1``, the frozen encoder's linear probe on the same labels). A folder holding
    another run is refused unless ``overwrite`` (``runs.claimed``).
    """
    if (checkpoint is None) == (scratch is None):
        raise ConfigError("finetune needs a pretrained --checkpoint, or --scratch with --backbone, not both")
    with claimed(output, overwrite=overwrite, data=data) as out:
        return _finetune(data, labels, out, checkpoint=checkpoint, scratch=scratch, from_layer=from_layer,
                         recipe=recipe, overrides=overrides, seed=seed, labels_seed=labels_seed, device=device)


def _finetune(data: DataConfig, labels: str, out: Path, *, checkpoint: str | Path | None, scratch: dict | None,
              from_layer: int, recipe: str | Path | None, overrides: list[str], seed: int, labels_seed: int,
              device: str) -> dict[str, Any]:
    dev = resolve_device(device)
    tree, recipe_path = stage_recipe(data.name, recipe)
    section = "finetune" if checkpoint is not None else "scratch"
    cfg = stage_config(FinetuneConfig, tree, section, list(overrides),
                       base="finetune" if section == "scratch" else None)
    check(cfg, section)
    if checkpoint is not None:
        run = load_run(checkpoint)
        method, preprocess = run.method, run.preprocess
        if not isinstance(preprocess, Preprocess):  # sentences or sound: fine-tuning trains image classifiers
            raise ConfigError(f"{checkpoint} holds an encoder of {preprocess.modality}; fine-tuning (and distillation) "
                              f"train image classifiers: evaluate it with contrastive eval (kNN, linear probe, STS)")
        if method is None and from_layer:
            raise ConfigError(f"--from-layer {from_layer}: {checkpoint} is an encoder.pt, which holds the encoder "
                              f"alone; fine-tuning from a projection-head layer needs the run's checkpoint.pt")
        if method is not None:
            enc, dim = encoder_from(method, from_layer)  # a layer the head cannot give fails before any work
        else:
            enc, dim = plain_batchnorm(run.encoder), run.feature_dim
        source = pretrained_source(run.config, run.context, from_layer)
        if data.image_size is None:  # as the encoder saw its training images
            data = DataConfig(**{**to_dict(data), "image_size": preprocess.size})
    splits = load_splits(data)
    train, test = splits.eval_train, splits.eval_test
    if train is None or test is None:
        raise DataError(f"fine-tuning needs labelled training and test data ({splits.note}); pass --train-data and "
                        f"--test-data with class sub-folders")
    if checkpoint is None:
        preprocess = Preprocess.for_dataset(train, None)
    elif train.channels != preprocess.channels:
        raise DataError(f"{data.name} has {train.channels}-channel images; the encoder was trained on "
                        f"{preprocess.channels}")
    subset = label_subsets.resolve(labels, train.labels, labels_seed, dataset=train.name)
    if len(subset.indices) < 2:  # a batch of one: batch norm cannot normalise it
        raise ConfigError(f"--labels {labels} keeps {len(subset.indices)} labelled image(s) of {train.name}; "
                          f"fine-tuning batches need at least 2 (batch norm): choose a larger subset")
    epochs = cfg.epochs_for(subset.fraction)

    if checkpoint is None:
        torch.manual_seed(seed)
        enc, dim = build_backbone(scratch, input_shape=(preprocess.channels, preprocess.size, preprocess.size))
        source = backbone_source(scratch, preprocess.channels, preprocess.size)
    # every parameter trains except those the method froze itself (SimCLR's head-output BN shift)
    model = Classifier(enc, dim, train.num_classes, zero_init=cfg.zero_init_classifier).to(dev)

    label_file = label_subsets.write_labels(subset, out / "labels.json")
    atomic_write_text(out / "stage.yaml", yaml.safe_dump({section: to_dict(cfg)}, sort_keys=False))
    index = torch.tensor(subset.indices)
    images, targets = supervised.pixels(train)[index], train.labels[index]
    test_images = supervised.pixels(test)
    results: dict[str, Any] = {
        "stage": "finetune" if checkpoint is not None else "scratch",
        "dataset": data.name, "classes": train.classes, "split": splits.note,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "method": run.config.method["name"] if checkpoint is not None else None,
        "backbone": source["section"] if scratch is not None else dict(run.config.backbone),
        "from_layer": from_layer, "feature_dim": dim, "parameters": count_parameters(model),
        "labels": subset.summary(), "labels_file": str(label_file), "recipe": str(recipe_path),
        "train_images": len(index), "test_images": len(test),
    }
    if checkpoint is not None and cfg.linear_probe:
        results.update(_linear_probe(model.encoder, images, targets, test_images, test.labels, preprocess, cfg,
                                     train.num_classes, seed, dev))
    log.info("%s on %d labelled images of %s (%s), %d epochs", results["stage"], len(index), data.name,
             subset.spec, epochs)
    views = supervised.crop_flip_views(preprocess, images.shape[-1], cfg.crop_scale, cfg.hflip_p)
    t_dev = targets.to(dev)
    fit = supervised.train_loop(model, images, lambda x, idx, step: F.cross_entropy(model(x), t_dev[idx]),
                                epochs=epochs, batch_size=min(cfg.batch_size, len(index)), optim=cfg.optim,
                                views=views, seed=seed, device=dev, metrics=out / "metrics.csv")
    t0 = time.perf_counter()
    logits = supervised.predict(model, test_images, preprocess, batch_size=cfg.eval_batch_size, device=dev)
    results.update({
        "top1": supervised.top1(logits, test.labels),
        "train_top1": supervised.top1(supervised.predict(model, images, preprocess, batch_size=cfg.eval_batch_size,
                                                         device=dev), targets),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "budget": {"epochs": fit.epochs, "steps": fit.steps, "batch_size": min(cfg.batch_size, len(index)),
                   "optimizer": cfg.optim.name, "lr": cfg.optim.lr, "lr_scaling": cfg.optim.lr_scaling,
                   "weight_decay": cfg.optim.weight_decay, "train_seconds": fit.seconds,
                   "images_per_s": fit.images_per_s, "views": "random resized crop + horizontal flip",
                   "seed": seed, "device": str(dev)},
    })
    results["classifier"] = str(save_classifier(model.cpu(), out / "classifier.pt", source=source,
                                                preprocess=preprocess, classes=train.classes,
                                                labels=asdict(subset)))
    results["curves"] = _curves(out, f"{results['stage']} on {subset.spec} of the labels")
    write_results(results, out)
    return results


def _linear_probe(encoder, images, targets, test_images, test_labels, preprocess, cfg: FinetuneConfig,
                  num_classes: int, seed: int, dev) -> dict:
    """The frozen encoder's linear probe on the same labelled images (offline protocol, before fine-tuning)."""
    sets = [TensorImages(x, y, name="probe", classes=None, mean=preprocess.mean, std=preprocess.std)
            for x, y in ((images, targets), (test_images, test_labels))]
    (xtr, ytr), (xte, yte) = (extract_features(encoder, s, preprocess=preprocess, batch_size=cfg.eval_batch_size,
                                               device=dev) for s in sets)
    probe = linear_probe(xtr, ytr, xte, yte, num_classes=num_classes, epochs=cfg.linear_epochs, lr=cfg.linear_lr,
                         seed=seed, device=dev)
    return {"linear_top1": probe["top1"], "linear_train_top1": probe["train_top1"],
            "linear_probe": {"features": "frozen encoder (the one fine-tuning starts from), standardised",
                             "epochs": cfg.linear_epochs, "lr": cfg.linear_lr, "optimizer": "adamw"}}


def _curves(out: Path, title: str) -> str:
    return str(training_curves(out / "metrics.csv", out / "curves.png", title=title))
