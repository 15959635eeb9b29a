"""Methods: one file each, registered under their names. Importing this package imports every method
module in it, which fills the registry; ``build_method`` and ``method_config`` read a run config's ``method:``
section through it."""

import importlib
import pkgutil
from typing import Any

from contrastive.config import Config, build_dataclass
from contrastive.errors import ConfigError
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.methods.simclr import SimCLR, SimCLRConfig, SimCLRV2Config
from contrastive.registry import lookup

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def method_spec(name: str) -> MethodSpec:
    """The registry entry of the method ``name`` (a ConfigError listing the known ones otherwise)."""
    return lookup("methods", name)


def method_config(cfg: Config) -> Any:
    """The method's own typed config, built from the ``method`` section (unknown keys raise)."""
    section = dict(cfg.method)
    name = section.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("method.name is missing; pick a method, for example method.name=simclr")
    return build_dataclass(method_spec(name).config_class, section, "method")


def build_method(cfg: Config, ctx: BuildContext) -> Method:
    """The method ``cfg.method`` names, built for the run ``ctx`` describes."""
    return method_spec(cfg.method["name"]).build(ctx, method_config(cfg))


__all__ = ["Batch", "BuildContext", "Method", "MethodSpec", "SimCLR", "SimCLRConfig", "SimCLRV2Config", "StepInfo",
           "StepOutput", "build_method", "method_config", "method_spec"]
