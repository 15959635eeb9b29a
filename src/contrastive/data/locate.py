"""Where a named dataset's files live, and how they are found (or downloaded) before any process reads them.

Files are read from ``data.data_dir`` (default ``~/.cache/contrastive/data``); a dataset that torchvision can
download is downloaded there only when its files are missing and ``data.download`` is on, so nothing touches
the network when the files exist. Under torchrun rank 0 looks (and downloads) first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

from contrastive import distributed
from contrastive.config import DataConfig
from contrastive.errors import DataError

DEFAULT_ROOT = Path("~/.cache/contrastive/data")


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir or DEFAULT_ROOT).expanduser()


def locate(dataset: str, cfg: DataConfig, places: list[Path], complete: Callable[[Path], bool],
           expected: str, download: Callable[[Path], None]) -> Path:
    """The first of ``places`` that is ``complete``; else download into ``data_root(cfg)`` (when allowed)
    and look again; else a DataError naming every place looked and what to do. Under torchrun rank 0 looks
    (and downloads) first and the other processes look after it; each then reads the files itself."""
    with distributed.main_first():
        return _locate_or_download(dataset, cfg, places, complete, expected, download)


def _locate_or_download(dataset: str, cfg: DataConfig, places: list[Path], complete: Callable[[Path], bool],
                        expected: str, download: Callable[[Path], None]) -> Path:
    found = next((p for p in places if complete(p)), None)
    if found is not None:
        return found
    root = data_root(cfg)
    if not cfg.download:
        reason = ("Downloading is off (data.download=false). Pass data.data_dir=<folder holding them>, or "
                  f"data.download=true to download them through torchvision into {root}")
    else:
        try:
            download(root)
        # Whatever broke (network, disk, a checksum), the remedy is the same: put the files in place.
        except Exception as e:  # noqa: BLE001
            reason = f"Downloading through torchvision into {root} failed ({type(e).__name__}: {e})"
        else:
            found = next((p for p in places if complete(p)), None)
            if found is not None:
                return found
            reason = f"Torchvision's download into {root} did not leave them there"
        reason += "; put the files in place and pass data.data_dir=<folder holding them>"
    raise DataError(f"{dataset}: {expected} not found; looked in {', '.join(str(p) for p in places)}. {reason}.")


def torchvision_download(cls_name: str, **kwargs: Any) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets

        getattr(torchvision.datasets, cls_name)(str(root), download=True, **kwargs)

    return download


# The most one member of a dataset archive may hold when it is read into memory (a clip, an image, a captions
# file): a few kilobytes to megabytes in the sets read this way; a member past it is refused, not read.
MEMBER_CAP = 64 * 2**20


def cache_root(cfg: DataConfig) -> Path:
    """Where archives are unpacked: ``data.cache_dir``, else the default data folder."""
    return Path(cfg.cache_dir or DEFAULT_ROOT).expanduser()


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def unpacked(archive: Path, cfg: DataConfig, name: str) -> Path:
    """The folder ``archive`` (a .tar.gz) is unpacked into, once, under ``cache_root(cfg)``: keyed by the archive's
    content, so another archive of the same size is unpacked afresh, and made whole before it is used (unpacked
    beside, then renamed). Rank 0 unpacks first. A member that would land outside the folder is a DataError."""
    folder = cache_root(cfg) / f"{name}-{content_hash(archive)}"
    with distributed.main_first():
        if not folder.is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(tmp, filter="data")
            except tarfile.FilterError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise DataError(f"{archive}: member {getattr(e, 'tarinfo', None) and e.tarinfo.name!r} was not "
                                f"unpacked ({type(e).__name__}: it would be written outside the folder or is not a "
                                f"plain file); this archive is not the dataset's") from None
            except (tarfile.TarError, OSError, EOFError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise DataError(f"{archive} cannot be unpacked ({e}); is it the whole archive?") from None
            os.replace(tmp, folder)
    return folder


def members(archive: Path, suffixes: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
    """``(member name, its bytes)`` of every file of a .tar.gz whose name ends in one of ``suffixes``, in stream
    order (a gzip stream cannot seek back); a member over MEMBER_CAP is a DataError naming it."""
    with tarfile.open(archive, "r|gz") as tar:
        for m in tar:
            if not m.isfile() or not m.name.endswith(suffixes):
                continue
            if m.size > MEMBER_CAP:
                raise DataError(f"{archive}: member {m.name} holds {m.size:,} bytes, more than this dataset's files "
                                f"ever do ({MEMBER_CAP:,}); it was not read. Is this the dataset's archive?")
            yield m.name, tar.extractfile(m).read()
