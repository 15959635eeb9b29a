"""Knowledge distillation from a fine-tuned teacher's softened predictions (Hinton et al. 2015), the third
step of SimCLR v2 (Chen et al. 2020b, Sec. 2, Eq. 2).

"We train the student network by minimizing L^distill = - sum_{x_i in D} [ sum_y P^T(y|x_i; tau)
log P^S(y|x_i; tau) ] where P(y|x_i) = exp(f^task(x_i)[y] / tau) / sum_y' exp(f^task(x_i)[y'] / tau),
and tau is a scalar temperature parameter. The teacher network ... is fixed during the distillation."
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(P^T(tau) || P^S(tau)), averaged over the batch.

    student_logits, teacher_logits: [n, classes]. The KL divergence is the paper's cross-entropy minus the
    teacher's entropy, a constant of the student, so both have the same gradient; it is 0 when the student
    matches the teacher, which makes the value readable. The tau^2 factor (Hinton et al. 2015, Sec. 2; the
    official SimCLR v2 distillation code multiplies by it too) keeps the gradient's size independent of tau;
    at the paper's tau = 1 it is 1. Log-softmax on both sides, computed in float32, never softmax then log.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"distillation_loss expects two [n, classes] tensors of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
    with torch.autocast(student_logits.device.type, enabled=False):
        log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)  # [n, classes]
        log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)  # [n, classes]
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    return kl * temperature**2
