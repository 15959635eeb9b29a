"""The Python API: what the ``contrastive`` command does, callable without it.

    from contrastive import api
    cfg = api.resolve_config(overrides=["data.name=digits", "train.epochs=10"])
    results = api.pretrain(cfg)            # trains, evaluates, writes results.json
    encoder, info = api.load_encoder("runs/latest/checkpoint.pt")

Each function composes the library's parts; the kind of data decides through its modality
(``contrastive.modalities``), and every run is read back through one loader (``contrastive.runs``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contrastive import distributed
from contrastive.config import Config, DataConfig
from contrastive.configure import apply_overrides, resolve_config
from contrastive.data.datasets import Splits
from contrastive.device import resolve_device
from contrastive.errors import ConfigError, DataError
from contrastive.machine import describe
from contrastive.methods import build_method
from contrastive.methods.base import BuildContext, Method
from contrastive.modalities import detect, load_splits, modality_named, modality_of, seen_in_pretraining
from contrastive.runs import (
    check_free,
    claimed,
    load_run,
    new_run_folder,
    point_latest,
    run_file,
    save_encoder,
    write_config,
    write_results,
)
from contrastive.training.trainer import Trainer

log = logging.getLogger("contrastive")

__all__ = ["BuildContext", "build_method", "embed", "evaluate", "evaluate_encoder", "load_encoder", "load_method",
           "pretrain", "resolve_config", "run_file"]


def pretrain(cfg: Config) -> dict[str, Any]:
    """Pretrain ``cfg.method`` on ``cfg.data``, then (unless ``eval.enabled`` is off, or unset on data without
    labels) evaluate the frozen encoder as the data's modality does (images: the weighted kNN and the linear
    probe beside the raw-pixel kNN; audio: beside MFCC statistics; sentences: STS and SentEval).

    Writes into ``train.output``: config.yaml, checkpoint.pt, encoder.pt (the encoder's weights and their
    preprocessing), metrics.csv, results.json. Returns what results.json holds.
    """
    torch.manual_seed(cfg.seed)
    # under torchrun: join the group now, so that rank 0 can download data alone first; a group this call
    # created is also ended here (a caller's own group is left to the caller)
    started = distributed.init_from_env(resolve_device(cfg.train.device), timeout_s=cfg.train.dist_timeout_s)
    try:
        return _pretrain(cfg)
    finally:
        if started:
            distributed.shutdown()


def _pretrain(cfg: Config) -> dict[str, Any]:
    if cfg.train.resume:  # --resume runs/x: the checkpoint in the run folder
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=str(run_file(cfg.train.resume))))
    fresh = cfg.train.output is None
    out = new_run_folder(cfg.method["name"]) if fresh else Path(cfg.train.output)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output=str(out)))
    # a run continues in its own folder only; any other folder holding a run is refused unless train.overwrite
    continuing = cfg.train.resume is not None and Path(cfg.train.resume).parent.resolve() == out.resolve()
    check_free(out, resume=continuing, overwrite=cfg.train.overwrite, data=cfg.data)  # every process, at once
    with (claimed(out, resume=continuing, overwrite=cfg.train.overwrite, data=cfg.data) if distributed.is_main()
          else nullcontext()):
        if fresh and distributed.is_main():
            point_latest(out)
        return _train_and_evaluate(cfg, out)


def _train_and_evaluate(cfg: Config, out: Path) -> dict[str, Any]:
    # every process decodes its own copy at once; only a download is rank 0's alone, first (data/locate.py)
    splits = load_splits(cfg.data, evaluate=cfg.eval.enabled is not False)
    modality = modality_of(splits.pretrain)
    foreign = sorted(set(cfg.modalities) - {modality.name})
    if foreign:
        raise ConfigError(f"modalities.{foreign[0]} is set, but {cfg.data.name} holds {modality.name} data; remove "
                          f"it (or set modalities.{modality.name}.* instead)")
    modality.check_backbone(cfg)
    train_set = modality.prepare(splits.pretrain, cfg)  # text: tokenised by the encoder's tokenizer
    evaluate = cfg.eval.enabled is not False and modality.can_evaluate(splits, cfg)
    if cfg.eval.enabled and not evaluate:
        raise DataError(f"{cfg.data.name} has no labels to evaluate with ({splits.note}); pass "
                        f"--train-data and --test-data with labelled folders, or --no-eval")
    if cfg.eval.enabled is None and not evaluate:
        log.warning("no evaluation after pretraining: %s", splits.note)
    if evaluate:
        modality.check_evaluation(cfg)  # what the evaluation reads is there before hours of training
    ctx = modality.context(cfg, train_set, distributed.world_size())
    method = build_method(cfg, ctx)
    if distributed.is_main():
        write_config(cfg, out / "config.yaml")
    log.info("pretraining %s (%s backbone, %d features) on %s: %d samples, %s", cfg.method["name"],
             cfg.backbone["name"], method.feature_dim, cfg.data.name, len(train_set), splits.note)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, method, train_set, out)
    fit = trainer.fit()
    preprocess = modality.preprocess(cfg, train_set)
    results: dict[str, Any] = {
        "method": cfg.method["name"],
        "backbone": cfg.backbone["name"],
        "dataset": cfg.data.name,
        "modality": modality.name,
        "pretrain_images": len(train_set),
        "epochs": fit.epochs_done,
        "steps": fit.steps_done,
        "stopped_early": fit.stopped_early,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "images_per_s": round(fit.images_per_s, 2),
        "peak_memory_mb": round(fit.peak_memory_mb, 1),
        # pretraining on the CPU repeats bit for bit with the same number of threads, not across numbers
        "device": describe(trainer.device),
        "checkpoint": str(fit.checkpoint),
    }
    if distributed.is_main():
        save_encoder(method, cfg, ctx, preprocess, out / "encoder.pt")
        results["encoder"] = str(out / "encoder.pt")
    if evaluate and distributed.is_main():
        results.update(modality.evaluate(method, preprocess, splits, cfg, note=splits.note,
                                         device=resolve_device(cfg.train.device)))
    if distributed.is_main():
        results["curves"] = draw_curves(out, results)
        write_results(results, out)
    return results


def draw_curves(out: Path, results: dict[str, Any]) -> str | None:
    """curves.png beside metrics.csv: loss, learning rate and the kNN top-1 where it was measured; None
    (and a log line) when the run logged no metrics row (train.log_every longer than the run)."""
    from contrastive.plots import training_curves

    if not (out / "metrics.csv").is_file():
        log.info("no metrics.csv rows were logged, so there are no training curves to draw")
        return None
    knn = [(results["steps"], results["knn_top1"])] if "knn_top1" in results else []
    title = f"{results.get('method', '')} on {results.get('dataset', '')}"
    return str(training_curves(out / "metrics.csv", out / "curves.png", title=title, knn=knn))


def evaluate_encoder(encoder: nn.Module, preprocess: Any, train_set, test_set, cfg: Config, *, note: str,
                     protocols: tuple[str, ...] | None = None) -> dict[str, Any]:
    """kNN and/or linear probe of a frozen encoder on labelled train and test sets, beside the baseline of the
    data's modality (the raw-pixel kNN; for audio the kNN and probe on MFCC statistics), as one dict."""
    modality = modality_of(train_set)
    return modality.evaluate_encoder(encoder, preprocess, Splits(train_set, train_set, test_set, note), cfg,
                                     note=note, device=resolve_device(cfg.train.device), protocols=protocols)


