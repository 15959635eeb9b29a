"""CPC on images (van den Oord et al. 2018, Sec. 3.3), as CPC v2 trains it (Henaff et al. 2019).

"We first resize every image to 256x256 pixels and then extract a 7x7 grid of 64x64 crops with 32 pixels
overlap", encode every crop, run a masked context network over the grid, and predict the latents of the
rows below from the context of a row. Pseudocode of one step (one view per image):

    z = f(augment_each(patches(x)))              # [B*R*C, D]: every patch encoded on its own
    c = g_ar(z.grid)                             # [B, D, R, C]: row r sees rows <= r only
    t = W_t z                                    # [B*R*C, d]: the patch latents as candidates
    for k in offsets:                            # one linear map W_k per offset
        loss += info_nce(W_k c[:, :, :R-k], t, positive = the patch k rows below, same column and image)

Every other patch of the (global) batch is a negative. Evaluation encodes the patches of the whole image
and averages them: one vector per image, standardised per dimension by running statistics of that average
over training. The scores t_j . W_k c are unchanged by a vector added to every candidate t_j, so nothing in
the loss pins the latents' shared offset, and on digits it dominates the pooled vector (mean cosine 0.95
between images); the dimensions' scales are as free. Standardising, as the linear probe does with its
features, is what lets a cosine kNN see the rest. The running mean and variance are the only state (buffers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive import distributed
from contrastive.data.augment import resized_crop
from contrastive.errors import ConfigError
from contrastive.losses.cpc import cpc_accuracy, cpc_info_nce
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.context import RowCausalContext
from contrastive.registry import register


@dataclass
class CPCConfig:
    patch_size: int = field(default=64, metadata={"help": "Side of the square patches in pixels; \"a 7x7 grid "
                            "of 64x64 crops with 32 pixels overlap\" of a 256 px image (CPC, Sec. 3.3; CPC v2 keeps "
                            "the grid)."})
    patch_stride: int = field(default=32, metadata={"help": "Pixels between neighbouring patches: 32, half the "
                              "patch, so neighbours overlap by half (CPC, Sec. 3.3)."})
    offsets: list = field(default_factory=lambda: [3, 4, 5], metadata={"help": "How many rows below a row's "
                          "context each prediction looks, one linear map W_k per offset. CPC predicts up to five "
                          "rows below (Sec. 3.3); CPC v2's implementation skips the two nearest rows, which "
                          "share pixels with or touch the context's own row at a stride of half the patch."})
    target_dim: int = field(default=64, metadata={"help": "Width of the linear projection of the patch latents "
                            "that predictions are scored against (64 in CPC v2's implementation as the deepul "
                            "course reproduces it); it keeps the [predictions, patches of the batch] scores cheap."})
    context_blocks: int = field(default=5, metadata={"help": "Residual blocks of the masked context network: "
                                "5, so the context of a row sees the five rows above it (CPC v2, Appendix A.2)."})
    context_width: int = field(default=256, metadata={"help": "Bottleneck channels of each context block "
                               "(256 in CPC v2's PixelCNN-style context network, Appendix A.2)."})
    patch_crop: float = field(default=1.0, metadata={"help": "Side of a random square crop of each patch, as a "
                              "fraction of the patch, resized back (CPC v2's patch-wise spatial jitter); 1: none."})
    patch_hflip_p: float = field(default=0.0, metadata={"help": "Probability of mirroring each patch on its own; "
                                 "0: the image-level flip of views.hflip_p is the paper's."})
    channel_drop_p: float = field(default=1.0, metadata={"help": "Probability that a patch keeps one random colour "
                                  "channel and the other two are set to 0, the normalised mean (CPC v2's colour "
                                  "dropping, after Doersch et al. 2015); grey images are unchanged."})
    norm_momentum: float = field(default=0.1, metadata={"help": "Weight of each step's batch in the running mean "
                                 "and variance of the pooled latents that the evaluated encoder standardises with "
                                 "(batch norm's 0.1; the loss leaves their offset and scale free, see the module "
                                 "docstring); updated after every step from every process's images; 0: never "
                                 "updated, so the encoder returns the plain average."})


def patchify(x: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, int, int]:
    """Images [B, C, H, W] -> patches [B*R*Q, C, size, size] in (image, row, column) order, and R, Q."""
    if x.shape[2] < size or x.shape[3] < size:
        raise ConfigError(f"{x.shape[2]}x{x.shape[3]} px images are smaller than method.patch_size={size}")
    grid = x.unfold(2, size, stride).unfold(3, size, stride)  # [B, C, R, Q, size, size]
    rows, cols = grid.shape[2], grid.shape[3]
    return grid.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], size, size), rows, cols


class PatchEncoder(nn.Module):
    """What evaluation sees: the image's patch grid encoded patch by patch and averaged, then standardised by the
    running mean and variance of that average over training, [B, C, S, S] -> [B, D]."""

    def __init__(self, backbone: nn.Module, feature_dim: int, patch_size: int, patch_stride: int):
        super().__init__()
        self.backbone, self.patch_size, self.patch_stride = backbone, patch_size, patch_stride
        self.register_buffer("running_mean", torch.zeros(feature_dim))
        self.register_buffer("running_var", torch.ones(feature_dim))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The patch latents of each image averaged over its grid, [B, D], not standardised."""
        patches, rows, cols = patchify(x, self.patch_size, self.patch_stride)
        return self.backbone(patches).view(x.shape[0], rows * cols, -1).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.pooled(x) - self.running_mean) * torch.rsqrt(self.running_var + 1e-5)

    @torch.no_grad()
    def track(self, pooled: torch.Tensor, momentum: float) -> None:
        """Move the running statistics towards those of ``pooled`` [N, D] (every process's images)."""
        var, mean = torch.var_mean(pooled, dim=0, correction=0)
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(var, momentum)


