"""Kinds of data, each a registered modality that owns everything particular to it (``base.Modality``): image,
audio, text and image-text. Importing this package registers them all; ``splits`` opens any data by name or path
through the modality that claims it."""

import importlib
import pkgutil

from contrastive.modalities.base import DataShape, Modality, Trial, register_dataset, register_modality
from contrastive.modalities.splits import (
    detect,
    load_splits,
    modalities,
    modality_named,
    modality_of,
    resolve_dataset,
    seen_in_pretraining,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.ispkg:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DataShape", "Modality", "Trial", "detect", "load_splits", "modalities", "modality_named", "modality_of",
           "register_dataset", "register_modality", "resolve_dataset", "seen_in_pretraining"]
