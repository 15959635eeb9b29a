"""CMC (Tian et al. 2019, "Contrastive Multiview Coding").

The views of an image are groups of its channels: L and ab of the Lab colour space (Sec. 4.2). Each view has
its own encoder; the views of one image are pulled together and those of other images pushed apart. Pseudocode
of one step (Sec. 3, the official train_CMC.py and NCEAverage):

    lab = normalise(rgb2lab(aug(x)))                          # one augmented crop per image, then split
    z_v = normalise(fc_v(encoder_v(lab[:, channels_v])))      # [B, 128] for every view v
    for (i, j) in graph:                   # core: (1, j) for every j > 1 (Eq. 4); full: every pair i < j (Eq. 5)
        for (a, b) in ((i, j), (j, i)):    # L(V_i, V_j) = L^{V_i,V_j} + L^{V_j,V_i} (Eq. 3)
            pos, noise = bank_b[index], bank_b[uniform(N, (B, K))]   # the same K noise rows for every view
            Z_ab = N * mean(exp([pos, noise] . z_a / τ))             # first step only, then fixed
            loss += NCE(z_a, pos, noise, τ, Z_ab)
    loss.backward(); optimizer.step()
    bank_v[index] = normalise(m bank_v[index] + (1 - m) z_v)         # every view's bank

``contrast: batch`` contrasts each view with the other views of the global batch instead (Eq. 2, no bank).
Evaluation reads the concatenation of every view's encoder features (Sec. 4.2: "concatenate the features").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive import distributed
from contrastive.data.color import normalised_lab
from contrastive.errors import ConfigError
from contrastive.losses.cmc import cmc_info_nce
from contrastive.losses.nce import nce_loss, nce_normaliser
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.memory import MemoryBank
from contrastive.registry import register

LAB = "Lab"


@dataclass
class CMCConfig:
    views: list = field(default_factory=lambda: ["L", "ab"], metadata={"help": "The views, each a group of Lab "
                        "channels named by their letters: [L, ab] is the paper's colour split (Sec. 4.2, the "
                        "official --view Lab); [L, a, b] gives three views, for the core and full graphs (Sec. 3.3)."})
    graph: str = field(default="core", metadata={"help": "Pairs contrasted when there are more than two views: "
                       "core, the first view with each other one (Eq. 4); full, every pair (Eq. 5). The same with "
                       "two views. The paper finds the full graph better with more views (Sec. 3.3)."})
    contrast: str = field(default="nce", metadata={"help": "nce: per-view memory banks and NCE against "
                          "num_negatives noise rows (Sec. 3.2, the official NCEAverage, its ImageNet default); "
                          "batch: each view against the other views of the global batch (Eq. 2, no bank)."})
    temperature: float = field(default=0.07, metadata={"help": "τ; 0.07 on ImageNet, 0.1 on STL-10 (the official "
                               "--nce_t and README)."})
    embedding_dim: int = field(default=128, metadata={"help": "Width of each view's L2-normalised linear head, "
                               "kept in the banks; 128 in the official code (--feat_dim)."})
    num_negatives: int = field(default=16384, metadata={"help": "K, noise rows per anchor for contrast=nce, drawn "
                               "uniformly from the bank with replacement; 16384 in the official train_CMC.py "
                               "(--nce_k; Fig. 4 shows more negatives help)."})
    bank_momentum: float = field(default=0.5, metadata={"help": "m of the bank update v <- normalise(m v + (1 - m) "
                                 "z); 0.5 in the official code (--nce_m)."})


def channel_groups(views: list) -> list[tuple[int, ...]]:
    """``method.views`` as Lab channel indices: ["L", "ab"] -> [(0,), (1, 2)]."""
    if not isinstance(views, list) or len(views) < 2:
        raise ConfigError(f"method.views={views!r}: give at least two groups of Lab channels, such as [L, ab]")
    groups, seen = [], set()
    for name in views:
        if not isinstance(name, str) or not name or any(c not in LAB for c in name) or len(set(name)) < len(name):
            raise ConfigError(f"method.views: {name!r} is not a group of the channels L, a and b (e.g. L, ab, a)")
        if seen & set(name):
            raise ConfigError(f"method.views={views!r}: the channels {sorted(seen & set(name))} are in two views; "
                              f"each channel belongs to one view")
        seen |= set(name)
        groups.append(tuple(LAB.index(c) for c in name))
    return groups


class LabEncoder(nn.Module):
    """Images normalised by the data's ``mean`` and ``std`` [B, 3, S, S] -> the concatenation of every view's
    encoder features [B, Σ d_v]: un-normalised, converted to Lab, normalised as the official code, split."""

    def __init__(self, backbones: list[nn.Module], groups: list[tuple[int, ...]], mean, std):
        super().__init__()
        self.backbones = nn.ModuleList(backbones)
        self.groups, self.mean, self.std = groups, tuple(mean), tuple(std)

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, S, S] -> one [B, |group|, S, S] tensor per view, from the same crop."""
        lab = normalised_lab(x, self.mean, self.std)  # [B, 3, S, S]
        return [torch.cat([lab[:, c:c + 1] for c in group], dim=1) for group in self.groups]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [backbone(v) for backbone, v in zip(self.backbones, self.views(x))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.features(x), dim=1)