class CPC(Method):
    """Patch encoder, masked context network, one linear prediction per offset, InfoNCE over the batch."""

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: CPCConfig, image_size: int):
        super().__init__()
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.patch_encoder = PatchEncoder(backbone, feature_dim, cfg.patch_size, cfg.patch_stride)
        self.context = RowCausalContext(feature_dim, cfg.context_width, cfg.context_blocks)
        self.target = nn.Linear(feature_dim, cfg.target_dim)
        self.predictors = nn.ModuleList(nn.Linear(feature_dim, cfg.target_dim, bias=False) for _ in cfg.offsets)
        self._check_grid(image_size)

    def encoder(self) -> nn.Module:
        return self.patch_encoder

    def projection_head(self) -> nn.Sequential:
        # linear, so on the averaged latents it is the average of the patches' candidate projections
        return nn.Sequential(self.target)

    def _check_grid(self, side: int) -> None:
        rows = (side - self.cfg.patch_size) // self.cfg.patch_stride + 1
        if rows <= max(self.cfg.offsets):
            raise ConfigError(f"method.offsets={list(self.cfg.offsets)}: {side} px views cut into "
                              f"method.patch_size={self.cfg.patch_size} px patches every method.patch_stride="
                              f"{self.cfg.patch_stride} px give {max(rows, 0)} rows, so an offset must be at most "
                              f"{rows - 1}; lower the offsets or the patch size or stride, or raise data.image_size")

    def augment(self, patches: torch.Tensor, step: StepInfo) -> torch.Tensor:
        """Each patch on its own: a random square crop resized back, a mirror, colour dropping. Drawn for the
        global batch from a stream every rank shares, this rank's rows taken, so the draws do not depend on
        how many processes share the batch."""
        cfg, (m, channels, p) = self.cfg, patches.shape[:3]
        gen = step.generator(patches.device, per_rank=False)
        every = m * distributed.world_size()
        mine = slice(step.rank * m, (step.rank + 1) * m)
        u = torch.rand(4, every, generator=gen, device=patches.device)[:, mine]  # [4, m]
        kept = torch.randint(3, (every,), generator=gen, device=patches.device)[mine]  # [m]
        if cfg.patch_crop < 1 or cfg.patch_hflip_p > 0:
            side = max(round(cfg.patch_crop * p), 1)
            top, left = torch.floor(u[0] * (p - side + 1)), torch.floor(u[1] * (p - side + 1))
            boxes = torch.stack([top, left, torch.full_like(top, side), torch.full_like(top, side)], dim=1)
            patches = resized_crop(patches, boxes, u[2] < cfg.patch_hflip_p, p)
        if channels == 3 and cfg.channel_drop_p > 0:
            keep = F.one_hot(kept, 3).to(patches.dtype)  # [m, 3]
            factor = torch.where((u[3] < cfg.channel_drop_p).unsqueeze(1), keep, torch.ones_like(keep))
            patches = patches * factor.view(m, 3, 1, 1)
        return patches

    def encode_grid(self, patches: torch.Tensor, n: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches [n*R*Q, C, p, p] -> latents z [n*R*Q, D] and contexts [n, R, Q, D] (row r: rows <= r)."""
        z = self.patch_encoder.backbone(patches)  # [n*R*Q, D]
        context = self.context(z.view(n, rows, cols, -1).permute(0, 3, 1, 2))  # [n, D, R, Q]
        return z, context.permute(0, 2, 3, 1)

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        if len(batch.views) != 1:
            raise ConfigError(f"CPC predicts patches of one view of each image, got {len(batch.views)} views; set "
                              f"views.n_views=1 and no views.groups")
        x = batch.views[0]
        n = x.shape[0]
        patches, rows, cols = patchify(x, self.cfg.patch_size, self.cfg.patch_stride)
        self._check_grid(x.shape[2])
        z, context = self.encode_grid(self.augment(patches, step), n, rows, cols)
        candidates = distributed.gather_with_grad(self.target(z))  # [N*R*Q, d]: every process's patches
        # each local patch's row among the candidates: this rank's images come after the lower ranks'
        index = (torch.arange(n * rows * cols, device=x.device) + distributed.rank() * n * rows * cols)
        index = index.view(n, rows, cols)
        losses, accuracies = [], []
        for k, predict in zip(self.cfg.offsets, self.predictors):
            prediction = predict(context[:, :rows - k]).reshape(-1, self.cfg.target_dim)  # [n*(R-k)*Q, d]
            positive = index[:, k:].reshape(-1)  # the patch k rows below, same column and image
            losses.append(cpc_info_nce(prediction, candidates, positive))
            accuracies.append(cpc_accuracy(prediction.detach(), candidates.detach(), positive))
        pooled = z.detach().view(n, rows * cols, -1).mean(dim=1)  # [n, D]: what evaluation averages
        return StepOutput(loss=torch.stack(losses).mean(), metrics={"cpc_acc": torch.stack(accuracies).mean()},
                          updates={"pooled": pooled}, embedding=pooled)

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        # from every process's images, so every rank keeps the statistics one process would
        self.patch_encoder.track(distributed.all_gather(updates["pooled"]), self.cfg.norm_momentum)


def _check(cfg: CPCConfig) -> None:
    for name in ("patch_size", "patch_stride", "target_dim", "context_width"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"method.{name}={getattr(cfg, name)} must be a positive integer")
    offsets = list(cfg.offsets)
    if not offsets or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in offsets) \
            or len(set(offsets)) != len(offsets):
        raise ConfigError(f"method.offsets={cfg.offsets!r}: expected distinct positive row offsets, for example [1, 2]")
    if cfg.context_blocks < 0:
        raise ConfigError(f"method.context_blocks={cfg.context_blocks} must be >= 0")
    if not 0 <= cfg.norm_momentum <= 1:
        raise ConfigError(f"method.norm_momentum={cfg.norm_momentum} must be in [0, 1] (0: no standardising)")
    if not 0 < cfg.patch_crop <= 1:
        raise ConfigError(f"method.patch_crop={cfg.patch_crop} must be in (0, 1]")
    for name in ("patch_hflip_p", "channel_drop_p"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"method.{name}={getattr(cfg, name)} must be a probability in [0, 1]")


def _build(ctx: BuildContext, cfg: CPCConfig) -> CPC:
    _check(cfg)
    return CPC(*ctx.build_backbone((ctx.channels, cfg.patch_size, cfg.patch_size)), cfg, image_size=ctx.image_size)


register("methods", "cpc")(MethodSpec(config_class=CPCConfig, build=_build, data=("image",)))
