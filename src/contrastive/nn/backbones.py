"""Backbones: encoders f(.) mapping a batch of inputs to pooled features [B, feature_dim].

Each is registered under its config name (``backbone.name``) as a :class:`BackboneSpec`: its own typed
config (the other keys of the ``backbone:`` section, as ``method:`` works), the kind of input it reads
(``reads``: image, audio, text), and a builder ``(cfg, input_shape) -> (module, feature_dim)``, ``input_shape``
being one input without the batch dimension; :func:`build_backbone` is the one entry point. The image encoders
are in ``convnets.py`` and ``vit.py``, the waveform encoder in ``audio.py``, the sentence encoders in ``text.py``;
importing ``contrastive.nn`` registers them all. No classifier is attached, and no weights are ever downloaded:
self-supervised pretraining starts from random initialisation (a text backbone may start from a local
pretrained model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from contrastive.config import build_dataclass
from contrastive.errors import ConfigError
from contrastive.registry import lookup


@dataclass(frozen=True)
class BackboneSpec:
    config_class: type
    build: Callable[..., tuple[nn.Module, int]]  # (cfg, input_shape) -> (module, feature_dim)
    reads: str  # the kind of input: a registered modality's ``reads`` (image, audio, text)


def backbone_config(section: Mapping[str, Any], where: str = "backbone") -> tuple[str, Any]:
    """``{"name": ..., **fields}`` -> (name, that backbone's typed config); unknown keys raise, naming the
    section as ``where`` (``backbone``; ``method.text`` for CLIP's text tower)."""
    fields = dict(section)
    name = fields.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name is missing; pick a backbone, for example {where}.name=resnet18")
    return name, build_dataclass(lookup("backbones", name).config_class, fields, where)


def backbone_spec(section: Mapping[str, Any], where: str = "backbone") -> BackboneSpec:
    """The registry entry of the backbone ``section`` names (a ConfigError listing the known ones otherwise)."""
    name = section.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name is missing; pick a backbone, for example {where}.name=resnet18")
    return lookup("backbones", name)


def build_backbone(section: Mapping[str, Any], *, input_shape: tuple[int, ...],
                   where: str = "backbone") -> tuple[nn.Module, int]:
    """The backbone that ``section`` (the ``backbone:`` config: name plus its own fields) names, for inputs of
    ``input_shape`` (images: [C, S, S]), and its feature dimension.

    The module maps a batch [B, *input_shape] -> [B, feature_dim]. An unknown name raises a ConfigError
    listing the registered backbones.
    """
    name, cfg = backbone_config(section, where)
    return lookup("backbones", name).build(cfg, tuple(input_shape))


def image_input(input_shape: tuple[int, ...], name: str) -> tuple[int, int]:
    """(channels, side) of images [C, S, S]; a ConfigError naming the backbone for any other input."""
    if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        raise ConfigError(f"backbone {name} reads square images [C, S, S]; this input is {list(input_shape)}")
    return input_shape[0], input_shape[-1]
