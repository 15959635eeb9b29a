"""MoCo v1 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning") and
v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

Algorithm 1 of the paper, which this file follows::

    f_k.params = f_q.params                       # initialise
    for x in loader:
        x_q, x_k = aug(x), aug(x)                 # two random augmentations
        q = f_q.forward(x_q)                      # queries: N x C
        k = f_k.forward(x_k).detach()             # keys: N x C, no gradient to keys
        l_pos = bmm(q.view(N,1,C), k.view(N,C,1)) # positive logits: N x 1
        l_neg = mm(q.view(N,C), queue.view(C,K))  # negative logits: N x K
        loss = CrossEntropyLoss(cat([l_pos, l_neg], dim=1) / t, zeros(N))
        loss.backward(); update(f_q.params)
        f_k.params = m * f_k.params + (1 - m) * f_q.params
        enqueue(queue, k); dequeue(queue)

v2 changes the head to a 2-layer MLP, the temperature to 0.2, and (in the recipe) adds blur and a cosine
learning-rate schedule. The key encoder sees a batch shuffled across its batch-norm groups (Sec. 3.3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive import distributed
from contrastive.errors import ConfigError
from contrastive.losses import info_nce_queue
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.ema import ema_update, momentum_copy
from contrastive.nn.heads import mlp
from contrastive.nn.memory import Queue
from contrastive.nn.shuffle_bn import shuffled_forward, split_batchnorm
from contrastive.registry import register

log = logging.getLogger("contrastive.moco")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class MoCoConfig:
    dim: int = _f(128, "Width of queries and keys; 128 (Sec. 3.3).")
    head: str = _f("linear", "linear: the fc layer to `dim` (v1); mlp: a 2-layer MLP with ReLU (v2, Sec. 2).")
    hidden_dim: int | None = _f(None, "Hidden width of the mlp head; None: the backbone's feature dimension "
                                "(2048 for ResNet-50, as v2).")
    queue_size: int = _f(65536, "K, keys in the dictionary; 65,536 on ImageNet (Sec. 4), 4,096 in the CIFAR-10 demo.")
    momentum: float = _f(0.999, "m of the key encoder's update; 0.999 (Sec. 4.1: 0.99-0.9999 work, 0.9 fails).")
    temperature: float = _f(0.07, "τ of the InfoNCE loss; 0.07 in v1 (Sec. 3.3), 0.2 in v2.")
    symmetric: bool = _f(False, "Also contrast the second view's queries with the first view's keys and add the "
                         "losses, as the MoCo CIFAR-10 demo's symmetric loss; both views' keys are enqueued.")
    shuffle_bn: bool = _f(True, "Shuffle the keys' batch across batch-norm groups (Sec. 3.3); without it BN leaks "
                          "which key matches which query.")
    bn_splits: int = _f(8, "Batch-norm groups of the global batch, in both encoders: MoCo's 8 GPUs x 32 images; a "
                        "process holds bn_splits / world_size of them (SplitBatchNorm, as the CIFAR-10 demo's 8).")


@dataclass
class MoCoV2Config(MoCoConfig):
    head: str = _f("mlp", "mlp: 'replace the fc head in MoCo with a 2-layer MLP head' (v2, Sec. 2).")
    temperature: float = _f(0.2, "τ = 0.2 with the MLP head (v2, Table 1).")


class MoCo(Method):
    """Query encoder f_q (backbone + head), momentum key encoder f_k, and a queue of keys."""

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: MoCoConfig, *, world_size: int = 1,
                 local_batch: int | None = None):
        super().__init__()
        _check(cfg, world_size, local_batch)
        self.cfg = cfg
        self.feature_dim = feature_dim
        if cfg.head == "linear":
            head = nn.Linear(feature_dim, cfg.dim)
        else:
            head = mlp([feature_dim, cfg.hidden_dim or feature_dim, cfg.dim], batch_norm=False)
        self.batch_multiple = cfg.bn_splits // world_size  # batch-norm groups of this process
        self.encoder_q = split_batchnorm(nn.Sequential(backbone, head), self.batch_multiple)
        # in training mode with f_q: keys use the batch statistics of shuffled groups, as the official code's
        self.encoder_k = momentum_copy(self.encoder_q)
        self.queue = Queue(cfg.queue_size, cfg.dim)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        if len(batch.views) != 2:
            raise ConfigError(f"MoCo takes 2 views per image (query and key), got {len(batch.views)}; "
                              f"set views.n_views=2")
        shuffle = step.generator(batch.views[0].device, per_rank=False)  # one permutation on every rank
        x_q, x_k = batch.views
        loss, k = self._contrast(x_q, x_k, shuffle)
        keys = [k]
        if self.cfg.symmetric:
            loss_21, k1 = self._contrast(x_k, x_q, shuffle)
            loss, keys = loss + loss_21, [k1, k]
        return StepOutput(loss=loss, updates={"keys": torch.stack(keys)}, embedding=keys[0])  # keys [views, n, dim]

    def _contrast(self, x_q: torch.Tensor, x_k: torch.Tensor, shuffle: torch.Generator):
        q = F.normalize(self.encoder_q(x_q), dim=1)  # [n, dim]
        with torch.no_grad():
            k = self._keys(x_k, shuffle)
        return info_nce_queue(q, k, self.queue.keys, self.cfg.temperature), k

    @torch.no_grad()
    def _keys(self, x: torch.Tensor, shuffle: torch.Generator) -> torch.Tensor:
        """[n, C, S, S] -> normalised keys [n, dim] from the key encoder, no gradient."""
        k = shuffled_forward(self.encoder_k, x, shuffle) if self.cfg.shuffle_bn else self.encoder_k(x)
        return F.normalize(k, dim=1)

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        ema_update(self.encoder_k, self.encoder_q, self.cfg.momentum)
        # every process's keys, view by view, so the queue is the same on every rank and in one process
        self.queue.push(torch.cat([distributed.all_gather(k) for k in updates["keys"]]))

    def encoder(self) -> nn.Module:
        return self.encoder_q[0]

    def projection_head(self) -> nn.Sequential:
        head = self.encoder_q[1]
        return head if isinstance(head, nn.Sequential) else nn.Sequential(head)

    def sync_batchnorm(self) -> None:
        """MoCo keeps batch norm per group: its shuffled groups are the point (Sec. 3.3), so no SyncBN."""
        log.info("moco: batch norm stays per process (shuffling BN); train.sync_batchnorm does not apply")


def _check(cfg: MoCoConfig, world_size: int, local_batch: int | None) -> None:
    if cfg.head not in ("linear", "mlp"):
        raise ConfigError(f"method.head={cfg.head!r}: choose linear (MoCo v1) or mlp (v2)")
    if cfg.bn_splits < 1 or cfg.bn_splits % world_size:
        raise ConfigError(f"method.bn_splits={cfg.bn_splits} must be a positive multiple of the {world_size} "
                          f"processes (each process holds bn_splits / processes batch-norm groups)")
    groups = cfg.bn_splits // world_size
    if local_batch is not None and local_batch % groups:
        raise ConfigError(f"method.bn_splits={cfg.bn_splits}: a process's batch of {local_batch} images does not "
                          f"split into {groups} batch-norm groups; make train.batch_size a multiple of bn_splits")
    if local_batch is not None and cfg.queue_size < local_batch * world_size * (2 if cfg.symmetric else 1):
        raise ConfigError(f"method.queue_size={cfg.queue_size} is smaller than the keys one step enqueues; "
                          f"make it at least the global batch size (times 2 with method.symmetric)")
    if cfg.temperature <= 0 or cfg.dim < 1:
        raise ConfigError(f"method.temperature={cfg.temperature} and method.dim={cfg.dim} must be positive")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"method.momentum={cfg.momentum} must lie in [0, 1)")


def _build(ctx: BuildContext, cfg: MoCoConfig) -> MoCo:
    return MoCo(*ctx.build_backbone(), cfg, world_size=ctx.world_size,
                local_batch=ctx.batch_size // ctx.world_size)


register("methods", "moco-v1")(MethodSpec(config_class=MoCoConfig, build=_build))
register("methods", "moco-v2")(MethodSpec(config_class=MoCoV2Config, build=_build))
