"""Datasets that only decode: items are ``(image uint8 [C, H, W], label int (-1 unlabeled), index int)``.

``load_splits(cfg.data)`` gives a run's pretraining data and evaluation sides; named datasets register
themselves in ``contrastive.data.named``; image folders are read by ``contrastive.data.folder``.
"""

from contrastive.data.datasets import (
    Concat,
    ImageDataset,
    Splits,
    Subset,
    TensorImages,
    collate_skip_corrupt,
    is_labelled,
    subset,
)
from contrastive.data.folder import IMAGE_EXTENSIONS, FolderImages, decode_image, open_folder
from contrastive.data.splits import hold_out, load_splits, resolve_dataset

__all__ = ["IMAGE_EXTENSIONS", "Concat", "FolderImages", "ImageDataset", "Splits", "Subset", "TensorImages",
           "collate_skip_corrupt", "decode_image", "hold_out", "is_labelled", "load_splits", "open_folder",
           "resolve_dataset", "subset"]
