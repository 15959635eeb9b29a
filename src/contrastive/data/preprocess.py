"""What an encoder expects as input, saved with every checkpoint so any later evaluation feeds it right: images
(``Preprocess``), audio clips (``AudioPreprocess``) or sentences (``TextPreprocess``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contrastive.errors import DataError


@dataclass(frozen=True)
class Preprocess:
    """uint8 [B,C,H,W] -> float [B,C,size,size], resized and normalised with the pretraining statistics."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_dataset(cls, dataset, size: int | None) -> "Preprocess":
        return cls(dataset.channels, size or dataset.image_size, tuple(dataset.mean), tuple(dataset.std))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess | AudioPreprocess | TextPreprocess":
        """What ``asdict`` of any kind gave back (audio and text say so in their ``modality`` field)."""
        if d.get("modality") == "audio":
            return AudioPreprocess(int(d["sample_rate"]), tuple(d["mean"]), tuple(d["std"]))
        if d.get("modality") == "text":
            return TextPreprocess(str(d["tokenizer"]), int(d["max_tokens"]), int(d["pad_id"]))
        return cls(int(d["channels"]), int(d["size"]), tuple(d["mean"]), tuple(d["std"]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from contrastive.data.views import eval_preprocess

        if images.shape[1] != self.channels:
            raise DataError(f"the encoder was trained on {self.channels}-channel images; this data has "
                            f"{images.shape[1]} channels")
        return eval_preprocess(images, self.mean, self.std, self.size)


@dataclass(frozen=True)
class AudioPreprocess:
    """float clips [B, 1, T] (NaN-padded, data/audio.py) -> the same normalised by the pretraining statistics and
    cut after the batch's longest clip; the encoder takes whole clips. Clips at another sample rate are refused
    (``check``)."""

    sample_rate: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    modality: str = "audio"

    @classmethod
    def for_dataset(cls, dataset) -> "AudioPreprocess":
        return cls(dataset.sample_rate, tuple(dataset.mean), tuple(dataset.std))

    def check(self, dataset) -> None:
        """A DataError when ``dataset`` is not audio at this sample rate."""
        rate = getattr(dataset, "sample_rate", None)
        if rate != self.sample_rate:
            what = f"{rate} Hz audio" if rate else "not audio"
            raise DataError(f"the encoder was trained on {self.sample_rate} Hz audio; {dataset.name} is {what}: "
                            f"resample it to {self.sample_rate} Hz")

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        if not clips.is_floating_point() or clips.ndim != 3 or clips.shape[1] != 1:
            raise DataError(f"the encoder was trained on mono audio clips [B, 1, T]; got {clips.dtype} "
                            f"{tuple(clips.shape)}")
        present = (~torch.isnan(clips[:, 0])).sum(1)  # [B] samples of each clip
        longest = int(present.max()) if len(clips) else 0  # what is past every clip's end is padding: cut off
        return (clips[..., :max(longest, 1)] - self.mean[0]) / self.std[0]


@dataclass(frozen=True)
class TextPreprocess:
    """Sentences are tokenised by the tokenizer in the directory ``tokenizer``, truncated at ``max_tokens``; a
    batch of token ids [B, L] padded with ``pad_id`` is cut after its longest sentence (the encoder derives the
    attention mask from the padding id)."""

    tokenizer: str
    max_tokens: int
    pad_id: int
    modality: str = "text"

    def check(self, dataset) -> None:
        if getattr(dataset, "modality", "image") != "text":
            raise DataError(f"the encoder reads sentences; {dataset.name} holds {dataset.modality} data")

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype != torch.long or ids.ndim != 2:
            raise DataError(f"a text encoder reads token ids int64 [B, L]; got {ids.dtype} {tuple(ids.shape)}")
        return trim_padding(ids, self.pad_id)


def trim_padding(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Token ids [..., L] cut after the last position where any row holds a token (one host sync)."""
    used = (ids != pad_id).flatten(0, -2).any(dim=0)  # [L]
    longest = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return ids[..., :longest]
