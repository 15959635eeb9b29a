"""Vision Transformers (Dosovitskiy et al. 2021): ``vit_tiny``, ``vit_small``, ``vit_base``, [B, C, H, W] ->
[B, embed_dim], the class token after the final LayerNorm, with no classifier head.

Built on timm's ``VisionTransformer`` (the optional dependency ``pip install 'contrastive[vit]'``), which
gives us the parts that are easy to get subtly wrong: multi-head attention (fused
``scaled_dot_product_attention``), pre-norm blocks with stochastic depth (``drop_path_rate``), the patch
embedding, and, with ``dynamic_img_size=True``, bicubic interpolation of the position embedding to any
input size (multi-crop feeds 96 px crops to a model built for 224 px; at the built size the embedding is
used as it is). timm is imported only when a ViT is built, so the core install works without it.

What we set ourselves: the DeiT sizes (tiny/small/base: width 192/384/768, depth 12, heads 3/6/12,
MLP ratio 4, LayerNorm eps 1e-6), no head (``num_classes=0``, class-token pooling), no pretrained
weights, and MoCo v3's options (Chen, Xie, He 2021, Sec. 5 and facebookresearch/moco-v3 ``vits.py``):
a fixed 2-D sin-cos position embedding, a frozen random patch projection ("we freeze the patch
projection layer"), and its xavier-uniform initialisation.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.nn.backbones import BackboneSpec, image_input
from contrastive.registry import register

# name -> (embed_dim, depth, num_heads): the DeiT sizes (Touvron et al. 2021, Table 1)
SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}
POSITION_EMBEDDINGS = ("learned", "sincos")
INITS = ("trunc_normal", "xavier")


@dataclass
class ViTConfig:
    patch_size: int = field(default=16, metadata={"help": "Side of the square patches: 16 as ViT and MoCo v3 "
                            "at 224 px (14x14 tokens). For 32 px images use 4 (8x8 = 64 tokens, the usual choice "
                            "for ViTs trained on CIFAR) or 8 (4x4 = 16 tokens: faster, coarser)."})
    num_heads: int | None = field(default=None, metadata={"help": "Attention heads; None: the DeiT sizes (tiny 3, "
                                  "small 6, base 12). MoCo v3's ViT-Small has 12 (its vits.py)."})
    position_embedding: str = field(default="learned", metadata={"help": "learned (ViT, DeiT, DINO) or sincos: "
                                    "the fixed 2-D sin-cos embedding MoCo v3 uses (Chen et al. 2021, Sec. 5)."})
    freeze_patch_embed: bool = field(default=False, metadata={"help": "Keep the patch projection at its random "
                                     "initialisation: 'we freeze the patch projection layer', which removes "
                                     "the loss spikes of ViT training (MoCo v3, Sec. 4.2 and 5)."})
    init: str = field(default="trunc_normal", metadata={"help": "trunc_normal: linear weights ~ truncated "
                      "normal, std 0.02 (ViT, DeiT, DINO; timm's default); xavier: MoCo v3's xavier-uniform, "
                      "with Q, K and V as three matrices and the patch projection as a linear layer."})
    drop_path_rate: float = field(default=0.0, metadata={"help": "Stochastic depth, rising linearly to this "
                                  "rate in the last block; 0 in MoCo v3's pretraining, 0.1 in DINO's."})


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos position embedding for a ``grid`` x ``grid`` patch grid: [grid*grid, dim].

    Token ``r * grid + c`` (row r, column c, row-major as the patches are) gets
    ``[sin(r w), cos(r w), sin(c w), cos(c w)]`` with frequencies ``w_i = temperature ** (-i / (dim / 4))``,
    i = 0 .. dim/4 - 1 (Vaswani et al. 2017, in 2-D). vits.py names the coordinates the other way round
    and computes the same tensor.
    """
    if dim % 4:
        raise ConfigError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = temperature ** -(torch.arange(quarter, dtype=torch.float32) / quarter)  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = coords.repeat_interleave(grid), coords.repeat(grid)  # [grid*grid] each, row-major
    r = torch.einsum("m,d->md", rows, omega)  # [grid*grid, dim/4]
    c = torch.einsum("m,d->md", cols, omega)  # [grid*grid, dim/4]
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)


