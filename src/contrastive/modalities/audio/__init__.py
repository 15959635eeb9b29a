"""Sound: folders of WAV files (class sub-folders optional) and ``spoken-digits``, held in memory as NaN-padded
clips (``clips.py``); random windows as the training views; whole clips normalised by the training statistics as
what an encoder reads; the mean and std over time of MFCCs as the baseline; settings derived from the clips'
sample rate and length for data without a recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from contrastive.config import Config, DataConfig
from contrastive.data.datasets import SampleDataset, Splits
from contrastive.errors import ConfigError, DataError
from contrastive.methods import method_spec
from contrastive.modalities.audio.clips import AudioClips, AudioViews, is_audio_folder, open_wav_folder, wav_survey
from contrastive.modalities.base import (
    Baseline,
    DataShape,
    Modality,
    Reasons,
    Trial,
    get_key,
    methods_for,
    open_tree,
    register_modality,
    split_layout,
)
from contrastive.trees import deep_merge

PAPER_WINDOW_S = 1.28  # "we train on sampled audio windows of length 20480" at 16 kHz (van den Oord et al. 2018)
FRAME_S = 0.01  # CPC's encoder downsamples 16 kHz by 160: a latent every 10 ms
CPU_WIDTH = 64  # encoder channels on a CPU (the paper's 512; the spoken-digits recipe's 64)
CPU_MAX_EPOCHS = 10  # the spoken-digits recipe's 10 epochs: about 4 minutes for 2,700 clips on two cores
# (sample rate, training clips, median and 90th percentile length in samples) of the named sets, known
# without reading them
SHAPES = {"spoken-digits": (8000, 2700, 3357, 4863)}  # measured on the FSDD training recordings


@dataclass(frozen=True)
class AudioShape(DataShape):
    """The shape of sound: ``size`` a clip's median length in samples, besides it the sample rate and the 90th
    percentile length."""

    rate: int = 0
    long: int = 0


@dataclass
class AudioConfig:
    window: int = field(default=20480, metadata={"help": "Samples in each random window cut from a clip; CPC trains "
                        "'on sampled audio windows of length 20480' (1.28 s at 16 kHz, van den Oord et al. 2018, Sec. "
                        "3.1). A shorter clip fills the start of its window and the rest is padding, which the "
                        "encoder skips."})
    gain_db: list = field(default_factory=lambda: [0.0, 0.0], metadata={"help": "Each window scaled by a random gain "
                          "drawn uniformly from [low, high] dB; [0, 0]: none, as CPC (its windows are the raw "
                          "waveform)."})
    n_mfcc: int = field(default=20, metadata={"help": "MFCCs per frame of the baseline (their mean and std over the "
                        "clip through the same kNN and linear probe); 13-20 is the usual range for speech, 20 is "
                        "librosa's default."})


@dataclass(frozen=True)
class AudioPreprocess:
    """float clips [B, 1, T] (NaN-padded, ``clips.py``) -> the same normalised by the pretraining statistics and
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


def mfcc_features(dataset: AudioClips, *, n_mfcc: int = 20) -> tuple[Tensor, Tensor]:
    """The audio baseline: per clip, the mean and std over time of ``n_mfcc`` MFCCs (librosa; 25 ms windows
    rounded up to a power of two, 10 ms hop, 40 mel bands: the usual speech front end), from the clips' own
    samples (the NaN padding left out). Returns ``(float32 [N, 2 * n_mfcc], labels int64 [N])`` in dataset
    order."""
    try:
        import librosa
    except ImportError:
        raise ConfigError("the MFCC baseline of audio data needs librosa: pip install 'contrastive[audio]', or "
                          "set eval.baseline=false") from None
    rate = dataset.sample_rate
    n_fft = 1 << math.ceil(math.log2(0.025 * rate))
    feats = torch.empty(len(dataset), 2 * n_mfcc)
    for i, clip in enumerate(dataset.clips[:, 0].numpy()):
        samples = clip[~np.isnan(clip)]
        m = librosa.feature.mfcc(y=samples, sr=rate, n_mfcc=n_mfcc, n_fft=n_fft, hop_length=rate // 100,
                                 n_mels=40)  # [n_mfcc, frames]
        feats[i] = torch.from_numpy(np.concatenate([m.mean(1), m.std(1)]))
    return feats, dataset.labels.clone()


