"""The Python API: what the ``contrastive`` command does, callable without it.

    from contrastive import api
    cfg = api.resolve_config(overrides=["data.name=digits", "train.epochs=10"])
    results = api.pretrain(cfg)            # trains, evaluates, writes results.json
    encoder, info = api.load_encoder("runs/latest/checkpoint.pt")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contrastive import distributed
from contrastive.config import Config, DataConfig
from contrastive.configure import apply_overrides, resolve_config
from contrastive.data import load_splits
from contrastive.data.modality import modality_of
from contrastive.data.preprocess import AudioPreprocess, Preprocess, TextPreprocess
from contrastive.data.views import run_view_size
from contrastive.data.splits import seen_in_pretraining
from contrastive.errors import CheckpointError, DataError
from contrastive.evaluation import extract_features, knn_device, knn_top1, linear_probe, save_embeddings
from contrastive.machine import describe
from contrastive.methods import build_method, method_config
from contrastive.methods.base import BuildContext, Method
from contrastive.registry import lookup
from contrastive.runs import load_run, run_file, save_encoder, write_config, write_results
from contrastive.training.checkpoint import is_checkpoint, read_file
from contrastive.training.trainer import Trainer
from contrastive.device import resolve_device

log = logging.getLogger("contrastive")

__all__ = ["BuildContext", "Preprocess", "build_method", "embed", "evaluate", "evaluate_encoder", "load_encoder",
           "pretrain", "resolve_config", "run_file"]

ENCODER_FORMAT = "contrastive-encoder/2"


def pretrain(cfg: Config) -> dict[str, Any]:
    """Pretrain ``cfg.method`` on ``cfg.data``, then (unless ``eval.enabled`` is off, or unset on data without
    labels) evaluate the frozen backbone with the weighted kNN and the linear probe beside the baseline of the
    data's modality (images: the raw-pixel kNN; audio: MFCC statistics).

    Writes into ``train.output``: config.yaml, checkpoint.pt, encoder.pt (backbone weights and their
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
    out = Path(cfg.train.output)
    # every process decodes its own copy at once; only a download is rank 0's alone, first (data/named.py)
    splits = load_splits(cfg.data, evaluate=cfg.eval.enabled is not False)
    modality = modality_of(splits.pretrain)
    train_set = modality.prepare(splits.pretrain, cfg)  # text: tokenised by the encoder's tokenizer
    evaluate = cfg.eval.enabled is not False and modality.can_evaluate(splits, cfg)
    if cfg.eval.enabled and not evaluate:
        raise DataError(f"{cfg.data.name} has no labels to evaluate with ({splits.note}); pass "
                        f"--train-data and --test-data with labelled folders, or --no-eval")
    if cfg.eval.enabled is None and not evaluate:
        log.warning("no evaluation after pretraining: %s", splits.note)
    size = run_view_size(cfg, train_set.image_size)  # the global views' side: what evaluation feeds the encoder
    ctx = BuildContext.for_run(cfg, train_set, distributed.world_size())
    method = build_method(cfg, ctx)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
    log.info("pretraining %s (%s backbone, %d features) on %s: %d images, %s", cfg.method["name"],
             cfg.backbone["name"], method.feature_dim, cfg.data.name, len(train_set), splits.note)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, method, train_set, out)
    fit = trainer.fit()
    preprocess = modality.preprocess(train_set, size)
    results: dict[str, Any] = {
        "method": cfg.method["name"],
        "backbone": cfg.backbone["name"],
        "dataset": cfg.data.name,
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
        results.update(modality.evaluate(method, preprocess, splits, cfg, note=splits.note))
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


def evaluate_encoder(encoder: nn.Module, preprocess: Preprocess, train_set, test_set, cfg: Config,
                     *, note: str, protocols: tuple[str, ...] | None = None) -> dict[str, Any]:
    """kNN and/or linear probe of a frozen encoder, plus the baseline of the data's modality (the raw-pixel kNN;
    for audio the kNN and probe on MFCC statistics), as one dict."""
    e = cfg.eval
    if protocols is None:
        protocols = tuple(p for p, on in (("knn", e.knn), ("linear", e.linear)) if on)
    for name, ds in (("training", train_set), ("test", test_set)):
        if ds is None or not bool((ds.labels >= 0).all()):
            raise DataError(f"evaluation needs labelled {name} data ({note}); pass --train-data/--test-data "
                            f"with class sub-folders")
    modality = modality_of(train_set)
    for ds in (train_set, test_set):
        modality.check_preprocess(preprocess, ds)
    device = resolve_device(cfg.train.device)
    num_classes = train_set.num_classes
    t0 = time.perf_counter()
    feats = {}
    for split, ds in (("train", train_set), ("test", test_set)):
        feats[split] = extract_features(encoder.to(device), ds, preprocess=preprocess, batch_size=e.batch_size,
                                        device=device)
    base = modality.baseline_key
    res: dict[str, Any] = {
        "evaluation": {"split": note, "train_images": len(train_set), "test_images": len(test_set),
                       "knn": {"k": e.knn_k, "temperature": e.knn_temperature, "similarity": "cosine"},
                       f"{base}_baseline": modality.describe_baseline(preprocess, e),
                       "linear": {"epochs": e.linear_epochs, "lr": e.linear_lr, "optimizer": "adamw",
                                  "features": "frozen, standardised"}},
        "feature_seconds": round(time.perf_counter() - t0, 2),
    }
    (xtr, ytr), (xte, yte) = feats["train"], feats["test"]
    if "knn" in protocols:
        res["knn_top1"] = knn_top1(xtr, ytr, xte, yte, num_classes=num_classes, k=e.knn_k,
                                   temperature=e.knn_temperature, device=knn_device(xtr, device))
    if "linear" in protocols:
        probe = linear_probe(xtr, ytr, xte, yte, num_classes=num_classes, epochs=e.linear_epochs, lr=e.linear_lr,
                             weight_decay=e.linear_weight_decay, batch_size=e.linear_batch_size, seed=cfg.seed,
                             device=device)
        res["linear_top1"] = probe["top1"]
        res["linear_train_top1"] = probe["train_top1"]
    baseline = [p for p in protocols if p in modality.baseline_protocols] if e.raw_pixel_baseline else []
    if baseline:
        (btr, _), (bte, _) = (modality.baseline_features(ds, preprocess, e, device) for ds in (train_set, test_set))
        if "knn" in baseline:
            res[f"{base}_knn_top1"] = knn_top1(btr, ytr, bte, yte, num_classes=num_classes, k=e.knn_k,
                                               temperature=e.knn_temperature, device=knn_device(btr, device))
        if "linear" in baseline:
            res[f"{base}_linear_top1"] = linear_probe(btr, ytr, bte, yte, num_classes=num_classes,
                                                      epochs=e.linear_epochs, lr=e.linear_lr,
                                                      weight_decay=e.linear_weight_decay,
                                                      batch_size=e.linear_batch_size, seed=cfg.seed,
                                                      device=device)["top1"]
    return res


def load_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the frozen encoder a method evaluates (``Method.encoder()``) from a checkpoint.pt or
    encoder.pt, or a run folder holding either; returns (module, info) where info holds ``feature_dim``,
    ``preprocess`` (what the encoder reads) and the run's ``config``."""
    run = load_run(path)
    return run.encoder, {"feature_dim": run.feature_dim, "preprocess": run.preprocess, "config": run.config}


def evaluate(checkpoint: str | Path, data: DataConfig, *, protocols: tuple[str, ...], overrides: list[str] = (),
             output: str | Path | None = None) -> dict[str, Any]:
    """Evaluate any checkpoint on any labelled dataset; writes results.json and config.yaml to ``output``.

    The evaluation settings are the checkpoint's run config (defaults for an encoder.pt) with ``overrides``.
    When the test images were seen (unlabelled) in pretraining, as a held-out fraction of the folder a
    ``--no-eval`` run pretrained on whole, the log and results.json say so.
    """
    encoder, info = load_encoder(checkpoint)
    pretrained = info["config"] or Config()
    cfg = apply_overrides(pretrained, list(overrides))
    # data.* overrides (data.label=speaker) apply to the data evaluated on
    data = apply_overrides(dataclasses.replace(cfg, data=data),
                           [o for o in overrides if o.strip().startswith("data.")]).data
    data = _at_encoder_size(data, info["preprocess"])
    cfg.data = data
    if isinstance(info["preprocess"], TextPreprocess):  # a sentence encoder: STS and SentEval (eval.*)
        from contrastive.data.modality import evaluate_text_encoder
        from contrastive.data.text_data import text_root

        dev = resolve_device(cfg.train.device)
        res = {"checkpoint": str(checkpoint), **evaluate_text_encoder(encoder.to(dev), info["preprocess"], cfg,
                                                                      text_root(data), device=dev,
                                                                      note=f"sentence encoder of {checkpoint}")}
        if output is not None:
            Path(output).mkdir(parents=True, exist_ok=True)
            write_config(cfg, Path(output) / "config.yaml")
            write_results(res, output)
        return res
    splits = load_splits(data)
    seen = seen_in_pretraining(pretrained.data, pretrained.eval.enabled is not False, data)
    if seen:
        log.warning("%s", seen)
    res = {"checkpoint": str(checkpoint), "dataset": data.name,
           **evaluate_encoder(encoder, info["preprocess"], splits.eval_train, splits.eval_test, cfg,
                              note=splits.note, protocols=protocols)}
    if seen:
        res["evaluation"]["warning"] = seen
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        write_config(cfg, Path(output) / "config.yaml")
        write_results(res, output)
    return res


def embed(checkpoint: str | Path, data: DataConfig, output: str | Path, *, split: str = "all",
          batch_size: int = 512, device: str = "auto") -> dict[str, Any]:
    """Write the frozen backbone's features of a dataset to ``output`` (.npy, labels beside when known)."""
    encoder, info = load_encoder(checkpoint)
    splits = load_splits(_at_encoder_size(data, info["preprocess"]))
    parts = {"pretrain": [splits.pretrain], "test": [splits.eval_test],
             "all": [splits.pretrain] + ([splits.eval_test] if splits.eval_test is not None and
                                         splits.eval_test is not splits.pretrain else [])}
    if split not in parts:
        raise DataError(f"--split {split!r} is not one of {', '.join(parts)}")
    sets = [s for s in parts[split] if s is not None]
    if not sets:
        raise DataError(f"{data.name} has no {split} split ({splits.note})")
    dev = resolve_device(device)
    joint = _joint_embedders(checkpoint, sets[0])
    if joint is not None:  # a clip run: images and captions, or sentences, in the joint space
        return _embed_joint(joint, sets, output, split=split, note=splits.note, batch_size=batch_size, device=dev)
    sets = [modality_of(s).for_encoder(s, info["preprocess"]) for s in sets]  # text: tokenised as in training
    xs, ys = zip(*(extract_features(encoder.to(dev), s, preprocess=info["preprocess"], batch_size=batch_size,
                                    device=dev) for s in sets))
    feats, labels = torch.cat(xs), torch.cat(ys)
    paths = save_embeddings(feats, labels, output)
    return {"features": [str(p) for p in paths], "images": int(feats.shape[0]), "dim": int(feats.shape[1]),
            "split": split, "note": splits.note, "classes": sets[0].classes}


def load_method(path: str | Path) -> tuple[Method, dict]:
    """The whole method of a checkpoint.pt (or the run folder holding one), in eval mode on the CPU, with its
    run ``config`` and ``preprocess``: what needs more than the encoder (clip's two towers)."""
    run = load_run(path, method=True)
    return run.method, {"config": run.config, "preprocess": run.preprocess}


def _joint_embedders(checkpoint: str | Path, dataset) -> tuple[Method, dict] | None:
    """(clip method, info) when ``checkpoint`` is a run of a method with an image and a text tower and
    ``dataset`` holds captions or sentences; None otherwise (the encoder alone embeds)."""
    if getattr(dataset, "modality", "image") not in ("image-text", "text"):
        return None
    path = run_file(checkpoint)
    raw = read_file(path)
    if not is_checkpoint(raw):
        return None
    spec = lookup("methods", raw["config"].get("method", {}).get("name"))
    if "text" not in getattr(spec.config_class, "__dataclass_fields__", {}):  # no text tower (method.text)
        return None
    return load_method(path)


def _embed_joint(joint: tuple[Method, dict], sets: list, output: str | Path, *, split: str, note: str,
                 batch_size: int, device: torch.device) -> dict[str, Any]:
    """A clip run's embeddings: images (``output``) and their captions (``<stem>.captions.npy``, the caption
    texts in ``<stem>.captions.txt`` and each caption's image row in ``<stem>.caption_image.npy``), or, for text,
    one vector per sentence (``output``), all in the joint space."""
    from contrastive.evaluation.embed import save_array
    from contrastive.evaluation.sts import encode_sentences
    from contrastive.nn.text import load_tokenizer, text_max_tokens, text_tokenizer_path

    method, info = joint
    section = method_config(info["config"]).text
    tokenizer = load_tokenizer(text_tokenizer_path(section))
    texts = method.text_embedder().to(device)

    def encode(sentences: list[str]) -> torch.Tensor:
        return encode_sentences(texts, tokenizer, sentences, batch_size=batch_size,
                                max_length=text_max_tokens(section), device=device)

    out = Path(output)
    if sets[0].modality == "text":
        rows = [r for s in sets for r in s.rows]
        if not isinstance(rows[0], str):
            raise DataError(f"{sets[0].name} holds rows of several sentences; embed a file of one sentence a line")
        feats = encode(rows)
        paths = save_embeddings(feats, None, out)
        return {"features": [str(p) for p in paths], "images": len(rows), "sentences": len(rows),
                "dim": int(feats.shape[1]), "split": split, "note": note, "classes": None}
    images = method.image_embedder().to(device)
    feats, labels = zip(*(extract_features(images, s, preprocess=info["preprocess"], batch_size=batch_size,
                                           device=device) for s in sets))
    z_img = torch.cat(feats)
    captions = [c for s in sets for caps in s.captions for c in caps]
    owner, base = [], 0
    for s in sets:
        owner += [base + i for i, caps in enumerate(s.captions) for _ in caps]
        base += len(s)
    z_txt = encode(captions)
    stem = out.with_suffix("")
    paths = save_embeddings(z_img, None, out) + save_embeddings(z_txt, None, Path(f"{stem}.captions.npy"))
    paths.append(save_array(torch.tensor(owner), Path(f"{stem}.caption_image.npy")))
    text_file = Path(f"{stem}.captions.txt")
    text_file.write_text("".join(c.replace("\n", " ") + "\n" for c in captions), encoding="utf-8")
    paths.append(text_file)
    return {"features": [str(p) for p in paths], "images": int(z_img.shape[0]), "captions": len(captions),
            "dim": int(z_img.shape[1]), "split": split, "note": note, "classes": None}


def _at_encoder_size(data: DataConfig, pre: Preprocess | AudioPreprocess) -> DataConfig:
    """Decode at the encoder's input size unless data.image_size says otherwise, so a checkpoint sees its
    evaluation images exactly as it saw its training images (audio clips are taken whole)."""
    if data.image_size is not None or not isinstance(pre, Preprocess):
        return data
    return dataclasses.replace(data, image_size=pre.size)
