"""Weighted k-nearest-neighbour classification of frozen features (InstDisc protocol).

Wu et al. 2018 (Unsupervised Feature Learning via Non-Parametric Instance Discrimination), Sec. 3.4:
a test feature is compared by cosine similarity s_i with every training feature, its k nearest
neighbours N_k vote, and class c gets the total weight w_c = sum_{i in N_k} exp(s_i / tau) * 1(c_i = c);
k = 200 and tau = 0.07, as in the `kNN` function of their lemniscate.pytorch code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.errors import DataError
from contrastive.evaluation.features import check_labelled


def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 256,
    device: str | torch.device | None = None,
) -> Tensor:
    """Predict a class for each test row by the similarity-weighted vote of its ``k`` nearest train rows.

    Shapes: ``train_feats [N, D]``, ``train_labels int [N]`` (all labelled), ``test_feats [M, D]``;
    returns ``int64 [M]`` on the CPU. ``k`` is clipped to ``N``. Test rows go in chunks of ``chunk_size`` so
    at most a ``[chunk_size, N]`` similarity block exists at a time (never the full ``[M, N]`` matrix). Ties
    in the vote go to the lowest class index. The normalised bank and the similarities live on ``device``
    (None: ``train_feats``' device; see :func:`knn_device`), filled a chunk at a time from the features
    wherever they are.
    """
    check_labelled(train_feats, train_labels, num_classes=num_classes, role="train")
    if test_feats.dim() != 2 or test_feats.shape[1] != train_feats.shape[1]:
        raise DataError(f"test features of shape {tuple(test_feats.shape)} do not match train features "
                        f"of dimension {train_feats.shape[1]}")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise DataError(f"kNN needs k >= 1, temperature > 0 and chunk_size >= 1; got k={k}, "
                        f"temperature={temperature}, chunk_size={chunk_size}")
    k = min(k, train_feats.shape[0])
    device = train_feats.device if device is None else torch.device(device)
    bank = torch.empty(train_feats.shape, device=device)  # [N, D]
    for start in range(0, train_feats.shape[0], chunk_size):  # row by row: the same values as all at once
        rows = train_feats[start:start + chunk_size]
        bank[start:start + len(rows)] = F.normalize(rows.to(device, non_blocking=True).float(), dim=1)
    bank_labels = train_labels.to(bank.device).long()
    preds = []
    for start in range(0, test_feats.shape[0], chunk_size):
        query = F.normalize(test_feats[start:start + chunk_size].to(bank.device).float(), dim=1)  # [B, D]
        sim = query @ bank.T  # [B, N] cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # [B, k], sorted, top_sim[:, 0] the largest
        # exp((s - s_max) / T) is exp(s / T) times a per-row constant: the same argmax, but no overflow
        # at small temperatures.
        weights = torch.exp((top_sim - top_sim[:, :1]) / temperature)  # [B, k]
        votes = torch.zeros(query.shape[0], num_classes, device=bank.device)  # [B, C]
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds).cpu()


def knn_device(train_feats: Tensor, device: str | torch.device) -> torch.device:
    """Where :func:`knn_predict` runs: ``device`` when it is a GPU with room for the normalised bank and a
    chunk's similarity blocks (in half its free memory), else the CPU. The bank of a large dataset does not
    fit every GPU; the CPU holds it in host memory instead."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.device("cpu")
    n, d = train_feats.shape
    need = 4 * n * d + 4 * 4 * 256 * n  # float32 bank; similarities, their top-k and exp of a 256-row chunk
    return device if need <= torch.cuda.mem_get_info(device)[0] // 2 else torch.device("cpu")


def knn_top1(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 256,
    device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy in ``[0, 1]`` of :func:`knn_predict` against ``test_labels int [M]`` (all labelled)."""
    check_labelled(test_feats, test_labels, num_classes=num_classes, role="test")
    preds = knn_predict(train_feats, train_labels, test_feats, num_classes=num_classes, k=k,
                        temperature=temperature, chunk_size=chunk_size, device=device)
    return (preds == test_labels.cpu().long()).float().mean().item()
