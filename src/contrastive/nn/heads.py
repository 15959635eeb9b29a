"""Heads on top of backbone features: a plain MLP builder and the papers' projection heads."""

from __future__ import annotations

from torch import nn

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
