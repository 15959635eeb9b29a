"""Image folders: a class-per-sub-folder tree (torchvision ImageFolder's layout) or a flat folder of
unlabeled images, decoded to RGB squares either once into memory or per item."""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from contrastive.config import DataConfig
from contrastive.errors import DataError
from contrastive.modalities.image.datasets import (
    ImageDataset,
    MeasuredStats,
    TensorImages,
    channel_stats,
    decide_in_memory,
    stats_indices,
)

log = logging.getLogger("contrastive.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# PIL signals a file it cannot read with any of these, depending on the format and where it breaks.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _unreadable(path: Path, reason: object) -> DataError:
    return DataError(f"cannot read image {path} ({reason}); fix or remove it, or pass data.skip_corrupt=true "
                     f"to skip unreadable images")


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, as a viewer shows it: turned by its EXIF orientation, and 16- or 32-bit
    greyscale scaled to 8 bits by its type's range (PIL's own conversion clips such values to white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        bits = 16 if img.mode.startswith("I;16") else 32
        pixels = np.asarray(img, dtype=np.int64)
        if bits == 32 and pixels.min() >= 0 and pixels.max() < 2**16:  # 16-bit PNGs PIL opens as 32-bit "I"
            bits = 16
        img = Image.fromarray((np.clip(pixels, 0, 2**bits - 1) >> (bits - 8)).astype(np.uint8), mode="L")
    return img.convert("RGB")


def decode_image(path: Path, size: int) -> Tensor:
    """The image at ``path`` as RGB uint8 ``[3, size, size]`` (``to_rgb``): shorter side resized to ``size``
    (bilinear), then centre-cropped. A DataError names the file when PIL cannot read it."""
    try:
        with Image.open(path) as img:
            img = to_rgb(img)
    except _PIL_ERRORS as e:
        raise _unreadable(path, e) from None
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


@dataclass
class Listing:
    """The image files under a folder, in sorted order, and what was passed over: hidden files and folders
    (names starting with a dot, e.g. .DS_Store, .git, macOS ._ files) and files of other types."""

    files: list[Path]
    hidden: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)

    def __add__(self, other: "Listing") -> "Listing":
        return Listing(self.files + other.files, self.hidden + other.hidden, self.other + other.other)


def list_images(folder: Path, *, recursive: bool) -> Listing:
    """The image files (by extension) in ``folder``, and in its sub-folders when ``recursive``.

    Symbolic links to files and folders are followed (a link back up the tree is entered once); hidden
    entries and non-image files are left out and listed.
    """
    listing = Listing([])
    seen: set[str] = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link loop, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        listing.hidden += [Path(top, d) for d in dirs if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in names:
            path = Path(top, name)
            if name.startswith("."):
                listing.hidden.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                listing.files.append(path)
            else:
                listing.other.append(path)
    listing.files.sort()
    return listing


def _log_ignored(root: Path, listing: Listing) -> None:
    for what, paths in (("hidden file(s) or folder(s)", listing.hidden), ("non-image file(s)", listing.other)):
        if paths:
            log.info("%s: ignored %d %s (%s%s)", root, len(paths), what, ", ".join(p.name for p in paths[:3]),
                     ", ..." if len(paths) > 3 else "")


def scan_folder(root: Path, classes: list[str] | None = None, *, log_ignored: bool = True
                ) -> tuple[list[Path], Tensor, list[str] | None]:
    """``(files, labels int64 [N], classes)`` of an image folder, in sorted, deterministic order.

    Sub-folders holding images (at any depth) are classes, as in torchvision's ImageFolder; a folder with
    none is a flat, unlabeled folder (labels -1, classes None). ``classes`` given (a test side read against
    its training side): labels index into that list, and a class sub-folder outside it is an error.
    Hidden and non-image files are ignored, and counted in the log unless ``log_ignored`` is off.
    """
    top = list_images(root, recursive=False)  # the loose images, and what else is at the top
    listing = Listing([], top.hidden, top.other)
    per_class = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        inside = list_images(d, recursive=True)
        listing += Listing([], inside.hidden, inside.other)
        if inside.files:
            per_class[d.name] = inside.files
    loose = top.files
    if log_ignored:
        _log_ignored(root, listing)
    if not per_class:
        if not loose:
            raise DataError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {root} or its "
                            f"sub-folders; point data.name (or --train-data/--test-data) at a folder of images")
        return loose, torch.full((len(loose),), -1, dtype=torch.long), None
    if loose:
        log.warning("%s: ignoring %d image(s) beside the class sub-folders (e.g. %s)", root, len(loose),
                    loose[0].name)
    if classes is None:
        classes = sorted(per_class)
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folder(s) {', '.join(unknown)} are not among the training classes "
                        f"({', '.join(classes)}); evaluation needs the same classes on both sides")
    files, labels = [], []
    for name, paths in per_class.items():
        files += paths
        labels += [classes.index(name)] * len(paths)
    return files, torch.tensor(labels, dtype=torch.long), classes