def load_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the frozen encoder a method evaluates (``Method.encoder()``) from a checkpoint.pt or
    encoder.pt, or a run folder holding either; returns (module, info) where info holds ``feature_dim``,
    ``preprocess`` (what the encoder reads) and the run's ``config``."""
    run = load_run(path)
    return run.encoder, {"feature_dim": run.feature_dim, "preprocess": run.preprocess, "config": run.config}


def load_method(path: str | Path) -> tuple[Method, dict]:
    """The whole method of a checkpoint.pt (or the run folder holding one), in eval mode on the CPU, with its
    run ``config`` and ``preprocess``: what needs more than the encoder (clip's two towers)."""
    run = load_run(path, method=True)
    return run.method, {"config": run.config, "preprocess": run.preprocess}


def evaluate(checkpoint: str | Path, data: DataConfig, *, protocols: tuple[str, ...], overrides: list[str] = (),
             output: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate any checkpoint on any data its encoder reads; writes results.json and config.yaml to ``output``.

    The evaluation settings are the checkpoint's run config with ``overrides``; the encoder's modality says what
    is measured (labelled images and sound: the kNN or linear probe; sentences: STS and SentEval). When the test
    images were seen (unlabelled) in pretraining, as a held-out fraction of the folder a ``--no-eval`` run
    pretrained on whole, the log and results.json say so. An ``output`` holding another run is refused unless
    ``overwrite`` (``runs.claimed``).
    """
    with claimed(output, overwrite=overwrite, data=data) if output is not None else nullcontext():
        return _evaluate(checkpoint, data, protocols=protocols, overrides=overrides, output=output)


def _evaluate(checkpoint: str | Path, data: DataConfig, *, protocols: tuple[str, ...], overrides: list[str],
              output: str | Path | None) -> dict[str, Any]:
    run = load_run(checkpoint)
    modality = modality_named(run.preprocess.modality, str(checkpoint))
    cfg = apply_overrides(run.config, list(overrides))
    # data.* overrides (data.label=speaker) apply to the data evaluated on
    data = apply_overrides(dataclasses.replace(cfg, data=data),
                           [o for o in overrides if o.strip().startswith("data.")]).data
    cfg.data = modality.data_for(data, run.preprocess)
    splits = load_splits(cfg.data) if modality.labelled_evaluation else None  # text: STS and SentEval
    seen = (seen_in_pretraining(run.config.data, run.config.eval.enabled is not False, cfg.data)
            if splits is not None else None)
    if seen:
        log.warning("%s", seen)
    note = splits.note if splits is not None else f"{modality.name} encoder of {checkpoint}"
    res = {"checkpoint": str(checkpoint), "dataset": cfg.data.name, "modality": modality.name,
           **modality.evaluate_encoder(run.encoder, run.preprocess, splits, cfg, note=note,
                                       device=resolve_device(cfg.train.device), protocols=protocols)}
    if seen:
        res["evaluation"]["warning"] = seen
    if output is not None:
        write_config(cfg, Path(output) / "config.yaml")
        write_results(res, output)
    return res


def embed(checkpoint: str | Path, data: DataConfig, output: str | Path, *, split: str = "all",
          batch_size: int = 512, device: str = "auto") -> dict[str, Any]:
    """Write a checkpoint's embeddings of a dataset to ``output`` (.npy, labels beside when known), as the data's
    modality embeds it (a clip run: images and their captions, or sentences, in the joint space)."""
    run = load_run(checkpoint)
    modality = detect(data)
    splits = load_splits(modality.data_for(data, run.preprocess))
    parts = {"pretrain": [splits.pretrain], "test": [splits.eval_test],
             "all": [splits.pretrain] + ([splits.eval_test] if splits.eval_test is not None and
                                         splits.eval_test is not splits.pretrain else [])}
    if split not in parts:
        raise DataError(f"--split {split!r} is not one of {', '.join(parts)}")
    sets = [s for s in parts[split] if s is not None]
    if not sets:
        raise DataError(f"{data.name} has no {split} split ({splits.note})")
    res = modality.embed(run.encoder, run.method, run.preprocess, sets, Path(output), batch_size=batch_size,
                         device=resolve_device(device))
    return {**res, "split": split, "note": splits.note, "classes": sets[0].classes}
