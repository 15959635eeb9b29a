"""Classifiers built on an encoder: what fine-tuning, the supervised baseline and distillation train, and the
file (classifier.pt) that holds one.

A classifier is an encoder (a pretrained method's evaluated encoder, optionally followed by the first k
layers of its projection head, or a freshly initialised backbone) and a linear layer to the classes.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from contrastive.config import Config, build_dataclass, config_from_tree, to_dict
from contrastive.errors import CheckpointError, ConfigError
from contrastive.methods.base import BuildContext, Method
from contrastive.modalities import modalities  # noqa: F401  (fills the dataset registry)
from contrastive.modalities.image.preprocess import Preprocess
from contrastive.nn.backbones import build_backbone
from contrastive.registry import names
from contrastive.runs import filled, rebuild_method
from contrastive.training.checkpoint import atomic_save, read_file
from contrastive.trees import read_yaml, recipe_dir

CLASSIFIER_FORMAT = "contrastive-classifier/1"


class Classifier(nn.Module):
    """images [B, C, S, S] -> logits [B, num_classes]: ``fc(encoder(x))``."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int, *, zero_init: bool = False):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(feature_dim, num_classes)
        if zero_init:  # SimCLR v2's zero_init_logits_layer: start from uniform predictions
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


def head_layers(head: nn.Sequential) -> list[nn.Sequential]:
    """A projection head cut into its layers: each Linear with the modules that follow it up to the next
    Linear (its BatchNorm and ReLU). SimCLR's 3-layer head gives [Linear, BN, ReLU], [Linear, BN, ReLU],
    [Linear, BN]."""
    layers: list[list[nn.Module]] = []
    for module in head:
        if isinstance(module, nn.Linear):
            layers.append([module])
        elif not layers:
            raise ConfigError(f"the projection head starts with {type(module).__name__}, not a Linear layer; "
                              f"it cannot be cut into layers")
        else:
            layers[-1].append(module)
    return [nn.Sequential(*layer) for layer in layers]