def _vision_transformer_class() -> type:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise ConfigError("the ViT backbones need timm, which is not installed; pip install 'contrastive[vit]' "
                          "(or pip install timm), or pick a ConvNet with backbone.name=resnet18") from None
    return VisionTransformer


def _build(name: str, cfg: ViTConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    in_channels, image_size = image_input(input_shape, name)
    embed_dim, depth, heads = SIZES[name]
    heads = cfg.num_heads or heads
    p = cfg.patch_size
    if p < 1 or image_size % p:
        raise ConfigError(f"backbone.patch_size={p} does not divide the {image_size} px views; pick a divisor "
                          f"(for 32 px images 4 or 8) or set views.size")
    if embed_dim % heads:
        raise ConfigError(f"backbone.num_heads={heads} does not divide {name}'s width {embed_dim}")
    if cfg.position_embedding not in POSITION_EMBEDDINGS:
        raise ConfigError(f"backbone.position_embedding={cfg.position_embedding!r}: choose "
                          f"{' or '.join(POSITION_EMBEDDINGS)}")
    if cfg.init not in INITS:
        raise ConfigError(f"backbone.init={cfg.init!r}: choose {' or '.join(INITS)}")
    if not 0 <= cfg.drop_path_rate < 1:
        raise ConfigError(f"backbone.drop_path_rate={cfg.drop_path_rate} is out of range: it must lie in [0, 1)")
    net = _vision_transformer_class()(
        img_size=image_size, patch_size=p, in_chans=in_channels, num_classes=0, global_pool="token",
        embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
        drop_path_rate=cfg.drop_path_rate, dynamic_img_size=True,
        # timm's "moco" mode is vits.py's initialisation of the linear layers (Q, K, V apart)
        weight_init="moco" if cfg.init == "xavier" else "")
    proj = net.patch_embed.proj
    if cfg.init == "xavier":
        # vits.py: xavier-uniform over the patch projection seen as a linear map of C * p * p inputs
        bound = math.sqrt(6.0 / (in_channels * p * p + embed_dim))
        with torch.no_grad():
            proj.weight.uniform_(-bound, bound)
            proj.bias.zero_()
    if cfg.position_embedding == "sincos":
        grid = image_size // p
        with torch.no_grad():
            net.pos_embed[0, 0].zero_()  # the class token's entry
            net.pos_embed[0, 1:].copy_(sincos_position_embedding(grid, embed_dim))
        net.pos_embed.requires_grad_(False)
    if cfg.freeze_patch_embed:
        proj.weight.requires_grad_(False)
        proj.bias.requires_grad_(False)
    return net, embed_dim


def is_vision_transformer(module: nn.Module) -> bool:
    """Whether ``module`` is a timm VisionTransformer (MoCo v3 picks its ViT heads and temperature by it)."""
    timm_vit = sys.modules.get("timm.models.vision_transformer")
    return timm_vit is not None and isinstance(module, timm_vit.VisionTransformer)


def without_drop_path(module: nn.Module) -> nn.Module:
    """Turn stochastic depth off in ``module``'s timm blocks, in place, and return it: DINO's teacher is a copy of
    the student without it (main_dino.py builds the teacher with no ``drop_path_rate``). A no-op without timm."""
    layers = sys.modules.get("timm.layers")
    if layers is not None:
        for m in module.modules():
            if isinstance(m, layers.DropPath):
                m.drop_prob = 0.0
    return module


def _builder(name: str):
    def build(cfg: ViTConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
        return _build(name, cfg, input_shape)

    build.__doc__ = f"{name}: [B, C, H, W] -> [B, {SIZES[name][0]}], the class token after the final norm."
    return build


for _name in SIZES:
    register("backbones", _name)(BackboneSpec(ViTConfig, _builder(_name), reads="image"))
