"""Checkpoints: one file holding every piece of training state, written atomically.

A checkpoint holds the config, the epoch and step reached, the method's state dict (weights and
buffers: queue, memory bank, EMA teacher, centre), the optimiser, the gradient scaler, and the RNG
states, so that resuming continues exactly as if the run had never stopped. Its tensors are CPU copies
(:func:`to_cpu`), so it loads on a machine without the GPU it was trained on.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrastive.errors import CheckpointError
from contrastive.files import atomic_write

FORMAT_VERSION = 2  # 2: weights-only contents, method state from the widened method contract


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save through ``files.atomic_write``: a crash mid-write leaves the previous checkpoint intact, never a
    truncated one."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a detached CPU copy (a CPU tensor is kept as it is), through
    dicts, lists and tuples: a state dict on a GPU becomes one that loads on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rng_state() -> dict:
    """The global generators' states as tensors, numbers and tuples only (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this process's device only
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_file(path: str | Path) -> Any:
    """Load a file a run wrote (checkpoint.pt, encoder.pt) with ``weights_only=True``: tensors, numbers,
    strings and plain containers only, so a file from elsewhere cannot run code while it is read.
    Clear errors for a missing, unreadable or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give the path of a .pt file a run wrote "
                              f"(for example runs/latest/checkpoint.pt or runs/latest/encoder.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if not refused:
            raise CheckpointError(f"checkpoint {path} cannot be read (it is not a PyTorch file: "
                                  f"{type(e).__name__}); it may be truncated or not a contrastive checkpoint") from None
        raise CheckpointError(
            f"checkpoint {path} was not loaded: it holds objects other than tensors, numbers, strings and plain "
            f"containers, and unpickling them could run code ({refused[0]}). contrastive never writes such "
            f"files; if you trust their source, convert them yourself with torch.load(path, weights_only=False)"
        ) from None
    except Exception as e:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                              f"it may be truncated or not a contrastive checkpoint") from None


def is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT_VERSION


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by the trainer, with a clear error for a missing or foreign file."""
    ckpt = read_file(path)
    if not is_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not a contrastive checkpoint of format {FORMAT_VERSION}")
    return ckpt
