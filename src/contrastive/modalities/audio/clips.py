"""Audio: WAV files (scipy.io.wavfile), clips held in memory, and random windows as the training views.

A dataset of clips holds them as one float32 tensor ``clips [N, 1, T]`` (mono, in [-1, 1]), ``T`` the longest
clip; a shorter clip ends in NaN. NaN is the padding, so a clip says its own length wherever it goes (a batch,
a window cut past its end) and nothing has to travel beside it: the encoder (``nn/audio.py``) counts NaN as
silence that is not there. Items are ``(clip [1, T], label, index)``, as images are ``(image, label, index)``.

- Any folder of WAV files: class sub-folders are labels, as for images; a flat folder is unlabeled.
- ``spoken-digits``: the Free Spoken Digit Dataset (3,000 recordings, 8 kHz, ``{digit}_{speaker}_{index}.wav``,
  10 digits x 6 speakers x 50), read from ``data.data_dir`` as ``fsdd-recordings.tar.gz`` or an unpacked
  ``fsdd/recordings`` folder (never downloaded). The usual test split: recordings with index 0-4. Two
  labellings, ``digit`` (default) and ``speaker``, chosen with ``data.label``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from contrastive.config import DataConfig
from contrastive.data.datasets import SampleDataset, Splits
from contrastive.data.locate import data_root, members
from contrastive.errors import ConfigError, DataError
from contrastive.modalities.base import register_dataset
from contrastive.modalities.image.folder import IMAGE_EXTENSIONS

log = logging.getLogger("contrastive.data")

AUDIO_EXTENSIONS = (".wav",)
FSDD_ARCHIVE = "fsdd-recordings.tar.gz"
FSDD_FOLDER = Path("fsdd", "recordings")
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
FSDD_TEST_INDICES = range(5)  # "the usual test split is index 0-4" (the FSDD README)


def read_wav(source: str | Path | io.BytesIO, name: str | None = None) -> tuple[int, np.ndarray]:
    """``(sample rate, float32 mono samples in [-1, 1])`` of a WAV file (a path or an open binary file; ``name``
    for messages). Integer PCM is scaled by its full range (int16 / 32768; unsigned 8-bit centred at 128);
    channels are averaged into one. A DataError names an unreadable or empty file."""
    from scipy.io import wavfile

    name = name or str(source)
    try:
        rate, data = wavfile.read(source)
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise DataError(f"cannot read WAV file {name} ({e}); fix or remove it, or pass data.skip_corrupt=true to "
                        f"skip unreadable files") from None
    if data.dtype == np.uint8:
        samples = (data.astype(np.float32) - 128) / 128
    elif np.issubdtype(data.dtype, np.integer):
        samples = data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    else:
        samples = data.astype(np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.size == 0:
        raise DataError(f"WAV file {name} holds no samples; remove it, or pass data.skip_corrupt=true to skip it")
    if not np.isfinite(samples).all():  # NaN is the padding of a clip here; inf would make every loss NaN
        raise DataError(f"WAV file {name} holds samples that are not finite numbers (NaN or inf); fix or remove it, or "
                        f"pass data.skip_corrupt=true to skip it")
    return int(rate), np.ascontiguousarray(samples)


def pad_clips(clips: Sequence[np.ndarray]) -> Tensor:
    """Clips of any lengths -> float32 ``[N, 1, T]``, T the longest, each clip followed by NaN."""
    out = torch.full((len(clips), 1, max(len(c) for c in clips)), float("nan"))
    for i, c in enumerate(clips):
        out[i, 0, :len(c)] = torch.from_numpy(c)
    return out


def clip_lengths(clips: Tensor) -> Tensor:
    """Samples of each clip of a NaN-padded ``[N, C, T]`` tensor -> int64 ``[N]``."""
    return (~torch.isnan(clips[:, 0])).sum(1)


def clip_stats(clips: Tensor) -> tuple[tuple[float], tuple[float]]:
    """``((mean,), (std,))`` of every sample of NaN-padded clips, padding excluded."""
    present = torch.cat([c[0, :n] for c, n in zip(clips, clip_lengths(clips).tolist())]).double()
    return (present.mean().item(),), (present.std(unbiased=False).item(),)


class AudioClips(SampleDataset):
    """Clips in memory, ``clips`` float32 ``[N, 1, T]`` NaN-padded (the dataset's ``samples``, which the trainer
    indexes), at ``sample_rate``; every item is served at the length T (``sample_shape`` [1, T]).

    ``labelings``: name -> (labels int64 [N], classes or None); ``label`` picks the one that ``labels`` and
    ``classes`` show (default: the first). ``mean``/``std``: of every sample, padding excluded (computed when
    not given).
    """

    modality = "audio"

    def __init__(self, clips: Tensor, labelings: dict[str, tuple[Tensor, list[str] | None]], *, name: str,
                 sample_rate: int, label: str | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        if clips.dtype != torch.float32 or clips.ndim != 3 or clips.shape[1] != 1:
            raise ValueError(f"clips must be float32 [N, 1, T], got {clips.dtype} {list(clips.shape)}")
        self.clips = self.samples = clips
        self.labelings = {k: (v[0].long(), v[1]) for k, v in labelings.items()}
        self.label = label or next(iter(self.labelings))
        if self.label not in self.labelings:
            raise ConfigError(f"data.label={self.label}: {name} has the labellings {', '.join(self.labelings)}")
        self.labels, self.classes = self.labelings[self.label]
        self.name = name
        self.sample_rate = sample_rate
        self.sample_shape = (1, clips.shape[-1])
        if mean is None or std is None:
            mean, std = clip_stats(clips)
        self.mean, self.std = tuple(mean), tuple(std)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return self.clips[i].clone(), int(self.labels[i]), i

    def __repr__(self) -> str:
        return (f"AudioClips({self.name!r}, {len(self)} clips at {self.sample_rate} Hz, up to {self.sample_shape[1]} "
                f"samples, label={self.label!r}, classes={self.num_classes})")

    def take(self, indices: Tensor) -> "AudioClips":
        """Clips ``indices`` as a dataset of their own (numbered 0..len-1), padded to their own longest clip."""
        clips = self.clips[indices]
        longest = int(clip_lengths(clips).max()) if len(clips) else 1
        return AudioClips(clips[..., :longest].clone(), {k: (v[indices], c) for k, (v, c) in self.labelings.items()},
                          name=self.name, sample_rate=self.sample_rate, label=self.label, mean=self.mean, std=self.std)

    def with_label(self, label: str) -> "AudioClips":
        """The same clips showing the labelling ``label`` (``data.label``)."""
        return AudioClips(self.clips, self.labelings, name=self.name, sample_rate=self.sample_rate, label=label,
                          mean=self.mean, std=self.std)


def _read_all(named: Iterable[tuple[str, object]], where: str,
              skip_corrupt: bool) -> tuple[list[int], list[np.ndarray], int]:
    """(positions read, clips, sample rate) of ``(name, path or file)`` pairs; every clip must share one rate."""
    kept, clips, rates, bad, named_list = [], [], {}, [], []
    for i, (name, source) in enumerate(named):
        named_list.append(name)
        try:
            rate, samples = read_wav(source, name)
        except DataError as e:
            if not skip_corrupt:
                raise
            bad.append(str(e))
            continue
        rates.setdefault(rate, name)
        kept.append(i)
        clips.append(samples)
    if bad:
        log.warning("skipped %d unreadable WAV file(s) in %s: %s", len(bad), where, bad[0])
    loud = [named_list[i] for i, c in zip(kept, clips) if c.size and float(np.abs(c).max()) > 1.0]
    if loud:
        log.warning("%d clip(s) of %s have samples outside [-1, 1] (float WAV files past full scale, e.g. %s); they "
                    "are read as they are", len(loud), where, loud[0])
    if not clips:
        raise DataError(f"no readable WAV files in {where}")
    if len(rates) > 1:
        (r1, f1), (r2, f2) = list(rates.items())[:2]
        raise DataError(f"{where}: {f1} is sampled at {r1} Hz but {f2} at {r2} Hz; the clips of one dataset share a "
                        f"sample rate: resample them to one (e.g. with sox or scipy.signal.resample_poly)")
    return kept, clips, next(iter(rates))


def _wav_files(folder: Path) -> list[Path]:
    found = []
    for top, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in AUDIO_EXTENSIONS]
    return sorted(found)


def is_audio_folder(path: Path) -> bool:
    """Whether ``path`` holds WAV files (at any depth) and no images: what makes a folder audio data."""
    wav = False
    for _, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        suffixes = {Path(n).suffix.lower() for n in names if not n.startswith(".")}
        if suffixes & set(IMAGE_EXTENSIONS):
            return False
        wav = wav or bool(suffixes & set(AUDIO_EXTENSIONS))
    return wav


@dataclass(frozen=True)
class WavSurvey:
    """A WAV folder's files, read from the headers of an evenly spaced sample of them."""

    folder: Path
    clips: int
    labelled: bool  # class sub-folders hold the files
    classes: int | None
    rate: int
    typical: int  # the median length, in samples
    long: int  # the 90th percentile length
    sampled: int

    def describe(self) -> str:
        return (f"{self.rate:,} Hz, typically {self.typical:,} samples ({self.typical / self.rate:.2f} s; 90% at most "
                f"{self.long / self.rate:.2f} s, of {self.sampled} sampled)")


