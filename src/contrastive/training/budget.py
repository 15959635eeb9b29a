"""What a run costs the machine: the memory of a training step, checked before the first epoch, and the
time of the whole run, estimated after its first steps.

Memory is measured by trial forward passes at small batches (2, 4 and 8 images), counting the bytes of every
tensor autograd keeps for the backward pass; those are what grows with the batch. Three batch sizes fit
``a + b n + c n^2`` exactly: linear for activations, quadratic for a loss over an ``[2n, 2n]`` similarity
matrix (NT-Xent). Weights and buffers already exist; their gradients and two optimiser slots per weight
(AdamW's moments, the most any optimiser here keeps) are added once.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.machine import available_memory, gib
from contrastive.methods.base import Batch, Method, StepInfo
from contrastive.modalities.base import Trial

log = logging.getLogger("contrastive.train")

TRIAL_BATCHES = (2, 4, 8)
# The backward pass holds, besides what the forward pass saved, the gradients of the layer it is in, and the
# allocator keeps some slack. With 1.5, the estimate of a SimCLR step was 1.15-1.4x the measured peak RSS on
# CPU (small_cnn at 32 px, batches 256 and 512, and at 96 px, batch 128; resnet18 at 32 px, batch 64).
BACKWARD_FACTOR = 1.5
# What the check leaves free of the available memory: other allocations of the process (loader, logging)
# and the caching allocator's fragmentation on CUDA.
HEADROOM = 0.9


@dataclass(frozen=True)
class StepMemory:
    """Bytes a training step needs beyond what is allocated already, as a function of the per-process batch n:
    ``fixed + per_image * n + per_pair * n^2``."""

    fixed: float  # gradients and optimiser state of the weights, plus batch-independent saved tensors
    per_image: float
    per_pair: float

    def need(self, n: int) -> float:
        return self.fixed + self.per_image * n + self.per_pair * n * n

    def largest_batch(self, budget: float) -> int:
        """The largest n with ``need(n) <= budget`` (0 when not even one image fits)."""
        room = budget - self.fixed
        if room < self.per_image + self.per_pair:
            return 0
        if self.per_pair <= 0:
            return int(room // self.per_image)
        b, c = self.per_image, self.per_pair
        n = int((-b + math.sqrt(b * b + 4 * c * room)) / (2 * c))
        while self.need(n + 1) <= budget:  # float rounding of the root, either way
            n += 1
        while n > 0 and self.need(n) > budget:
            n -= 1
        return n


def _saved_bytes(method: Method, batch: Batch, step: StepInfo, autocast) -> int:
    """Bytes of the distinct tensors autograd saves in one forward pass of ``method`` (parameters excluded:
    they exist already)."""
    params = {p.untyped_storage().data_ptr() for p in method.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = method(batch, step=step)
    del out  # frees the graph
    return sum(storages.values())


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def measure_step(method: Method, trial: Trial, *, device: torch.device, amp_dtype: torch.dtype | None,
                 step: StepInfo, dataset_size: int | None = None) -> StepMemory:
    """The memory of a training step of ``method`` on the views ``trial`` makes (the data's modality's: random
    crops of images, windows of audio, real sentences), from trial forward passes at TRIAL_BATCHES times
    ``method.batch_multiple`` samples (their dataset indices below ``dataset_size``: rows of a memory bank).
    Changes no state: batch-norm running statistics are kept (momentum 0 for the trials) and the random
    generators are restored."""
    trials = tuple(n * method.batch_multiple for n in TRIAL_BATCHES)  # MoCo: whole batch-norm groups
    norms = _batch_norms(method)
    kept = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
            for m in norms]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    saved = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for m in norms:
                m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch statistic: unchanged
            for n in trials:
                gen = torch.Generator(device=device).manual_seed(n)
                views = trial.make(n, gen)
                index = torch.arange(n, device=device) % (dataset_size or n)
                batch = Batch(views=views, index=index,
                              label=torch.full((n,), -1, dtype=torch.long, device=device), n_global=trial.n_global)
                saved.append(_saved_bytes(method, batch, step, autocast))
    finally:
        for m, momentum, tracked in kept:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    (n1, n2, n3), (s1, s2, s3) = trials, saved
    # the quadratic through the three points, by divided differences
    d12, d23 = (s2 - s1) / (n2 - n1), (s3 - s2) / (n3 - n2)
    c = max((d23 - d12) / (n3 - n1), 0.0)
    b = max(d12 - c * (n1 + n2), 0.0)
    a = max(s1 - b * n1 - c * n1 * n1, 0.0)
    weights = sum(p.numel() * p.element_size() for p in method.parameters() if p.requires_grad)
    # per sample, besides the saved tensors: its views and what they were cut from (the modality's count)
    return StepMemory(fixed=3 * weights + BACKWARD_FACTOR * a, per_image=BACKWARD_FACTOR * b + trial.input_bytes,
                      per_pair=BACKWARD_FACTOR * c)


def check_step_fits(memory: StepMemory, *, batch_size: int, world_size: int, device: torch.device,
                    what: str) -> None:
    """Raise a ConfigError naming the largest batch that fits when a step at ``batch_size`` (global, split
    over ``world_size`` processes) needs more than HEADROOM of the memory ``device`` has free."""
    available, source = available_memory(device)
    budget = HEADROOM * available
    per_process = batch_size // world_size
    need = memory.need(per_process)
    log.info("memory check: a training step of %s at batch %d needs about %s; %s free on %s (%s)", what,
             batch_size, gib(need), gib(available), device, source)
    if need <= budget:
        return
    largest = memory.largest_batch(budget) * world_size
    advice = (f"the largest batch that fits is {largest}: pass --batch-size {largest} "
              f"(train.batch_size={largest})" if largest >= 2 * world_size else
              "not even a batch of 2 fits: lower data.image_size, pick a smaller backbone, or free memory")
    raise ConfigError(
        f"train.batch_size={batch_size} does not fit in memory: a training step of {what} needs about {gib(need)}"
        f"{' per process' if world_size > 1 else ''}, but {gib(available)} is free on {device} ({source}); "
        f"{advice}. The estimate comes from trial steps at batches {', '.join(map(str, TRIAL_BATCHES))}; "
        f"train.memory_check=false skips this check")


class TimeEstimate:
    """The expected time of the run, from the speed of its first steps (the first step, which builds kernels
    and fills caches, is left out of the measure)."""

    STEPS = 10  # steps measured before the estimate
    SECONDS = 30.0  # or fewer steps, once they have taken this long

    def __init__(self, start_step: int, end_step: int, batch_size: int):
        self.start, self.end, self.batch_size = start_step, end_step, batch_size
        self.t0: float | None = None
        self.done = False

    def tick(self, step: int) -> str | None:
        """Called after each optimiser step (``step`` steps done); returns the estimate once."""
        now = time.perf_counter()
        if self.done:
            return None
        if step == self.start + 1:
            self.t0 = now
            return None
        measured = step - self.start - 1
        if self.t0 is None or measured < 1 or (measured < self.STEPS and now - self.t0 < self.SECONDS):
            return None
        self.done = True
        per_step = (now - self.t0) / measured
        left = max(self.end - step, 0) * per_step
        total = (self.end - self.start) * per_step
        ends = time.strftime("%H:%M", time.localtime(time.time() + left))
        return (f"{self.batch_size / per_step:,.0f} images/s over steps {self.start + 2}-{step}: the run's "
                f"{self.end - self.start:,} steps take about {duration(total)}, {duration(left)} from now "
                f"(around {ends}); evaluation not included")


def duration(seconds: float) -> str:
    """``"2 h 05 min"``, ``"7 min 30 s"``, ``"12 s"``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"