class _Decode(Dataset):
    """Item i -> ``(i, image uint8 [3, S, S])``, or ``(i, message)`` when the file is unreadable, so the
    caller decides what a bad file means with every file's outcome in hand."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Tensor | str]:
        try:
            return i, decode_image(self.files[i], self.size)
        except DataError as e:
            return i, str(e)


def _decode_batches(files: list[Path], size: int, num_workers: int) -> Iterator[list[tuple[int, Tensor | str]]]:
    loader = DataLoader(_Decode(files, size), batch_size=64, num_workers=num_workers, collate_fn=list)
    yield from loader


def _readable_batches(files: list[Path], size: int, num_workers: int) -> Iterator[Tensor]:
    for batch in _decode_batches(files, size, num_workers):
        images = [img for _, img in batch if not isinstance(img, str)]
        if images:
            yield torch.stack(images)


class FolderImages(MeasuredStats, ImageDataset):
    """Decodes ``files[i]`` each time item ``i`` is read. An unreadable file raises a DataError naming it,
    or, with ``skip_corrupt``, gives None (batch with ``collate_skip_corrupt``)."""

    def __init__(self, files: list[Path], labels: Tensor, *, name: str, classes: list[str] | None, size: int,
                 skip_corrupt: bool, num_workers: int):
        self.files = files
        self.labels = labels
        self.name = name
        self.classes = classes
        self.channels = 3
        self.image_size = size
        self.skip_corrupt = skip_corrupt
        self.num_workers = num_workers

    def __getitem__(self, i: int) -> tuple[Tensor, int, int] | None:
        try:
            image = decode_image(self.files[i], self.image_size)
        except DataError:
            if self.skip_corrupt:
                return None
            raise
        return image, int(self.labels[i]), i

    @cached_property
    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        sample = [self.files[i] for i in stats_indices(len(self)).tolist()]
        return channel_stats(_readable_batches(sample, self.image_size, self.num_workers))


# Image sizes are read from this many headers at most, evenly spaced in sorted order (so the same on every run).
SIZE_SAMPLE = 256


@dataclass(frozen=True)
class SizeSurvey:
    """Shorter sides of a sample of a folder's images, read from their headers."""

    typical: int  # the median shorter side: the decode size when data.image_size is unset
    smallest: int
    largest: int
    sampled: int  # readable headers read
    grey: int  # sampled images stored with one channel (decoded to RGB like the rest)

    def describe(self) -> str:
        spread = f", {self.smallest}-{self.largest} px" if self.smallest != self.largest else ""
        grey = f", {self.grey} greyscale, decoded to RGB" if self.grey else ""
        return f"typically {self.typical} px (the median shorter side of {self.sampled} sampled{spread}{grey})"


def survey_sizes(files: list[Path]) -> SizeSurvey:
    """The sizes of up to SIZE_SAMPLE evenly spaced images of ``files``. Unreadable files are passed over
    here (decoding names them); a DataError when none of the sample can be read."""
    step = max(len(files) // SIZE_SAMPLE, 1)
    sides, grey, first_error = [], 0, None
    for path in files[::step][:SIZE_SAMPLE]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
                grey += img.mode in ("1", "L", "LA", "I", "I;16", "F")
        except _PIL_ERRORS as e:
            first_error = first_error or _unreadable(path, e)
    if not sides:
        raise first_error or DataError(f"no images to read sizes from in {files[0].parent}")
    return SizeSurvey(int(statistics.median_low(sides)), min(sides), max(sides), len(sides), grey)


def _load_into_memory(files: list[Path], labels: Tensor, *, root: Path, classes: list[str] | None, size: int,
                      cfg: DataConfig) -> TensorImages:
    pixels = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    bad: list[tuple[int, str]] = []
    for batch in _decode_batches(files, size, cfg.num_workers):
        for i, image in batch:
            if isinstance(image, str):
                bad.append((i, image))
            else:
                pixels[i] = image
    if bad and not cfg.skip_corrupt:
        more = f" ({len(bad) - 1} more unreadable image(s) in {root})" if len(bad) > 1 else ""
        raise DataError(bad[0][1] + more)
    if bad:
        log.warning("skipped %d unreadable image(s) in %s: %s%s", len(bad), root,
                    ", ".join(str(files[i]) for i, _ in bad[:5]), ", ..." if len(bad) > 5 else "")
        keep = torch.ones(len(files), dtype=torch.bool)
        keep[[i for i, _ in bad]] = False
        if not keep.any():
            raise DataError(f"none of the {len(files)} images in {root} is readable")
        pixels, labels = pixels[keep], labels[keep]
    return TensorImages(pixels, labels, name=str(root), classes=classes)


def open_folder(root: Path, cfg: DataConfig, classes: list[str] | None = None) -> ImageDataset:
    """An image folder as a dataset of RGB ``[3, S, S]`` images, S = ``cfg.image_size`` or, when None, the
    images' median shorter side (``survey_sizes``); decoded once into memory when ``cfg.in_memory`` (unset:
    when the decoded set fits, see ``decide_in_memory``) (in
    ``cfg.num_workers`` DataLoader workers), else per item. ``classes``: see ``scan_folder``."""
    files, labels, classes = scan_folder(root, classes)
    size = cfg.image_size or survey_sizes(files).typical
    if decide_in_memory(cfg.in_memory, len(files) * 3 * size * size, f"{root} ({len(files)} images at {size} px)"):
        return _load_into_memory(files, labels, root=root, classes=classes, size=size, cfg=cfg)
    return FolderImages(files, labels, name=str(root), classes=classes, size=size,
                        skip_corrupt=cfg.skip_corrupt, num_workers=cfg.num_workers)
