"""SimCSE (Gao, Yao, Chen 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings"), unsupervised
(``simcse``) and supervised (``simcse-sup``).

Unsupervised, Sec. 3: "we simply feed the same input to the encoder twice": the two encodings differ by their
dropout masks alone, and each sentence's other encoding is its positive against the other sentences of the
batch (Eq. 1, τ = 0.05)::

    for x in loader:                       # n sentences, token ids [n, L]
        h = f(cat([x, x]))                 # one pass of 2n rows: every row its own dropout mask
        z = mlp(h)                         # [CLS] + MLP during training only ("w/ MLP (train)", Table 6)
        loss = simcse_unsup(z[:n], z[n:])  # InfoNCE over the global batch's second encodings

Optional word-level views (crop, deletion, swap, replacement: ``data/text_views.py``) are applied to each copy
on top of dropout, the discrete augmentations of its Table 1; they default to off, as the paper's best.

Supervised, Sec. 4: rows (premise, entailment, contradiction): the entailed sentence is the positive and the
contradiction a hard negative of its premise; every other row's positive and hard negative are negatives too
(Eq. 5). Pairs without a hard negative use Eq. 1 with the given positives. The MLP is kept at test time ("w/
MLP", Table 6). Dropout differs across processes under DDP: the trainer seeds the global generator by step
and rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.data.text_views import TextViewConfig, TextViews
from contrastive.errors import ConfigError
from contrastive.losses import simcse_sup, simcse_unsup
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.registry import register

MLP_USES = ("train", "always", "none")


@dataclass
class SimCSEConfig:
    temperature: float = field(default=0.05, metadata={"help": "τ of Eq. 1; 0.05 in the paper (Table D.1 tries "
                               "0.001-1: 0.05 is best)."})
    mlp: str = field(default="train", metadata={"help": "The MLP (Linear d->d + tanh, BERT's pooler) over the "
                     "sentence embedding: train (during training only, unsupervised SimCSE's choice), always "
                     "(also at test: supervised SimCSE's), none."})
    crop: float = field(default=0.0, metadata={"help": "Word-level view on top of dropout: fraction of tokens cut "
                        "away, keeping one span (Table 1: crop 10% 77.8 vs dropout alone 82.5 STS-B dev); 0: off."})
    delete: float = field(default=0.0, metadata={"help": "Fraction of tokens deleted at random (Table 1: 10% "
                          "gives 75.9); 0: off."})
    swap: float = field(default=0.0, metadata={"help": "Fraction of tokens swapped in random pairs; 0: off."})
    replace: float = field(default=0.0, metadata={"help": "Fraction of tokens replaced by random vocabulary tokens "
                           "(Table 1's synonym replacement without a thesaurus); 0: off."})


@dataclass
class SimCSESupConfig(SimCSEConfig):
    mlp: str = field(default="always", metadata={"help": "train, always (supervised SimCSE keeps the MLP at test, "
                     "Table 6) or none."})


class _WithHead(nn.Module):
    """A sentence encoder with the MLP on top, as supervised SimCSE evaluates it."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(ids, attention_mask))


class SimCSE(Method):
    """Sentence encoder f (token ids -> [n, d]), the MLP, and SimCSE's InfoNCE."""

    min_batch = 2  # the batch's other sentences are the negatives

    collapse_advice = ("lower optim.lr (SimCSE fine-tunes BERT at 3e-5) or raise method.temperature; check that the "
                       "encoder has dropout (method.crop/delete give views without it)")

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: SimCSEConfig, *, supervised: bool):
        super().__init__()
        if cfg.mlp not in MLP_USES:
            raise ConfigError(f"method.mlp={cfg.mlp!r} is none of {', '.join(MLP_USES)}")
        self.cfg = cfg
        self.supervised = supervised
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.mlp = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.Tanh()) if cfg.mlp != "none" else None
        words = TextViewConfig(crop=cfg.crop, delete=cfg.delete, swap=cfg.swap, replace=cfg.replace)
        self.words = (TextViews(words, special_ids=backbone.special_ids, pad_id=backbone.pad_id,
                                vocab_size=backbone.vocab_size) if any(vars(words).values()) else None)

    def encoder(self) -> nn.Module:
        return _WithHead(self.backbone, self.mlp) if self.cfg.mlp == "always" else self.backbone

    def _embed(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """One encoder pass over every row of every tensor [n, L_j] (padded to one length): [n, d] each."""
        pad = self.backbone.pad_id
        longest = max(r.shape[1] for r in rows)
        x = torch.cat([F.pad(r, (0, longest - r.shape[1]), value=pad) for r in rows])  # [k n, L]
        z = self.backbone(x)  # [k n, d]
        if self.mlp is not None:
            z = self.mlp(z)
        return list(z.split(rows[0].shape[0]))

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        views = batch.views
        if self.supervised:
            if len(views) not in (2, 3):
                raise ConfigError(f"simcse-sup learns from rows of (sentence, positive[, hard negative]); the data "
                                  f"gives {len(views)} sentence(s) a row: use data.name=sick-triples or a CSV of "
                                  f"sent0,sent1[,hard_neg]")
            z = self._embed(views)
            loss = simcse_sup(*z, self.cfg.temperature) if len(z) == 3 else simcse_unsup(*z, self.cfg.temperature)
            return StepOutput(loss=loss, embedding=z[0].detach())
        if len(views) != 1:
            raise ConfigError(f"simcse learns from single sentences; the data gives rows of {len(views)} sentences "
                              f"(use simcse-sup for pairs and triples)")
        (x,) = views  # [n, L]
        pair = [x, x]
        if self.words is not None:  # discrete views on top of dropout, one per copy
            g = step.generator(x.device)
            pair = [self.words(x, x != self.backbone.pad_id, g)[0] for _ in range(2)]
        z1, z2 = self._embed(pair)
        return StepOutput(loss=simcse_unsup(z1, z2, self.cfg.temperature), embedding=z1.detach())


def _check_text(ctx: BuildContext) -> tuple[nn.Module, int]:
    backbone, dim = ctx.build_backbone()
    if not hasattr(backbone, "pad_id"):
        raise ConfigError(f"SimCSE encodes sentences; backbone.name={ctx.backbone_section.get('name')} is not a text "
                          f"encoder (minilm, hf_text, text_transformer)")
    return backbone, dim


register("methods", "simcse")(MethodSpec(config_class=SimCSEConfig,
                                         build=lambda ctx, cfg: SimCSE(*_check_text(ctx), cfg, supervised=False),
                                         data=("text",)))
register("methods", "simcse-sup")(MethodSpec(config_class=SimCSESupConfig,
                                             build=lambda ctx, cfg: SimCSE(*_check_text(ctx), cfg, supervised=True),
                                             data=("text",)))
