"""Defaults derived from the data and the device, for data without a recipe of its own.

``resolve_config`` calls :func:`derive` when no ``--config`` is given and ``configs/<method>-<dataset>.yaml``
does not exist (an image folder, or a named dataset the method has no recipe for). It looks at the data
(image count, typical size, channels: ``data.splits.probe``) and at the device (CPU or CUDA, free memory),
and picks:

- the recipe family: the method's CIFAR-scale recipe (``<method>-cifar10.yaml``) for images of at most
  SMALL_SIDE px, its ImageNet-scale one (``<method>.yaml``) for larger ones;
- the decode size (``data.image_size``): the images' typical side, at least MIN_SIDE, at most 224 on a GPU
  and CPU_MAX_SIDE on a CPU;
- the backbone: the recipe's on a GPU, ``small_cnn`` on a CPU (a ResNet-50 would take weeks there);
- the epochs: the recipe's on a GPU, at most CPU_MAX_EPOCHS on a CPU;
- the batch: the recipe's, lowered to a power of two that leaves at least 4 steps an epoch, fits in half
  the free memory (by the trial steps of ``training.budget``) and, on a CPU, is at most CPU_MAX_BATCH.

Every choice is logged with its reason and the key that changes it, and kept in the config's ``auto``
section, so config.yaml records what was chosen and why; values set explicitly (flags, ``key=value``) are
kept and the later choices build on them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from contrastive.errors import ConfigError

log = logging.getLogger("contrastive.config")

SMALL_SIDE = 64  # CIFAR-scale recipes up to this side (the CIFAR stem's rule in nn/backbones.py)
MIN_SIDE = 16  # smaller images are decoded up to it, so random crops keep some pixels (digits: 8 -> 16)
GPU_MAX_SIDE = 224  # ImageNet's training size (SimCLR, Appendix A)
CPU_MAX_SIDE = 96  # STL-10's size: the ImageNet views at a side a CPU trains at hundreds of images/s
CPU_MAX_EPOCHS = 100  # SimCLR's ablations train 100 epochs (Chen et al. 2020, Sec. 3); hours on a CPU
CPU_MAX_BATCH = 512  # SimCLR's CIFAR-10 batch (Appendix B.9); larger ones only lengthen a CPU step
MIN_STEPS = 4  # optimiser steps an epoch at least
MEMORY_SHARE = 0.5  # of the free memory (less the decoded data) a chosen batch may take


def _get(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _device(layer: dict) -> torch.device:
    name = _get(layer, "train.device") or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def derive(method: str, layer: dict) -> tuple[dict, dict[str, str]]:
    """``(tree, reasons)`` for ``method`` on the data ``layer`` names, ``layer`` being what the user set
    (flags and ``key=value``): the family recipe with the derived values set, for ``layer`` to overlay, and
    each choice's reason by key."""
    from contrastive.config import DataConfig, TrainConfig, build_dataclass, read_yaml, recipe_dir
    from contrastive.data.modality import data_modality
    from contrastive.data.splits import probe
    from contrastive.machine import describe

    data = build_dataclass(DataConfig, dict(layer.get("data") or {}), "data")
    kind = data_modality(data)
    if kind in ("text", "image-text"):  # nothing is derived from sentences: the method's own recipe
        found = recipe_dir() / f"{method}.yaml"
        if not found.is_file():
            raise ConfigError(f"{data.name} holds {kind} data and {method} has no recipe for it (configs/{method}.yaml); "
                              f"train a method for it ({'simcse, simcse-sup' if kind == 'text' else 'clip'}) or "
                              f"pass a recipe with --config")
        return read_yaml(found), {"recipe": f"{found.name}: the method's recipe for {kind} data (--config to pick "
                                            f"another)"}
    shape = probe(data, evaluate=_get(layer, "eval.enabled") is not False)
    device = _device(layer)
    cpu = device.type == "cpu"
    tree: dict = {}
    reasons: dict[str, str] = {}

    def note(key: str, value: Any, reason: str, flag: str) -> None:
        reasons[key] = f"{value}: {reason} ({flag} or {key}=... to change)"

    # the recipe family, by the size the encoder will see
    small = (_get(layer, "views.size") or _get(layer, "data.image_size") or shape.size) <= SMALL_SIDE
    scale = (f"CIFAR-scale recipe, for images of at most {SMALL_SIDE} px" if small else
             f"ImageNet-scale recipe, for images larger than {SMALL_SIDE} px")
    cifar = [f"{method}-cifar10.yaml", f"{method}-cifar100.yaml"]
    preferred, fallback = (cifar, [f"{method}.yaml"]) if small else ([f"{method}.yaml"], cifar)
    d = recipe_dir()
    found = next((n for n in preferred if (d / n).is_file()), None)
    why = f"the method's {scale}"
    if found is None:
        found = next((n for n in fallback if (d / n).is_file()), None)
        why = f"{method} has no {scale.split(',')[0]}, so its other one"
    recipe = read_yaml(d / found) if found else {}
    reasons["recipe"] = (f"{found}: {why} (--config to pick another)" if found else
                         f"none: {method} has no recipe, so its own defaults (--config to pick one)")
    kept = "the recipe's" if found else "the default"

    # the decode size
    size = _get(layer, "data.image_size")
    if size is None:
        cap = CPU_MAX_SIDE if cpu else GPU_MAX_SIDE
        size = max(shape.size, MIN_SIDE) if small else min(shape.size, cap)
        if size > shape.size:
            why = f"the images are {shape.size} px, decoded at {MIN_SIDE} so random crops keep some pixels"
        elif size < shape.size:
            why = (f"the images are typically {shape.size} px; at most {cap} px on a "
                   f"{'CPU (STL-10 size, hundreds of images/s)' if cpu else 'GPU (ImageNet training size)'}")
        else:
            why = "the images' typical side"
        _set(tree, "data.image_size", size)
        note("data.image_size", size, why, "--image-size")
    view_size = _get(layer, "views.size") or _get(recipe, "views.size") or size

    # the backbone
    if _get(layer, "backbone.name") is None:
        backbone = _get(recipe, "backbone.name") or "small_cnn"  # Config's default backbone
        if cpu and backbone != "small_cnn":
            tree["backbone"] = {"name": "small_cnn"}  # a section of its own: the recipe's fields do not carry over
            note("backbone.name", "small_cnn", f"on a CPU it trains at hundreds of images/s, where the recipe's "
                 f"{backbone} would take days to weeks", "--backbone")
        else:
            note("backbone.name", backbone, kept + ("" if cpu else " on a GPU"), "--backbone")

    # the epochs
    if _get(layer, "train.epochs") is None:
        epochs = _get(recipe, "train.epochs") or TrainConfig().epochs
        if cpu and epochs > CPU_MAX_EPOCHS:
            _set(tree, "train.epochs", CPU_MAX_EPOCHS)
            note("train.epochs", CPU_MAX_EPOCHS, f"on a CPU, the length of SimCLR's ablations, not {kept} "
                 f"{epochs}", "--epochs")
        else:
            note("train.epochs", epochs, kept, "--epochs")

    # the batch size
    if _get(layer, "train.batch_size") is None:
        batch, why = _batch(_merge(_merge(recipe, tree), layer), shape, size, view_size, device, cpu, kept)
        _set(tree, "train.batch_size", batch)
        note("train.batch_size", batch, why, "--batch-size")

    log.info("no recipe for %s on %s: settings from the data (%s) and the device (%s); explicit settings win:",
             method, data.name, shape.how, describe(device))
    for key, reason in reasons.items():
        log.info("  %s = %s", key, reason)
    return _merge(recipe, tree), reasons


