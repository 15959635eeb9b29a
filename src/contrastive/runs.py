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
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from contrastive.config import Config, config_from_tree, to_dict
from contrastive.errors import CheckpointError
from contrastive.files import atomic_write_text
from contrastive.methods import build_method
from contrastive.methods.base import BuildContext, Method
from contrastive.modalities import modality_named
from contrastive.training.checkpoint import atomic_save, is_checkpoint, read_file
from contrastive.training.trainer import CHECKPOINT_NAME

ENCODER_FORMAT = "contrastive-encoder/2"
ENCODER_NAME = "encoder.pt"


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
