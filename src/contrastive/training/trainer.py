"""The trainer: one loop that drives any method through the contract in ``methods/base.py``.

Plain PyTorch with DistributedDataParallel (see docs/ARCHITECTURE.md for why not Lightning). Every
random choice of a step is a function of (seed, epoch, step, rank): the data order of an epoch comes
from a generator seeded by (seed, epoch), the views of a step from one seeded by (seed, step, rank), the
method's draws from ``StepInfo.generator``, and torch's global generator (dropout) is reseeded by
(seed, step, rank) before every step. Resuming from a checkpoint therefore continues bitwise-identically
on the CPU, and no two ranks share a dropout mask. On a GPU a step queues its work without waiting for the
device; the host reads from it at log rows and checkpoints (and, when they are on, at fp16's loss-scale
check and a time budget's agreement between processes).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from contrastive import distributed
from contrastive.config import Config, to_dict
from contrastive.data import collate_skip_corrupt
from contrastive.data.datasets import PerItemViews
from contrastive.device import cuda_settings, keep_on_device, peak_memory_mb, resolve_device, resolve_precision
from contrastive.errors import CheckpointError, ConfigError, NonFiniteLossError
from contrastive.methods.base import STREAM_GLOBAL, Batch, Method, StepInfo, StepOutput, step_seed
from contrastive.modalities import modality_of
from contrastive.optim.optimizers import build_optimizer, clip_gradients, set_step_values
from contrastive.optim.schedules import lr_at, scaled_lr, weight_decay_at
from contrastive.training.budget import TimeEstimate, check_step_fits, measure_step
from contrastive.training.checkpoint import (
    FORMAT_VERSION,
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
    to_cpu,
)
from contrastive.training.collapse import collapse_stats, collapsed
from contrastive.training.metrics import MetricLogger, progress_bar
from contrastive.training.resume import check_resumable, data_fingerprint

log = logging.getLogger("contrastive.train")

CHECKPOINT_NAME = "checkpoint.pt"


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int,
                  batch_order: Callable[[torch.Generator], list[torch.Tensor] | None] | None = None
                  ) -> list[list[int]]:
    """This rank's index batches for one epoch: a permutation seeded by (seed, epoch), full global
    batches only (SimCLR's loss depends on the batch size), each split evenly over the ranks.

    ``batch_order(generator)``: the method's own global batches (``Method.batch_order``: P x K batches) drawn
    from the same seeded generator instead, or None for the permutation; n // batch_size of them either way.
    """
    world, rank = distributed.world_size(), distributed.rank()
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = batch_order(g) if batch_order is not None else None
    if batches is None:
        order = torch.randperm(n, generator=g)
        batches = [order[b * batch_size:(b + 1) * batch_size] for b in range(n // batch_size)]
    elif len(batches) != n // batch_size or any(len(b) != batch_size for b in batches):
        raise ValueError(f"Method.batch_order gave {len(batches)} batches of sizes "
                         f"{sorted({len(b) for b in batches})}; the trainer needs {n // batch_size} of {batch_size}")
    per_rank = batch_size // world
    return [chunk[rank * per_rank:(rank + 1) * per_rank].tolist() for chunk in batches]


@dataclass
class TrainResult:
    epochs_done: int
    steps_done: int
    images_per_s: float  # mean over the training steps of this invocation
    peak_memory_mb: float  # peak RSS of this process (CPU) or peak allocated (CUDA)
    stopped_early: str | None  # why training stopped before the last epoch (max_steps, time budget)
    checkpoint: Path


class Trainer:
    """Trains ``method`` on ``dataset`` with the config's optimiser, schedule, views and precision.

    Under torchrun it joins the process group if none exists; whoever drives it then ends the group with
    ``contrastive.distributed.shutdown()`` (``api.pretrain`` does so for the group it started).
    """

    def __init__(self, cfg: Config, method: Method, dataset, output: str | Path):
        self.cfg = cfg
        self.output = Path(output)
        self.device = resolve_device(cfg.train.device)
        distributed.init_from_env(self.device, timeout_s=cfg.train.dist_timeout_s)
        self.world = distributed.world_size()
        if cfg.train.batch_size % self.world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                              f"{self.world} processes; make it a multiple")
        if cfg.data.skip_corrupt and dataset.samples is None and self.world > 1:
            raise ConfigError("data.skip_corrupt on a dataset decoded per item (data.in_memory=false) would give "
                              "the processes unequal batches; use data.in_memory=true, which drops unreadable "
                              "images once at load time, or fix the files")
        if cfg.train.batch_size < method.min_batch:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size}: {cfg.method['name']} needs at least "
                              f"{method.min_batch} samples a step (min_batch: its loss contrasts a sample with the "
                              f"others of the batch, and with fewer it is constant); raise train.batch_size")
        if cfg.train.batch_size // self.world < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                          for m in method.modules()):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} over {self.world} process(es) leaves "
                              f"{cfg.train.batch_size // self.world} sample(s) to each, and batch norm (in "
                              f"{cfg.backbone['name']} or the method's head) needs at least 2 to normalise a batch; "
                              f"raise train.batch_size")
        if cfg.train.batch_size > len(dataset):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the dataset "
                              f"({len(dataset)} samples); lower train.batch_size")
        self.dataset = dataset
        # images, audio, text, image-caption pairs: the kind of data chooses the views, the memory check's trial
        # and the preprocessing
        self.modality = modality_of(dataset)
        self.context = self.modality.context(cfg, dataset, self.world)  # saved, so the method can be rebuilt
        self.amp_dtype = resolve_precision(cfg.train.precision, self.device)
        cuda_settings(cfg.train, self.device)
        self.method = method.to(self.device)
        if self._sync_batchnorm():  # in place, where the method wants it: the method object stays the caller's
            self.method.sync_batchnorm()
        if cfg.train.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.modality.check_backbone(cfg)
        self.views = self.modality.views(cfg, dataset)
        self.steps_per_epoch = len(dataset) // cfg.train.batch_size
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        if 0 < self.total_steps <= self.warmup_steps:
            log.warning("optim.warmup_epochs=%g is as long as the run (train.epochs=%d): the learning rate only rises "
                        "and never decays; set optim.warmup_epochs below %d, e.g. %g (a tenth of the run, as "
                        "SimCLR warms up for 10 of 100 epochs)", cfg.optim.warmup_epochs, cfg.train.epochs,
                        cfg.train.epochs, cfg.train.epochs / 10)
        self.peak_lr = scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling)
        self.optimizer = build_optimizer(self.method, cfg.optim, self.peak_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.model: nn.Module = self.method
        if self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.method, device_ids=ids, **_ddp_options(self.method.ddp_options))
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.epoch = 0
        self.step = 0
        self.epoch_batch = 0  # index batches of this epoch consumed (trained on, or skipped as unreadable)
        self.skipped_images = 0  # unreadable images skipped under data.skip_corrupt (streaming mode)
        # The first step whose loss was not finite (-1: none yet) and that loss, kept on the device: reading
        # them is a host synchronisation, done only where the host waits anyway (a log row, a checkpoint).
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_loss = torch.zeros((), device=self.device)
        self._images = self._place_images()

    def _sync_batchnorm(self) -> bool:
        want = self.cfg.train.sync_batchnorm
        if want and self.device.type == "cpu":
            raise ConfigError("train.sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm); on CPU "
                              "processes set it to false or leave it unset")
        return self.world > 1 and self.device.type != "cpu" and want is not False

    def _place_images(self) -> torch.Tensor | None:
        """The in-memory dataset's samples (uint8 images, float audio clips, token ids) where batched views index
        them: on the GPU when they fit (``keep_on_device``: a batch is then an index there, no host copy), else on
        the host; None when the data is read per item (the DataLoader pins its batches)."""
        images = self.dataset.samples
        if getattr(self.views, "per_item", False) or not isinstance(images, torch.Tensor):
            return None
        if self.device.type == "cuda" and keep_on_device(self.cfg.train.data_on_device, images.nbytes,
                                                         torch.cuda.mem_get_info(self.device)[0]):
            log.info("the dataset's %.0f MB of %s samples are kept on %s", images.nbytes / 2**20, self.modality.name,
                     self.device)
            return images.to(self.device)
        return images

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "config": to_dict(self.cfg),
            "epoch": self.epoch,
            "step": self.step,
            "epoch_batch": self.epoch_batch,
            # CPU copies: the file loads on a machine without this run's GPU; loading copies them back
            "method": to_cpu(self.method.state_dict()),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "preprocess": asdict(self.modality.preprocess(self.cfg, self.dataset)),
            "context": asdict(self.context),
            "data_fingerprint": data_fingerprint(self.dataset),
        }

    def resume(self, path: str | Path) -> None:
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, self.cfg, self.context, self.dataset, path)
        try:
            self.method.load_state_dict(ckpt["method"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot resume from {path}: its state does not fit this run's method and optimiser "
                                  f"({str(e).splitlines()[0]})") from None
        self._load_scaler(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.step, self.epoch_batch = ckpt["epoch"], ckpt["step"], ckpt["epoch_batch"]
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    def _load_scaler(self, state: dict) -> None:
        """The fp16 loss scale from a checkpoint; a run resumed in another precision starts its own.

        A disabled scaler (fp32, bf16) saves ``{}``; torch refuses to load that into an enabled one (fp16).
        """
        if self.scaler.is_enabled() and not state:
            log.info("resuming in fp16 from a checkpoint trained in fp32 or bf16: the loss scale starts afresh")
            return
        if state and not self.scaler.is_enabled():
            log.info("resuming without fp16 from a checkpoint trained in fp16: its loss scale is not needed")
            return
        self.scaler.load_state_dict(state)

    def save(self) -> Path:
        self._check_finite()  # never write weights that a non-finite loss has reached
        path = self.output / CHECKPOINT_NAME
        if distributed.is_main():
            atomic_save(self.state_dict(), path)
        return path

    # ---------------------------------------------------------------- data

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """Yield this rank's share of each step: (a uint8 batch (tensor views) or a list of views (pil),
        dataset indices [n], labels [n])."""
        size = self.cfg.train.batch_size
        index_batches = epoch_batches(  # the method's own batches (P x K), else a seeded permutation
            len(self.dataset), size, self.cfg.seed, epoch,
            lambda g: self.method.batch_order(self.dataset.labels, size, g, self.dataset.name))
        # after a resume from a mid-epoch checkpoint (max_steps, time budget), skip the batches already done
        index_batches = index_batches[self.epoch_batch:]
        images = self._images
        if images is not None:
            # decoded in memory already: index it, no loader processes needed; on the GPU (dataset kept there)
            # or gathered straight into pinned memory, so the copy to the GPU does not block the host
            labels = self.dataset.labels
            pin = self.device.type == "cuda" and images.device.type == "cpu"
            for idx in index_batches:
                self.epoch_batch += 1
                index = torch.tensor(idx)
                if images.device.type == "cpu":
                    out = torch.empty((len(idx), *images.shape[1:]), dtype=images.dtype, pin_memory=pin)
                    batch = torch.index_select(images, 0, index, out=out)
                else:
                    batch = images[index.to(images.device, non_blocking=True)]
                yield batch, index, labels[index]
            return
        dataset = self.dataset
        if getattr(self.views, "per_item", False):  # made in the loader's workers (PIL views of images)
            dataset = PerItemViews(self.dataset, self.views)
        skip = self.cfg.data.skip_corrupt
        loader = DataLoader(
            dataset,
            batch_sampler=index_batches,
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate_skip_corrupt if skip else None,
            pin_memory=self.device.type == "cuda",
            # worker seeds (and so PIL views) differ per rank and epoch, and repeat with the seed
            generator=torch.Generator().manual_seed(step_seed(self.cfg.seed, epoch, distributed.rank())),
        )
        for batch in loader:
            self.epoch_batch += 1
            if skip:
                batch, skipped = batch
                self.skipped_images += skipped
                if batch is None:  # every image of this batch was unreadable
                    continue
            images, labels, index = batch
            yield images, index, labels

    def _batch(self, images, index: torch.Tensor, labels: torch.Tensor) -> Batch:
        if getattr(self.views, "per_item", False):
            views = [v.to(self.device, non_blocking=True) for v in images]
        else:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(step_seed(self.cfg.seed, self.step, distributed.rank()))
            # the dataset indices too: image-caption views draw each image's caption by them
            views = self.views(images.to(self.device, non_blocking=True), gen, index=index)
        if self.cfg.train.channels_last:  # a memory format of 4-d tensors: images (not token ids, not audio)
            views = [v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for v in views]
        return Batch(views=views, index=index.to(self.device, non_blocking=True),
                     label=labels.to(self.device, non_blocking=True), n_global=self.views.n_global)

    # ---------------------------------------------------------------- loop

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.output.mkdir(parents=True, exist_ok=True)
        if cfg.train.resume:
            self.resume(cfg.train.resume)
        logger = (MetricLogger(self.output, cfg.train.tensorboard, append=bool(cfg.train.resume))
                  if distributed.is_main() else None)
        start = time.perf_counter()
        images_seen = 0
        stopped = None
        last_log_t, last_log_images = start, 0
        bar = progress_bar(cfg, self.step, self.total_steps)
        warned_collapse = False
        try:
            # once: a method that keeps a frozen part in eval mode overrides train() to say so
            self.method.train()
            if cfg.train.memory_check:
                self.check_memory()
            end = min(self.total_steps, cfg.train.max_steps or self.total_steps)
            clock = TimeEstimate(self.step, end, cfg.train.batch_size)
            while self.epoch < cfg.train.epochs and stopped is None:
                if bar is not None:
                    bar.set_description(f"epoch {self.epoch + 1}/{cfg.train.epochs}")
                for images, index, labels in self._batches(self.epoch):
                    if cfg.train.max_steps is not None and self.step >= cfg.train.max_steps:
                        # checked before a step, so a run resumed at max_steps trains no further
                        stopped = f"train.max_steps={cfg.train.max_steps}"
                        self.epoch_batch -= 1  # this batch was drawn but not used
                        break
                    lr = lr_at(self.step, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                               optim=cfg.optim, peak=self.peak_lr)
                    out = self._train_step(images, index, labels, lr)
                    images_seen += cfg.train.batch_size
                    estimate = clock.tick(self.step)
                    if estimate and distributed.is_main():
                        log.info("expected time: %s", estimate)
                    if bar is not None:
                        bar.update(1)
                    if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                        self._check_finite()
                        now = time.perf_counter()
                        ips = (images_seen - last_log_images) / max(now - last_log_t, 1e-9)
                        last_log_t, last_log_images = now, images_seen
                        metrics = {"loss": out.loss.detach(), **out.metrics}
                        if out.embedding is not None:
                            metrics.update(collapse_stats(out.embedding))
                        row = {"epoch": self.epoch, "step": self.step, "lr": lr, "images_per_s": ips,
                               **({"weight_decay": self.optimizer.param_groups[0]["weight_decay"]}
                                  if cfg.optim.weight_decay_end is not None else {}),
                               **{k: distributed.all_reduce_mean(v).item() for k, v in metrics.items()}}
                        if out.embedding is not None and not warned_collapse:
                            warned_collapse = self._watch_collapse(row, out.embedding.shape[-1])
                        if logger is not None:
                            logger.write(row)
                        if bar is not None:
                            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
                    if cfg.train.time_budget_s is not None and distributed.any_rank(
                            time.perf_counter() - start >= cfg.train.time_budget_s, self.device):
                        stopped = f"train.time_budget_s={cfg.train.time_budget_s:g}"  # same step, every rank
                    if stopped:
                        break
                if stopped is None:
                    self.epoch += 1
                    self.epoch_batch = 0
                    if self.epoch % cfg.train.checkpoint_every == 0 or self.epoch == cfg.train.epochs:
                        self.save()
            if stopped is not None:
                self.save()
            self._check_finite()
        finally:
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
        elapsed = time.perf_counter() - start
        if self.skipped_images:
            log.warning("skipped %d unreadable image reads (data.skip_corrupt=true)", self.skipped_images)
        return TrainResult(
            epochs_done=self.epoch,
            steps_done=self.step,
            images_per_s=images_seen / elapsed if elapsed > 0 else 0.0,
            peak_memory_mb=peak_memory_mb(self.device),
            stopped_early=stopped,
            checkpoint=self.output / CHECKPOINT_NAME,
        )

    def _watch_collapse(self, row: dict, dim: int) -> bool:
        """Warn (once a run) when a log row's embedding statistics show a collapse, from the second epoch on
        (a fresh network's outputs may be narrow); True when it warned."""
        why = collapsed(row["embed_std"], row["embed_rank"], dim) if self.epoch >= 1 else None
        if why is not None and distributed.is_main():
            log.warning("collapse watch at epoch %d, step %d: %s. For %s: %s", self.epoch, self.step, why,
                        self.cfg.method["name"], self.method.collapse_advice)
        return why is not None

    def check_memory(self) -> None:
        """Before the first step: a ConfigError naming the largest batch that fits when a step at
        train.batch_size would not fit in the device's free memory (trial steps, see training/budget.py)."""
        trial = self.modality.trial(self.cfg, self.dataset, self.views, self.device)
        memory = measure_step(self.method, trial, device=self.device, amp_dtype=self.amp_dtype,
                              step=self.step_info(), dataset_size=len(self.dataset))
        check_step_fits(memory, batch_size=self.cfg.train.batch_size, world_size=self.world, device=self.device,
                        what=f"{self.cfg.method['name']} with {self.cfg.backbone['name']} on {trial.what}")

    def step_info(self) -> StepInfo:
        return StepInfo(step=self.step, epoch=self.epoch, total_steps=self.total_steps,
                        steps_per_epoch=self.steps_per_epoch, epochs=self.cfg.train.epochs, seed=self.cfg.seed,
                        rank=distributed.rank())

    def _train_step(self, images, index: torch.Tensor, labels: torch.Tensor, lr: float) -> StepOutput:
        set_step_values(self.optimizer, lr=lr, peak_lr=self.peak_lr,
                        weight_decay=weight_decay_at(self.step, total_steps=self.total_steps, optim=self.cfg.optim))
        info = self.step_info()
        batch = self._batch(images, index, labels)
        # dropout and any other use of the global generator: a function of (seed, step, rank)
        torch.manual_seed(step_seed(self.cfg.seed, self.step, distributed.rank(), STREAM_GLOBAL))
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else nullcontext())
        with autocast:
            out = self.model(batch, step=info)
        # noted on the device without waiting for it; _check_finite reads it at the next log row or checkpoint
        loss = out.loss.detach()
        first = torch.isfinite(loss).logical_not_().logical_and_(self._bad_step < 0)
        self._bad_step = torch.where(first, self.step, self._bad_step)
        self._bad_loss = torch.where(first, loss.float(), self._bad_loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
        self.method.before_optimizer_step(info)
        if self.cfg.optim.grad_clip is not None:
            clip_gradients(self.method, self.cfg.optim.grad_clip, self.cfg.optim.grad_clip_mode)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.method.after_step({k: v.detach() for k, v in out.updates.items()}, info)
        self.step += 1
        return out

    def _check_finite(self) -> None:
        """Stop with advice when a loss since the last check was not finite, on every rank at once (the
        first such step over all ranks). One host synchronisation, at a log row or a checkpoint."""
        # none here: past the last step, so the minimum over ranks is the first bad step anywhere
        bad = torch.where(self._bad_step < 0, self.total_steps, self._bad_step)
        step = int(distributed.all_reduce_min(bad))
        if step == self.total_steps:
            return
        lr = lr_at(step, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch, optim=self.cfg.optim,
                   peak=self.peak_lr)
        value = f"{self._bad_loss.item()}" if int(self._bad_step) == step else "non-finite on another process"
        raise NonFiniteLossError(
            f"the loss became {value} at epoch {step // self.steps_per_epoch}, step {step} (lr {lr:.4g}). "
            f"Lower optim.lr, set optim.grad_clip (for example 1.0), lengthen optim.warmup_epochs, "
            f"or use train.precision=fp32 if you trained in fp16; the last good checkpoint is in {self.output}"
        )


def _ddp_options(options: dict) -> dict:
    """A method's DistributedDataParallel options for this torch: newer releases (2.14) name
    ``broadcast_buffers=False`` ``forward_sync_buffers=False``, which still syncs buffers once at
    construction, as broadcast_buffers=False does (the method's buffers start equal on every rank anyway)."""
    import inspect

    out = dict(options)
    if "broadcast_buffers" in out and "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        out["forward_sync_buffers"] = out.pop("broadcast_buffers")
    return out