def _batch(tree: dict, shape: Any, size: int, view_size: int, device: torch.device, cpu: bool,
           kept: str) -> tuple[int, str]:
    """The batch size for the config ``tree`` and why: the smallest of the limits, as a power of two, lowered
    further when a step would take more than MEMORY_SHARE of the free memory."""
    from contrastive.config import TrainConfig
    from contrastive.machine import available_memory, describe, gib

    world = int(os.environ.get("WORLD_SIZE", 1))
    limits = [(_get(tree, "train.batch_size") or TrainConfig().batch_size, kept)]
    if cpu:
        limits.append((CPU_MAX_BATCH, "on a CPU, SimCLR's CIFAR-10 batch at most"))
    limits.append((max(shape.images // MIN_STEPS, 2), f"the largest power of two that leaves {MIN_STEPS} steps "
                                                      f"an epoch over {shape.images:,} images"))
    limit, why = min(limits, key=lambda x: x[0])
    batch = _power_of_two(limit, world)
    free, _ = available_memory(device)
    decoded = shape.images * shape.channels * size * size
    if cpu and decoded <= 0.5 * free:  # the data will be decoded into this memory (data.in_memory unset)
        free -= decoded
    budget = MEMORY_SHARE * free
    memory = _step_memory(_merge(tree, {"train": {"batch_size": batch}}), shape, view_size, device, world)
    if memory.need(batch // world) <= budget:
        return batch, f"{why} (a step needs about {gib(memory.need(batch // world))} of the {gib(free)} free)"
    batch = _power_of_two(memory.largest_batch(budget) * world, world)
    if batch < 2:
        raise ConfigError(f"not even a batch of 2 images of {view_size} px fits in the memory free on "
                          f"{describe(device)} ({gib(free)}); lower data.image_size, or free memory")
    return batch, (f"the largest power of two whose step (about {gib(memory.need(batch // world))}) fits in "
                   f"{MEMORY_SHARE:.0%} of the {gib(free)} free on {describe(device)}")


def _merge(a: dict, b: dict) -> dict:
    from contrastive.config import deep_merge

    return deep_merge(a, b)


def _power_of_two(n: int, world: int) -> int:
    """The largest power of two <= n, a multiple of ``world`` (which, above 1, may make it smaller)."""
    p = 1
    while p * 2 <= n:
        p *= 2
    return p - p % world if p % world else p


def _step_memory(tree: dict, shape: Any, view_size: int, device: torch.device, world: int):
    """The training step's memory (``training.budget.measure_step``) of the config ``tree``, its method built
    for ``shape``'s data on ``device``, without touching the global random state."""
    from contrastive.config import Config, build_dataclass
    from contrastive.configure import validate
    from contrastive.methods import build_method
    from contrastive.data.views import global_size, run_view_groups, view_groups, view_shapes
    from contrastive.methods.base import BuildContext, StepInfo
    from contrastive.training.budget import measure_step
    from contrastive.device import resolve_precision

    cfg = build_dataclass(Config, tree, "")
    validate(cfg)
    batch, epochs = cfg.train.batch_size, cfg.train.epochs
    steps = max(shape.images // batch, 1)
    decoded = cfg.data.image_size or shape.size
    groups = view_groups(cfg.views, decoded, run_view_groups(cfg))
    view_size = global_size(groups, decoded)
    # the data's statistics are not read yet: placeholders (they scale the views, not the step's memory)
    ctx = BuildContext(channels=shape.channels, image_size=view_size, dataset_size=shape.images,
                       num_classes=shape.classes, batch_size=batch, world_size=world, steps_per_epoch=steps,
                       epochs=epochs, backbone_section=dict(cfg.backbone), mean=(0.5,) * shape.channels,
                       std=(0.25,) * shape.channels)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        method = build_method(cfg, ctx).to(device)
        sizes, n_global = view_shapes(groups, decoded)
        return measure_step(method, channels=shape.channels, sizes=sizes, n_global=n_global, device=device,
                            amp_dtype=resolve_precision(cfg.train.precision, device),
                            step=StepInfo(step=0, epoch=0, total_steps=steps * epochs, steps_per_epoch=steps,
                                          epochs=epochs), dataset_size=shape.images)
