"""A run's config, resolved: defaults, then a YAML recipe, then flags, then ``key=value`` overrides, validated.

With no recipe given, the method and data named pick ``configs/<method>-<dataset>.yaml``; when there is none (a
folder of the user's own data, or a dataset the method has no recipe for), ``autoconfig.derive`` asks the data's
modality for the settings that fit the data and the device, recorded with their reasons in the ``auto`` section.
The open sections (``method:``, ``backbone:``, ``modalities:``) are checked against the parts they name.
"""

from __future__ import annotations

import copy
from pathlib import Path

from contrastive.autoconfig import derive
from contrastive.config import Config, build_dataclass, check_fields, to_dict, upgrade_tree
from contrastive.errors import ConfigError
from contrastive.methods import method_config
from contrastive.modalities import modality_named
from contrastive.nn.backbones import backbone_config
from contrastive.registry import names
from contrastive.trees import deep_merge, find_recipe, parse_override, read_yaml, set_path


def resolve_config(
    *, recipe: str | Path | dict | None = None, tree: dict | None = None, overrides: list[str] = ()
) -> Config:
    """Defaults <- recipe <- ``tree`` (e.g. from CLI flags) <- ``key=value`` overrides, validated.

    ``recipe`` is a YAML file or an already read tree (a checkpoint's config). When it is None, the method
    and dataset named in ``tree``/``overrides`` pick ``configs/<method>-<dataset>.yaml``; when there is none
    (an image folder, or a dataset the method has no recipe for), ``autoconfig.derive`` picks the recipe
    family and derives the settings that fit the data and the device, recorded in the ``auto`` section.
    """
    parsed = [parse_override(o) for o in overrides]
    layer: dict = deep_merge({}, copy.deepcopy(tree or {}))  # the overrides below never write into the caller's
    for path, value in parsed:
        set_path(layer, path, value)
    if isinstance(recipe, dict):  # a checkpoint's config
        merged = upgrade_tree(recipe)
    elif recipe is not None:  # a recipe, or a run's config.yaml
        merged = upgrade_tree(read_yaml(recipe))
    else:
        method = (layer.get("method") or {}).get("name", "simclr")
        dataset = str((layer.get("data") or {}).get("name", "digits"))
        found = find_recipe(method, dataset)
        if found is not None:
            merged = read_yaml(found)
        else:
            merged, reasons = derive(method, layer)
            merged["auto"] = reasons
    merged = deep_merge(merged, layer)
    cfg = build_dataclass(Config, merged, "")
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A new Config: ``cfg`` with ``key=value`` overrides applied and validated."""
    tree = to_dict(cfg)
    for path, value in (parse_override(o) for o in overrides):
        set_path(tree, path, value)
    out = build_dataclass(Config, tree, "")
    validate(out)
    return out


def validate(cfg: Config) -> None:
    """Value ranges of the typed fields, then the open sections against the parts they name; a ConfigError
    names the field."""
    check_fields(cfg)
    method_config(cfg)
    backbone_config(cfg.backbone)
    for name, section in cfg.modalities.items():
        if name not in names("modalities"):
            raise ConfigError(f"modalities.{name}: no such kind of data; known: {', '.join(names('modalities'))}")
        if not isinstance(section, dict):
            raise ConfigError(f"modalities.{name}: expected a section (mapping), got {section!r}")
        modality_named(name).settings(cfg)
