"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Algorithm 1, with multi-crop (the teacher sees the global crops, the student every crop)::

    gt.params = gs.params                         # teacher = student at the start
    for x in loader:
        crops = augment(x)                        # 2 global crops, then 8 local crops
        s = [gs(c) for c in crops]                # student logits [B, K] per crop
        t = [gt(c) for c in crops[:2]]            # teacher logits [B, K] per global crop, no gradient
        loss = mean over i, v != i of H(t[i], s[v])
        loss.backward(); update(gs)               # AdamW
        gt.params = l * gt.params + (1 - l) * gs.params
        C = m * C + (1 - m) * mean(cat(t))        # the centre, over every process's batch

    def H(t, s):
        s = softmax(s / tau_s)
        t = softmax((t - C) / tau_t)              # centre and sharpen
        return -(t * log(s)).sum(dim=1).mean()

g = backbone + DINOHead (nn/heads.py). As facebookresearch/dino main_dino.py: crops of one size go through
the backbone as one batch and the head sees all of them together (``MultiCropWrapper``); the teacher has no
stochastic depth; l rises from 0.996 to 1 by a half cosine over the iterations; tau_t rises linearly over the
first epochs (``teacher_temp_schedule``, per epoch); the student's last layer gets no update during the first
epoch (``cancel_gradients_last_layer``). Unlike the official EMA, which covers parameters only, the teacher's
batch-norm statistics follow the student's by the same rule (nn/ema.py) after its own forward pass moved them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.losses import center_update, dino_loss
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.ema import SCHEDULES, ema_update, momentum_at, momentum_copy
from contrastive.nn.heads import DINOHead
from contrastive.nn.vit import without_drop_path
from contrastive.registry import register


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DINOConfig:
    out_dim: int = _f(65536, "K, the head's output width; 65,536 (--out_dim: 'for complex and large datasets large "
                      "values (like 65k) work well').")
    hidden_dim: int = _f(2048, "Hidden width of the head's MLP; 2048 (Sec. 3.1).")
    bottleneck_dim: int = _f(256, "Width of the L2-normalised output of the MLP that the last layer reads; 256 "
                             "(DINOHead).")
    head_layers: int = _f(3, "Linear layers of the MLP; 3 (Sec. 3.1, DINOHead's nlayers).")
    use_bn: bool = _f(False, "BatchNorm in the head's MLP (--use_bn_in_head, default off): with a ViT 'we do not use "
                      "any BN also in the projection heads, making the system entirely BN-free' (Sec. 3.1); an "
                      "option for ConvNets.")
    norm_last_layer: bool = _f(True, "Keep the last layer's weight norm g at 1 (--norm_last_layer, default true); "
                               "false 'leads to better performance but can make the training unstable', the "
                               "README's setting for ViT-S.")
    momentum: float = _f(0.996, "Starting EMA coefficient l of the teacher, rising to 1 (--momentum_teacher 0.996; "
                         "'a higher value with small batches: for example 0.9995 with batch size of 256').")
    momentum_schedule: str = _f("cosine", "cosine: l rises to 1 by a half cosine over the run (main_dino.py's "
                                "momentum_schedule); constant: l throughout.")
    student_temperature: float = _f(0.1, "tau_s of the student softmax; 0.1 (Sec. 3.2).")
    teacher_temperature: float = _f(0.07, "tau_t after the warm-up; 0.07 as the paper (Sec. 3.2, 'a linear warm-up "
                                    "for tau_t from 0.04 to 0.07 during the first 30 epochs') and the README's "
                                    "boosted run; --teacher_temp defaults to 0.04 ('anything above 0.07 is "
                                    "unstable').")
    warmup_teacher_temperature: float = _f(0.04, "tau_t at epoch 0 (--warmup_teacher_temp 0.04; Sec. 3.2).")
    warmup_teacher_temperature_epochs: int = _f(30, "Epochs of the linear tau_t warm-up; 30 (Sec. 3.2; "
                                                "--warmup_teacher_temp_epochs, whose default is 0).")
    center_momentum: float = _f(0.9, "m of the centre's EMA; 0.9 (main_dino.py DINOLoss's center_momentum).")
    freeze_last_layer: int = _f(1, "Epochs during which the student's last layer is not updated; 1 "
                                "(--freeze_last_layer: 'doing so during the first epoch helps training').")


def teacher_temperature_at(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """tau_t of ``epoch``: main_dino.py's ``np.linspace(warmup, final, warmup_epochs)[epoch]`` during the warm-up
    (``final`` is reached at its last epoch, warmup_epochs - 1), then ``final``."""
    if epoch >= warmup_epochs:
        return final
    if warmup_epochs == 1:
        return warmup
    return warmup + (final - warmup) * epoch / (warmup_epochs - 1)


def _check(cfg: DINOConfig) -> None:
    if cfg.momentum_schedule not in SCHEDULES:
        raise ConfigError(f"method.momentum_schedule={cfg.momentum_schedule!r}: choose {' or '.join(SCHEDULES)}")
    for name in ("momentum", "center_momentum"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"method.{name}={getattr(cfg, name)} is out of range: it must lie in [0, 1]")
    for name in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"method.{name}={getattr(cfg, name)} is out of range: it must be > 0")
    for name in ("warmup_teacher_temperature_epochs", "freeze_last_layer"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"method.{name}={getattr(cfg, name)} is out of range: it must be >= 0 epochs")
    for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"method.{name}={getattr(cfg, name)} is out of range: it must be >= 1")


