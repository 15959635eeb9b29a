"""CPC's audio encoder g_enc (van den Oord et al. 2018, Sec. 3.1): strided 1-D convolutions on the raw waveform.

"The encoder ... consists of a five layer convolutional network with strides [5, 4, 2, 2, 2], filter-sizes
[10, 8, 4, 4, 4] and 512 hidden units with ReLU activations. The total downsampling factor of the network is 160
so that there is a feature vector for every 10ms of speech" (at 16 kHz).

Clips of different lengths travel as one tensor ``[B, C, T]`` whose shorter clips end in NaN (the padding
convention of ``data/audio.py``). Every layer zeroes its frames past the end of its clip, so a clip's frames are
the same in any batch, with any padding, as when it is encoded alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.nn.backbones import BackboneSpec
from contrastive.registry import register


@dataclass
class AudioConvConfig:
    widths: list = field(default_factory=lambda: [512] * 5, metadata={"help": "Channels of each conv layer: '512 "
                         "hidden units' in all five (CPC Sec. 3.1); narrower for a CPU."})
    kernels: list = field(default_factory=lambda: [10, 8, 4, 4, 4], metadata={"help": "Filter sizes, one per "
                          "layer: [10, 8, 4, 4, 4] (CPC Sec. 3.1)."})
    strides: list = field(default_factory=lambda: [5, 4, 2, 2, 2], metadata={"help": "Strides, one per layer: [5, "
                          "4, 2, 2, 2], a frame every 160 samples, 10 ms at 16 kHz (CPC Sec. 3.1); at 8 kHz the "
                          "first four give the same 10 ms."})


class AudioConv(nn.Module):
    """Conv1d-ReLU layers, each padded by ceil((kernel - stride) / 2) on both sides, so a clip of T samples
    (a multiple of the total stride) gives exactly T / prod(strides) frames.

    ``frames(x)``: ``[B, C, T]`` -> ``(z [B, T', D], valid [B, T'] bool)``; ``forward(x)``: the mean of the valid
    frames, ``[B, D]`` (the backbone contract). NaN samples are padding: they count as zeros, and the frames
    past the clip's end are zero and not valid.
    """

    def __init__(self, in_channels: int, widths: list[int], kernels: list[int], strides: list[int]):
        super().__init__()
        self.kernels, self.strides = list(kernels), list(strides)
        self.paddings = [(k - s + 1) // 2 for k, s in zip(kernels, strides)]
        chans = [in_channels, *widths]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, k, stride=s, padding=p)
                                   for a, b, k, s, p in zip(chans, widths, kernels, strides, self.paddings))
        self.feature_dim = widths[-1]
        self.downsampling = 1
        for s in strides:
            self.downsampling *= s
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def out_length(self, length: torch.Tensor) -> torch.Tensor:
        """Frames ``[B]`` that clips of ``length [B]`` samples give."""
        for k, s, p in zip(self.kernels, self.strides, self.paddings):
            length = ((length + 2 * p - k).div(s, rounding_mode="floor") + 1).clamp_min(0)
        return length

    def frames(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = ~torch.isnan(x)  # [B, C, T]
        length = present[:, 0].sum(1)  # [B] samples of each clip
        h = x.masked_fill(~present, 0.0)
        for conv, k, s, p in zip(self.convs, self.kernels, self.strides, self.paddings):
            length = ((length + 2 * p - k).div(s, rounding_mode="floor") + 1).clamp_min(0)
            h = torch.relu(conv(h))  # [B, D_i, T_i]
            valid = torch.arange(h.shape[-1], device=h.device) < length[:, None]  # [B, T_i]
            h = h * valid[:, None, :]  # what follows a clip is zero, whatever the batch pads it with
        return h.transpose(1, 2), valid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, valid = self.frames(x)
        return masked_mean(z, valid)


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x [B, T, D]`` averaged over the valid steps ``valid [B, T]`` of each row -> ``[B, D]`` (a row without a
    valid step gives zeros)."""
    w = valid.to(x.dtype)
    return torch.einsum("btd,bt->bd", x, w) / w.sum(1, keepdim=True).clamp_min(1)  # [B, D]


def cpc_audio_conv(cfg: AudioConvConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """:class:`AudioConv`: waveforms ``[B, C, T]`` -> ``[B, widths[-1]]``, C from ``input_shape`` [C, T] (the
    length T is not needed: a clip may have any length)."""
    lists = {"widths": cfg.widths, "kernels": cfg.kernels, "strides": cfg.strides}
    for name, values in lists.items():
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ConfigError(f"backbone.{name}={values!r}: expected a non-empty list of positive integers")
    if not len(cfg.widths) == len(cfg.kernels) == len(cfg.strides):
        raise ConfigError(f"backbone.widths, backbone.kernels and backbone.strides need one entry per layer; got "
                          f"{len(cfg.widths)}, {len(cfg.kernels)} and {len(cfg.strides)}")
    if any(k < s for k, s in zip(cfg.kernels, cfg.strides)):
        raise ConfigError(f"backbone.kernels={cfg.kernels} and backbone.strides={cfg.strides}: a kernel shorter than "
                          f"its stride skips samples; make every kernel at least its stride")
    net = AudioConv(input_shape[0], cfg.widths, cfg.kernels, cfg.strides)
    return net, net.feature_dim


register("backbones", "cpc_audio_conv")(BackboneSpec(AudioConvConfig, cpc_audio_conv, reads="audio"))