class AudioModality(Modality):
    name = "audio"
    reads = "audio"
    accepts = "a folder of WAV files (class sub-folders optional)"
    noun = "clips"
    config_class = AudioConfig
    baseline_key = "mfcc"
    baseline_label = "MFCC"

    # -------------------------------------------------------------- detection and reading

    def claims(self, path: Path) -> bool:
        return path.is_dir() and is_audio_folder(path)

    def open(self, path: Path, cfg: DataConfig, classes: list[str] | None) -> Splits:
        return open_tree(path, cfg, classes, open_wav_folder)

    def probe(self, cfg: DataConfig, *, evaluate: bool = True) -> DataShape:
        """The clips' count, sample rate and median length from the WAV headers (at most 256 read)."""
        if cfg.name in SHAPES:
            rate, clips, typical, long = SHAPES[cfg.name]
            return AudioShape(clips, typical, 1, f"{cfg.name}: {clips:,} training clips at {rate:,} Hz, typically "
                                                 f"{typical:,} samples", 10, rate=rate, long=long)
        path = Path(cfg.name).expanduser()
        layout = split_layout(path)
        survey = wav_survey(layout[0] if layout else path)
        clips = survey.clips
        held = evaluate and layout is None and survey.labelled and cfg.train_data is None and cfg.test_data is None
        if held:
            clips -= round(cfg.holdout * clips)
        return AudioShape(clips, survey.typical, 1, f"{survey.folder}: {survey.clips:,} WAV files"
                                                    f"{f' ({clips:,} for pretraining)' if held else ''}, "
                                                    f"{survey.describe()}", survey.classes, rate=survey.rate,
                          long=survey.long)

    def check_same_input(self, pretrain: SampleDataset, other: SampleDataset) -> None:
        if other.sample_rate != pretrain.sample_rate:
            raise DataError(f"{other.name} is sampled at {other.sample_rate} Hz but the pretraining data "
                            f"{pretrain.name} at {pretrain.sample_rate} Hz; resample one of them")

    # -------------------------------------------------------------- training

    def input_shape(self, cfg: Config, dataset: SampleDataset) -> tuple[int, ...]:
        return (1, self.settings(cfg).window)

    def views(self, cfg: Config, dataset: SampleDataset) -> AudioViews:
        if cfg.views.backend != "tensor":
            raise ConfigError(f"views.backend={cfg.views.backend}: audio windows are cut batched on the training "
                              f"device; use views.backend=tensor")
        if cfg.views.groups is not None:
            raise ConfigError("views.groups: audio views have no groups; give views.n_views and "
                              "modalities.audio.window")
        if method_spec(cfg.method["name"]).view_groups is not None:
            raise ConfigError(f"the method's view groups are crops of images; audio views are windows of a clip "
                              f"(modalities.audio.window, views.n_views): train a method for audio "
                              f"({', '.join(methods_for(self.name))}) on audio")
        if not dataset.std[0] > 0:
            raise DataError(f"{dataset.name}: every sample of every clip has the same value (std 0: silence), so the "
                            f"windows cannot be normalised and nothing tells the clips apart; check the data")
        s = self.settings(cfg)
        return AudioViews(cfg.views.n_views, s.window, s.gain_db, dataset.mean, dataset.std)

    def trial(self, cfg: Config, dataset: SampleDataset, views: Any, device: torch.device) -> Trial:
        return self._trial(cfg, device)

    def _trial(self, cfg: Config, device: torch.device) -> Trial:
        """Random windows: a window's memory does not depend on its samples."""
        window, n = self.settings(cfg).window, cfg.views.n_views

        def make(count: int, generator: torch.Generator) -> list[Tensor]:
            return [torch.randn(count, 1, window, generator=generator, device=device) for _ in range(n)]

        # per clip: its windows and the float window they are cut at
        return Trial(make, (n + 1) * window * 4, f"{window}-sample windows", n)

    def planned(self, cfg: Config, shape: DataShape, device: torch.device) -> tuple[tuple[int, ...], Trial]:
        return (1, self.settings(cfg).window), self._trial(cfg, device)

    # -------------------------------------------------------------- what an encoder reads

    def preprocess(self, cfg: Config, dataset: SampleDataset) -> AudioPreprocess:
        return AudioPreprocess.for_dataset(dataset)  # whole clips: no size

    def preprocess_from_dict(self, d: dict) -> AudioPreprocess:
        return AudioPreprocess(int(d["sample_rate"]), tuple(d["mean"]), tuple(d["std"]))

    def for_encoder(self, dataset: SampleDataset, preprocess: Any) -> SampleDataset:
        super().for_encoder(dataset, preprocess)
        preprocess.check(dataset)
        return dataset

    # -------------------------------------------------------------- evaluation

    def baseline(self, cfg: Config, preprocess: AudioPreprocess, device: torch.device) -> Baseline:
        n_mfcc = self.settings(cfg).n_mfcc
        return Baseline(self.baseline_key, f"the same kNN and linear probe on the mean and std over time of {n_mfcc} "
                                           f"MFCCs (librosa; 25 ms windows, 10 ms hop)", ("knn", "linear"),
                        lambda ds: mfcc_features(ds, n_mfcc=n_mfcc))

    # -------------------------------------------------------------- settings for data without a recipe

    def derive(self, method: str, data: DataConfig, layer: dict, device: torch.device
               ) -> tuple[dict, Reasons, DataShape]:
        """The method's recipe for sound (the paper's settings), with the window the paper's 1.28 s at the clips'
        sample rate but no longer than most clips (their 90th percentile, rounded up to whole 10 ms frames), the
        encoder's strides cut to keep 10 ms frames at that rate, a narrower encoder and at most CPU_MAX_EPOCHS on a
        CPU."""
        if method not in methods_for(self.name):
            raise ConfigError(f"{data.name} holds audio data, and {method} does not train on it; methods for audio "
                              f"data: {', '.join(methods_for(self.name))}")
        shape = self.probe(data, evaluate=get_key(layer, "eval.enabled") is not False)
        cpu = device.type == "cpu"
        reasons = Reasons()
        recipe, kept = reasons.recipe(method, [f"{method}.yaml"], [f"{method}-spoken-digits.yaml"],
                                      "recipe for sound, the paper's settings")
        tree: dict = {}
        rate = shape.rate
        if get_key(layer, "modalities.audio.window") is None:
            paper = round(PAPER_WINDOW_S * rate)
            frame = round(FRAME_S * rate)
            longest = math.ceil(shape.long / frame) * frame
            window = min(paper, longest)
            tree["modalities"] = {"audio": {"window": window}}
            reasons.note("modalities.audio.window", window,
                         f"the paper's {PAPER_WINDOW_S} s at {rate:,} Hz" if window == paper else
                         f"most clips are shorter than the paper's {PAPER_WINDOW_S} s ({paper:,} samples at {rate:,} "
                         f"Hz): 90% of them fit whole", "modalities.audio.window")
        if get_key(layer, "backbone.name") is None:
            section = dict(get_key(recipe, "backbone") or {})
            strides, kernels, widths = (list(section.get(k) or []) for k in ("strides", "kernels", "widths"))
            changed = []
            while len(strides) > 1 and math.prod(strides) > FRAME_S * rate:
                strides, kernels, widths = strides[:-1], kernels[:-1], widths[:-1]
                changed.append("strides")
            if cpu and widths and max(widths) > CPU_WIDTH:
                widths = [min(w, CPU_WIDTH) for w in widths]
                changed.append("widths")
            if changed:
                tree["backbone"] = {**section, "strides": strides, "kernels": kernels, "widths": widths}
                why = []
                if "strides" in changed:
                    why.append(f"{len(strides)} layers downsampling {math.prod(strides)}: a latent every "
                               f"{1000 * math.prod(strides) / rate:g} ms at {rate:,} Hz, as the paper's 10 ms")
                if "widths" in changed:
                    why.append(f"{CPU_WIDTH} channels a layer on a CPU (the paper's {max(section['widths'])})")
                reasons.note("backbone", f"{section.get('name')} {widths}/{strides}", "; ".join(why), "--backbone")
        reasons.epochs(layer, recipe, tree, CPU_MAX_EPOCHS if cpu else None, kept,
                       "on a CPU, the spoken-digits recipe's length")
        return deep_merge(recipe, tree), reasons, shape


AUDIO = register_modality(AudioModality())

__all__ = ["AUDIO", "AudioClips", "AudioConfig", "AudioModality", "AudioPreprocess", "AudioViews", "mfcc_features"]
