"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments").

One step, as facebookresearch/swav main_swav.py runs it::

    C = normalise(C)                                    # prototypes [K, d] on the unit sphere
    z = normalise(head(backbone(crops)))                # [V, n, d]: 2 global crops, then the local ones
    scores = z @ C.T                                    # [V, n, K]
    for i in crops_for_assign:                          # the global crops
        q_i = sinkhorn([queue_i @ C.T; scores_i])[-n:]  # equal-partition codes of the batch (Eq. 3)
    loss = mean_i mean_{v != i} -sum_k q_i log softmax(scores_v / τ)   # swapped prediction (Eq. 4)
    loss.backward(); prototypes' gradient dropped during the first epoch; optimizer.step()
    queue_i <- [z_i; queue_i] from epoch_queue_starts on

The queue here holds every process's embeddings (gathered in after_step) and each process prepends its
own contiguous share of the rows, so Sinkhorn's sums over processes count every queued embedding once and
the codes are the single-process ones. It is a fixed-shape buffer from the start, used once it is full.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive import distributed
from contrastive.errors import ConfigError
from contrastive.losses import sinkhorn, swav_loss
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.heads import mlp
from contrastive.registry import register


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SwAVConfig:
    hidden_dim: int = _f(2048, "Hidden width of the projection head (Linear-BN-ReLU-Linear); 2048 (main_swav.py "
                         "hidden_mlp for ResNet-50).")
    projection_dim: int = _f(128, "Width of the L2-normalised embedding z the prototypes score; 128 (--feat_dim).")
    num_prototypes: int = _f(3000, "K, prototype vectors; 3000 on ImageNet (--nmb_prototypes), and the paper "
                             "finds K matters little once there are enough of them (ablation in the appendix).")
    temperature: float = _f(0.1, "τ of the swapped prediction's softmax; 0.1 (Eq. 2, --temperature).")
    epsilon: float = _f(0.05, "ε of the entropic regularisation of the codes; 0.05 (Sec. 3.1, --epsilon): "
                        "'a strong entropy regularization (i.e. using a high ε) generally leads to a trivial "
                        "solution where all samples collapse into an unique representation'.")
    sinkhorn_iterations: int = _f(3, "Sinkhorn-Knopp iterations; 'using only 3 iterations is fast and sufficient' "
                                  "(Sec. 3.1, --sinkhorn_iterations).")
    crops_for_assign: int = _f(2, "Crops whose codes are computed: the first N, which must be global views "
                               "(--crops_for_assign 0 1: the two full-resolution crops).")
    freeze_prototypes_epochs: float = _f(1.0, "The prototypes get no update during this many epochs, while the "
                                         "fresh network's codes settle (--freeze_prototypes_niters 313: one "
                                         "epoch at batch 4096; 5005: one epoch at batch 256).")
    queue_length: int = _f(0, "Embeddings per assigned crop kept from earlier batches: 'when working with small "
                           "batches, we use features from the previous batches to augment the size of Z' for the "
                           "equal partition (Sec. 3.1); 3840 at batch 256, 0 at batch 4096 (scripts/*bs256* and "
                           "swav_800ep_pretrain.sh). A multiple of the global batch size; 0: no queue.")
    epoch_queue_starts: int = _f(15, "The epoch from which the queue is filled (and used once full); 15 "
                                 "(--epoch_queue_starts), so early, fast-changing embeddings are never queued.")


