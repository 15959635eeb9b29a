"""Files the project writes, written whole or not at all: into a temporary file beside the target, flushed to
disk, then renamed over it, so a kill or a full disk never leaves half a file where a whole one was. A written
file gets the permissions the user's umask gives any new file (not the temporary file's 0600)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator


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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
