"""What the kind of data decides, so that the trainer and the evaluation never ask which kind it is.

A dataset says its modality (``dataset.modality``, "image" unless it says otherwise); its entry here gives
the training views (through ``views.make_views``), the memory check's trial views, the preprocessing an
encoder saves for evaluation, the baseline features evaluation compares with, and the backbones that read
it. Images: crops of uint8 batches, raw pixels as the baseline. Audio: random windows of NaN-padded clips
(``data/audio.py``), MFCC statistics as the baseline. Text or image-caption pairs add an entry of their own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from contrastive.config import Config, DataConfig, EvalConfig
from contrastive.data.preprocess import AudioPreprocess, Preprocess
from contrastive.errors import ConfigError, DataError


def _is_audio_backbone(section: dict) -> bool:
    from contrastive.nn.audio import AUDIO_BACKBONES

    return section.get("name") in AUDIO_BACKBONES


class ImageModality:
    name = "image"
    dims = 2  # a view is [n, C, S, S]
    baseline_key = "raw_pixel"
    baseline_protocols = ("knn",)

    def views(self, cfg: Config, dataset: Any):
        from contrastive.data.views import make_views, run_view_groups

        return make_views(cfg.views, dataset.mean, dataset.std, dataset.channels, dataset.image_size,
                          run_view_groups(cfg))

    def trial_sizes(self, cfg: Config, dataset: Any) -> tuple[list[int], int]:
        """(the side of every view of a batch, in batch order; how many are global): the memory check's trial."""
        from contrastive.data.views import run_view_groups, view_groups, view_shapes

        return view_shapes(view_groups(cfg.views, dataset.image_size, run_view_groups(cfg)), dataset.image_size)

    def describe(self, sizes: list[int]) -> str:
        return f"{sizes[0]} px views"

    def check_backbone(self, section: dict) -> None:
        if _is_audio_backbone(section):
            raise ConfigError(f"backbone.name={section['name']} reads audio waveforms, and this data is images; pick an "
                              f"image backbone (small_cnn, resnet18, ...)")

    def preprocess(self, dataset: Any, size: int | None) -> Preprocess:
        return Preprocess.for_dataset(dataset, size)

    def check_preprocess(self, preprocess: Any, dataset: Any) -> None:
        if not isinstance(preprocess, Preprocess):
            raise DataError(f"the encoder was trained on {preprocess.modality}; {dataset.name} holds images")

    def describe_baseline(self, preprocess: Preprocess, e: EvalConfig) -> str:
        return f"the same kNN on the encoder's input at {self._pixels(preprocess, e).size} px (resized, normalised pixels)"

    def baseline_features(self, dataset: Any, preprocess: Preprocess, e: EvalConfig,
                          device: torch.device) -> tuple[Tensor, Tensor]:
        from contrastive.evaluation.features import raw_pixel_features

        # every image's pixels are held at once, as floats: at most eval.raw_pixel_size px
        return raw_pixel_features(dataset, preprocess=self._pixels(preprocess, e), batch_size=e.batch_size,
                                  device=device)

    @staticmethod
    def _pixels(preprocess: Preprocess, e: EvalConfig) -> Preprocess:
        return dataclasses.replace(preprocess, size=min(preprocess.size, e.raw_pixel_size or preprocess.size))


class AudioModality:
    name = "audio"
    dims = 1  # a view is [n, C, T]
    baseline_key = "mfcc"
    baseline_protocols = ("knn", "linear")

    def views(self, cfg: Config, dataset: Any):
        from contrastive.data.views import make_views, run_view_groups

        return make_views(cfg.views, dataset.mean, dataset.std, dataset.channels, dataset.image_size,
                          run_view_groups(cfg), modality=self.name)

    def trial_sizes(self, cfg: Config, dataset: Any) -> tuple[list[int], int]:
        return [cfg.views.window] * cfg.views.n_views, cfg.views.n_views

    def describe(self, sizes: list[int]) -> str:
        return f"{sizes[0]}-sample windows"

    def check_backbone(self, section: dict) -> None:
        if not _is_audio_backbone(section):
            from contrastive.nn.audio import AUDIO_BACKBONES

            raise ConfigError(f"backbone.name={section.get('name')} reads images, and this data is audio; pick an audio "
                              f"backbone ({', '.join(AUDIO_BACKBONES)}) and an audio method (cpc-audio)")

    def preprocess(self, dataset: Any, size: int | None) -> AudioPreprocess:
        return AudioPreprocess.for_dataset(dataset)  # whole clips: no size

    def check_preprocess(self, preprocess: Any, dataset: Any) -> None:
        if not isinstance(preprocess, AudioPreprocess):
            raise DataError(f"the encoder was trained on images; {dataset.name} holds audio clips")
        preprocess.check(dataset)

    def describe_baseline(self, preprocess: AudioPreprocess, e: EvalConfig) -> str:
        return (f"the same kNN and linear probe on the mean and std over time of {e.n_mfcc} MFCCs (librosa; 25 ms "
                f"windows, 10 ms hop)")

    def baseline_features(self, dataset: Any, preprocess: AudioPreprocess, e: EvalConfig,
                          device: torch.device) -> tuple[Tensor, Tensor]:
        from contrastive.evaluation.features import mfcc_features

        return mfcc_features(dataset, n_mfcc=e.n_mfcc)


MODALITIES = {m.name: m for m in (ImageModality(), AudioModality())}


def modality_of(dataset: Any) -> ImageModality | AudioModality:
    """The entry of ``dataset``'s modality."""
    name = getattr(dataset, "modality", "image")
    if name not in MODALITIES:
        raise DataError(f"{getattr(dataset, 'name', dataset)}: no support for {name!r} data (known: "
                        f"{', '.join(MODALITIES)})")
    return MODALITIES[name]


def data_modality(cfg: DataConfig) -> str:
    """The modality of the data ``cfg`` names, known without loading it: a named dataset's (its loader's
    ``modality`` attribute), or a folder's (``audio`` when it holds WAV files and no images)."""
    from contrastive.data.audio import is_audio_folder
    from contrastive.registry import lookup, names

    if cfg.name in names("datasets"):
        return getattr(lookup("datasets", cfg.name), "modality", "image")
    path = Path(cfg.name).expanduser()
    return "audio" if path.is_dir() and is_audio_folder(path) else "image"
