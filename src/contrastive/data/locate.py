"""Where a named dataset's files live, and how they are found (or downloaded) before any process reads them.

Files are read from ``data.data_dir`` (default ``~/.cache/contrastive/data``); a dataset that torchvision can
download is downloaded there only when its files are missing and ``data.download`` is on, so nothing touches
the network when the files exist. Under torchrun rank 0 looks (and downloads) first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

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
