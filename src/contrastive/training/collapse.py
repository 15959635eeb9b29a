"""The collapse watch: is the representation spreading out, or falling onto a point or a few directions?

Methods without negatives (BYOL, SimSiam) or with a teacher (DINO) can find the trivial solution of a
constant output. Two numbers, read from the embeddings a method hands back (``StepOutput.embedding``) at
every log row, show it:

- ``embed_std``: the per-dimension standard deviation of the L2-normalised embeddings, averaged over
  dimensions. SimSiam (Chen & He 2021, Sec. 4.1, Fig. 2) watches exactly this: "if the outputs collapse to
  a constant vector, their std over all samples should be zero"; spread out evenly on the sphere it is
  about 1/sqrt(d). The log shows it, the warning reads it as a multiple of 1/sqrt(d).
- ``embed_rank``: the effective rank of the embeddings, exp of the entropy of their normalised singular
  values (Roy & Vetterli 2007; RankMe, Garrido et al. 2023): 1 for a single direction, d when every
  direction is used equally. A "dimensional collapse" shows as a small rank with a non-zero std.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Thresholds of the warning: a std below 5% of the evenly spread value, or under 1.5 effective directions.
STD_RATIO_FLOOR = 0.05
RANK_FLOOR = 1.5


@torch.no_grad()
def collapse_stats(embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """``embedding`` [n, d] -> {"embed_std": mean per-dimension std of the normalised rows, "embed_rank":
    effective rank}; 0-dim float32 tensors on the embedding's device, no host synchronisation."""
    z = F.normalize(embedding.detach().float().flatten(1), dim=1)  # [n, d]
    std = z.std(dim=0).mean()
    s = torch.linalg.svdvals(z)  # [min(n, d)]
    p = s / s.sum().clamp_min(1e-12)
    rank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {"embed_std": std, "embed_rank": rank}


def collapsed(std: float, rank: float, dim: int) -> str | None:
    """Why these statistics show a collapse, or None: the std far below 1/sqrt(dim), or about one direction."""
    if std * math.sqrt(dim) < STD_RATIO_FLOOR:
        return (f"the embeddings' per-dimension std is {std:.2g}, {std * math.sqrt(dim):.2g} x the 1/sqrt({dim}) of "
                f"embeddings spread over the sphere: they are collapsing to a constant")
    if rank < RANK_FLOOR:
        return f"the embeddings' effective rank is {rank:.2f} of {dim}: they are collapsing onto one direction"
    return None
