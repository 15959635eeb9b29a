"""Training a classifier end to end on uint8 images, and scoring it: the loop under fine-tuning, the
supervised-from-scratch baseline and distillation.

Views are crop and flip only (SimCLR v2 fine-tunes with "random crop with resize and random flip", no
colour distortion), made batched on the training device by the pretraining's ``TensorViews``. The
optimiser, parameter groups and learning-rate schedule are the pretraining's own (``optim``,
``optim.schedules``). Every random choice is a function of the seed: the order of an epoch comes from
(seed, epoch), the views of a step from (seed, step).

As in pretraining, a step on a GPU never makes the host wait for it: images are kept on the GPU when they fit
(else gathered into pinned memory and copied without blocking), an epoch's order is copied there once, and a
non-finite loss is noted on the device and read at the metrics rows and at the end.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from contrastive.config import OptimConfig, ViewConfig
from contrastive.device import keep_on_device
from contrastive.errors import DataError, NonFiniteLossError
from contrastive.methods.base import STREAM_METHOD, STREAM_VIEWS, step_seed
from contrastive.modalities.image.preprocess import Preprocess
from contrastive.modalities.image.views import TensorViews
from contrastive.optim.optimizers import build_optimizer
from contrastive.optim.schedules import lr_at, scaled_lr

log = logging.getLogger("contrastive.supervised")

# loss_fn(views [n, C, S, S], positions [n] of the batch's images, step) -> scalar loss
LossFn = Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class LoopResult:
    epochs: int
    steps: int
    seconds: float
    images_per_s: float


def crop_flip_views(preprocess: Preprocess, in_size: int, crop_scale: list, hflip_p: float) -> TensorViews:
    """One random-resized-crop-and-flip view per image, normalised as ``preprocess`` normalises; no colour
    jitter, grey or blur."""
    cfg = ViewConfig(n_views=1, size=preprocess.size, crop_scale=list(crop_scale), hflip_p=hflip_p, jitter_p=0.0,
                     grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    return TensorViews(cfg, preprocess.mean, preprocess.std, preprocess.channels, in_size)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """A permutation of 0..n-1 seeded by (seed, epoch), cut into ceil(n / batch_size) batches of nearly
    equal size: every image once per epoch, and no batch so small that batch norm breaks (450 images at
    batch 256 give two batches of 225)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=g).tensor_split(math.ceil(n / batch_size)))