def _header(path: Path) -> tuple[int, int]:
    """(sample rate, samples) of a WAV file from its header (the whole file for formats ``wave`` cannot read)."""
    try:
        with wave.open(str(path), "rb") as f:
            return f.getframerate(), f.getnframes()
    except (wave.Error, EOFError):
        rate, samples = read_wav(path)
        return rate, len(samples)


def wav_survey(folder: Path, sample: int = 256) -> WavSurvey:
    """Count the WAV files under ``folder`` and read the rate and length of at most ``sample`` of them."""
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of WAV files")
    per_class = {d.name: _wav_files(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    per_class = {k: v for k, v in per_class.items() if v}
    files = [f for fs in per_class.values() for f in fs] if per_class else _wav_files(folder)
    if not files:
        raise DataError(f"no WAV files in {folder} or its sub-folders; point data.name at a folder of .wav files")
    picked = files[::max(len(files) // sample, 1)][:sample]
    headers = [_header(f) for f in picked]
    rates = {r for r, _ in headers}
    if len(rates) > 1:
        raise DataError(f"{folder}: its clips are sampled at {sorted(rates)} Hz; the clips of one dataset share a "
                        f"sample rate: resample them to one (e.g. with sox or scipy.signal.resample_poly)")
    lengths = sorted(n for _, n in headers)
    return WavSurvey(folder, len(files), bool(per_class), len(per_class) or None, rates.pop(),
                     lengths[len(lengths) // 2], lengths[min(int(0.9 * len(lengths)), len(lengths) - 1)], len(picked))


def open_wav_folder(root: Path, cfg: DataConfig, classes: list[str] | None = None,
                    like: SampleDataset | None = None) -> AudioClips:
    """A folder of WAV files as clips in memory: sub-folders holding WAV files are classes (``classes`` given:
    labels index into that list, as ``folder.scan_folder``); a folder without any is unlabeled."""
    if cfg.in_memory is False:
        raise ConfigError("data.in_memory=false: audio clips are always held in memory (one float32 tensor); "
                          "leave data.in_memory unset")
    per_class = {d.name: _wav_files(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    per_class = {k: v for k, v in per_class.items() if v}
    if per_class:
        classes = classes or sorted(per_class)
        unknown = sorted(set(per_class) - set(classes))
        if unknown:
            raise DataError(f"{root}: class folder(s) {', '.join(unknown)} are not among the training classes "
                            f"({', '.join(classes)}); evaluation needs the same classes on both sides")
        files = [f for name in per_class for f in per_class[name]]
        labels = torch.tensor([classes.index(name) for name, fs in per_class.items() for _ in fs])
    else:
        files = _wav_files(root)
        if not files:
            raise DataError(f"no WAV files in {root} or its sub-folders; point data.name at a folder of .wav files")
        classes, labels = None, torch.full((len(files),), -1)
    kept, clips, rate = _read_all(((str(f), f) for f in files), str(root), cfg.skip_corrupt)
    return AudioClips(pad_clips(clips), {"class": (labels[kept], classes)}, name=str(root), sample_rate=rate)


# --------------------------------------------------------------------------------------------------
# the Free Spoken Digit Dataset


def _fsdd_recordings(cfg: DataConfig) -> tuple[list[tuple[str, object]], str]:
    """``(name, path or file)`` of every recording, in name order, and where they were found."""
    root = data_root(cfg)
    folder, archive = root / FSDD_FOLDER, root / FSDD_ARCHIVE
    if folder.is_dir():
        return [(p.name, p) for p in sorted(folder.glob("*.wav"))], str(folder)
    if archive.is_file():
        files = [(Path(name).name, io.BytesIO(data)) for name, data in members(archive, (".wav",))]
        return sorted(files, key=lambda f: f[0]), str(archive)
    raise DataError(f"spoken-digits: neither {archive} nor {folder}/ exists. The Free Spoken Digit Dataset is not "
                    f"downloaded by this package: put its recordings (github.com/Jakobovski/free-spoken-digit-dataset, "
                    f"recordings/, as {FSDD_ARCHIVE} or unpacked as fsdd/recordings/) in a folder and pass "
                    f"data.data_dir=<that folder>")


@register_dataset("spoken-digits", "audio")
def spoken_digits(cfg: DataConfig) -> Splits:
    """The Free Spoken Digit Dataset: train = recordings with index 5-49, test = index 0-4; labellings ``digit``
    and ``speaker``; normalisation statistics of the training clips."""
    recordings, where = _fsdd_recordings(cfg)
    parsed = [(_FSDD_NAME.match(name), name, source) for name, source in recordings]
    odd = [name for m, name, _ in parsed if m is None]
    if odd or not parsed:
        raise DataError(f"spoken-digits: {where} holds {'no recordings' if not parsed else odd[0]}; its files are "
                        f"named {{digit}}_{{speaker}}_{{index}}.wav")
    kept, clips, rate = _read_all(((name, source) for _, name, source in parsed), where, cfg.skip_corrupt)
    fields = [parsed[i][0].groups() for i in kept]
    speakers = sorted({s for _, s, _ in fields})
    digits = torch.tensor([int(d) for d, _, _ in fields])
    labelings = {"digit": (digits, [str(d) for d in range(10)]),
                 "speaker": (torch.tensor([speakers.index(s) for _, s, _ in fields]), speakers)}
    test = torch.tensor([int(i) in FSDD_TEST_INDICES for _, _, i in fields])
    sides = {"train": (~test).nonzero().flatten(), "test": test.nonzero().flatten()}
    if not all(len(idx) for idx in sides.values()):
        raise DataError(f"spoken-digits: {where} has no {'test' if test.all() else 'training'} recordings (index 0-4 "
                        f"test, 5-49 train)")
    padded = {split: pad_clips([clips[i] for i in idx.tolist()]) for split, idx in sides.items()}
    mean, std = clip_stats(padded["train"])
    train, test_ds = (AudioClips(padded[split], {k: (v[idx], c) for k, (v, c) in labelings.items()},
                                 name=f"spoken-digits/{split}", sample_rate=rate, mean=mean, std=std)
                      for split, idx in sides.items())
    return Splits(train, train, test_ds, note=f"spoken-digits ({where}): recordings with index 5-49 for training "
                                             f"({len(train)}), 0-4 for testing ({len(test_ds)})")



# --------------------------------------------------------------------------------------------------
# views


class AudioViews:
    """``n_views`` random windows of ``window`` samples from every clip of a batch, on its device.

    ``AudioViews(n_views, window, gain_db, mean, std)(clips, generator)``: clips float32 ``[B, 1, T]`` NaN-padded ->
    one float32 ``[B, 1, window]`` per view, normalised by mean/std. A window starts uniformly where it fits inside
    its clip (CPC samples its windows from longer utterances); a clip shorter than the window starts it and is
    followed by NaN padding, which the encoder skips. ``gain_db`` [low, high] scales each window by a random gain.
    """

    def __init__(self, n_views: int, window: int, gain_db: Sequence[float], mean: Sequence[float],
                 std: Sequence[float]):
        if not isinstance(n_views, int) or n_views < 1:
            raise ConfigError(f"views.n_views: expected an integer >= 1, got {n_views!r}")
        if not isinstance(window, int) or window < 1:
            raise ConfigError(f"modalities.audio.window: expected a number of samples >= 1, got {window!r}")
        g = gain_db
        if not (isinstance(g, (list, tuple)) and len(g) == 2 and all(isinstance(v, (int, float)) for v in g)
                and g[0] <= g[1]):
            raise ConfigError(f"modalities.audio.gain_db: expected [low, high] in dB with low <= high, got {g!r}")
        self.window, self.count, self.n_global, self.size = window, n_views, n_views, window
        self.gain_db = (float(g[0]), float(g[1]))
        self.mean, self.std = float(mean[0]), float(std[0])

    def __call__(self, clips: Tensor, generator: torch.Generator, index: Tensor | None = None) -> list[Tensor]:
        if not clips.is_floating_point() or clips.ndim != 3 or clips.shape[1] != 1:
            raise ValueError(f"AudioViews expects float clips [B, 1, T], got {clips.dtype} {tuple(clips.shape)}")
        b, _, t = clips.shape
        room = (clip_lengths(clips) - self.window).clamp_min(0)  # [B] positions a window may start at, less one
        steps = torch.arange(self.window, device=clips.device)  # [W]
        low, high = self.gain_db
        views = []
        for _ in range(self.count):
            u = torch.rand(b, 2, generator=generator, device=clips.device)  # [B, (start, gain)]
            start = torch.minimum((u[:, 0] * (room + 1)).long(), room)  # [B]
            at = start[:, None] + steps  # [B, W]
            x = clips[:, 0].gather(1, at.clamp_max(t - 1)).masked_fill(at >= t, float("nan"))  # [B, W]
            if high > 0 or low < 0:
                x = x * torch.pow(10.0, (low + (high - low) * u[:, 1:]) / 20)
            views.append(((x - self.mean) / self.std)[:, None])
        return views
