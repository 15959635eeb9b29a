"""Batches of P classes x K samples (Hermans et al. 2017, Sec. 3: "randomly sampling P classes (person
identities), and then randomly sampling K images of each class"), and the checks of the labels that the
methods learning from labels (siamese, triplet, supcon) make before they use them.

:func:`pk_batches` is a pure function of (labels, P, K, generator): the trainer calls it once an epoch with
a generator seeded by (seed, epoch), so the epoch's batches repeat on resume, mid-epoch included.
"""

from __future__ import annotations

import torch

from contrastive.errors import ConfigError, DataError


def require_labels(num_classes: int | None, method: str) -> None:
    """Refuse, at build time, training data without classes for a method that learns from labels."""
    if num_classes is None:
        raise ConfigError(f"method.name={method} learns from labels, but the training data is unlabeled (no class "
                          f"sub-folders); give a labelled dataset (an image folder with one sub-folder per class, "
                          f"or a named dataset such as digits or cifar10), or pick a self-supervised method such "
                          f"as simclr")


def check_labelled(labels: torch.Tensor, name: str, method: str) -> None:
    """Refuse data where some images have no label (-1), naming the dataset ``name``."""
    missing = int((labels < 0).sum())
    if missing:
        raise DataError(f"{name}: {missing} of {len(labels)} training images have no label (-1), and "
                        f"method.name={method} learns from labels; train on the labelled images only (a folder "
                        f"with a class sub-folder for every image), or pick a self-supervised method")


def check_classes_per_batch(classes_per_batch: int | None) -> None:
    """Refuse, at build time, a ``method.classes_per_batch`` that is neither None (random batches) nor >= 1."""
    if classes_per_batch is not None and classes_per_batch < 1:
        raise ConfigError(f"method.classes_per_batch={classes_per_batch} must be >= 1, or null for random batches")


def samples_per_class(batch_size: int, classes_per_batch: int) -> int:
    """K = train.batch_size / method.classes_per_batch, refused when it is not a whole number >= 2 (a class
    with one sample in the batch has no positive)."""
    if classes_per_batch < 1 or batch_size % classes_per_batch or batch_size // classes_per_batch < 2:
        raise ConfigError(f"train.batch_size={batch_size} must be a multiple of method.classes_per_batch="
                          f"{classes_per_batch} with at least 2 samples per class (batches of P classes x K "
                          f"samples); set train.batch_size to K x {classes_per_batch} for some K >= 2, or change "
                          f"method.classes_per_batch")
    return batch_size // classes_per_batch


def pk_batches(labels: torch.Tensor, classes_per_batch: int, samples_per_class: int, generator: torch.Generator,
               num_batches: int | None = None) -> list[torch.Tensor]:
    """One epoch of batches [P * K] of indices into ``labels`` [N] (every label >= 0): ``num_batches`` of
    them, N // (P K) by default, as the trainer's random batches have.

    Each class's samples are shuffled once at the start of the epoch. Each batch draws P distinct classes,
    each with probability proportional to the samples it has not yet given this epoch (at least 1, so that a
    class can be drawn again once fewer than P classes have samples left), then takes the next K samples of
    each: the P classes in the order drawn, their K samples consecutive. So within an epoch classes and
    samples are drawn without replacement while they last. When a class runs short (fewer than K left), its
    remaining samples are followed by a fresh permutation of its other samples, so a sample appears at most
    once in a batch, and that class goes on from the fresh permutation. A class with fewer than K samples
    in all repeats its samples within the batch. Everything is drawn from ``generator``, in a fixed order.
    """
    if labels.ndim != 1 or (labels < 0).any():
        raise ValueError("pk_batches needs labels [N], every one >= 0 (check_labelled says which data lacks them)")
    p, k = classes_per_batch, samples_per_class
    classes, counts = torch.unique(labels, return_counts=True)  # sorted, with at least one sample each
    if p > len(classes):
        raise ConfigError(f"method.classes_per_batch={p} is more than the {len(classes)} classes of the training "
                          f"data; set it to at most {len(classes)}")
    by_class = torch.argsort(labels, stable=True).split(counts.tolist())  # the samples of each class
    queue = [members[torch.randperm(len(members), generator=generator)] for members in by_class]
    left = counts.clone()  # samples of each class not yet given this epoch
    if num_batches is None:
        num_batches = len(labels) // (p * k)
    batches = []
    for _ in range(num_batches):
        chosen = torch.multinomial(left.clamp_min(1).double(), p, replacement=False, generator=generator)
        parts = []
        for c in chosen.tolist():
            taken, queue[c] = queue[c][:k], queue[c][k:]
            while len(taken) < k:  # ran short: the rest, then a fresh permutation of the class's other samples
                members = by_class[c]
                others = members[~torch.isin(members, taken)]
                others = others if len(others) else members  # a class smaller than K repeats its samples
                fresh = others[torch.randperm(len(others), generator=generator)]
                need = k - len(taken)
                taken, queue[c] = torch.cat([taken, fresh[:need]]), fresh[need:]
            parts.append(taken)
            left[c] = max(int(left[c]) - k, 0)
        batches.append(torch.cat(parts))
    return batches


def labelled_batch_order(labels: torch.Tensor, batch_size: int, generator: torch.Generator, name: str, method: str,
                         classes_per_batch: int | None) -> list[torch.Tensor] | None:
    """``Method.batch_order`` of a method that learns from labels: the labels of ``name`` checked, then P x K
    batches when ``classes_per_batch`` (P) is set, else None (the trainer's random batches)."""
    check_labelled(labels, name, method)
    if classes_per_batch is None:
        return None
    return pk_batches(labels, classes_per_batch, samples_per_class(batch_size, classes_per_batch), generator,
                      len(labels) // batch_size)
