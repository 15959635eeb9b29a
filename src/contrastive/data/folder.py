"""Image folders: a class-per-sub-folder tree (torchvision ImageFolder's layout) or a flat folder of
unlabeled images, decoded to RGB squares either once into memory or per item."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from contrastive.config import DataConfig
from contrastive.data.datasets import ImageDataset, MeasuredStats, TensorImages, channel_stats, stats_indices
from contrastive.errors import DataError

log = logging.getLogger("contrastive.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# PIL signals a file it cannot read with any of these, depending on the format and where it breaks.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _unreadable(path: Path, reason: object) -> DataError:
    return DataError(f"cannot read image {path} ({reason}); fix or remove it, or pass data.skip_corrupt=true "
                     f"to skip unreadable images")


def decode_image(path: Path, size: int) -> Tensor:
    """The image at ``path`` as RGB uint8 ``[3, size, size]``: shorter side resized to ``size`` (bilinear),
    then centre-cropped. A DataError names the file when PIL cannot read it."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except _PIL_ERRORS as e:
        raise _unreadable(path, e) from None
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def _images_in(folder: Path, *, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[Path], Tensor, list[str] | None]:
    """``(files, labels int64 [N], classes)`` of an image folder, in sorted, deterministic order.

    Sub-folders holding images (at any depth) are classes, as in torchvision's ImageFolder; a folder with
    none is a flat, unlabeled folder (labels -1, classes None). ``classes`` given (a test side read against
    its training side): labels index into that list, and a class sub-folder outside it is an error.
    """
    per_class = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _images_in(d, recursive=True)
        if files:
            per_class[d.name] = files
    loose = _images_in(root, recursive=False)
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


def _first_size(files: list[Path], skip_corrupt: bool) -> int:
    """Shorter side of the first readable image (read from its header only)."""
    for path in files:
        try:
            with Image.open(path) as img:
                return min(img.size)
        except _PIL_ERRORS as e:
            if not skip_corrupt:
                raise _unreadable(path, e) from None
    raise DataError(f"none of the {len(files)} images in {files[0].parent} is readable")


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
    shorter side of the first image; decoded once into memory when ``cfg.in_memory`` (in
    ``cfg.num_workers`` DataLoader workers), else per item. ``classes``: see ``scan_folder``."""
    files, labels, classes = scan_folder(root, classes)
    size = cfg.image_size or _first_size(files, cfg.skip_corrupt)
    if cfg.in_memory:
        return _load_into_memory(files, labels, root=root, classes=classes, size=size, cfg=cfg)
    return FolderImages(files, labels, name=str(root), classes=classes, size=size,
                        skip_corrupt=cfg.skip_corrupt, num_workers=cfg.num_workers)
