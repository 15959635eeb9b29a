"""Embeddings written as plain ``.npy`` files, for use outside this library (numpy, UMAP, a vector store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from contrastive.errors import DataError
from contrastive.files import atomic_write


def _atomic_save(array: np.ndarray, path: Path) -> None:
    """A reader never sees a half-written file (``files.atomic_write``)."""
    atomic_write(path, lambda f: np.save(f, array))


def labels_path(path: str | Path) -> Path:
    """``emb.npy`` -> ``emb.labels.npy``, the labels file beside an embeddings file."""
    path = Path(path)
    return path.with_name(path.name[: -len(".npy")] + ".labels.npy")


def save_embeddings(feats: Tensor, labels: Tensor | None, path: str | Path) -> list[Path]:
    """Write ``feats [N, D]`` to ``path`` as float32 ``.npy`` and, if any label is >= 0, the int64 labels
    ``[N]`` (-1 kept for unlabeled rows) to ``<stem>.labels.npy`` beside it.

    Without labels, a labels file left at that place by an earlier run is removed, so the two files never
    disagree. Returns the paths written, embeddings first.
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise DataError(f"embeddings path {path} must end in .npy (they are written with numpy.save)")
    feats_np = torch.as_tensor(feats).detach().cpu().float().numpy()
    if feats_np.ndim != 2:
        raise DataError(f"embeddings must be a [N, D] matrix, got shape {feats_np.shape}")
    labels_np = None if labels is None else torch.as_tensor(labels).detach().cpu().long().numpy()
    if labels_np is not None and labels_np.shape != (feats_np.shape[0],):
        raise DataError(f"labels have shape {labels_np.shape} but there are {feats_np.shape[0]} embeddings")
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(feats_np, path)
    written = [path]
    if labels_np is not None and (labels_np >= 0).any():
        _atomic_save(labels_np, labels_path(path))
        written.append(labels_path(path))
    else:
        labels_path(path).unlink(missing_ok=True)
    return written


def save_array(values: Tensor, path: str | Path) -> Path:
    """Any tensor as ``.npy`` at ``path``, written atomically (a clip run's caption -> image rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(torch.as_tensor(values).detach().cpu().numpy(), path)
    return path
