"""Heads on top of backbone features: a plain MLP builder, the papers' projection heads and DINO's head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from contrastive.errors import ConfigError


def mlp(dims: list[int], *, batch_norm: bool, last_bn: bool = False, bias_last: bool = True) -> nn.Sequential:
    """An MLP through ``dims``: [B, dims[0]] -> [B, dims[-1]].

    Between layers: Linear (+ BatchNorm1d when ``batch_norm``) + ReLU; after the last Linear no
    non-linearity, only a BatchNorm1d without affine parameters when ``last_bn`` (MoCo v3's heads).
    A Linear followed by BatchNorm has no bias, since the BN's shift would cancel it; ``bias_last`` sets
    the last Linear's bias when no BN follows it.
    """
    if len(dims) < 2:
        raise ConfigError(f"an MLP needs an input and an output size, got dims={dims}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i < len(dims) - 2:
            layers.append(nn.Linear(d_in, d_out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        else:
            layers.append(nn.Linear(d_in, d_out, bias=bias_last and not last_bn))
            if last_bn:
                layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def projection_head(
    feature_dim: int, hidden_dim: int, output_dim: int, num_layers: int, batch_norm: bool
) -> nn.Sequential:
    """SimCLR's projection head g(.): [B, feature_dim] -> [B, output_dim], ``num_layers`` Linear layers.

    SimCLR v1 uses two layers (Chen et al. 2020, Sec. 2.1): "We use a MLP with one hidden layer to obtain
    z_i = g(h_i) = W(2) σ(W(1) h_i) where σ is a ReLU non-linearity." SimCLR v2 uses three (Chen et al.
    2020b, Sec. 2): "we also increase the capacity of the non-linear network g(·) (a.k.a. projection head),
    by making it deeper."

    With ``batch_norm`` every layer, the output one included, is followed by BatchNorm, as in SimCLR's
    code (v1 and v2), whose last ``linear_layer(..., use_bias=False, use_bn=True)`` normalises with a
    learnable scale and no centre (``center=use_bias``): here a BatchNorm1d whose shift is frozen at zero.
    """
    if num_layers < 1:
        raise ConfigError(f"a projection head needs at least one layer, got num_layers={num_layers}")
    dims = [feature_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
    head = mlp(dims, batch_norm=batch_norm, bias_last=not batch_norm)
    if batch_norm:
        out_bn = nn.BatchNorm1d(output_dim)
        out_bn.bias.requires_grad_(False)  # center=False: the shift stays 0, the scale learns
        head.append(out_bn)
    return head


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021, Sec. 3.1): [B, in_dim] features -> [B, out_dim] logits.

    "The projection head consists of a 3-layer multi-layer perceptron (MLP) with hidden dimension 2048 followed
    by ℓ2 normalization and a weight normalized fully connected layer with K dimensions." As
    facebookresearch/dino ``vision_transformer.py`` ``DINOHead``: Linear layers with bias, GELU between them
    (BatchNorm1d before each GELU with ``use_bn``, the option for ConvNets), the last one to ``bottleneck_dim``
    (256); the MLP's weights drawn from a normal of std 0.02 truncated at +-2, biases 0. The last layer has
    no bias and is weight-normalised, W = g v / ||v|| row by row, with g starting at 1 and, with
    ``norm_last_layer``, frozen there, so every prototype stays a unit vector.
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim, num_layers) < 1:
            raise ConfigError(f"a DINO head needs positive sizes and at least 1 layer, got in_dim={in_dim}, "
                              f"out_dim={out_dim}, hidden_dim={hidden_dim}, bottleneck_dim={bottleneck_dim}, "
                              f"num_layers={num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            linear = nn.Linear(d_in, d_out)
            nn.init.trunc_normal_(linear.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            if i < len(dims) - 2:
                layers += [nn.BatchNorm1d(d_out)] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # PyTorch's default Linear initialisation for v, as the official head (made after its trunc-normal pass)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # [out_dim, 1]; original1 is v [out_dim, bottleneck]
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] -> [B, bottleneck_dim], the L2-normalised MLP output the last layer reads."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))
