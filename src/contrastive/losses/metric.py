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

Mining is done with masks over the [n, N] (and [n, N, N] for the triplets) distance tensors: no index is read
back to the host, so none of these waits for an accelerator. All compute in float32 with autocast off.
Under several processes each process computes the loss of its own anchors against the embeddings of every
process, gathered with their gradient, as NT-Xent does (losses/nt_xent.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive import distributed

MINING = ("batch-all", "batch-hard", "semi-hard")


def pairwise_distances(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """[n, d] and [N, d] (x itself when None) -> [n, N] Euclidean distances, with a floor under the square root
    so that the gradient at a zero distance (the diagonal, equal embeddings) is finite."""
    y = x if y is None else y
    d2 = x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * torch.einsum("id,jd->ij", x, y)  # [n, N]
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


def _candidates(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's rows x [n, d] and labels [n] -> (every process's rows [N, d], with gradient; their labels
    [N]; where this process's rows sit among them [n]). In one process: x, labels and 0..n-1."""
    candidates = distributed.gather_with_grad(x)  # [N, d]
    candidate_labels = distributed.all_gather(labels)  # [N]
    position = torch.arange(len(x), device=x.device) + distributed.rank() * len(x)  # [n]
    return candidates, candidate_labels, position


def _label_masks(labels: torch.Tensor, candidate_labels: torch.Tensor | None = None,
                 position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor labels [n], candidate labels [N] (the anchors themselves when None) and each anchor's position
    among the candidates [n] -> (positive [n, N]: same label, not itself; negative [n, N]: another label)."""
    if candidate_labels is None:
        candidate_labels, position = labels, torch.arange(len(labels), device=labels.device)
    same = labels[:, None] == candidate_labels[None, :]  # [n, N]
    itself = position[:, None] == torch.arange(len(candidate_labels), device=labels.device)[None, :]  # [n, N]
    return same & ~itself, ~same


def _class_sizes(labels: torch.Tensor) -> torch.Tensor:
    """[N] -> [N]: how many of the N samples share each one's label (itself included)."""
    return (labels[:, None] == labels[None, :]).sum(1)


def hardest(dist: torch.Tensor, labels: torch.Tensor, candidate_labels: torch.Tensor | None = None,
            position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard mining over distances [n, N] from n anchors to N candidates (the anchors themselves when
    ``candidate_labels`` is None): per anchor, (index of its farthest positive [n], of its nearest negative
    [n], valid [n]: the anchor has both)."""
    pos, neg = _label_masks(labels, candidate_labels, position)
    far_pos = dist.masked_fill(~pos, -1.0).argmax(1)  # [n]
    near_neg = dist.masked_fill(~neg, float("inf")).argmin(1)  # [n]
    return far_pos, near_neg, pos.any(1) & neg.any(1)


def semi_hard(dist: torch.Tensor, labels: torch.Tensor, candidate_labels: torch.Tensor | None = None,
              position: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Semi-hard mining over distances [n, N] (candidates as :func:`hardest`): for every anchor-positive pair
    (a, p), the index [n, N] of the nearest negative farther from a than p, or of the farthest negative when
    none is; and valid [n, N] (p is a positive of a and a has a negative)."""
    pos, neg = _label_masks(labels, candidate_labels, position)
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
    by ``mining`` (one of :data:`MINING`). A scalar float32 tensor; 0 when the batch has no valid triplet.

    Under several processes x is this process's share: its anchors are mined against every process's
    embeddings (gathered with their gradient), and the loss is this process's share of the global mean times
    the number of processes, so the mean over processes is the global loss and DDP's averaged gradient the
    single-process one. The global count of valid anchors (pairs) comes from the gathered labels; batch-all's
    count of active triplets is summed over processes.
    """
    if mining not in MINING:
        raise ValueError(f"mining={mining!r}; use one of {', '.join(MINING)}")
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        candidates, candidate_labels, position = _candidates(x, labels)
        world = distributed.world_size()
        dist = pairwise_distances(x, candidates)  # [n, N]
        sizes = _class_sizes(candidate_labels)  # [N]
        has_negative = sizes < len(candidate_labels)  # [N]
        if mining == "batch-hard":
            p, q, valid = hardest(dist, labels, candidate_labels, position)
            losses = (dist.gather(1, p[:, None]) - dist.gather(1, q[:, None]) + margin).clamp_min(0)[:, 0]  # [n]
            anchors = ((sizes > 1) & has_negative).sum()  # over every process's anchors
            return world * (losses * valid).sum() / anchors.clamp_min(1)
        if mining == "semi-hard":
            q, valid = semi_hard(dist, labels, candidate_labels, position)  # [a, p] each
            d_an = dist.gather(1, q)  # [a, p]: D(a, chosen negative of (a, p))
            losses = (dist - d_an + margin).clamp_min(0)  # [a, p]
            pairs = ((sizes - 1) * has_negative).sum()  # anchor-positive pairs over every process's anchors
            return world * (losses * valid).sum() / pairs.clamp_min(1)
        pos, neg = _label_masks(labels, candidate_labels, position)
        valid = pos[:, :, None] & neg[:, None, :]  # [a, p, n]
        losses = (dist[:, :, None] - dist[:, None, :] + margin).clamp_min(0) * valid  # [a, p, n]
        active = distributed.all_reduce_sum((losses > 0).sum())  # the triplets still active, every process's
        return world * losses.sum() / active.clamp_min(1)  # the mean over the triplets still active


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SupCon's L^sup_out of z [N, d] (every view of every image, stacked; normalised here) with labels [N]:
    the mean over the anchors with at least one positive. A scalar float32 tensor.

    Under several processes z is this process's share: its anchors are contrasted with every process's
    embeddings (gathered with their gradient), and the loss is this process's share of the global mean times
    the number of processes, as :func:`triplet_loss`.
    """
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(f"expected z [N, d] and labels [N], got {tuple(z.shape)} and {tuple(labels.shape)}")
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)
        candidates, candidate_labels, position = _candidates(z, labels)
        logits = torch.einsum("id,jd->ij", z, candidates) / temperature  # [n, N]
        pos, neg = _label_masks(labels, candidate_labels, position)
        itself = ~(pos | neg)  # [n, N]: the anchor's own column
        log_prob = logits - torch.logsumexp(logits.masked_fill(itself, float("-inf")), dim=1, keepdim=True)  # [n, N]
        n_pos = pos.sum(1)  # [n]
        per_anchor = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)  # [n]
        anchors = (_class_sizes(candidate_labels) > 1).sum()  # anchors with a positive, over every process
        return distributed.world_size() * (per_anchor * (n_pos > 0)).sum() / anchors.clamp_min(1)


def pairwise_margin_loss(x: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Hadsell et al.'s loss over every ordered pair (i, j), i != j, of the embeddings x [n, d] (not
    normalised here) with labels [n]: similar when the labels are equal. The mean of
    ``contrastive_margin_loss`` over those pairs, a scalar float32 tensor.

    Under several processes x is this process's share, paired with every process's embeddings (gathered
    with their gradient); each process has as many pairs, so the mean over processes is the global mean.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        candidates, candidate_labels, position = _candidates(x, labels)
        d = pairwise_distances(x, candidates)  # [n, N]
        pos, neg = _label_masks(labels, candidate_labels, position)
        losses = torch.where(pos, 0.5 * d.pow(2), 0.5 * (margin - d).clamp_min(0).pow(2))  # [n, N]
        return (losses * (pos | neg)).sum() / (pos | neg).sum().clamp_min(1)
