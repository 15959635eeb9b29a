"""Linear probe: a linear classifier trained on frozen, once-extracted features.

The linear evaluation protocol of InstDisc (Wu et al. 2018) and SimCLR (Chen et al. 2020): the backbone
is frozen and only a linear layer on its features is trained. The features are cached, so an epoch is a
pass over a ``[N, D]`` matrix rather than over the images: 100 epochs over 45k x 512 features take about
10 s on one busy CPU core. Offline protocol: no augmentation of the probe's inputs, and the test split is
used only for the final score.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.errors import DataError
from contrastive.evaluation.features import check_labelled
from contrastive.optim.optimizers import AdamW


def _accuracy(model: nn.Module, feats: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return (model(feats).argmax(dim=1) == labels).float().mean().item()


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    batch_size: int = 512,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Train ``nn.Linear(D, num_classes)`` on ``train_feats [N, D]`` and score it on ``test_feats [M, D]``.

    Features are standardised with the mean and standard deviation of the train features only. The
    classifier is trained with cross-entropy and AdamW (weight decay on the weight, not the bias), over
    mini-batches in an order drawn from a generator seeded with ``seed``, with the learning rate decayed
    from ``lr`` to 0 by a cosine over ``epochs``. The same inputs and seed give the same result.

    Returns ``{"top1": test accuracy, "train_top1": train accuracy}``, both in ``[0, 1]``.
    """
    check_labelled(train_feats, train_labels, num_classes=num_classes, role="train")
    check_labelled(test_feats, test_labels, num_classes=num_classes, role="test")
    if test_feats.shape[1] != train_feats.shape[1]:
        raise DataError(f"test features have dimension {test_feats.shape[1]} but train features have "
                        f"{train_feats.shape[1]}")
    device = torch.device(device)
    x_train = train_feats.to(device).float()
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False)
    # A dimension that is constant on the train set (e.g. a dead ReLU) carries no information; dividing it
    # by ~0 would blow up whatever the test set has there.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    x_train = (x_train - mean) / std
    x_test = (test_feats.to(device).float() - mean) / std
    y_train = train_labels.to(device).long()
    y_test = test_labels.to(device).long()

    model = nn.Linear(x_train.shape[1], num_classes).to(device)
    # The problem is convex, so the start point does not change the optimum; zeros make the run depend
    # on the seed only through the batch order, and leave the global RNG untouched.
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    # torch's AdamW, which on CPU features leaves a machine's GPU alone (see training.optim.AdamW)
    optimizer = AdamW([{"params": [model.weight], "weight_decay": weight_decay},
                       {"params": [model.bias], "weight_decay": 0.0}], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {"top1": _accuracy(model, x_test, y_test), "train_top1": _accuracy(model, x_train, y_train)}
