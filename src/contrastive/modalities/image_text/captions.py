"""Image-caption pairs: images held in memory with their captions, as CLIP (Radford et al. 2021) trains on them.

A dataset of pairs is a :class:`TensorImages` whose image ``i`` comes with ``captions[i]`` (one or more) and
``image_names[i]``; items stay ``(image uint8 [3, S, S], -1, i)`` and the captions are read by index, so the
image side goes through the loaders and views of images unchanged.

- Any folder holding a captions file (``CAPTION_FILES``) and the images it names, at any depth (the Kaggle
  Flickr8k layout: ``captions.txt`` beside ``Images/``). Three formats, told apart by content: Flickr8k token
  files (``name#n<TAB>caption``), plain TSV (``name<TAB>caption``) and CSV with the header ``image,caption``.
- ``flickr8k``: Flickr8k (Hodosh, Young and Hockenmaier 2013, 5 captions per image) as the shared
  ``flickr8k-128.tar.gz`` holds it (``flickr8k-128/``: ``images/*.jpg`` at 128x128, ``Flickr8k.token.txt``,
  ``Flickr_8k.trainImages.txt``, ``Flickr_8k.devImages.txt``), read from ``data.data_dir`` as that archive or
  unpacked (never downloaded). Pretraining reads the 6,000 training images; retrieval is scored on the 1,000
  development images, because the archive does not hold the test images.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from contrastive.config import DataConfig
from contrastive.data.datasets import Splits
from contrastive.data.locate import data_root, members
from contrastive.errors import ConfigError, DataError
from contrastive.modalities.base import register_dataset
from contrastive.modalities.image.datasets import TensorImages
from contrastive.modalities.image.folder import _load_into_memory, list_images, survey_sizes
from contrastive.modalities.text.rows import tokenize

log = logging.getLogger("contrastive.data")

# Looked for in this order; the first one present is the folder's captions file.
CAPTION_FILES = ("captions.txt", "captions.tsv", "captions.csv", "Flickr8k.token.txt")
FLICKR8K_ARCHIVE = "flickr8k-128.tar.gz"
FLICKR8K_FOLDER = "flickr8k-128"
FLICKR8K_TOKENS = "Flickr8k.token.txt"
FLICKR8K_LISTS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt"}
FLICKR8K_SIZE = 128  # the shared archive's images are 128x128
# (channels, native side, pretraining images), as named.SHAPES gives them for the other named datasets
FLICKR8K_SHAPE = (3, 128, 6000)

_TOKEN_ID = re.compile(r"^(.+)#(\d+)$")  # Flickr8k's caption id: "<image file name>#<0-4>"


class ImageCaptions(TensorImages):
    """Images ``pixels [N, C, H, H]`` (served at ``size``, as TensorImages) with ``captions[i]``, the captions
    of image ``i`` in file order (at least one each), and ``image_names[i]``, its file name. Unlabeled: labels
    are -1 and ``classes`` None. ``mean``/``std`` None: measured on these images."""

    modality = "image-text"

    def __init__(self, pixels: Tensor, captions: Sequence[Sequence[str]], image_names: Sequence[str], *,
                 name: str, size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        if not len(captions) == len(image_names) == len(pixels):
            raise ValueError(f"{len(pixels)} images, {len(captions)} caption lists and {len(image_names)} names")
        empty = next((n for n, c in zip(image_names, captions) if not c), None)
        if empty is not None:
            raise ValueError(f"image {empty} has no caption")
        super().__init__(pixels, torch.full((len(pixels),), -1, dtype=torch.long), name=name, classes=None,
                         size=size, mean=mean, std=std)
        self.captions = [list(c) for c in captions]
        self.image_names = list(image_names)
        # once tokenised (``tokenized``): every image's captions as token ids [N, K, L] (K the most captions of an
        # image, missing rows padding), the count of each image's captions [N], the padding id
        self.caption_ids: Tensor | None = None
        self.caption_counts: Tensor | None = None
        self.pad_id: int | None = None

    def tokenized(self, tokenizer: Any, max_tokens: int) -> "ImageCaptions":
        """A copy holding every caption's token ids under ``tokenizer``, truncated at ``max_tokens``."""
        out = self.take(torch.arange(len(self)))
        flat = [c for caps in self.captions for c in caps]
        ids = tokenize(flat, tokenizer, max_tokens, name=self.name)  # [M, L]
        counts = torch.tensor([len(c) for c in self.captions], dtype=torch.long)
        tokens = torch.full((len(self), int(counts.max()), ids.shape[1]), int(tokenizer.pad_token_id), dtype=torch.long)
        at = torch.cumsum(counts, 0) - counts
        for k in range(tokens.shape[1]):
            has = counts > k
            tokens[has, k] = ids[at[has] + k]
        out.caption_ids, out.caption_counts, out.pad_id = tokens, counts, int(tokenizer.pad_token_id)
        return out

    def __repr__(self) -> str:
        return (f"ImageCaptions({self.name!r}, {len(self)} images, {sum(map(len, self.captions))} captions, "
                f"{self.channels}x{self.image_size}x{self.image_size})")

    def take(self, indices: Tensor) -> "ImageCaptions":
        """Images ``indices`` with their captions and names (and token ids), numbered 0..len-1, sharing these
        statistics."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        keep = idx.tolist()
        out = ImageCaptions(self.pixels[idx], [self.captions[i] for i in keep], [self.image_names[i] for i in keep],
                            name=self.name, size=self.image_size, mean=self.mean, std=self.std)
        if self.caption_ids is not None:
            out.caption_ids, out.caption_counts = self.caption_ids[idx], self.caption_counts[idx]
            out.pad_id = self.pad_id
        return out


# --------------------------------------------------------------------------------------------------
# captions files


def _decode_text(data: bytes, where: str, encoding: str | None = None) -> list[str]:
    """The lines of a text file in ``encoding`` (None: UTF-8, a byte-order mark dropped), ending at \\n, \\r\\n or
    \\r."""
    try:
        text = data.decode(encoding or "utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{where}, line {line}: not valid {encoding or 'UTF-8'} ({e.reason} at byte {e.start}); "
                        f"give the file's encoding (data.encoding, for example data.encoding=latin-1)") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and not lines[-1] else lines


def _is_csv_header(line: str) -> bool:
    fields = next(csv.reader([line]), [])
    return [f.strip().lower() for f in fields] == ["image", "caption"]


def _parse_captions(lines: list[str], where: str) -> dict[str, list[str]]:
    """Image name -> captions of the lines of a captions file (``where`` names it in messages)."""
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise DataError(f"{where}: no captions (the file is empty or blank)")
    out: dict[str, list[str]] = defaultdict(list)
    first = numbered[0][1]
    if _is_csv_header(first):
        rows = csv.reader(lines[numbered[0][0]:])  # after the header; a quoted caption may span lines
        for row in rows:
            line = numbered[0][0] + rows.line_num
            if not row or len(row) == 1 and not row[0].strip():
                continue
            if len(row) != 2 or not row[0].strip():
                raise DataError(f"{where}, line {line}: {len(row)} field(s) where 2 were expected (image,caption); "
                                f"quote a caption that holds a comma")
            _add(out, row[0].strip(), row[1], where, line)
        return _found(out, where)
    if "\t" not in first:
        raise DataError(f"{where}, line {numbered[0][0]}: not a captions file: expected Flickr8k token lines "
                        f"(name#n<TAB>caption), name<TAB>caption lines, or CSV with the header image,caption")
    if [f.strip().lower() for f in first.split("\t")] == ["image", "caption"]:  # a TSV header
        numbered = numbered[1:]
    # token ids or plain names, as the first caption line has them
    tokens = bool(numbered) and _TOKEN_ID.match(numbered[0][1].split("\t", 1)[0].strip()) is not None
    for line, text in numbered:
        fields = text.split("\t")
        if len(fields) != 2 or not fields[0].strip():
            raise DataError(f"{where}, line {line}: expected {'name#n' if tokens else 'name'}<TAB>caption, got "
                            f"{len(fields)} tab-separated field(s)")
        name = fields[0].strip()
        if tokens:
            m = _TOKEN_ID.match(name)
            if m is None:
                raise DataError(f"{where}, line {line}: caption id {name!r} is not <image name>#<n> as on the "
                                f"file's first line")
            name = m.group(1)
        _add(out, name, fields[1], where, line)
    return _found(out, where)


def _found(out: dict[str, list[str]], where: str) -> dict[str, list[str]]:
    if not out:
        raise DataError(f"{where}: no captions, only a header")
    return dict(out)


def _add(out: dict[str, list[str]], name: str, caption: str, where: str, line: int) -> None:
    caption = caption.strip()
    if not caption:
        raise DataError(f"{where}, line {line}: empty caption for {name}; give it a caption or remove the line")
    out[name].append(caption)


def read_captions(path: str | Path, encoding: str | None = None) -> dict[str, list[str]]:
    """Image file name -> its captions in file order, from a Flickr8k token file (``name#n<TAB>caption``), a
    plain TSV file (``name<TAB>caption``, an ``image<TAB>caption`` header allowed) or a CSV file with the
    header ``image,caption`` (Kaggle's Flickr8k ``captions.txt``; captions quoted as Excel writes them), told
    apart by the first line. Blank lines are skipped; a malformed line or an empty caption is a DataError
    naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such captions file")
    return _parse_captions(_decode_text(path.read_bytes(), str(path), encoding), str(path))


def caption_file(folder: str | Path) -> Path | None:
    """The first of CAPTION_FILES in ``folder``, or None."""
    folder = Path(folder)
    return next((folder / n for n in CAPTION_FILES if (folder / n).is_file()), None)


def is_caption_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a captions file (one of CAPTION_FILES)."""
    return Path(path).is_dir() and caption_file(path) is not None


def _check_in_memory(cfg: DataConfig) -> None:
    if cfg.in_memory is False:
        raise ConfigError("data.in_memory=false: image-caption data is always decoded into memory (one uint8 "
                          "tensor beside its captions); leave data.in_memory unset")


def _decode(sources: Sequence[Path | _Member], size: int, where: Path, cfg: DataConfig) -> tuple[Tensor, list[int]]:
    """``(pixels uint8 [n, 3, size, size], positions in sources of those n)``: the readable ``sources`` (paths,
    or archive members as files) decoded by the image folders' loader, which with data.skip_corrupt drops
    unreadable ones; the positions travel as labels so the captions stay with their images."""
    ds = _load_into_memory(sources, torch.arange(len(sources)), root=where, classes=None, size=size, cfg=cfg)
    return ds.pixels, ds.labels.tolist()


def open_caption_folder(root: Path, cfg: DataConfig) -> ImageCaptions:
    """A folder with a captions file as image-caption pairs in memory, sorted by image name.

    The captions file (``caption_file``) names the images: by path relative to ``root``, or by file name
    alone, found at any depth. Every image it names must be there; images it does not name are skipped and
    counted in the log. Images are decoded at ``cfg.image_size`` (None: the images' median shorter side,
    as ``folder.open_folder`` chooses).
    """
    root = Path(root)
    _check_in_memory(cfg)
    source = caption_file(root)
    if source is None:
        raise DataError(f"{root}: no captions file ({', '.join(CAPTION_FILES)}); put the captions beside the "
                        f"images in one of those files")
    captions = read_captions(source, cfg.encoding)
    on_disk = list_images(root, recursive=True).files
    by_path = {p.relative_to(root).as_posix(): p for p in on_disk}
    by_name: dict[str, list[Path]] = defaultdict(list)
    for p in on_disk:
        by_name[p.name].append(p)
    names = sorted(captions)
    files, missing = [], []
    for name in names:
        if name in by_path:  # a path relative to root (a bare name: an image at the top)
            files.append(by_path[name])
        elif "/" not in name and name in by_name:
            hits = by_name[name]
            if len(hits) > 1:
                raise DataError(f"{source} names {name}, and {root} holds {len(hits)} images of that name "
                                f"({hits[0]}, {hits[1]}); give the image's path relative to {root} instead")
            files.append(hits[0])
        else:
            missing.append(name)
    if missing:
        raise DataError(f"{source} names {len(missing)} image(s) that are not under {root}: "
                        f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}; put them there or "
                        f"remove their lines from {source.name}")
    extra = len(on_disk) - len(set(files))
    if extra:
        log.info("%s: skipped %d image(s) that %s gives no caption", root, extra, source.name)
    size = cfg.image_size or survey_sizes(files).typical
    pixels, kept = _decode(files, size, root, cfg)
    return ImageCaptions(pixels, [captions[names[i]] for i in kept], [names[i] for i in kept], name=str(root))


# --------------------------------------------------------------------------------------------------
# Flickr8k


class _Member(io.BytesIO):
    """An archive member's bytes, read like a file, that messages name as ``archive/member``."""

    def __init__(self, data: bytes, where: str):
        super().__init__(data)
        self.where = where

    def __str__(self) -> str:
        return self.where


def _flickr8k_files(cfg: DataConfig) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, object], str]:
    """``(captions, {"train": names, "dev": names}, image name -> path or file, where)`` from the unpacked
    folder or the archive under ``data_root(cfg)``."""
    root = data_root(cfg)
    folder, archive = root / FLICKR8K_FOLDER, root / FLICKR8K_ARCHIVE
    texts = (FLICKR8K_TOKENS, *FLICKR8K_LISTS.values())
    if folder.is_dir():
        lines = {}
        for n in texts:
            if not (folder / n).is_file():
                raise DataError(f"flickr8k: {folder} has no {n}; unpack {FLICKR8K_ARCHIVE} there again")
            lines[n] = (_decode_text((folder / n).read_bytes(), str(folder / n)), str(folder / n))
        images: dict[str, object] = {p.name: p for p in list_images(folder / "images", recursive=False).files}
        where = str(folder)
    elif archive.is_file():
        lines, images = {}, {}
        for path, data in members(archive, (".jpg", ".jpeg", ".JPG", ".JPEG", *texts)):
            name = Path(path).name
            if name.startswith("."):
                continue
            if name.lower().endswith((".jpg", ".jpeg")):
                images[name] = _Member(data, f"{archive}/{path}")
            elif name in texts:
                lines[name] = (_decode_text(data, f"{archive}/{path}"), f"{archive}/{path}")
        absent = [n for n in texts if n not in lines]
        if absent:
            raise DataError(f"flickr8k: {archive} holds no {', '.join(absent)}; it is not the flickr8k-128 archive "
                            f"({FLICKR8K_FOLDER}/ with images/, {', '.join(texts)})")
        where = str(archive)
    else:
        raise DataError(f"flickr8k: neither {archive} nor {folder}/ exists. Flickr8k is not downloaded by this "
                        f"package: put {FLICKR8K_ARCHIVE} (or its unpacked {FLICKR8K_FOLDER}/ folder: images/, "
                        f"{', '.join(texts)}) in a folder and pass data.data_dir=<that folder>")
    captions = _parse_captions(*lines[FLICKR8K_TOKENS])
    sides = {side: [s for s in (line.strip() for line in lines[f][0]) if s] for side, f in FLICKR8K_LISTS.items()}
    for side, names in sides.items():
        listed = FLICKR8K_LISTS[side]
        if not names:
            raise DataError(f"flickr8k: {where}: {listed} lists no images")
        for what, absent in (("no caption in " + FLICKR8K_TOKENS, [n for n in names if n not in captions]),
                             ("no image file", [n for n in names if n not in images])):
            if absent:
                raise DataError(f"flickr8k: {where}: {len(absent)} image(s) of {listed} have {what} "
                                f"({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}); the files are "
                                f"incomplete: unpack or copy {FLICKR8K_ARCHIVE} again")
    return captions, sides, images, where


