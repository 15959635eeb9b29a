"""Frozen features for offline evaluation: extract once, then kNN and the linear probe read the cache.

Datasets yield ``(sample, label int (-1 = unlabeled), index int)``, a sample of the dataset's kind of data (an
image uint8 [C, H, W], an audio clip [1, T], token ids [L]). Features come back in dataset order, float32 on the
CPU, with their int64 labels, so one extraction serves every evaluator (a modality's baseline features too).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from contrastive.data.datasets import collate_skip_corrupt
from contrastive.errors import DataError

log = logging.getLogger("contrastive.eval")


def _batches(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool = False
             ) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches in dataset order; unreadable images of a streaming folder read with
    data.skip_corrupt (items that are None) are left out and counted in the log."""
    if len(dataset) == 0:
        raise DataError("the dataset to extract features from is empty; check its path and split")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=False, collate_fn=collate_skip_corrupt)
    skipped = 0
    for batch, dropped in loader:
        skipped += dropped
        if batch is not None:
            images, labels, _ = batch
            yield images, labels
    if skipped:
        log.warning("skipped %d unreadable images of %s (data.skip_corrupt=true); they have no features",
                    skipped, getattr(dataset, "name", type(dataset).__name__))


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    *,
    preprocess: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """Encode every image of ``dataset`` with the frozen ``encoder``.

    ``preprocess`` maps uint8 ``[B, C, H, W]`` to float ``[B, C, S, S]`` on ``device``. The encoder runs
    in eval mode (batch-norm running statistics, no dropout), as in the offline protocol of InstDisc
    (Wu et al. 2018, Sec. 3.4); each sub-module's own train/eval mode is restored afterwards.

    Returns ``(features float32 [N, D] on the CPU, labels int64 [N])`` in dataset order; an encoder output
    with more than two dimensions is flattened to ``[B, D]``. Images skipped as unreadable (streaming
    folders with data.skip_corrupt) have no row, and the log says how many. Each batch is written into one
    tensor allocated at the first batch, so the features are never held twice (raw pixels are large).
    """
    device = torch.device(device)
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    feats = labels = None
    n = 0
    try:
        for images, batch_labels in _batches(dataset, batch_size, num_workers, device.type == "cuda"):
            out = encoder(preprocess(images.to(device, non_blocking=True))).flatten(1)
            if feats is None:
                feats = torch.empty(len(dataset), out.shape[1])
                labels = torch.empty(len(dataset), dtype=torch.long)
            feats[n:n + len(out)] = out
            labels[n:n + len(out)] = batch_labels
            n += len(out)
    finally:
        # Restored per module: sub-modules frozen on purpose (eval inside a training model) stay frozen.
        for module, training in modes:
            module.training = training
    if feats is None:
        raise DataError("every image of the dataset was unreadable; there is nothing to extract features from")
    return feats[:n], labels[:n]


def check_labelled(feats: Tensor, labels: Tensor, *, num_classes: int, role: str) -> None:
    """Raise ``DataError`` unless ``feats [N, D]`` and ``labels [N]`` pair up with labels in ``[0, C)``.

    ``role`` ("train", "test") names the side at fault in the message.
    """
    if feats.dim() != 2:
        raise DataError(f"{role} features must be a [N, D] matrix, got shape {tuple(feats.shape)}")
    if labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise DataError(f"{role} labels have shape {tuple(labels.shape)} but there are {feats.shape[0]} "
                        f"{role} feature rows; give one label per row")
    if feats.shape[0] == 0:
        raise DataError(f"there are no {role} examples to evaluate with")
    unlabeled = int((labels < 0).sum())
    if unlabeled:
        raise DataError(f"{unlabeled} of {labels.shape[0]} {role} examples are unlabeled (label -1); kNN and "
                        f"the linear probe need labelled data: set data.train_data / data.test_data to a "
                        f"labelled dataset")
    if int(labels.max()) >= num_classes:
        raise DataError(f"{role} label {int(labels.max())} is out of range for num_classes={num_classes}")
