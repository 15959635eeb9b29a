"""Where a process computes and in what precision: the device policy every command shares.

``train.device`` becomes this process's device (under torchrun its own GPU), ``train.precision`` the autocast
dtype the device runs natively, and the CUDA switches (cuDNN autotuning, TF32) are set and logged here. An
in-memory dataset goes to the GPU when it takes at most a quarter of its free memory (``keep_on_device``).
Nothing here starts CUDA on a machine where the run asked for the CPU.
"""

from __future__ import annotations

import logging
import os

import torch

from contrastive.errors import ConfigError

log = logging.getLogger("contrastive.train")


def resolve_device(name: str) -> torch.device:
    """The device this process runs on, from ``train.device`` and what is visible.

    auto: CUDA when available, else the CPU. A bare ``cuda`` (or auto) under torchrun is this process's own
    GPU: cuda:LOCAL_RANK, or cuda:0 when the launcher shows each process a single GPU (``srun
    --gpus-per-task=1``, where LOCAL_RANK may exceed the visible count). Refused with a ConfigError: an
    explicit ``cuda:N`` shared by several processes of one machine (NCCL's "Duplicate GPU detected"), and an
    index or LOCAL_RANK beyond the visible GPUs (CUDA's "invalid device ordinal").
    """
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu or auto")
    visible = torch.cuda.device_count()
    shown = f"{visible} GPU{'s' if visible != 1 else ''} visible (CUDA_VISIBLE_DEVICES=" \
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
    local_rank = os.environ.get("LOCAL_RANK")
    # processes on this machine: torchrun's LOCAL_WORLD_SIZE, else (another launcher) at most WORLD_SIZE
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if device.index is not None:
        if processes > 1:
            raise ConfigError(f"train.device={name} with {processes} processes on this machine would put every "
                              f"process on GPU {device.index}; use train.device=cuda (or auto), which gives each "
                              f"process its own GPU")
        if device.index >= visible:
            raise ConfigError(f"train.device={name} but {shown}; pick an index below {visible}")
    elif local_rank is None or visible == 1:
        device = torch.device("cuda", 0)
    elif int(local_rank) < visible:
        device = torch.device("cuda", int(local_rank))
    else:
        raise ConfigError(f"LOCAL_RANK={local_rank} but {shown}; start one process per GPU "
                          f"(torchrun --nproc-per-node={visible}) or show each process its own GPU")
    torch.cuda.set_device(device)
    return device


_PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32.

    auto: bf16 on a GPU with native bf16 (compute capability 8.0 and newer); on older GPUs bf16 is emulated
    and slow (``torch.cuda.is_bf16_supported()`` says True on a T4 or V100), so fp16 with loss scaling where
    tensor cores run it (7.0 and newer), else fp32; fp32 on other devices. The choice is logged.
    """
    if name == "auto":
        if device.type != "cuda":
            dtype, why = None, f"the {device.type} device"
        elif torch.cuda.is_bf16_supported(including_emulation=False):
            dtype, why = torch.bfloat16, f"{torch.cuda.get_device_name(device)} runs bf16 natively"
        elif torch.cuda.get_device_capability(device) >= (7, 0):
            dtype, why = torch.float16, (f"{torch.cuda.get_device_name(device)} has no native bf16 but fp16 "
                                         f"tensor cores; gradients are loss-scaled")
        else:
            dtype, why = None, f"{torch.cuda.get_device_name(device)} has neither native bf16 nor fp16 tensor cores"
        log.info("train.precision=auto: %s on %s", _PRECISION_NAMES[dtype], why)
        return dtype
    if name == "fp32":
        return None
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            log.warning("train.precision=bf16: %s emulates bf16, which is slow; fp16 (or auto) is faster there",
                        torch.cuda.get_device_name(device))
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; on a CPU use bf16 or fp32")
        return torch.float16
    raise ConfigError(f"train.precision={name!r} is not one of auto, fp32, bf16, fp16")


def cuda_settings(train, device: torch.device) -> None:
    """cuDNN autotuning and TF32 as ``train.cudnn_benchmark`` / ``train.tf32`` say, logged; CUDA only.

    Process-wide settings (torch keeps them globally); set with the legacy API, which keeps torch's two
    ways of reading them consistent.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = train.cudnn_benchmark
    torch.set_float32_matmul_precision("high" if train.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = train.tf32
    log.info("cuda: cudnn.benchmark=%s, TF32 for fp32 matmuls and convolutions=%s (train.cudnn_benchmark, "
             "train.tf32)", train.cudnn_benchmark, train.tf32)


def keep_on_device(setting: bool | None, nbytes: int, free_bytes: int) -> bool:
    """Whether an in-memory dataset of ``nbytes`` goes to the GPU (``train.data_on_device``): as set, or
    (None) when it takes at most a quarter of the GPU's free memory, leaving the rest to training."""
    return setting if setting is not None else nbytes <= free_bytes // 4


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