@register_dataset("flickr8k", "image-text")
def flickr8k(cfg: DataConfig) -> Splits:
    """Flickr8k image-caption pairs: pretrain = the images of ``Flickr_8k.trainImages.txt`` (6,000), eval_test =
    those of ``Flickr_8k.devImages.txt`` (1,000), each in its list's order with its 5 captions; eval_train None.
    Decoded at ``cfg.image_size`` or 128; normalisation statistics of the training images, on both sides."""
    _check_in_memory(cfg)
    captions, sides, images, where = _flickr8k_files(cfg)
    names = sides["train"] + sides["dev"]
    pixels, kept = _decode([images[n] for n in names], cfg.image_size or FLICKR8K_SIZE, Path(where), cfg)
    n_train = len(sides["train"])
    at = {"train": [j for j, i in enumerate(kept) if i < n_train],  # rows of pixels, per side
          "dev": [j for j, i in enumerate(kept) if i >= n_train]}
    if not all(at.values()):
        raise DataError(f"flickr8k: {where}: none of the {'training' if not at['train'] else 'dev'} images "
                        f"is readable")

    def side(split: str, **stats: tuple[float, ...]) -> ImageCaptions:
        named = [names[kept[j]] for j in at[split]]
        return ImageCaptions(pixels[at[split]], [captions[n] for n in named], named, name=f"flickr8k/{split}",
                             **stats)

    train = side("train")
    dev = side("dev", mean=train.mean, std=train.std)
    return Splits(train, None, dev, note=f"flickr8k ({where}): the {len(train):,} {FLICKR8K_LISTS['train']} images "
                                         f"for pretraining; retrieval scored on the {len(dev):,} "
                                         f"{FLICKR8K_LISTS['dev']} images (the test images are not in the archive)")