class PlainBatchNorm(_BatchNorm):
    """Batch norm of any input rank, with nothing beyond ``_BatchNorm``'s own forward."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        """Any rank: it takes the place of a module that took whatever rank it was given."""


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """Every batch-norm subclass with behaviour of its own (MoCo's SplitBatchNorm, SyncBatchNorm) replaced, in
    place, by a plain batch norm holding the same parameters and statistics (same state-dict keys):
    supervised training normalises over its own batches, and exported files need only standard operators."""
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm) and type(child) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            plain = PlainBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                                   track_running_stats=child.track_running_stats)
            for key, value in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                current = getattr(plain, key)
                if isinstance(current, nn.Parameter):
                    setattr(plain, key, nn.Parameter(value.data, requires_grad=value.requires_grad))
                else:
                    setattr(plain, key, value)
            plain.train(child.training)
            setattr(module, name, plain)
        else:
            plain_batchnorm(child)
    return module


def encoder_from(method: Method, from_layer: int) -> tuple[nn.Module, int]:
    """The encoder fine-tuning starts from, and its output width.

    ``from_layer`` 0: the method's evaluated encoder (``Method.encoder()``). ``from_layer`` k >= 1: that
    encoder followed by the first k layers of the method's projection head (``Method.projection_head()``, cut by
    :func:`head_layers`), as SimCLR v2 fine-tunes "from the first layer of the projection head" (k = 1,
    the official code's ``ft_proj_selector=1``). k runs up to the head's number of layers.
    """
    if from_layer < 0:
        raise ConfigError(f"--from-layer {from_layer}: give 0 (the encoder) or a projection-head layer >= 1")
    backbone = _trainable(plain_batchnorm(method.encoder()))
    if from_layer == 0:
        return backbone, method.feature_dim
    head = method.projection_head()
    name = type(method).__name__
    if head is None:
        raise ConfigError(f"--from-layer {from_layer}: {name} keeps no projection head to fine-tune from; use "
                          f"--from-layer 0")
    layers = head_layers(head)
    if from_layer > len(layers):
        raise ConfigError(f"--from-layer {from_layer}: the projection head of this {name} has {len(layers)} "
                          f"layer(s); choose 0 (the encoder) to {len(layers)}")
    kept = layers[:from_layer]
    return nn.Sequential(backbone, *(_trainable(layer) for layer in kept)), kept[-1][0].out_features


def _trainable(module: nn.Module) -> nn.Module:
    """``module``, its parameters trainable when none is: an EMA copy (DINO's teacher, which ``encoder()``
    evaluates) is frozen only because no optimiser steps it, and fine-tuning trains it. A module with some
    trainable parameters keeps its frozen ones frozen (MoCo v3's fixed random patch projection)."""
    if not any(p.requires_grad for p in module.parameters()):
        module.requires_grad_(True)
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- files


def save_classifier(model: Classifier, path: str | Path, *, source: dict, preprocess: Preprocess,
                    classes: list[str] | None, labels: dict) -> Path:
    """classifier.pt: the weights (CPU tensors), what rebuilds the architecture (``source``), the input
    preprocessing, the class names and the label subset it was trained on (``LabelSubset`` as a dict)."""
    return atomic_save({"format": CLASSIFIER_FORMAT, "source": source, "preprocess": asdict(preprocess),
                        "num_classes": model.fc.out_features, "feature_dim": model.fc.in_features,
                        "classes": classes, "labels": labels,
                        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def pretrained_source(cfg: Config, ctx: BuildContext, from_layer: int) -> dict:
    """``source`` of a classifier whose encoder comes from a pretrained method."""
    return {"kind": "pretrained", "config": to_dict(cfg), "context": asdict(ctx), "from_layer": from_layer}


def backbone_source(section: dict, channels: int, image_size: int) -> dict:
    """``source`` of a classifier on a freshly built backbone (supervised baseline, distilled student)."""
    return {"kind": "backbone", "section": dict(section), "channels": channels, "image_size": image_size}


def build_encoder(source: dict) -> tuple[nn.Module, int]:
    """The encoder ``source`` describes, with random (or, for a pretrained source, meta) weights."""
    if source["kind"] == "pretrained":
        method = rebuild_method(config_from_tree(source["config"]), BuildContext.from_dict(source["context"], "image"))
        return encoder_from(method, source["from_layer"])
    if source["kind"] == "backbone":
        c, s = source["channels"], source["image_size"]
        return build_backbone(source["section"], input_shape=(c, s, s))
    raise CheckpointError(f"unknown classifier source {source['kind']!r}")


def is_classifier_file(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("format") == CLASSIFIER_FORMAT


def load_classifier(path: str | Path) -> tuple[Classifier, dict]:
    """A classifier.pt (a fine-tuned model, a supervised baseline or a distilled student), in eval mode;
    ``path`` may be the run folder holding it. Returns (model, info) where info holds ``preprocess``,
    ``classes``, ``labels`` (the subset's dict) and ``source``."""
    path = Path(path)
    if path.is_dir():
        path = path / "classifier.pt"
    raw = read_file(path)
    if not is_classifier_file(raw):
        raise CheckpointError(f"{path} is not a classifier.pt written by `contrastive finetune` or `distill`; the "
                              f"teacher is a fine-tuned model, not a pretraining checkpoint")
    encoder, dim = build_encoder(raw["source"])
    with torch.device("meta"):
        model = Classifier(encoder, raw["feature_dim"], raw["num_classes"])
    try:
        model.load_state_dict(raw["state_dict"], assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the classifier it describes ({e})") from None
    filled(model, path)
    return model.eval(), {"preprocess": Preprocess.from_dict(raw["preprocess"]), "classes": raw["classes"],
                          "labels": raw["labels"], "source": raw["source"]}


# ---------------------------------------------------------------------------------------------- recipes


def stage_recipe(dataset: str, recipe: str | Path | None) -> tuple[dict, Path]:
    """The recipe of the stages after pretraining: ``recipe``, else ``configs/semi-supervised/<dataset>.yaml``
    for a named dataset that has one, else ``configs/semi-supervised/default.yaml`` (SimCLR v2's ImageNet
    settings; an image folder gets these, whatever its name)."""
    if recipe is not None:
        return read_yaml(recipe), Path(recipe)
    folder = recipe_dir() / "semi-supervised"
    path = folder / f"{dataset}.yaml"
    if dataset not in names("datasets") or not path.is_file():
        path = folder / "default.yaml"
    return read_yaml(path), path


def stage_config(cls: type, tree: dict, section: str, overrides: list[str], *, base: str | None = None) -> Any:
    """``cls`` from a recipe's ``section`` (laid over its ``base`` section when given) and ``key=value``
    overrides relative to that section (``epochs=5``, ``optim.lr=0.1``)."""
    from contrastive.trees import parse_override

    unknown = set(tree) - {"finetune", "scratch", "distill"}
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))} in the stage recipe; valid: finetune, "
                          f"scratch, distill")
    values = _merged(tree.get(base) or {} if base is not None else {}, tree.get(section) or {})
    for keys, value in (parse_override(o) for o in overrides):
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return build_dataclass(cls, values, section)


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
