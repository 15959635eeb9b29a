"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"): an image
encoder and a text encoder trained to tell which caption goes with which image of the batch.

Its Fig. 3 pseudocode::

    I_f = image_encoder(I)                     # [n, d_i]
    T_f = text_encoder(T)                      # [n, d_t]
    I_e = l2_normalize(I_f @ W_i)              # [n, d_e] joint multimodal embedding
    T_e = l2_normalize(T_f @ W_t)
    logits = I_e @ T_e.T * exp(t)              # learned temperature
    loss = (ce(logits, arange(n), axis=0) + ce(logits, arange(n), axis=1)) / 2

``losses.clip_loss`` is that loss, each process's images against every process's captions and the other way
(gathered with gradient), so a 2-process run equals the 1-process run. The image encoder is the run's
``backbone:``; the text encoder is ``method.text`` (a text backbone section: a pretrained transformer or a small
one trained from scratch), optionally locked: the "locked text tower" of LiT (Zhai et al. 2022, which locks the
image tower) turned round, with the pretrained text encoder frozen (no gradient, no dropout) and only its linear
projection W_t trained. "The learnable temperature parameter τ was initialized to the equivalent of 0.07 ... and
clipped to prevent scaling the logits by more than 100": after every step ``log(1/τ)`` is clamped at log 100.

Evaluation reads ``encoder()`` (the image backbone: kNN and linear probe on image data) and the joint space
(``embedders()``: retrieval and zero-shot classification).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.losses import clip_loss
from contrastive.losses.clip import MAX_LOGIT_SCALE
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.nn.backbones import backbone_spec, build_backbone
from contrastive.nn.text import TEXT_BACKBONES
from contrastive.registry import register


@dataclass
class CLIPConfig:
    text: dict = field(default_factory=lambda: {"name": "minilm"}, metadata={"help": "The text encoder: a text "
                       "backbone section (name: minilm, hf_text or text_transformer, plus its fields). CLIP trains a "
                       "63M-parameter transformer from scratch; minilm starts from all-MiniLM-L6-v2."})
    embed_dim: int = field(default=256, metadata={"help": "Width of the joint embedding space (W_i, W_t); CLIP: 1024 "
                           "(RN50) to 768 (ViT-L/14). 256 suits a CPU-sized run."})
    lock_text: bool = field(default=False, metadata={"help": "Freeze the text encoder (its weights and dropout; "
                            "the projection W_t still trains): the locked-text-tower variant."})
    temperature: float = field(default=0.07, metadata={"help": "Initial τ: 'initialized to the equivalent of 0.07' "
                               "(CLIP, Sec. 2.5); the logit scale 1/τ is clipped at 100."})
    learn_temperature: bool = field(default=True, metadata={"help": "Learn τ (CLIP) or keep it fixed."})


class _TextEmbedder(nn.Module):
    def __init__(self, text: nn.Module, projection: nn.Linear):
        super().__init__()
        self.text = text
        self.projection = projection

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.projection(self.text(ids, attention_mask))


class CLIP(Method):
    min_batch = 2  # each image's caption is told apart from the batch's other captions

    def __init__(self, backbone: nn.Module, image_dim: int, text: nn.Module, text_dim: int, cfg: CLIPConfig):
        super().__init__()
        if not 0 < cfg.temperature:
            raise ConfigError(f"method.temperature={cfg.temperature}: τ must be positive")
        self.cfg = cfg
        self.feature_dim = image_dim
        self.backbone = backbone  # image encoder
        self.text = text  # token ids [n, L] -> [n, text_dim]
        self.image_projection = nn.Linear(image_dim, cfg.embed_dim, bias=False)  # W_i
        self.text_projection = nn.Linear(text_dim, cfg.embed_dim, bias=False)  # W_t
        # log(1/τ); a parameter either way, so that a checkpoint holds it
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)),
                                        requires_grad=cfg.learn_temperature)
        if cfg.lock_text:
            self.text.requires_grad_(False)

    def train(self, mode: bool = True) -> "CLIP":
        super().train(mode)
        if self.cfg.lock_text:
            self.text.eval()  # a locked tower has no dropout either: its features are those it was trained to give
        return self

    def projection_head(self) -> nn.Sequential:
        """W_i over the image encoder's features (fine-tuning may start from the joint space, --from-layer 1)."""
        return nn.Sequential(self.image_projection)

    def embedders(self) -> dict[str, nn.Module]:
        """Images and token ids -> the joint space (before normalisation)."""
        return {"image": nn.Sequential(self.backbone, self.image_projection),
                "text": _TextEmbedder(self.text, self.text_projection)}

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        if len(batch.views) != 2 or batch.views[1].dtype != torch.long:
            raise ConfigError("clip trains on image-caption pairs (one crop and one caption of each image): give "
                              "image-caption data (data.name=flickr8k or a folder with a captions file) and "
                              "views.n_views=1")
        image, caption = batch.views  # [n, C, S, S], [n, L]
        z_image = self.image_projection(self.backbone(image))  # [n, d_e]
        with torch.no_grad() if self.cfg.lock_text else nullcontext():
            h_text = self.text(caption)  # [n, d_t]
        z_text = self.text_projection(h_text)  # [n, d_e]
        loss = clip_loss(z_image, z_text, self.logit_scale)
        return StepOutput(loss=loss, metrics={"logit_scale": self.logit_scale.detach().exp()},
                          embedding=z_image.detach())

    @torch.no_grad()
    def after_step(self, updates: dict[str, torch.Tensor], step: StepInfo) -> None:
        self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))  # CLIP clips the scale at 100


def _build(ctx: BuildContext, cfg: CLIPConfig) -> CLIP:
    if not isinstance(cfg.text, dict) or backbone_spec(cfg.text, "method.text").reads != "text":
        raise ConfigError(f"method.text={cfg.text!r} is not a text encoder section; give one of "
                          f"{', '.join(TEXT_BACKBONES)}, e.g. method.text={{name: minilm}}")
    image, image_dim = ctx.build_backbone()
    text, text_dim = build_backbone(cfg.text, input_shape=(), where="method.text")  # token ids of any length
    return CLIP(image, image_dim, text, text_dim, cfg)


register("methods", "clip")(MethodSpec(config_class=CLIPConfig, build=_build, data=("image-text",),
                                       towers={"image": "backbone", "text": "method.text"}))
