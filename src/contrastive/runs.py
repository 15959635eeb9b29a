"""A run's files, read and written in one place: the one loader of runs, and the files a run folder holds.

A pretraining run folder holds ``config.yaml``, ``checkpoint.pt`` (the trainer's: the whole method, optimiser
and random state), ``encoder.pt`` (the evaluated encoder alone), ``metrics.csv`` and ``results.json``.
:func:`load_run` turns a run folder or either ``.pt`` file into a :class:`Run`: the run's config, the context
its method was built from, the preprocessing its encoder reads, and the encoder (and, from a checkpoint, the
whole method) with the saved weights, in eval mode on the CPU. Every command and stage that reads a pretraining
run reads it here. Both files are read with ``weights_only``, so a file from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch import nn

from contrastive import distributed
from contrastive.config import Config, DataConfig, config_from_tree, to_dict
from contrastive.errors import CheckpointError, ConfigError
from contrastive.files import atomic_write_text
from contrastive.methods import build_method
from contrastive.methods.base import BuildContext, Method
from contrastive.modalities import modality_named
from contrastive.training.checkpoint import atomic_save, is_checkpoint, read_file
from contrastive.training.trainer import CHECKPOINT_NAME

log = logging.getLogger("contrastive")

ENCODER_FORMAT = "contrastive-encoder/2"
ENCODER_NAME = "encoder.pt"
# What a run (pretraining, evaluation or a stage) writes into its folder, and of those what it produces: a folder
# holding a product holds a run (one that stopped before producing any, its config.yaml alone, does not).
RUN_FILES = ("config.yaml", CHECKPOINT_NAME, ENCODER_NAME, "results.json", "metrics.csv", "curves.png", "tensorboard",
             "classifier.pt", "labels.json", "stage.yaml")
PRODUCTS = (CHECKPOINT_NAME, ENCODER_NAME, "classifier.pt", "results.json")
LOCK_NAME = ".contrastive.lock"


@dataclass
class Run:
    """A pretraining run as read back: what rebuilds it and what it learned."""

    path: Path  # the file read (checkpoint.pt or encoder.pt)
    config: Config
    context: BuildContext
    preprocess: Any  # what the encoder reads: the preprocessing of the run's kind of data
    encoder: nn.Module  # Method.encoder(), in eval mode, on the CPU
    feature_dim: int
    method: Method | None  # the whole method (checkpoint.pt); None for an encoder.pt, which holds the encoder alone


def run_file(path: str | Path, *, encoder: bool = False) -> Path:
    """``path``, or when it is a run folder the checkpoint.pt in it (or, with ``encoder``, its encoder.pt
    when it holds no checkpoint)."""
    p = Path(path)
    if not p.is_dir():
        return p
    names = [CHECKPOINT_NAME, ENCODER_NAME] if encoder else [CHECKPOINT_NAME]
    found = next((p / n for n in names if (p / n).is_file()), None)
    if found is None:
        raise CheckpointError(f"{p} is a folder without a {' or '.join(names)}; give a run folder or the file")
    return found


def rebuild_method(config: Config, context: BuildContext) -> Method:
    """The method a run config and build context describe, its tensors on the meta device (a memory bank of a
    million rows costs nothing here): fill it with ``load_state_dict(..., assign=True)`` and :func:`filled`."""
    with torch.device("meta"):
        return build_method(config, context)


def filled(module: nn.Module, path: str | Path) -> nn.Module:
    """``module``, or a CheckpointError naming the tensors a file left on the meta device."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: the file has no values for {', '.join(left[:5])}; it was written by "
                              f"another version of contrastive")
    return module


def _load_weights(module: nn.Module, state: dict, path: Path, what: str) -> nn.Module:
    try:
        module.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the {what} its config describes ({e})") from None
    return filled(module, path)


def load_run(path: str | Path, *, method: bool = False) -> Run:
    """A run folder, checkpoint.pt or encoder.pt, read back (see the module docstring). ``method``: the whole
    method is needed (clip's two towers, a projection head to fine-tune from), so an encoder.pt is refused."""
    path = run_file(path, encoder=not method)
    raw = read_file(path)
    is_encoder = isinstance(raw, dict) and raw.get("format") == ENCODER_FORMAT
    if not is_encoder and not is_checkpoint(raw):
        what = "a checkpoint.pt" if method else "a checkpoint.pt nor an encoder.pt"
        raise CheckpointError(f"{path} is {'not' if method else 'neither'} {what} written by this version of "
                              f"contrastive" + ("; give the run folder or its checkpoint.pt (an encoder.pt holds "
                                                "the evaluated encoder only)" if method else ""))
    if is_encoder and method:
        raise CheckpointError(f"{path} is an encoder.pt, which holds the evaluated encoder only; give the run folder "
                              f"or its checkpoint.pt")
    preprocess = read_preprocess(raw["preprocess"], path)
    config = config_from_tree(raw["config"])
    context = BuildContext.from_dict(raw["context"], preprocess.modality)
    whole = rebuild_method(config, context)
    if is_encoder:
        encoder = _load_weights(whole.encoder(), raw["state_dict"], path, "encoder")
        feature_dim, kept = raw["feature_dim"], None
    else:
        kept = _load_weights(whole, raw["method"], path, "method").eval()
        encoder, feature_dim = kept.encoder(), kept.feature_dim
    return Run(path=path, config=config, context=context, preprocess=preprocess, encoder=encoder.eval(),
               feature_dim=feature_dim, method=kept)


