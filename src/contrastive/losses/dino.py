"""DINO's self-distillation loss and its teacher centre (Caron et al. 2021).

"we learn to match these distributions by minimizing the cross-entropy loss w.r.t. the parameters of the
student network: min H(P_t(x), P_s(x)), where H(a, b) = -a log b", summed over each global view x the
teacher sees and each other view x' ≠ x the student sees (Eq. 3). The teacher's output is centred and
sharpened, P_t = softmax((g_t(x) - c) / τ_t), and "the center c is updated with an exponential moving
average": c <- m c + (1 - m) (1/B) Σ_i g_t(x_i) (Eq. 4).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from contrastive import distributed


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor,
              student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """Mean over the pairs (teacher crop i, student crop v ≠ i) of -mean_b Σ_k P_t[i][b, k] log P_s[v][b, k]
    (facebookresearch/dino, main_dino.py ``DINOLoss.forward``, without its centre update).

    student: [B, K] logits of every crop, the global crops first; teacher: [B, K] logits of the global crops,
    in the same order (detached here); center: [1, K] or [K]. P_s = log_softmax(s / τ_s), P_t =
    softmax((t - center) / τ_t). A scalar float32 tensor; the new centre is :func:`center_update`'s.
    """
    if not 1 <= len(teacher) <= len(student) or len(student) < 2:
        raise ValueError(f"dino_loss needs at least 2 student crops and 1 to {len(student)} teacher crops, got "
                         f"{len(student)} and {len(teacher)}")
    with torch.autocast(student[0].device.type, enabled=False):
        log_p_s = F.log_softmax(torch.stack([s.float() for s in student]) / student_temperature, dim=2)  # [V, B, K]
        t = torch.stack([t.detach().float() for t in teacher])  # [T, B, K]
        p_t = F.softmax((t - center.detach().float()) / teacher_temperature, dim=2)  # [T, B, K]
        n_crops, batch = log_p_s.shape[0], log_p_s.shape[1]
        cross = -torch.einsum("tbk,vbk->tv", p_t, log_p_s) / batch  # [T, V] mean over b of -Σ_k P_t log P_s
        other = ~torch.eye(len(teacher), n_crops, dtype=torch.bool, device=cross.device)  # [T, V] v != i
        return (cross * other).sum() / other.sum()


@torch.no_grad()
def center_update(center: torch.Tensor, teacher_logits: Sequence[torch.Tensor], momentum: float) -> torch.Tensor:
    """The new centre m * center + (1 - m) * the mean teacher logit over every crop and every process's
    samples (main_dino.py ``DINOLoss.update_center``: all-reduced sum / (local count * world_size)).

    center: [1, K]; teacher_logits: the [B, K] teacher logits of the global crops (dino_loss's ``teacher``).
    Returns a float32 [1, K] tensor and writes nothing; every process gets the same value.
    """
    if any(t.ndim != 2 for t in teacher_logits):
        raise ValueError(f"center_update expects [B, K] teacher logits per crop, got "
                         f"{[tuple(t.shape) for t in teacher_logits]}")
    with torch.autocast(center.device.type, enabled=False):
        t = torch.cat([t.float() for t in teacher_logits])  # [T * B, K]
        batch_center = distributed.all_reduce_sum(t.sum(dim=0, keepdim=True)) / (len(t) * distributed.world_size())
        return center.float() * momentum + batch_center * (1 - momentum)  # [1, K]
