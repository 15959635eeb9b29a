"""What a run shows while it trains: metrics.csv and TensorBoard rows (MetricLogger), and the progress bar."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from contrastive import distributed
from contrastive.config import Config
from contrastive.errors import ConfigError


def progress_bar(cfg: Config, done: int, total: int):
    """One bar over the run's optimiser steps (a resumed run starts where it stopped)."""
    if not cfg.train.progress or not distributed.is_main():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


class MetricLogger:
    """metrics.csv (continued by a resume, started afresh otherwise) and, when available or asked for,
    TensorBoard."""

    def __init__(self, output: Path, tensorboard: bool | None, *, append: bool):
        self.path = output / "metrics.csv"
        if not append:
            self.path.unlink(missing_ok=True)
        self.file = None
        self.writer = None
        self.fields: list[str] | None = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise ConfigError("train.tensorboard=true but tensorboard is not installed; "
                                      "pip install tensorboard, or set train.tensorboard=false") from None
            else:
                self.writer = SummaryWriter(str(output / "tensorboard"))

    def write(self, row: dict) -> None:
        if self.file is None:
            new = not self.path.exists()
            self.file = open(self.path, "a", newline="")
            self.fields = list(row)
            self._csv = csv.DictWriter(self.file, fieldnames=self.fields)
            if new:
                self._csv.writeheader()
        self._csv.writerow({k: row.get(k) for k in self.fields})
        self.file.flush()
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
