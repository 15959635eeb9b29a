"""Semantic textual similarity: Spearman's correlation of cosine similarities with gold scores.

The protocol of Sentence-BERT and SimCSE (Gao et al. 2021, Appendix B): Spearman's correlation of the cosine
similarity of the two sentences' embeddings with the human score, over the whole split at once (the "all"
setting): STS-B scores 0-5, SICK relatedness 1-5. Ranks of tied values are averaged, as
``scipy.stats.spearmanr`` ranks them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.errors import DataError
from contrastive.modalities.text.readers import Pair, TextCollate


def average_ranks(x: Tensor) -> Tensor:
    """[n] -> [n] float64 ranks 1..n, tied values sharing the mean of their ranks."""
    values, order = torch.sort(x.double())
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each group's first member
    mean_rank = first.double() + (counts.double() + 1) / 2  # [groups]
    return torch.empty_like(values).scatter_(0, order, mean_rank[inverse])


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of two [n] vectors: Pearson's correlation of their average ranks."""
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise DataError(f"Spearman's correlation needs two vectors of one length >= 2, got {tuple(x.shape)} and "
                        f"{tuple(y.shape)}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()))


def sts_spearman(first: Tensor, second: Tensor, scores: Tensor) -> float:
    """Spearman's correlation of the cosine similarity of each pair's embeddings (first, second [n, D]) with
    the gold scores [n]."""
    cosine = F.cosine_similarity(first.double(), second.double(), dim=1)  # [n]
    return spearman(cosine, scores)


@torch.no_grad()
def encode_sentences(encoder: Callable[[Tensor, Tensor], Tensor], tokenizer: Any, sentences: Sequence[str], *,
                     batch_size: int = 128, max_length: int = 128, device: str | torch.device = "cpu") -> Tensor:
    """Embeddings [n, D] (float32, on the CPU, in the given order) of ``sentences`` by a frozen sentence encoder
    (``input_ids``, ``attention_mask`` -> [B, D]) in eval mode, its modes restored afterwards.

    Sentences are encoded longest first, so each batch is padded to about its own length (what
    sentence-transformers' ``encode`` does); the order does not change an embedding.
    """
    if not sentences:
        raise DataError("no sentences to encode")
    modes = [(m, m.training) for m in encoder.modules()] if isinstance(encoder, torch.nn.Module) else []
    for module, _ in modes:
        module.eval()
    collate = TextCollate(tokenizer, max_length=max_length)
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    out: Tensor | None = None
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = collate([sentences[i] for i in rows])
            z = encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
            if out is None:
                out = torch.empty(len(sentences), z.shape[1])
            out[torch.tensor(rows)] = z
    finally:
        for module, training in modes:
            module.train(training)
    return out


def evaluate_sts(encoder: Callable[[Tensor, Tensor], Tensor], tokenizer: Any, pairs: Sequence[Pair],
                 **encode_options: Any) -> float:
    """Spearman's correlation on scored pairs (``read_stsb``, ``read_sick``); each distinct sentence is
    encoded once."""
    if any(p.score is None for p in pairs):
        raise DataError("STS evaluation needs gold scores; read the pairs with read_stsb or read_sick")
    unique = list(dict.fromkeys(s for p in pairs for s in (p.first, p.second)))
    where = {s: i for i, s in enumerate(unique)}
    z = encode_sentences(encoder, tokenizer, unique, **encode_options)
    first = z[torch.tensor([where[p.first] for p in pairs])]
    second = z[torch.tensor([where[p.second] for p in pairs])]
    return sts_spearman(first, second, torch.tensor([p.score for p in pairs], dtype=torch.float64))
