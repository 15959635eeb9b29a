"""What an image encoder reads, saved with every checkpoint so any later evaluation feeds it right."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contrastive.errors import DataError
from contrastive.modalities.image.views import eval_preprocess


@dataclass(frozen=True)
class Preprocess:
    """uint8 [B,C,H,W] -> float [B,C,size,size], resized and normalised with the pretraining statistics."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    modality: str = "image"

    @classmethod
    def for_dataset(cls, dataset, size: int | None) -> "Preprocess":
        return cls(dataset.channels, size or dataset.image_size, tuple(dataset.mean), tuple(dataset.std))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["channels"]), int(d["size"]), tuple(d["mean"]), tuple(d["std"]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.channels:
            raise DataError(f"the encoder was trained on {self.channels}-channel images; this data has "
                            f"{images.shape[1]} channels")
        return eval_preprocess(images, self.mean, self.std, self.size)
