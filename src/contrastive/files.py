"""Files the project writes, written whole or not at all: into a temporary file beside the target, flushed to
disk, then renamed over it, so a kill or a full disk never leaves half a file where a whole one was. A written
file gets the permissions the user's umask gives any new file (not the temporary file's 0600). A write that
finds the disk full is an OutOfSpaceError naming the file and the folder, whatever the writer raised."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

from contrastive.errors import OutOfSpaceError

# bytes free below which a writer's failure is taken for a full disk (torch's C++ writer says "unexpected pos")
FULL = 1 << 20


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (made if missing) for a writer that takes a path; renamed to
    ``path`` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        full = _out_of_space(e, path.parent)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise OutOfSpaceError(f"no space left on the disk of {path.parent} to write {path.name}; "
                                  f"{'the earlier one is untouched; ' if path.exists() else ''}free some space "
                                  f"there, or write elsewhere") from e
        raise


def atomic_write(path: str | Path, write: Callable[[IO], None], *, binary: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, flush it to disk, then rename it to ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def _out_of_space(e: BaseException, folder: Path) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(e, RuntimeError):  # a C++ writer's own words for a failed write
        try:
            return shutil.disk_usage(folder).free < FULL
        except OSError:
            return False
    return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
