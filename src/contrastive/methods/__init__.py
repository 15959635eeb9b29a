"""Methods: one file each, registered under their names. Importing this package fills the registry."""

from contrastive.methods import simclr  # noqa: F401
from contrastive.methods.base import MethodSpec, StepInfo, StepOutput
from contrastive.methods.simclr import SimCLR, SimCLRConfig, SimCLRV2Config

__all__ = ["MethodSpec", "SimCLR", "SimCLRConfig", "SimCLRV2Config", "StepInfo", "StepOutput"]