class CMC(Method):
    """An encoder and a linear head per view; per-view memory banks for contrast=nce."""

    def __init__(self, encoders: list[tuple[nn.Module, int]], cfg: CMCConfig, dataset_size: int, mean, std):
        super().__init__()
        groups = channel_groups(cfg.views)
        if cfg.graph not in ("core", "full"):
            raise ConfigError(f"method.graph={cfg.graph!r}: choose core or full")
        if cfg.contrast not in ("nce", "batch"):
            raise ConfigError(f"method.contrast={cfg.contrast!r}: choose nce or batch")
        if cfg.temperature <= 0:
            raise ConfigError(f"method.temperature={cfg.temperature} must be > 0")
        if cfg.num_negatives < 1:
            raise ConfigError(f"method.num_negatives={cfg.num_negatives}: NCE needs at least 1 noise row")
        if not 0.0 <= cfg.bank_momentum < 1.0:
            raise ConfigError(f"method.bank_momentum={cfg.bank_momentum} must lie in [0, 1)")
        if len(encoders) != len(groups):
            raise ValueError(f"{len(encoders)} encoders for {len(groups)} views")
        self.cfg = cfg
        self.feature_dim = sum(dim for _, dim in encoders)
        self.encoders = LabEncoder([module for module, _ in encoders], groups, mean, std)
        self.heads = nn.ModuleList(nn.Linear(dim, cfg.embedding_dim) for _, dim in encoders)
        v = len(groups)
        self.pairs = [(0, j) for j in range(1, v)] if cfg.graph == "core" else list(itertools.combinations(range(v), 2))
        if cfg.contrast == "nce":
            self.banks = nn.ModuleList(MemoryBank(dataset_size, cfg.embedding_dim, cfg.bank_momentum) for _ in groups)
            # Z of every direction (i -> j, then j -> i, pair by pair); 0 until the first step estimates it
            self.register_buffer("z", torch.zeros(2 * len(self.pairs)))

    def encoder(self) -> nn.Module:
        return self.encoders

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images [n, 3, S, S] -> each view's L2-normalised float32 features [n, embedding_dim]."""
        return [F.normalize(head(h).float(), dim=1) for head, h in zip(self.heads, self.encoders.features(x))]

    def noise_index(self, n: int, step: StepInfo, device: torch.device) -> torch.Tensor:
        """[n, K] bank rows of this process's noise, shared by every view: drawn for the global batch from a
        stream seeded by (seed, step) alone, this rank's rows taken (as InstDisc)."""
        gen = step.generator(device, per_rank=False)
        every = self.banks[0].sample(n * distributed.world_size(), self.cfg.num_negatives, gen)  # [N, K]
        return every[step.rank * n:(step.rank + 1) * n]

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        if len(batch.views) != 1:
            raise ConfigError(f"CMC splits one augmented view of each image into its Lab channels (Tian et al. "
                              f"2019, Sec. 4.2), got {len(batch.views)} views; set views.n_views=1")
        z = self.embed(batch.views[0])  # V x [n, d]
        names = ["".join(LAB[c] for c in group) for group in self.encoders.groups]
        if self.cfg.contrast == "batch":
            pair_losses = [cmc_info_nce(z[i], z[j], self.cfg.temperature) for i, j in self.pairs]
            updates = {}
        else:
            pair_losses, updates = self._nce(z, batch.index, step)
        metrics = {f"loss_{names[i]}_{names[j]}": loss.detach() for (i, j), loss in zip(self.pairs, pair_losses)}
        return StepOutput(loss=sum(pair_losses), metrics=metrics, updates=updates, embedding=z[0].detach())

    def _nce(self, z: list[torch.Tensor], index: torch.Tensor, step: StepInfo):
        """L(V_i, V_j) of every pair against the banks, and the updates for after_step."""
        tau, size = self.cfg.temperature, len(self.banks[0])
        noise_index = self.noise_index(z[0].shape[0], step, z[0].device)
        rows = [(bank.rows[index], bank.rows[noise_index]) for bank in self.banks]  # V x ([n, d], [n, K, d])
        estimate = not bool(self.z.gt(0).all())  # the first step: Z of every direction from this batch
        zs, pair_losses = [], []
        for p, (i, j) in enumerate(self.pairs):
            pair = 0.0
            for k, (a, b) in enumerate(((i, j), (j, i)), start=2 * p):  # view a's features against view b's bank
                positive, noise = rows[b]
                zs.append(nce_normaliser(z[a], positive, noise, tau, size) if estimate else self.z[k])
                pair = pair + nce_loss(z[a], positive, noise, tau, zs[-1], size)
            pair_losses.append(pair)
        features = torch.stack([f.detach() for f in z], dim=1)  # [n, V, d]
        return pair_losses, {"index": index, "features": features, "z": torch.stack(zs)}

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        if self.cfg.contrast != "nce":
            return
        # every process's rows, so each rank's banks are the single-process banks
        index, features = distributed.all_gather(updates["index"]), distributed.all_gather(updates["features"])
        for v, bank in enumerate(self.banks):
            bank.update(index, features[:, v])
        self.z.copy_(updates["z"])


def _build(ctx: BuildContext, cfg: CMCConfig) -> CMC:
    if ctx.channels != 3:
        raise ConfigError(f"CMC contrasts the L and ab channels of colour images (Tian et al. 2019, Sec. 4.2); the "
                          f"training data (data.name) has {ctx.channels} channel(s). Use RGB data, e.g. "
                          f"data.name=cifar10 or a folder of colour images")
    if ctx.mean is None or ctx.std is None:
        raise ConfigError("CMC un-normalises its views before the Lab conversion and needs the data's per-channel "
                          "mean and std; build the context with BuildContext.for_run(cfg, dataset) or give "
                          "BuildContext(mean=..., std=...)")
    encoders = [ctx.build_backbone((len(group), *ctx.input_shape[1:])) for group in channel_groups(cfg.views)]
    return CMC(encoders, cfg, ctx.dataset_size, ctx.mean, ctx.std)


register("methods", "cmc")(MethodSpec(config_class=CMCConfig, build=_build, data=("image",)))
