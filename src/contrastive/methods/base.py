"""The contract every method keeps, what it is built from, and the registry entry that builds one.

A method is a plain ``nn.Module``::

    out = method(batch, step=info)          # Batch in: views, dataset indices, labels
    out.loss.backward(); optimizer.step()
    method.after_step(out.updates, info)    # detached results in: EMA, queue push, bank write

``forward`` changes no state; everything a method keeps between steps is a persistent buffer created in
``__init__`` (so a checkpoint restores it and every rank holds the same). ``Method`` gives the optional
hooks defaults that do nothing, so the trainer treats every method alike and anyone can drive one from
their own loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

# Streams of per-step randomness: each consumer gets its own seed, so adding one never shifts another.
STREAM_VIEWS, STREAM_METHOD, STREAM_GLOBAL, STREAM_LOADER = 0, 1, 2, 3


def step_seed(seed: int, step: int, rank: int, stream: int = STREAM_VIEWS) -> int:
    """A seed that is a function of (run seed, step, rank, stream) only, so a resumed run repeats it."""
    return (((seed * 1_000_003 + step) * 4096 + rank) + stream * 0x9E3779B97F4A7C15) % (2**63)


@dataclass(frozen=True)
class StepInfo:
    """Where training is. Schedules are pure functions of these numbers."""

    step: int  # optimiser steps done before this one
    epoch: int
    total_steps: int  # optimiser steps of the whole run
    steps_per_epoch: int = 1
    epochs: int = 1
    seed: int = 0
    rank: int = 0

    @property
    def progress(self) -> float:
        """Fraction of the run done before this step, in [0, 1) (MoCo v3 / BYOL momentum schedules)."""
        return self.step / max(self.total_steps, 1)

    def generator(self, device: torch.device | str, *, per_rank: bool = True) -> torch.Generator:
        """A generator for this step's random choices (negatives, shuffles), seeded by (seed, step, rank).

        ``per_rank=False`` gives every rank the same stream: draw for the global batch and take this rank's
        rows, and the choices do not depend on how many processes share the batch.
        """
        g = torch.Generator(device=device)
        g.manual_seed(step_seed(self.seed, self.step, self.rank if per_rank else 0, STREAM_METHOD))
        return g


@dataclass(frozen=True)
class Batch:
    """This process's share of one global batch."""

    views: list[torch.Tensor]  # float tensors [n, C, S_v, S_v], normalised, on the training device; global first
    index: torch.Tensor  # [n] int64: each sample's position in the training dataset (memory banks)
    label: torch.Tensor  # [n] int64: class, -1 when unknown (supervised losses only)
    n_global: int | None = None  # the first n_global views are global (views.groups); None: all of them

    @property
    def global_views(self) -> list[torch.Tensor]:
        """The global views (DINO's teacher, SwAV's codes): the first ``n_global``, all when unset."""
        return self.views if self.n_global is None else self.views[:self.n_global]


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars; read only when logged
    updates: dict[str, torch.Tensor] = field(default_factory=dict)  # detached results for after_step
    # [n, d] the representation the loss shapes (projections, queries), for the collapse watch
    # (training/collapse.py); read only at log rows
    embedding: torch.Tensor | None = None


