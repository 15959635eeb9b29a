"""The ConvNet image encoders: ResNet-18/34/50 (torchvision's, with SimCLR's small-image stem option) and
``small_cnn`` for CPU runs; each maps float images [B, C, H, W] to pooled features [B, feature_dim]."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torchvision import models

from contrastive.errors import ConfigError
from contrastive.nn.backbones import BackboneSpec, image_input
from contrastive.registry import register


@dataclass
class ConvNetConfig:
    cifar_stem: bool | None = field(default=None, metadata={"help": "A stem that keeps the resolution (ResNet: "
                                    "3x3 stride-1 conv without max-pool, as SimCLR uses for CIFAR, B.9); None "
                                    "turns it on for images of 64 px or less."})
    norm: str = field(default="batch", metadata={"help": "Normalisation after each conv: batch (the ResNet "
                      "papers, SimCLR) or layer (GroupNorm with one group: each sample's own statistics). CPC v2 "
                      "(Henaff et al. 2019, Sec. 3) uses layer norm, since batch statistics would let a patch see "
                      "the other patches of its image."})


def norm_layer(cfg: ConvNetConfig) -> Callable[[int], nn.Module]:
    """``backbone.norm`` as a constructor ``channels -> module``; an unknown name is a ConfigError."""
    if cfg.norm == "batch":
        return nn.BatchNorm2d
    if cfg.norm == "layer":
        return lambda channels: nn.GroupNorm(1, channels)
    raise ConfigError(f"backbone.norm={cfg.norm!r}: expected batch or layer")


def uses_cifar_stem(cfg: ConvNetConfig, image_size: int) -> bool:
    """Whether the small-image stem applies: ``cfg.cifar_stem``, or when None, images of 64 px or less.

    A 7x7 stride-2 conv plus max-pool would shrink a 32 px image to 8 px before the first block; SimCLR
    replaces them for CIFAR-10 (Chen et al. 2020, Appendix B.9).
    """
    return cfg.cifar_stem if cfg.cifar_stem is not None else image_size <= 64


def _resnet(arch: str, cfg: ConvNetConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    # zero_init_residual: the last BN of each residual block starts at gamma = 0 so every block starts as
    # the identity (Goyal et al. 2017, Sec. 5.1), as SimCLR's and MoCo v3's ResNets do.
    in_channels, image_size = image_input(input_shape, arch)
    net = getattr(models, arch)(weights=None, zero_init_residual=True, norm_layer=norm_layer(cfg))
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if uses_cifar_stem(cfg, image_size):
        # "we replace the first 7x7 Conv of stride 2 with 3x3 Conv of stride 1, and also remove the first
        # max pooling operation" (SimCLR, Appendix B.9).
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # A replaced conv1 gets torchvision's own ResNet conv initialisation, not PyTorch's default.
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net, feature_dim


def resnet18(cfg: ConvNetConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """ResNet-18 (He et al. 2016) without its classifier: [B, C, H, W] -> [B, 512]."""
    return _resnet("resnet18", cfg, input_shape)


def resnet34(cfg: ConvNetConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """ResNet-34 (He et al. 2016) without its classifier: [B, C, H, W] -> [B, 512]."""
    return _resnet("resnet34", cfg, input_shape)


def resnet50(cfg: ConvNetConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """ResNet-50 (He et al. 2016), SimCLR's main encoder, without its classifier: [B, C, H, W] -> [B, 2048]."""
    return _resnet("resnet50", cfg, input_shape)


@dataclass
class SmallCNNConfig(ConvNetConfig):
    widths: list = field(default_factory=lambda: [32, 64, 128, 256], metadata={"help": "Channels of the "
                         "conv stages; the default trains at hundreds of 32 px images/s on two CPU cores, a "
                         "narrower list ([16, 32, 64, 128]: a quarter of the multiply-adds) makes a smaller "
                         "student for distillation."})


class SmallCNN(nn.Module):
    """Conv-norm-ReLU stages (default 32, 64, 128, 256 channels) and global average pooling, for CPU runs.

    Every stage after the first halves the resolution; stage 1 keeps it on small images (the CIFAR-stem
    rule) and halves it on large ones, so with four stages a 32 px image is pooled from 4x4 maps.
    Shapes: [B, C, H, W] -> [B, widths[-1]].
    """

    def __init__(self, in_channels: int, first_stride: int, widths: tuple[int, ...] = (32, 64, 128, 256),
                 norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            stride = first_stride if i == 0 else 2
            # No conv bias: the norm that follows subtracts it (batch norm) or has its own (layer norm's affine).
            layers += [
                nn.Conv2d(prev, width, kernel_size=3, stride=stride, padding=1, bias=False),
                norm(width),
                nn.ReLU(inplace=True),
            ]
            prev = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = prev
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def small_cnn(cfg: SmallCNNConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """:class:`SmallCNN`: [B, C, H, W] -> [B, widths[-1]] (256 by default)."""
    in_channels, image_size = image_input(input_shape, "small_cnn")
    widths = cfg.widths
    if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ConfigError(f"backbone.widths={widths!r}: expected a non-empty list of positive channel counts, "
                          f"for example [16, 32, 64, 128]")
    net = SmallCNN(in_channels, first_stride=1 if uses_cifar_stem(cfg, image_size) else 2, widths=tuple(widths),
                   norm=norm_layer(cfg))
    return net, net.feature_dim


for _name, _build in (("resnet18", resnet18), ("resnet34", resnet34), ("resnet50", resnet50)):
    register("backbones", _name)(BackboneSpec(ConvNetConfig, _build, reads="image"))
register("backbones", "small_cnn")(BackboneSpec(SmallCNNConfig, small_cnn, reads="image"))
