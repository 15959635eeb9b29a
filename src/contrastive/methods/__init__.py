"""Methods: one file each, registered under their names. Importing this package imports every method
module in it, which fills the registry."""

import importlib
import pkgutil

from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.methods.simclr import SimCLR, SimCLRConfig, SimCLRV2Config

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Batch", "BuildContext", "Method", "MethodSpec", "SimCLR", "SimCLRConfig", "SimCLRV2Config", "StepInfo",
           "StepOutput"]
