"""The data shared beside the repository (``../shared/data``, described by its README.md): a test that needs one of
its files skips, naming the file, where it is absent (a newcomer's clone has nothing beside it), and fails under
``CI=true``, where the data is always there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    """``../shared/data/<name>``; a skip naming it when it is absent (a failure under CI=true)."""
    path = SHARED / name
    if not path.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing, and CI=true says the shared data is beside the clone "
                        f"(see ../shared/data/README.md)")
        pytest.skip(f"{path} is absent (see ../shared/data/README.md); under CI=true this test runs")
    return path
