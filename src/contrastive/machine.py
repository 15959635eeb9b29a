"""What the machine offers a run: free memory on the host or on a CUDA device, and a name for the device.

Read when defaults are derived from the device (``contrastive.autoconfig``), when a dataset decides whether its
decoded images fit in memory (``data.in_memory`` unset), and by the memory check before the first epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# cgroup v2, then v1: a container's limit is lower than what /proc/meminfo shows for the whole host.
_CGROUP_LIMITS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _host_available() -> tuple[int, str]:
    """(bytes, where the number comes from) the host can still give this process."""
    available, source = None, "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available, source = int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    if available is None:  # not Linux: the physical memory, less nothing we can know of
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        available, source = pages * page_size, "physical memory"
    for limit_path, usage_path in _CGROUP_LIMITS:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        # v1 reports "no limit" as a huge number; anything above the host's memory is no limit
        if limit is not None and usage is not None and limit - usage < available:
            available, source = max(limit - usage, 0), f"the container's memory limit ({limit_path})"
            break
    return available, source


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free for this process on ``device``, where the number comes from): free GPU memory on CUDA;
    on the CPU, Linux's MemAvailable or a container's remaining limit, whichever is lower."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    return _host_available()


def describe(device: torch.device) -> str:
    """``"CPU (2 threads)"`` or the GPU's name, for log lines."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def gib(n: float) -> str:
    """Bytes as ``"1.5 GiB"`` (or MiB below one GiB), for messages."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
