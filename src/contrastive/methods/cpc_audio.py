"""CPC on sound (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding", Sec. 3.1).

A strided convolutional encoder turns a raw waveform into a latent every 10 ms, a GRU summarises the latents so
far into a context, and the context predicts the latents of the next K steps, each against the others:

    z = g_enc(x)                        # [n, T, D]: frames of every window (nn/audio.py)
    c = g_ar(z)                         # [n, T, H]: GRU, c_t depends on z_<=t only
    for k in 1..K: W_k c_t              # "a different W_k for every step k" (Eq. 3: f_k = exp(z_{t+k}^T W_k c_t))
    loss = InfoNCE(W_k c_t; z_{t+k} positive, every other z of the global batch negative)   # Eq. 4

The candidates are every latent of every window of the global batch (gathered with their gradient), so the
negatives are other time steps of the same sequence and every step of the other sequences. The loss is the
mean over every (sequence, t, k) whose target z_{t+k} lies inside its clip: a window past the end of a shorter
clip is padding (data/audio.py), its frames are zero among the candidates and never a target (their target is
cross-entropy's ignore_index, -100). Nothing is kept between steps. Evaluation reads ``encoder()``: conv + GRU,
the mean of c_t over the clip's frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive import distributed
from contrastive.errors import ConfigError
from contrastive.losses.cpc import cpc_accuracy, cpc_info_nce
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.audio import AudioConv, masked_mean
from contrastive.registry import register

IGNORE = -100  # F.cross_entropy's ignore_index: a prediction whose future is padding


@dataclass
class CPCAudioConfig:
    steps: int = field(default=12, metadata={"help": "K, the future steps each context predicts: 'we predict 12 "
                       "timesteps in the future using the contrastive loss' (Sec. 3.1)."})
    context_dim: int = field(default=256, metadata={"help": "Hidden state of the GRU g_ar, the evaluated features: "
                             "'a GRU RNN ... with 256 dimensional hidden state' (Sec. 3.1)."})


class AudioContext(nn.Module):
    """g_enc and g_ar: waveforms [B, C, T] (NaN-padded) -> the mean of c_t over each clip's frames, [B, H]."""

    def __init__(self, g_enc: AudioConv, context_dim: int):
        super().__init__()
        self.g_enc = g_enc
        self.g_ar = nn.GRU(g_enc.feature_dim, context_dim, batch_first=True)

    def sequences(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z [B, T', D], c [B, T', H], valid [B, T']): latents, contexts and which frames lie inside the clip."""
        z, valid = self.g_enc.frames(x)
        c, _ = self.g_ar(z)  # causal: the zero frames after a clip change none of its own contexts
        return z, c, valid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, valid = self.sequences(x)
        return masked_mean(c, valid)


class CPCAudio(Method):
    """Encoder, GRU and the K linear predictors W_k (no bias: the score is z^T W_k c)."""

    collapse_advice = "lower optim.lr; CPC's negatives (other steps, other clips) keep the latents apart"

    def __init__(self, g_enc: nn.Module, cfg: CPCAudioConfig):
        super().__init__()
        if not isinstance(g_enc, AudioConv):
            raise ConfigError(f"cpc-audio encodes waveforms; backbone.name must be an audio backbone (cpc_audio_conv), "
                              f"got a {type(g_enc).__name__}")
        if cfg.steps < 1 or cfg.context_dim < 1:
            raise ConfigError(f"method.steps={cfg.steps} and method.context_dim={cfg.context_dim} must be >= 1")
        self.cfg = cfg
        self.net = AudioContext(g_enc, cfg.context_dim)
        self.latent_dim = g_enc.feature_dim
        self.predictors = nn.Linear(cfg.context_dim, cfg.steps * self.latent_dim, bias=False)  # W_1..W_K stacked
        self.feature_dim = cfg.context_dim

    def encoder(self) -> nn.Module:
        return self.net

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        x = torch.cat(batch.views)  # [n, 1, W]: every window is a sequence of its own
        z, c, valid = self.net.sequences(x)
        n, t, d = z.shape
        k = self.cfg.steps
        if t <= k:
            raise ConfigError(f"windows of {x.shape[-1]} samples give {t} frames, too few to predict "
                              f"method.steps={k} ahead; lengthen modalities.audio.window or lower method.steps")
        candidates = distributed.gather_with_grad(z * valid[..., None]).reshape(-1, d)  # [N T, D]
        w = self.predictors.weight.view(k, d, -1)  # [K, D, H]
        predictions = torch.einsum("kdh,nth->ntkd", w, c).reshape(-1, d)  # [n T K, D]: W_k c_t

        ahead = torch.arange(t, device=z.device)[:, None] + torch.arange(1, k + 1, device=z.device)  # [T, K]: t + k
        inside = (ahead < t) & valid.gather(1, ahead.clamp_max(t - 1).view(1, -1).expand(n, -1)).view(n, t, k)
        first = distributed.rank() * n * t  # this process's first row among the candidates
        rows = first + torch.arange(n, device=z.device).view(n, 1, 1) * t + ahead  # [n, T, K]: row of z_{t+k}
        targets = torch.where(inside, rows, IGNORE).reshape(-1)  # [n T K]
        loss = cpc_info_nce(predictions, candidates, targets)  # mean over the local predictions that count
        counted = inside.sum()
        if distributed.world_size() > 1:  # DDP averages ranks: weigh each by its share of the global predictions
            total = distributed.all_reduce_sum(counted.clone()).clamp_min(1)
            loss = loss * (counted * distributed.world_size() / total)
        accuracy = cpc_accuracy(predictions.detach(), candidates.detach(), targets) * targets.numel() / counted.clamp_min(1)
        return StepOutput(loss=loss, metrics={"cpc_accuracy": accuracy},
                          embedding=masked_mean(c, valid).detach())


def _build(ctx: BuildContext, cfg: CPCAudioConfig) -> CPCAudio:
    return CPCAudio(ctx.build_backbone()[0], cfg)


register("methods", "cpc-audio")(MethodSpec(config_class=CPCAudioConfig, build=_build, data=("audio",)))