@dataclass
class BuildContext:
    """What a method may know when it is built: the data, the batch and the run's length.

    ``build_backbone()`` makes a fresh, randomly initialised encoder from the run's ``backbone:`` section
    each time it is called (CMC builds one per view), returning ``(module, feature_dim)``.
    """

    channels: int  # of the images the encoder sees
    image_size: int  # side of the views the encoder sees
    dataset_size: int  # training images: rows of a memory bank
    num_classes: int | None  # None when the training data is unlabeled
    batch_size: int  # global, over every process
    world_size: int
    steps_per_epoch: int
    epochs: int
    backbone_section: dict = field(default_factory=lambda: {"name": "small_cnn"})
    # the training data's per-channel mean and std, which normalised the views (CMC un-normalises them before
    # its Lab conversion); None in contexts saved before they were recorded
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def build_backbone(self, in_channels: int | None = None, image_size: int | None = None) -> tuple[nn.Module, int]:
        """``image_size``: the side the encoder will see when it is not the views' (CPC's patches)."""
        from contrastive.nn.backbones import build_backbone

        return build_backbone(self.backbone_section, in_channels=in_channels or self.channels,
                              image_size=image_size or self.image_size)

    @classmethod
    def for_run(cls, cfg: Any, dataset: Any, world_size: int = 1) -> "BuildContext":
        """The context of training ``cfg`` (a Config) on ``dataset`` over ``world_size`` processes."""
        from contrastive.data.views import run_view_size

        return cls(channels=dataset.channels, image_size=run_view_size(cfg, dataset.image_size),
                   dataset_size=len(dataset), num_classes=dataset.num_classes, batch_size=cfg.train.batch_size,
                   world_size=world_size, steps_per_epoch=max(len(dataset) // cfg.train.batch_size, 1),
                   epochs=cfg.train.epochs, backbone_section=dict(cfg.backbone), mean=tuple(dataset.mean),
                   std=tuple(dataset.std))


class Method(nn.Module):
    """Defaults for the optional hooks; a method overrides only what it needs.

    A method sets ``self.feature_dim``, the width of what ``encoder()`` returns.
    """

    feature_dim: int
    # what to change when the collapse watch sees the embeddings collapse (training/collapse.py)
    collapse_advice: str = "lower optim.lr or lengthen optim.warmup_epochs"
    batch_multiple: int = 1  # a process's batch must be a multiple of this (MoCo: its batch-norm groups)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        """State updates after the optimiser step, from ``forward``'s detached ``updates``."""

    def before_optimizer_step(self, step: StepInfo) -> None:
        """Runs between backward and the optimiser step: a part frozen for the first steps (SwAV's prototypes,
        DINO's last layer) drops its gradients here (``grad = None``: the optimiser skips it, momentum and
        weight decay included), rather than being detached, which DDP would reject as unused parameters."""

    def param_groups(self) -> list[dict]:
        """The method's parameter groups with their tags (``training.optim.DEFAULT_TAGS``): ``lr_scale``,
        ``fixed_lr`` (SimSiam's predictor), ``lars`` and ``decay`` exclusions, a unique ``name``. Every
        trainable parameter in exactly one; biases and norms are split off each group without decay or LARS."""
        return [{"name": "default", "params": list(self.parameters())}]

    def encoder(self) -> nn.Module:
        """The module evaluation and ``encoder.pt`` use: images [B, C, S, S] -> features [B, D]."""
        return self.backbone

    def projection_head(self) -> nn.Sequential | None:
        """The head on top of ``encoder()`` (SimCLR v2 fine-tunes from its first layer); None when there is none."""
        return None

    def batch_order(self, labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                    name: str) -> list[torch.Tensor] | None:
        """An epoch's global batches of dataset indices, drawn from ``generator`` (seeded by seed and epoch) given
        the training data's ``labels`` [N] (-1: unknown) and its ``name`` (for errors): ``len(labels) //
        batch_size`` batches of ``batch_size`` (the P x K batches of the triplet loss). None: the trainer's
        random permutation."""
        return None

    def sync_batchnorm(self) -> None:
        """Turn batch norm into SyncBatchNorm where the method wants statistics over every process
        (SimCLR's global BN: all of it). MoCo keeps its key encoder's per-process BN for shuffling."""
        for name, child in list(self.named_children()):
            setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))

    # DistributedDataParallel options. broadcast_buffers=True would send rank 0's buffers (a whole memory
    # bank) to every rank at each forward and overwrite what a rank wrote itself; state buffers are kept
    # equal by the methods' own collectives instead.
    ddp_options: dict[str, Any] = {"broadcast_buffers": False}


@dataclass(frozen=True)
class MethodSpec:
    """Registry entry: the method's typed config and a builder ``(ctx, cfg) -> Method``."""

    config_class: type
    build: Callable[[BuildContext, Any], Method]
    # the paper's view groups (views.groups) for global views of a given side, used when the config names
    # none; None: n_views views of one recipe
    view_groups: Callable[[int], list[dict]] | None = None
