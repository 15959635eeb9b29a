"""May a checkpoint continue this run? A resume continues the run it saved only: the same method, backbone, data,
views, optimiser, seed, batch and epochs, on data of the same size and labels, over as many processes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from contrastive.config import Config, config_from_tree, to_dict
from contrastive.errors import CheckpointError, ConfigError
from contrastive.methods import method_config
from contrastive.methods.base import BuildContext
from contrastive.nn.backbones import backbone_config

# checkpoint fields that must match for a resume to continue the same run
_RESUME_KEYS = [("method",), ("backbone",), ("data",), ("views",), ("optim",), ("seed",),
                ("train", "batch_size"), ("train", "epochs")]
# data fields that say where or how fast to read, not what: they may change between a run and its resume
_DATA_OPERATIONAL = {"data_dir", "download", "num_workers"}


def check_resumable(ckpt: dict, cfg: Config, context: BuildContext, dataset, path: str | Path) -> None:
    """A CheckpointError naming what differs when ``ckpt`` (read from ``path``) would not continue the run of
    ``cfg`` on ``dataset`` (its ``context``): a setting that changes the run, or other data or another number of
    processes than it started with (the same folder with images added changes the steps of an epoch, the
    schedule, the batch order and a memory bank's rows; another process count changes per-process batch
    norm)."""
    now = resolved(cfg)
    try:
        then = resolved(config_from_tree(ckpt["config"]))
    except ConfigError as e:
        raise CheckpointError(f"cannot resume from {path}: its config no longer validates ({e})") from None
    for keys in _RESUME_KEYS:
        a, b = then, now
        for k in keys:
            a, b = a[k], b[k]
        if keys == ("data",):
            a, b = ({k: v for k, v in d.items() if k not in _DATA_OPERATIONAL} for d in (a, b))
        if a != b:
            raise CheckpointError(f"cannot resume from {path}: {'.'.join(keys)} was {a!r} there and is "
                                  f"{b!r} now; resume with the checkpoint's config (its config.yaml)")
    started = BuildContext.from_dict(ckpt["context"], context.modality)
    changes = [f"{what} was {a} and is {b}" for what, a, b in (
        ("the training data's size", started.dataset_size, context.dataset_size),
        ("the number of processes", started.world_size, context.world_size),
        ("the steps of an epoch", started.steps_per_epoch, context.steps_per_epoch))
        if a != b]
    saved = ckpt.get("data_fingerprint")
    if not changes and saved is not None and saved != data_fingerprint(dataset):
        changes.append("the training data's labels differ (its fingerprint)")
    if changes:
        raise CheckpointError(f"cannot resume from {path}: {'; '.join(changes)}. A run continues on the data "
                              f"and processes it started with; start a new run (another --output) for these")


def data_fingerprint(dataset) -> str:
    """A cheap fingerprint of a training set: its size, sample shape and labels (not its samples)."""
    h = hashlib.sha256(f"{len(dataset)}|{tuple(dataset.sample_shape)}".encode())
    h.update(dataset.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def resolved(cfg: Config) -> dict:
    """``cfg`` as a dict whose open sections list every field of their typed config, defaults included, so two
    configs that differ only in spelling out a default compare equal."""
    tree = to_dict(cfg)
    tree["method"] = {"name": cfg.method["name"], **to_dict(method_config(cfg))}
    tree["backbone"] = {"name": cfg.backbone["name"], **to_dict(backbone_config(cfg.backbone)[1])}
    return tree
