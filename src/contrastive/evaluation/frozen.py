"""The offline protocol every kind of data shares: a frozen encoder's features of the labelled train and test
sides, scored by the weighted kNN and the linear probe, beside a baseline's features under the same probes."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from contrastive.config import EvalConfig
from contrastive.evaluation.features import extract_features
from contrastive.evaluation.knn import knn_device, knn_top1
from contrastive.evaluation.linear import linear_probe


def evaluate_frozen(encoder: nn.Module, preprocess: Callable[[Tensor], Tensor], train_set, test_set, e: EvalConfig,
                    *, seed: int, device: torch.device, note: str, protocols: tuple[str, ...] | None = None,
                    baseline: Any = None) -> dict[str, Any]:
    """kNN and/or linear probe (``protocols``; None: those ``e`` turns on) of ``encoder`` on labelled sides, as one
    dict; ``baseline`` (``key``, ``description``, ``protocols``, ``features(dataset) -> (x, y)``), when given, runs
    the same probes on its own features under ``{key}_knn_top1`` and ``{key}_linear_top1``."""
    if protocols is None:
        protocols = tuple(p for p, on in (("knn", e.knn), ("linear", e.linear)) if on)
    num_classes = train_set.num_classes
    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = (extract_features(encoder.to(device), ds, preprocess=preprocess,
                                               batch_size=e.batch_size, device=device) for ds in (train_set, test_set))
    res: dict[str, Any] = {
        "evaluation": {"split": note, "train_images": len(train_set), "test_images": len(test_set),
                       "knn": {"k": e.knn_k, "temperature": e.knn_temperature, "similarity": "cosine"},
                       **({f"{baseline.key}_baseline": baseline.description} if baseline is not None else {}),
                       "linear": {"epochs": e.linear_epochs, "lr": e.linear_lr, "optimizer": "adamw",
                                  "features": "frozen, standardised"}},
        "feature_seconds": round(time.perf_counter() - t0, 2),
    }

    def knn(x: Tensor, y: Tensor, xt: Tensor, yt: Tensor) -> float:
        return knn_top1(x, y, xt, yt, num_classes=num_classes, k=e.knn_k, temperature=e.knn_temperature,
                        device=knn_device(x, device))

    def linear(x: Tensor, y: Tensor, xt: Tensor, yt: Tensor) -> dict:
        return linear_probe(x, y, xt, yt, num_classes=num_classes, epochs=e.linear_epochs, lr=e.linear_lr,
                            weight_decay=e.linear_weight_decay, batch_size=e.linear_batch_size, seed=seed,
                            device=device)

    if "knn" in protocols:
        res["knn_top1"] = knn(xtr, ytr, xte, yte)
    if "linear" in protocols:
        probe = linear(xtr, ytr, xte, yte)
        res["linear_top1"] = probe["top1"]
        res["linear_train_top1"] = probe["train_top1"]
    run = [p for p in protocols if p in baseline.protocols] if baseline is not None else []
    if run:
        (btr, _), (bte, _) = (baseline.features(ds) for ds in (train_set, test_set))
        if "knn" in run:
            res[f"{baseline.key}_knn_top1"] = knn(btr, ytr, bte, yte)
        if "linear" in run:
            res[f"{baseline.key}_linear_top1"] = linear(btr, ytr, bte, yte)["top1"]
    return res
