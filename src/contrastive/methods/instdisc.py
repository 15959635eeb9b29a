"""InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination").

Each image is its own class. Pseudocode of one step (Sec. 3, the official lemniscate.pytorch):

    f = normalise(fc(backbone(aug(x))))                 # [B, 128], one augmented view per image
    v_pos = bank[index]; v_noise = bank[uniform(N, (B, m))]
    Z = N * mean(exp([v_pos, v_noise] . f / τ))         # first step only, then fixed (Eq. 7)
    loss = NCE(f, v_pos, v_noise, τ, Z)                 # Eq. 6; or the full softmax over the bank (Eq. 2)
    loss.backward(); optimizer.step()
    bank[index] = normalise(0.5 * bank[index] + 0.5 * f)   # "proximal" update (Sec. 3.3)

The bank holds one 128-d feature per training image ("memory bank", Sec. 3.2); the noise indices of a
step come from a generator seeded by (seed, step) drawn for the global batch, and bank writes use every
process's features, so all ranks hold the same bank as a single process would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive import distributed
from contrastive.errors import ConfigError
from contrastive.losses.nce import nce_loss, nce_normaliser, nonparametric_softmax
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.memory import MemoryBank
from contrastive.registry import register

LOSSES = ("nce", "softmax")


@dataclass
class InstDiscConfig:
    loss: str = field(default="nce", metadata={"help": "nce: noise-contrastive estimation with num_negatives "
                      "noise samples (Sec. 3.2), the paper's ImageNet objective; softmax: the full "
                      "non-parametric softmax over the whole bank (Eq. 2), exact and cheap when the dataset is "
                      "small (the official CIFAR-10 command, --nce-k 0)."})
    temperature: float = field(default=0.07, metadata={"help": "τ of exp(v·f/τ); 0.07 on ImageNet (Sec. 3.1 and "
                               "the official main.py), 0.1 on CIFAR-10 (official cifar.py)."})
    embedding_dim: int = field(default=128, metadata={"help": "Width of the fc layer's L2-normalised output "
                               "kept in the bank; 128 in the paper ('128 features per image ... only 600MB storage for "
                               "a million images', abstract)."})
    num_negatives: int = field(default=4096, metadata={"help": "m, noise samples per image for the NCE loss, "
                               "drawn uniformly with replacement from the bank (so m may exceed the dataset "
                               "size); 4096 in the paper's ImageNet runs and the official code."})
    bank_momentum: float = field(default=0.5, metadata={"help": "Momentum of the bank update "
                                 "v <- normalise(m v + (1 - m) f); 0.5 in the official code (--nce-m, 'stabilizes "
                                 "the learning process')."})


class InstDisc(Method):
    """Backbone, fc to ``embedding_dim``, L2 normalisation; a memory bank of ``dataset_size`` rows."""

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: InstDiscConfig, dataset_size: int):
        super().__init__()
        if cfg.loss not in LOSSES:
            raise ConfigError(f"method.loss={cfg.loss!r}: choose nce or softmax")
        if cfg.num_negatives < 1:
            raise ConfigError(f"method.num_negatives={cfg.num_negatives}: NCE needs at least 1 noise sample")
        if not 0.0 <= cfg.bank_momentum < 1.0:
            raise ConfigError(f"method.bank_momentum={cfg.bank_momentum} must lie in [0, 1)")
        if cfg.temperature <= 0:
            raise ConfigError(f"method.temperature={cfg.temperature} must be > 0")
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, cfg.embedding_dim)
        self.bank = MemoryBank(dataset_size, cfg.embedding_dim, cfg.bank_momentum)
        if cfg.loss == "nce":
            # NCE's normaliser Z; 0 until the first step estimates it (the official code's -1)
            self.register_buffer("z", torch.zeros(()))

    def projection_head(self) -> nn.Sequential:
        return nn.Sequential(self.fc)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [n, C, S, S] -> L2-normalised float32 features [n, embedding_dim]."""
        return F.normalize(self.fc(self.backbone(x)).float(), dim=1)

    def noise_index(self, n: int, step: StepInfo, device: torch.device) -> torch.Tensor:
        """[n, m] bank indices of this process's noise samples: drawn for the global batch from a stream
        seeded by (seed, step) alone, this rank's rows taken, so they do not depend on the process count."""
        gen = step.generator(device, per_rank=False)
        every = self.bank.sample(n * distributed.world_size(), self.cfg.num_negatives, gen)  # [N, m]
        return every[step.rank * n:(step.rank + 1) * n]

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        if len(batch.views) != 1:
            raise ConfigError(f"InstDisc augments each image once per step (Wu et al. 2018, Sec. 3), got "
                              f"{len(batch.views)} views; set views.n_views=1")
        f = self.embed(batch.views[0])  # [n, d]
        bank, tau = self.bank.rows, self.cfg.temperature
        updates = {"index": batch.index, "features": f.detach()}
        if self.cfg.loss == "softmax":
            return StepOutput(loss=nonparametric_softmax(f, bank, batch.index, tau), updates=updates,
                              embedding=updates["features"])
        positive = bank[batch.index]  # [n, d]
        noise = bank[self.noise_index(f.shape[0], step, f.device)]  # [n, m, d]
        z = self.z if bool(self.z > 0) else nce_normaliser(f, positive, noise, tau, len(self.bank))
        updates["z"] = z
        loss = nce_loss(f, positive, noise, tau, z, len(self.bank))
        return StepOutput(loss=loss, updates=updates, embedding=updates["features"])

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        # every process's rows, so each rank's bank is the single-process bank
        self.bank.update(distributed.all_gather(updates["index"]), distributed.all_gather(updates["features"]))
        if "z" in updates:
            self.z.copy_(updates["z"])


def _build(ctx: BuildContext, cfg: InstDiscConfig) -> InstDisc:
    return InstDisc(*ctx.build_backbone(), cfg, ctx.dataset_size)


register("methods", "instdisc")(MethodSpec(config_class=InstDiscConfig, build=_build))