def _multi_crop(backbone: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Features [sum of the views' rows, D] of consecutive views of one size encoded as one batch each."""
    features, start = [], 0
    for end in range(1, len(views) + 1):
        if end == len(views) or views[end].shape[-2:] != views[start].shape[-2:]:
            features.append(backbone(torch.cat(views[start:end])))
            start = end
    return torch.cat(features)


class DINO(Method):
    """Student (backbone + head) trained by gradient; teacher = its EMA, which evaluation uses."""

    collapse_advice = ("raise the centre momentum (method.center_momentum) or lower the teacher temperature "
                       "(method.teacher_temperature); keep the last layer frozen for the first epoch "
                       "(method.freeze_last_layer=1)")

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: DINOConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.head = DINOHead(feature_dim, cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                             num_layers=cfg.head_layers, use_bn=cfg.use_bn, norm_last_layer=cfg.norm_last_layer)
        self.teacher_backbone = without_drop_path(momentum_copy(backbone))
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # C, [1, K]

    def teacher_temperature(self, step: StepInfo) -> float:
        c = self.cfg
        return teacher_temperature_at(step.epoch, c.warmup_teacher_temperature, c.teacher_temperature,
                                      c.warmup_teacher_temperature_epochs)

    def momentum(self, step: StepInfo) -> float:
        """l of the teacher update that follows ``step``: main_dino.py's ``momentum_schedule[it]``."""
        return momentum_at(self.cfg.momentum_schedule, self.cfg.momentum, step.step, step.total_steps)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        views, n_global = batch.views, len(batch.global_views)
        if n_global < 2:
            raise ConfigError(f"DINO needs at least 2 global views (the loss skips a teacher crop's own student "
                              f"crop), got {n_global}; give views.groups 2 global views, or leave it unset for the "
                              f"paper's 2 global + 8 local crops")
        n = views[0].shape[0]
        z = self.head.bottleneck(_multi_crop(self.backbone, views))  # [V * n, bottleneck_dim], unit rows
        student = self.head.last_layer(z).chunk(len(views))  # V x [n, K]
        with torch.no_grad():
            teacher = self.teacher_head(_multi_crop(self.teacher_backbone, batch.global_views))  # [T * n, K]
        teacher = teacher.unflatten(0, (n_global, n))  # [T, n, K]
        loss = dino_loss(student, list(teacher), self.center, self.cfg.student_temperature,
                         self.teacher_temperature(step))
        return StepOutput(loss=loss, updates={"teacher": teacher}, embedding=z[:n].detach())

    def before_optimizer_step(self, step: StepInfo) -> None:
        if step.epoch < self.cfg.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        ema_update(nn.ModuleList([self.teacher_backbone, self.teacher_head]), nn.ModuleList([self.backbone, self.head]),
                   self.momentum(step))
        self.center.copy_(center_update(self.center, list(updates["teacher"]), self.cfg.center_momentum))

    def encoder(self) -> nn.Module:
        return self.teacher_backbone  # the teacher, which does better than the student all along (Sec. 3.1)

    def projection_head(self) -> nn.Sequential:
        return self.teacher_head.mlp


def view_groups(side: int) -> list[dict]:
    """main_dino.py's ``DataAugmentationDINO`` for global crops of ``side`` px: two global crops (scale 0.4-1;
    blur p 1.0, and blur p 0.1 with solarise p 0.2) and 8 local crops at 96/224 of the side (scale 0.05-0.4,
    blur p 0.5); each with flip, colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8 and grey p 0.2."""
    common = {"hflip_p": 0.5, "jitter_p": 0.8, "jitter": [0.4, 0.4, 0.2, 0.1], "grayscale_p": 0.2,
              "blur_sigma": [0.1, 2.0]}
    return [
        {"count": 1, "global": True, "crop_scale": [0.4, 1.0], **common, "blur_p": 1.0, "solarize_p": 0.0},
        {"count": 1, "global": True, "crop_scale": [0.4, 1.0], **common, "blur_p": 0.1, "solarize_p": 0.2},
        {"count": 8, "global": False, "size": max(round(side * 96 / 224), 1), "crop_scale": [0.05, 0.4], **common,
         "blur_p": 0.5, "solarize_p": 0.0},
    ]


def _build(ctx: BuildContext, cfg: DINOConfig) -> DINO:
    backbone, feature_dim = ctx.build_backbone()
    return DINO(backbone, feature_dim, cfg)


register("methods", "dino")(MethodSpec(config_class=DINOConfig, build=_build, view_groups=view_groups))
