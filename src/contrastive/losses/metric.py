"""Losses that learn from labels or known pairs: the margin contrastive loss on pairs, the triplet loss with
batch-all, batch-hard and semi-hard mining, and supervised contrastive (SupCon).

- Contrastive loss (Hadsell, Chopra & LeCun 2006, Eq. 4): for a pair at Euclidean distance D,
  L = (1 - Y) 1/2 D² + Y 1/2 max(0, m - D)², with Y = 0 for a similar pair and 1 for a dissimilar one.
- Triplet loss (Schroff et al. 2015, Eq. 1; Hermans et al. 2017 for the batch strategies):
  L = max(0, D(a, p) - D(a, n) + m) over triplets of an anchor a, a positive p of its label and a negative n
  of another. *batch-all* averages over every valid triplet that still has a positive loss; *batch-hard*
  takes, per anchor, its farthest positive and nearest negative; *semi-hard* (FaceNet Sec. 3.2) takes, per
  anchor-positive pair, the nearest negative that is farther than the positive (D(a, p) < D(a, n)), and the
  farthest negative when none is.
- SupCon (Khosla et al. 2020, Eq. 2, L^sup_out): every other sample of the anchor's label is a positive,
  L_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / τ) / sum_{a != i} exp(z_i.z_a / τ) ), averaged over the
  anchors with at least one positive. With exactly one positive per anchor (two views, labels = image) it is
  NT-Xent.

Mining is done with masks over the [n, n] (and [n, n, n] for the triplets) distance tensors: no index is read
back to the host, so none of these waits for an accelerator. All compute in float32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MINING = ("batch-all", "batch-hard", "semi-hard")


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """[n, d] -> [n, n] Euclidean distances, with a floor under the square root so that the gradient at a
    zero distance (the diagonal, equal embeddings) is finite."""
    sq = x.pow(2).sum(1)  # [n]
    d2 = sq[:, None] + sq[None, :] - 2 * torch.einsum("id,jd->ij", x, x)  # [n, n]
    return d2.clamp_min(1e-12).sqrt()


def contrastive_margin_loss(x1: torch.Tensor, x2: torch.Tensor, similar: torch.Tensor, margin: float = 1.0
                            ) -> torch.Tensor:
    """Hadsell et al.'s loss, the mean over n pairs: x1, x2 [n, d] the two sides' embeddings, ``similar`` [n]
    bool (True: same class, pulled together; False: pushed beyond ``margin``). A scalar float32 tensor."""
    if x1.shape != x2.shape or x1.ndim != 2 or similar.shape != x1.shape[:1]:
        raise ValueError(f"expected x1, x2 [n, d] and similar [n], got {tuple(x1.shape)}, {tuple(x2.shape)}, "
                         f"{tuple(similar.shape)}")
    with torch.autocast(x1.device.type, enabled=False):
        d = (x1.float() - x2.float()).pow(2).sum(1).clamp_min(1e-12).sqrt()  # [n]
        return torch.where(similar, 0.5 * d.pow(2), 0.5 * (margin - d).clamp_min(0).pow(2)).mean()


def _label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] -> (positive [n, n]: same label, not itself; negative [n, n]: another label)."""
    same = labels[:, None] == labels[None, :]  # [n, n]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def hardest(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard mining: per anchor, (index of its farthest positive [n], of its nearest negative [n],
    valid [n]: the anchor has both)."""
    pos, neg = _label_masks(labels)
    far_pos = dist.masked_fill(~pos, -1.0).argmax(1)  # [n]
    near_neg = dist.masked_fill(~neg, float("inf")).argmin(1)  # [n]
    return far_pos, near_neg, pos.any(1) & neg.any(1)


def semi_hard(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Semi-hard mining: for every anchor-positive pair (a, p), the index [n, n] of the nearest negative
    farther from a than p, or of the farthest negative when none is; and valid [n, n] (p is a positive of a
    and a has a negative)."""
    pos, neg = _label_masks(labels)
    d_ap = dist[:, :, None]  # [a, p, 1]
    d_an = dist[:, None, :]  # [a, 1, n]
    farther = neg[:, None, :] & (d_an > d_ap)  # [a, p, n]
    inf = torch.tensor(float("inf"), device=dist.device)
    nearest_farther = torch.where(farther, d_an, inf).argmin(2)  # [a, p]
    farthest = dist.masked_fill(~neg, float("-inf")).argmax(1)  # [a]
    chosen = torch.where(farther.any(2), nearest_farther, farthest[:, None])  # [a, p]
    return chosen, pos & neg.any(1, keepdim=True)


def triplet_loss(x: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, mining: str = "batch-hard"
                 ) -> torch.Tensor:
    """The triplet loss of the embeddings x [n, d] (not normalised here) with labels [n], mined in the batch
    by ``mining`` (one of :data:`MINING`). A scalar float32 tensor; 0 when the batch has no valid triplet."""
    if mining not in MINING:
        raise ValueError(f"mining={mining!r}; use one of {', '.join(MINING)}")
    with torch.autocast(x.device.type, enabled=False):
        dist = pairwise_distances(x.float())  # [n, n]
        if mining == "batch-hard":
            p, n, valid = hardest(dist, labels)
            rows = torch.arange(len(labels), device=x.device)
            losses = (dist[rows, p] - dist[rows, n] + margin).clamp_min(0)  # [n]
            return (losses * valid).sum() / valid.sum().clamp_min(1)
        if mining == "semi-hard":
            n, valid = semi_hard(dist, labels)  # [a, p] each
            d_an = dist.gather(1, n)  # [a, p]: D(a, chosen negative of (a, p))
            losses = (dist - d_an + margin).clamp_min(0)  # [a, p]
            return (losses * valid).sum() / valid.sum().clamp_min(1)
        pos, neg = _label_masks(labels)
        valid = pos[:, :, None] & neg[:, None, :]  # [a, p, n]
        losses = (dist[:, :, None] - dist[:, None, :] + margin).clamp_min(0) * valid  # [a, p, n]
        return losses.sum() / (losses > 0).sum().clamp_min(1)  # the mean over the triplets still active


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SupCon's L^sup_out of z [N, d] (every view of every image, stacked; normalised here) with labels [N]:
    the mean over the anchors with at least one positive. A scalar float32 tensor."""
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(f"expected z [N, d] and labels [N], got {tuple(z.shape)} and {tuple(labels.shape)}")
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)
        logits = torch.einsum("id,jd->ij", z, z) / temperature  # [N, N]
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)  # [N, N]
        pos, _ = _label_masks(labels)
        n_pos = pos.sum(1)  # [N]
        per_anchor = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)  # [N]
        has = n_pos > 0
        return (per_anchor * has).sum() / has.sum().clamp_min(1)