class DeviceRows:
    """Tensors with a row per image (uint8 images, labels), served to ``device`` by index without making the host
    wait: kept on a GPU when together they take at most a quarter of its free memory (the pretraining's rule,
    ``keep_on_device``), else on the host, where a batch is gathered into pinned memory and copied without
    blocking. ``home`` is where they are kept, and where an index into them belongs."""

    def __init__(self, *tensors: Tensor, device: torch.device):
        self.device = device
        keep = device.type != "cuda" or keep_on_device(None, sum(t.nbytes for t in tensors),
                                                       torch.cuda.mem_get_info(device)[0])
        self.home = device if keep else torch.device("cpu")
        self.tensors = [t.to(self.home) for t in tensors]

    def __len__(self) -> int:
        return len(self.tensors[0])

    def take(self, index: Tensor) -> list[Tensor]:
        """Rows ``index`` (on ``home``) of each tensor, on ``device``."""
        if self.home == self.device:
            return [t[index] for t in self.tensors]
        out = []
        for t in self.tensors:
            batch = torch.empty((len(index), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
            torch.index_select(t, 0, index, out=batch)
            out.append(batch.to(self.device, non_blocking=True))
        return out


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` (on the CPU) on ``device``; to a GPU from pinned memory, so the copy does not block the host."""
    if x.device == device:
        return x
    return (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)


def train_loop(model: nn.Module, images: Tensor, loss_fn: LossFn, *, epochs: int, batch_size: int,
               optim: OptimConfig, views: TensorViews, seed: int, device: torch.device,
               metrics: Path | None = None) -> LoopResult:
    """Train ``model``'s trainable parameters for ``epochs`` over ``images`` (uint8 [N, C, H, W], on the CPU),
    ``loss_fn`` giving each batch's loss from its views (the batch's positions come on ``device``). Writes a
    metrics.csv row (epoch, step, lr, loss, images/s) every few steps when ``metrics`` is given. A loss that
    is not finite stops the run with a NonFiniteLossError naming its step, at the next row or at the end."""
    n = len(images)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    peak = scaled_lr(optim.lr, batch_size, optim.lr_scaling)
    optimizer = build_optimizer(model, optim, peak)
    log_every = max(1, total // 200)
    writer = file = None
    if metrics is not None:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        file = open(metrics, "w", newline="")
        writer = csv.DictWriter(file, fieldnames=["epoch", "step", "lr", "loss", "images_per_s"])
        writer.writeheader()
    data = DeviceRows(images, device=device)
    # the first step whose loss was not finite (-1: none yet) and that loss, kept on the device until read
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)

    def check_finite() -> None:
        first = int(bad_step)  # the host waits here, at a metrics row or at the end
        if first >= 0:
            lr = lr_at(first, total_steps=total, steps_per_epoch=steps_per_epoch, optim=optim, peak=peak)
            raise NonFiniteLossError(f"the loss became {bad_loss.item()} at epoch {first // steps_per_epoch}, step "
                                     f"{first} (lr {lr:.4g}); lower optim.lr or set optim.grad_clip")

    step, seen = 0, 0
    model.train()
    start = last_t = time.perf_counter()
    last_seen = 0
    try:
        for epoch in range(epochs):
            order = epoch_batches(n, batch_size, seed, epoch)
            sizes = [len(idx) for idx in order]
            # the epoch's order where the images are and where the loss wants it: one copy each, not one a step
            homes = to_device(torch.cat(order), data.home).split(sizes)
            positions = homes if data.home == device else to_device(torch.cat(order), device).split(sizes)
            for home, idx in zip(homes, positions):
                lr = lr_at(step, total_steps=total, steps_per_epoch=steps_per_epoch, optim=optim, peak=peak)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                gen = torch.Generator(device=device).manual_seed(step_seed(seed, step, 0, STREAM_VIEWS))
                (x,) = views(data.take(home)[0], gen)
                torch.manual_seed(step_seed(seed, step, 0, STREAM_METHOD))  # dropout, if the model has any
                loss = loss_fn(x, idx, step)
                detached = loss.detach()
                first = torch.isfinite(detached).logical_not_().logical_and_(bad_step < 0)
                bad_step = torch.where(first, step, bad_step)
                bad_loss = torch.where(first, detached.float(), bad_loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if optim.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
                optimizer.step()
                step += 1
                seen += len(idx)
                if writer is not None and (step % log_every == 0 or step == total):
                    check_finite()
                    now = time.perf_counter()
                    writer.writerow({"epoch": epoch, "step": step, "lr": lr, "loss": detached.item(),
                                     "images_per_s": (seen - last_seen) / max(now - last_t, 1e-9)})
                    file.flush()
                    last_t, last_seen = now, seen
        check_finite()
    finally:
        if file is not None:
            file.close()
    elapsed = time.perf_counter() - start
    return LoopResult(epochs=epochs, steps=step, seconds=round(elapsed, 2),
                      images_per_s=round(seen / elapsed if elapsed > 0 else 0.0, 1))


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, preprocess: Preprocess, *, batch_size: int,
            device: torch.device) -> Tensor:
    """Logits [N, classes] (float32, CPU) of uint8 ``images [N, C, H, W]`` through the deterministic
    evaluation input (resize, normalise), with the model in eval mode (its modes are restored)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out = [model(preprocess(images[s:s + batch_size].to(device))).float().cpu()
               for s in range(0, len(images), batch_size)]
    finally:
        for m, training in modes:
            m.training = training
    return torch.cat(out)


def top1(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


def pixels(ds) -> Tensor:
    """The whole dataset as uint8 [N, C, S, S]: its decoded ``images`` when held in memory, else every item
    decoded once now (an unreadable one stops with the dataset's own error)."""
    images = getattr(ds, "images", None)
    if isinstance(images, Tensor):
        return images
    items = [ds[i] for i in range(len(ds))]
    if any(item is None for item in items):
        raise DataError(f"{ds.name} has unreadable images (data.skip_corrupt); fine-tuning and distillation need "
                        f"every image, so remove them or use data.in_memory=true, which drops them at load time")
    return torch.stack([item[0] for item in items])