class SwAV(Method):
    """Backbone, projection head, L2 normalisation and prototypes; a queue of earlier embeddings per
    assigned crop, ``queue`` [crops_for_assign, queue_length, projection_dim], with ``queue_rows``, how many
    rows were ever written (full from ``queue_length`` on)."""

    min_batch = 2  # the codes are an equal partition of the batch over the prototypes

    collapse_advice = ("lower method.epsilon or raise method.num_prototypes; freeze the prototypes longer "
                       "(method.freeze_prototypes_epochs); use the queue (method.queue_length) when the batch is "
                       "smaller than the number of prototypes")

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SwAVConfig, *, batch_size: int | None = None,
                 world_size: int = 1):
        super().__init__()
        _check(cfg, batch_size, world_size)
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.projector = mlp([feature_dim, cfg.hidden_dim, cfg.projection_dim], batch_norm=True)
        self.prototypes = nn.Linear(cfg.projection_dim, cfg.num_prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        self.register_buffer("queue", torch.zeros(cfg.crops_for_assign, cfg.queue_length, cfg.projection_dim))
        self.register_buffer("queue_rows", torch.zeros((), dtype=torch.long))

    def project(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Crops [n, C, S_v, S_v] -> L2-normalised embeddings [n, projection_dim], one per crop. As the
        official multi-resolution forward: the backbone sees the crops of one size together, the head all
        crops at once (its batch norm normalises over them)."""
        n = views[0].shape[0]
        features = [self.backbone(torch.cat(list(same))) for _, same in itertools.groupby(views, lambda v: v.shape)]
        return list(F.normalize(self.projector(torch.cat(features)), dim=1).split(n))

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        n_views, n_global = len(batch.views), len(batch.global_views)
        if n_views < 2:
            raise ConfigError(f"SwAV predicts the code of one crop from the other crops: it needs at least 2 views, "
                              f"got {n_views}; set views.groups (2 global crops and any local ones)")
        if n_global < self.cfg.crops_for_assign:
            raise ConfigError(f"method.crops_for_assign={self.cfg.crops_for_assign} but the views have {n_global} "
                              f"global crop(s); codes are computed only for global crops: lower "
                              f"method.crops_for_assign or mark more views.groups global")
        z = self.project(batch.views)
        scores = [self.prototypes(v) for v in z]  # [n, K] per crop
        codes = self.codes(scores[:self.cfg.crops_for_assign], step)
        loss = swav_loss(scores, codes, self.cfg.temperature)
        assigned = torch.stack(z[:self.cfg.crops_for_assign]).detach()  # [A, n, dim]
        return StepOutput(loss=loss, updates={"embeddings": assigned}, embedding=z[0].detach())

    @torch.no_grad()
    def codes(self, scores: list[torch.Tensor], step: StepInfo) -> list[torch.Tensor]:
        """Sinkhorn codes [n, K] of each assigned crop's scores [n, K], over every process's batch. Once the
        queue is full, this process's share of its rows is scored and put in front, and only the batch's
        codes are kept (main_swav.py: ``distributed_sinkhorn(out)[-bs:]``)."""
        eps, iters = self.cfg.epsilon, self.cfg.sinkhorn_iterations
        alone = [sinkhorn(s, eps, iters) for s in scores]
        if not self._queue_on(step):
            return alone
        world, rank = distributed.world_size(), distributed.rank()
        share = self.cfg.queue_length // world
        rows = self.queue[:, rank * share:(rank + 1) * share]  # [A, L / world, dim]
        # chosen on the device, so that no step waits for the host to read the counter
        full = self.queue_rows >= self.cfg.queue_length
        with_queue = [sinkhorn(torch.cat([self.prototypes(r), s]), eps, iters)[-s.shape[0]:]
                      for s, r in zip(scores, rows)]
        return [torch.where(full, q, a) for q, a in zip(with_queue, alone)]

    def before_optimizer_step(self, step: StepInfo) -> None:
        # the official code's `p.grad = None` for the first iterations: the optimiser skips the prototypes
        # (momentum and weight decay included) and DDP still sees them used
        if step.step < round(self.cfg.freeze_prototypes_epochs * step.steps_per_epoch):
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        # main_swav.py normalises the prototypes before each step's forward; after each step is the same
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))
        if not self._queue_on(step):
            return
        # every process's embeddings, rank by rank: the queue is the same on every rank
        z = distributed.all_gather(updates["embeddings"].transpose(0, 1).contiguous()).transpose(0, 1)  # [A, B, d]
        length, b = self.cfg.queue_length, z.shape[1]
        if b > length:
            raise ValueError(f"cannot enqueue {b} embeddings per crop into a queue of {length}")
        slots = (torch.arange(b, device=z.device) + self.queue_rows) % length  # [B]
        self.queue.index_copy_(1, slots, z.to(self.queue.dtype))
        self.queue_rows.add_(b)

    def _queue_on(self, step: StepInfo) -> bool:
        return self.cfg.queue_length > 0 and step.epoch >= self.cfg.epoch_queue_starts

    def projection_head(self) -> nn.Sequential:
        return self.projector


def _check(cfg: SwAVConfig, batch_size: int | None, world_size: int) -> None:
    for name in ("hidden_dim", "projection_dim", "num_prototypes", "sinkhorn_iterations", "crops_for_assign"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"method.{name}={getattr(cfg, name)} must be at least 1")
    if cfg.temperature <= 0 or cfg.epsilon <= 0:
        raise ConfigError(f"method.temperature={cfg.temperature} and method.epsilon={cfg.epsilon} must be > 0")
    if cfg.freeze_prototypes_epochs < 0 or cfg.epoch_queue_starts < 0:
        raise ConfigError(f"method.freeze_prototypes_epochs={cfg.freeze_prototypes_epochs} and "
                          f"method.epoch_queue_starts={cfg.epoch_queue_starts} must be >= 0")
    if cfg.queue_length < 0:
        raise ConfigError(f"method.queue_length={cfg.queue_length} must be >= 0 (0: no queue)")
    if cfg.queue_length and cfg.queue_length % world_size:
        raise ConfigError(f"method.queue_length={cfg.queue_length} must be a multiple of the {world_size} processes "
                          f"(each puts an equal share of the queue in front of its batch)")
    if cfg.queue_length and batch_size is not None and cfg.queue_length % batch_size:
        raise ConfigError(f"method.queue_length={cfg.queue_length} must be a multiple of train.batch_size="
                          f"{batch_size} (each step enqueues the global batch), for example "
                          f"{max(cfg.queue_length // batch_size, 1) * batch_size}; 0 turns the queue off")


def paper_views(side: int) -> list[dict]:
    """Multi-crop (Sec. 3.2): 2 global crops at ``side`` (224) of scale (0.14, 1) and 6 local crops at
    side * 96/224 of scale (0.05, 0.14), each with flip, SimCLR's colour distortion at strength 1 and blur p
    0.5 (src/multicropdataset.py). The official blur is a 23-tap kernel of sigma 0.1-2 pixels on every crop,
    so the local crops' sigma and kernel (given for a 224 px image, scaled to the crop) are scaled up to the
    same pixels."""
    local = max(round(side * 96 / 224), 1)
    shared = {"crop_ratio": [3 / 4, 4 / 3], "hflip_p": 0.5, "jitter_p": 0.8, "jitter_strength": 1.0, "jitter": None,
              "grayscale_p": 0.2, "blur_p": 0.5, "solarize_p": 0.0}
    up = side / local
    return [{"count": 2, "global": True, "size": side, "crop_scale": [0.14, 1.0], "blur_sigma": [0.1, 2.0],
             "blur_kernel_frac": 0.1, **shared},
            {"count": 6, "global": False, "size": local, "crop_scale": [0.05, 0.14], "blur_sigma": [0.1 * up, 2.0 * up],
             "blur_kernel_frac": min(0.1 * up, 1.0), **shared}]


def _build(ctx: BuildContext, cfg: SwAVConfig) -> SwAV:
    return SwAV(*ctx.build_backbone(), cfg, batch_size=ctx.batch_size, world_size=ctx.world_size)


register("methods", "swav")(MethodSpec(config_class=SwAVConfig, build=_build, view_groups=paper_views))
