"""Defaults derived from the data and the device, for data without a recipe of its own.

``configure.resolve_config`` calls :func:`derive` when no ``--config`` is given and
``configs/<method>-<dataset>.yaml`` does not exist (a folder of the user's own data, or a named dataset the method
has no recipe for). The data's modality (``contrastive.modalities``) picks the recipe and derives what depends on
its kind of data (images: the recipe family by size, the decode size, a CPU backbone, the epochs; sound: the
window and the encoder's strides from the sample rate and clip length; sentences and image-caption pairs: the
method's own recipe). Then, for every kind alike, the batch: the recipe's, lowered to a power of two that leaves
at least MIN_STEPS steps an epoch, fits in half the free memory (by the trial steps of ``training.budget`` on the
modality's trial batch) and, on a CPU, is at most CPU_MAX_BATCH.

Every choice is logged with its reason and the key that changes it, and kept in the config's ``auto``
section, so config.yaml records what was chosen and why; values set explicitly (flags, ``key=value``) are
kept and the later choices build on them.
"""

from __future__ import annotations

import logging
import os

import torch

from contrastive import machine
from contrastive.config import Config, DataConfig, TrainConfig, build_dataclass, check_fields
from contrastive.trees import deep_merge
from contrastive.device import resolve_precision
from contrastive.errors import ConfigError
from contrastive.machine import describe, gib
from contrastive.methods import build_method
from contrastive.methods.base import BuildContext, StepInfo
from contrastive.modalities import DataShape, Modality, detect
from contrastive.modalities.base import get_key
from contrastive.training.budget import StepMemory, measure_step

log = logging.getLogger("contrastive.config")

CPU_MAX_BATCH = 512  # SimCLR's CIFAR-10 batch (Appendix B.9); larger ones only lengthen a CPU step
MIN_STEPS = 4  # optimiser steps an epoch at least
MEMORY_SHARE = 0.5  # of the free memory (less the decoded data) a chosen batch may take


def _device(layer: dict) -> torch.device:
    name = get_key(layer, "train.device") or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def derive(method: str, layer: dict) -> tuple[dict, dict[str, str]]:
    """``(tree, reasons)`` for ``method`` on the data ``layer`` names, ``layer`` being what the user set
    (flags and ``key=value``): the recipe with the derived values set, for ``layer`` to overlay, and each
    choice's reason by key."""
    data = build_dataclass(DataConfig, dict(layer.get("data") or {}), "data")
    modality = detect(data)
    device = _device(layer)
    tree, reasons, shape = modality.derive(method, data, layer, device)
    if get_key(layer, "train.batch_size") is None:
        kept = "the recipe's" if get_key(tree, "train.batch_size") is not None else "the default"
        batch, why = _batch(deep_merge(tree, layer), modality, shape, device, kept)
        tree = deep_merge(tree, {"train": {"batch_size": batch}})
        reasons.note("train.batch_size", batch, why, "--batch-size")
    log.info("no recipe for %s on %s: settings from the data (%s) and the device (%s); explicit settings win:",
             method, data.name, shape.how, describe(device))
    for key, reason in reasons.items():
        log.info("  %s = %s", key, reason)
    return tree, dict(reasons)


def _batch(tree: dict, modality: Modality, shape: DataShape, device: torch.device, kept: str) -> tuple[int, str]:
    """The batch size for the config ``tree`` and why: the smallest of the limits, as a power of two, lowered
    further when a step would take more than MEMORY_SHARE of the free memory."""
    cpu = device.type == "cpu"
    world = int(os.environ.get("WORLD_SIZE", 1))
    limits = [(get_key(tree, "train.batch_size") or TrainConfig().batch_size, kept)]
    if cpu:
        limits.append((CPU_MAX_BATCH, "on a CPU, SimCLR's CIFAR-10 batch at most"))
    limits.append((max(shape.samples // MIN_STEPS, 2), f"the largest power of two that leaves {MIN_STEPS} steps "
                                                       f"an epoch over {shape.samples:,} {modality.noun}"))
    limit, why = min(limits, key=lambda x: x[0])
    batch = _power_of_two(limit, world)
    free, _ = machine.available_memory(device)
    if cpu and shape.memory <= 0.5 * free:  # the data will be held in this memory (data.in_memory unset)
        free -= shape.memory
    budget = MEMORY_SHARE * free
    memory, what = _step_memory(deep_merge(tree, {"train": {"batch_size": batch}}), modality, shape, device, world)
    if memory.need(batch // world) <= budget:
        return batch, f"{why} (a step needs about {gib(memory.need(batch // world))} of the {gib(free)} free)"
    batch = _power_of_two(memory.largest_batch(budget) * world, world)
    if batch < 2:
        raise ConfigError(f"not even a batch of 2 ({what}) fits in the memory free on {describe(device)} "
                          f"({gib(free)}); lower data.image_size, or free memory")
    return batch, (f"the largest power of two whose step (about {gib(memory.need(batch // world))}) fits in "
                   f"{MEMORY_SHARE:.0%} of the {gib(free)} free on {describe(device)}")


def _power_of_two(n: int, world: int) -> int:
    """The largest power of two <= n, a multiple of ``world`` (which, above 1, may make it smaller)."""
    p = 1
    while p * 2 <= n:
        p *= 2
    return p - p % world if p % world else p


def _step_memory(tree: dict, modality: Modality, shape: DataShape, device: torch.device,
                 world: int) -> tuple[StepMemory, str]:
    """The training step's memory (``training.budget.measure_step``) of the config ``tree``, its method built for
    data of ``shape`` on ``device`` and run on the modality's trial batch, without touching the global random
    state; and what the trial reads."""
    cfg = build_dataclass(Config, tree, "")
    check_fields(cfg)
    batch, epochs = cfg.train.batch_size, cfg.train.epochs
    steps = max(shape.samples // batch, 1)
    input_shape, trial = modality.planned(cfg, shape, device)
    # the data's statistics are not read yet: placeholders (they scale the views, not the step's memory)
    ctx = BuildContext(input_shape=input_shape, dataset_size=shape.samples, num_classes=shape.classes,
                       batch_size=batch, world_size=world, steps_per_epoch=steps, epochs=epochs,
                       backbone_section=dict(cfg.backbone), modality=modality.name, mean=(0.5,) * shape.channels,
                       std=(0.25,) * shape.channels)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        method = build_method(cfg, ctx).to(device)
        memory = measure_step(method, trial, device=device, amp_dtype=resolve_precision(cfg.train.precision, device),
                              step=StepInfo(step=0, epoch=0, total_steps=steps * epochs, steps_per_epoch=steps,
                                            epochs=epochs), dataset_size=shape.samples)
    return memory, trial.what