def read_preprocess(d: dict, path: str | Path) -> Any:
    """The preprocessing a file saved, made back by its modality (a file written before preprocessing named its
    modality holds images)."""
    return modality_named(d.get("modality", "image"), str(path)).preprocess_from_dict(d)


def save_encoder(method: Method, cfg: Config, ctx: BuildContext, preprocess: Any, path: str | Path) -> Path:
    """encoder.pt: the evaluated encoder's weights (CPU tensors: the file loads on a machine without a GPU),
    its input preprocessing, and the run config and build context that rebuild its architecture."""
    encoder = method.encoder()
    return atomic_save({"format": ENCODER_FORMAT, "backbone": cfg.backbone["name"], "feature_dim": method.feature_dim,
                        "preprocess": asdict(preprocess), "config": to_dict(cfg), "context": asdict(ctx),
                        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}}, path)


def write_results(results: dict, folder: str | Path) -> Path:
    """results.json, written atomically and as strict JSON: a number that is not finite (a NaN accuracy) is null."""
    return atomic_write_text(Path(folder) / "results.json", json.dumps(_finite(results), indent=2, allow_nan=False)
                             + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_config(cfg: Config, path: str | Path) -> Path:
    """config.yaml (or ``path``): the whole run config, written atomically."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


@contextmanager
def claimed(folder: str | Path, *, resume: bool = False, overwrite: bool = False,
            data: DataConfig | None = None) -> Iterator[Path]:
    """``folder`` held for one run while the block runs, for the process that writes the run's files.

    Refused with a ConfigError: a file in its place; a folder that holds another run (its ``PRODUCTS``) unless
    the run continues it (``resume``) or replaces it (``overwrite``: every run file, ``RUN_FILES``, is removed
    first, and the log names them); a folder inside one the run reads as ``data`` (its curves.png would become a
    training image of the next run); a folder another live process holds (its lock file names the process). A lock
    whose process is gone is taken over with a warning, and temporary files a killed write left behind are
    removed.
    """
    folder = Path(folder)
    check_free(folder, resume=resume, overwrite=overwrite, data=data)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    _take(lock)
    try:
        for orphan in folder.glob(".*.tmp"):  # a write killed before its rename
            orphan.unlink(missing_ok=True)
            log.info("removed %s, a temporary file an interrupted write left", orphan)
        if overwrite and not resume:
            old = [folder / n for n in RUN_FILES if (folder / n).exists()]
            if old:
                log.warning("--overwrite: removing the earlier run's %s from %s", ", ".join(p.name for p in old),
                            folder)
            for path in old:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        yield folder
    finally:
        lock.unlink(missing_ok=True)


def check_free(folder: str | Path, *, resume: bool = False, overwrite: bool = False,
               data: DataConfig | None = None) -> None:
    """The refusals of :func:`claimed` that need no lock (every process of a distributed run can check them)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; give a folder for the run's files")
    where = folder.resolve()
    for read in _folders_read(data):
        if where == read or read in where.parents:
            raise ConfigError(f"--output {folder} is inside {read}, a data folder this run reads; the run's files "
                              f"(curves.png) would become data of the next run there. Give a folder outside it")
    held = [n for n in PRODUCTS if (folder / n).exists()]
    if held and not (resume or overwrite):
        raise ConfigError(f"--output {folder} holds a run already ({', '.join(held)}); give a new folder, or "
                          f"--overwrite to replace that run (--resume {folder} continues a pretraining run)")


def _folders_read(data: DataConfig | None) -> list[Path]:
    """The folders ``data`` reads as folders of samples (a file or a named dataset is not one)."""
    if data is None:
        return []
    paths = (data.name, data.train_data, data.test_data)
    return [Path(p).resolve() for p in paths if p and Path(p).is_dir()]


def _take(lock: Path) -> None:
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _holder(lock)
            if pid is not None and host == socket.gethostname() and not _alive(pid):
                log.warning("%s was held by process %d, which is no longer running: taking it over", lock.parent, pid)
                lock.unlink(missing_ok=True)
                continue
            raise ConfigError(f"another run is writing into {lock.parent} (process {pid} on {host}, {lock}); wait for "
                              f"it to end, or give another --output") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return
    raise ConfigError(f"could not take {lock}; remove it if no run is writing into {lock.parent}")


def _holder(lock: Path) -> tuple[int | None, str]:
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None, "an unknown host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def new_run_folder(method: str, root: str | Path = "runs") -> Path:
    """A new folder for a run, ``<root>/<date>-<time>-<method>`` (a suffix when that exists), the same on every
    process of a distributed run (rank 0 picks it); ``<root>/latest`` points at it once the run holds it
    (:func:`point_latest`)."""
    root = Path(root)
    stamp = torch.tensor([int(time.time()), 0])
    if distributed.is_main():
        while (root / _run_name(stamp, method)).exists():
            stamp[1] += 1
    distributed.broadcast(stamp)
    return root / _run_name(stamp, method)


def _run_name(stamp: torch.Tensor, method: str) -> str:
    when = time.strftime("%Y%m%d-%H%M%S", time.localtime(int(stamp[0])))
    return f"{when}-{method}" + (f"-{int(stamp[1]) + 1}" if int(stamp[1]) else "")


def point_latest(folder: Path) -> None:
    """``<folder's parent>/latest`` -> ``folder`` (a relative link, replaced whole). A real folder of that name, an
    earlier version's run, is left as it is, and the log says where this run is."""
    latest = folder.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        log.warning("%s is a folder, not a link, so it keeps what it holds; this run is in %s", latest, folder)
        return
    tmp = folder.parent / f".latest.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(folder.name, target_is_directory=True)
    os.replace(tmp, latest)
