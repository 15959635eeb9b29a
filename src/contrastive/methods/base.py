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

    views: list[torch.Tensor]  # this process's views, on the training device, global first (images: float
    #                            [n, C, S_v, S_v], normalised; sentences: token ids [n, L])
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

    input_shape: tuple[int, ...]  # one global view as the encoder reads it, without the batch: images [C, S, S],
    #                               audio windows [1, T], token ids [L]
    dataset_size: int  # training samples: rows of a memory bank
    num_classes: int | None  # None when the training data is unlabeled
    batch_size: int  # global, over every process
    world_size: int
    steps_per_epoch: int
    epochs: int
    backbone_section: dict = field(default_factory=lambda: {"name": "small_cnn"})
    modality: str = "image"  # the kind of data trained on (a registered modality's name)
    # the training data's per-channel mean and std, which normalised the views (CMC un-normalises them before
    # its Lab conversion); None for data without them (token ids)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(n) for n in self.input_shape)  # a list when read back from a file

    @property
    def channels(self) -> int:
        """Images and audio: the channels of a view ([C, ...])."""
        return self.input_shape[0]

    @property
    def image_size(self) -> int:
        """Images: the side of a view ([C, S, S])."""
        return self.input_shape[-1]

    def build_backbone(self, input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, int]:
        """``input_shape``: what the encoder will read when it is not a view (CMC's channel groups, CPC's
        patches)."""
        from contrastive.nn.backbones import build_backbone

        return build_backbone(self.backbone_section, input_shape=input_shape or self.input_shape)

    @classmethod
    def from_dict(cls, d: dict, modality: str) -> "BuildContext":
        """A context as a file holds it (``asdict``) for data of ``modality``, also one written before contexts
        had an input shape: those held an image's ``channels`` and ``image_size`` (for audio a clip's length, for
        text a row's)."""
        d = {"modality": modality, **d}
        if "input_shape" not in d:
            channels, size = d.pop("channels"), d.pop("image_size")
            d["input_shape"] = {"audio": (channels, size), "text": (size,)}.get(modality, (channels, size, size))
        return cls(**d)


class Method(nn.Module):
    """Defaults for the optional hooks; a method overrides only what it needs.

    A method sets ``self.feature_dim``, the width of what ``encoder()`` returns.
    """

    feature_dim: int
    # what to change when the collapse watch sees the embeddings collapse (training/collapse.py)
    collapse_advice: str = "lower optim.lr or lengthen optim.warmup_epochs"
    batch_multiple: int = 1  # a process's batch must be a multiple of this (MoCo: its batch-norm groups)
    # the fewest samples a global batch needs for the loss to learn: 2 where the batch's other samples are the
    # negatives (with one, the loss is constant and the run would "succeed" without learning)
    min_batch: int = 1

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
        """The module evaluation and ``encoder.pt`` use: a batch of inputs (images [B, C, S, S]) -> features [B, D]."""
        return self.backbone

    def projection_head(self) -> nn.Sequential | None:
        """The head on top of ``encoder()`` (SimCLR v2 fine-tunes from its first layer); None when there is none."""
        return None

    def embedders(self) -> dict[str, nn.Module]:
        """A method that embeds several kinds of data into one space (CLIP: images and captions) names a module per
        kind (a registered modality's name) into that space; retrieval, zero-shot and ``embed`` read them. Empty:
        ``encoder()`` is the method's one embedding."""
        return {}

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
    # the kinds of data the method trains on (registered modalities' names); None: any kind its backbone reads
    data: tuple[str, ...] | None = None
    # a method with an encoder per kind of data: the config section that builds each one, e.g. CLIP's
    # {"image": "backbone", "text": "method.text"}; None: the backbone reads the data
    towers: dict[str, str] | None = None
