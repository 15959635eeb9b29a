"""Trees of settings: YAML files read safely (``read_yaml``; the recipes shipped in ``contrastive/recipes``),
laid over one another (``deep_merge``) and edited by ``key=value`` overrides (``parse_override``, ``set_path``).
What the values mean is ``config.py``'s; the order the layers come in is ``configure.py``'s."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from contrastive.errors import ConfigError

# Open sections: their fields depend on the part they name, so a layer that names another part replaces the
# section (the recipe's resnet18 ``cifar_stem`` does not carry over to ``backbone.name=vit_small``).
_OPEN_SECTIONS = ("method", "backbone")


def deep_merge(base: dict, update: dict, *, top: bool = True) -> dict:
    out = dict(base)
    for k, v in update.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            # a section naming another thing (backbone, method, a method's own section such as clip's text
            # tower) replaces the old one: the old one's fields would not be the new one's
            renamed = (not top or k in _OPEN_SECTIONS) and "name" in v and v["name"] != old.get("name")
            out[k] = dict(v) if renamed else deep_merge(old, v, top=False)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=0.3`` -> (["optim", "lr"], 0.3); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (for example optim.lr=0.3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot read the value as YAML ({e})") from None
    return key.split("."), value


def set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
    if len(path) == 2 and path[0] in _OPEN_SECTIONS and path[1] == "name" and node.get("name", value) != value:
        node.clear()  # another part: the previous one's fields do not apply to it
    node[path[-1]] = value


def recipe_dir() -> Path:
    return Path(str(resources.files("contrastive.recipes")))


def find_recipe(method: str, dataset: str) -> Path | None:
    """The recipe written for a method on a dataset, ``configs/<method>-<dataset>.yaml``, or None."""
    path = recipe_dir() / f"{method}-{dataset}.yaml"
    return path if path.is_file() else None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; give a path to a YAML recipe (see configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(data).__name__}")
    return data
