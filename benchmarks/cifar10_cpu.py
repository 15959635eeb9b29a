"""CIFAR-10 on a CPU, one row per method: training images/s and the kNN / linear-probe accuracy a fixed budget
buys, for our pipeline and, side by side where lightly has the parts, for the same recipe built from lightly
1.6's building blocks (SimCLR, MoCo v2, BYOL).

Run (see benchmarks/README.md for the environment):
    .venv-bench/bin/python benchmarks/cifar10_cpu.py                                # SimCLR, ours, 4 epochs
    .venv-bench/bin/python benchmarks/cifar10_cpu.py --method moco-v2 --mode both   # ours, lightly, ratios
    .venv-bench/bin/python benchmarks/cifar10_cpu.py --method cmc --mode random     # the untrained encoder
Each run merges its entry into benchmarks/results/cifar10_cpu.json under "<method>/<mode>", replacing that
method and mode's previous one.

Data: ../shared/data/cifar10-train-jpeg.tar.gz (the CIFAR-10 *training* split as JPEGs; the official test
split is not available), unpacked once into the cache. The last 500 images of every class by sorted file
name are held out as the test side (5,000 images); the other 45,000 are pretrained on and are the
evaluation's train side. The split is a folder of symlinks, <cache>/split/{train,test}/<class>/, which our
library reads natively and torchvision's ImageFolder reads for lightly.

What is the same in both modes: the recipe (configs/<method>-cifar10.yaml) with backbone small_cnn, its
initial weights (our build_backbone under the same seed), the split, epochs, batch size, optimiser and
schedule (ours, so the optimiser is not a variable), torch's thread count, and the evaluation (our
frozen-feature kNN k=200 T=0.07, linear probe and raw-pixel kNN).
`--mode random` trains nothing: it evaluates the method's evaluated encoder (for CPC the pooled patch encoder,
for CMC the concatenated view encoders) with the weights pretraining starts from (the same seed), under the
same kNN and linear probe, which is what a method must beat to have learned anything.
What differs is exactly the pipeline under test: ours decodes the images once into memory and augments
whole batches in the training process; lightly's is per-image torchvision transforms in 2 DataLoader
workers decoding JPEGs every epoch, and its heads, losses and momentum utilities, used as its examples do.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from contrastive import api
from contrastive.config import Config
from contrastive.configure import resolve_config
from contrastive.device import peak_memory_mb
from contrastive.methods import method_config
from contrastive.modalities import load_splits, modality_of
from contrastive.modalities.image import IMAGE
from contrastive.modalities.image.preprocess import Preprocess
from contrastive.modalities.image.views import jitter_amounts
from contrastive.nn.backbones import build_backbone
from contrastive.optim.optimizers import build_optimizer
from contrastive.optim.schedules import lr_at, scaled_lr

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
RESULTS = ROOT / "benchmarks" / "results" / "cifar10_cpu.json"
HELD_OUT_PER_CLASS = 500
# CIFAR-10's published per-channel statistics; the lightly pipeline normalises with them, as a lightly user
# would, and its encoder is evaluated with the same ones.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
BACKBONE_NOTE = ("backbone small_cnn instead of the recipe's resnet18: resnet18 trains at only ~20 images/s "
                 "on this 2-core CPU, too slow for a benchmark of minutes")
LIGHTLY_METHODS = ("simclr", "moco-v2", "byol")  # methods with a lightly side-by-side (run_lightly)


def recipe(method: str) -> Path:
    return ROOT / "configs" / f"{method}-cifar10.yaml"
INSTALL_HINT = ("python3 -m venv .venv-bench && .venv-bench/bin/pip install -e . -r benchmarks/requirements.txt, "
                "then run this script with .venv-bench/bin/python")


# ------------------------------------------------------------------------------------------------ data


def unpack(archive: Path, cache: Path) -> Path:
    """``<cache>/train/<class>/*.jpg``, unpacked from ``archive`` the first time only."""
    target = cache / "train"
    if target.is_dir():
        return target
    if not archive.is_file():
        sys.exit(f"{archive} does not exist; the benchmark reads CIFAR-10 from ../shared/data/ (--archive)")
    tmp = cache / ".unpacking"
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    # Renamed into place only when complete, so an interrupted unpack is redone rather than half-used.
    (tmp / "train").rename(target)
    tmp.rmdir()
    return target


def materialise_split(images: Path, cache: Path, limit: int | None) -> Path:
    """``<cache>/split[-limitN]/{train,test}/<class>/``: symlinks to ``images``, the last 500 files of each
    class (sorted by name) under test/, the rest under train/; ``limit`` keeps only the first ``limit`` of
    each side per class (smoke runs)."""
    split = cache / ("split" if limit is None else f"split-limit{limit}")
    if split.is_dir():
        return split
    tmp = cache / f".{split.name}.building"
    for class_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.jpg"))
        sides = {"train": files[:-HELD_OUT_PER_CLASS], "test": files[-HELD_OUT_PER_CLASS:]}
        for side, members in sides.items():
            folder = tmp / side / class_dir.name
            folder.mkdir(parents=True, exist_ok=True)
            for f in members[:limit]:
                link = folder / f.name
                if not link.is_symlink():  # an interrupted build is resumed, not failed
                    link.symlink_to(f.resolve())
    tmp.rename(split)
    return split


# ------------------------------------------------------------------------------------------------ runs


def make_config(args: argparse.Namespace, split: Path, mode: str) -> Config:
    """The recipe with the benchmark's budget; both modes read every shared setting from it."""
    # A tree rather than key=value strings keeps the fixed settings typed (no YAML parsing of values).
    train = {"epochs": args.epochs, "device": "cpu", "progress": False, "tensorboard": False,
             "output": str(args.cache / "runs" / args.method / mode)}
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    tree = {"data": {"name": str(split)}, "backbone": {"name": "small_cnn"}, "train": train,
            "eval": {"enabled": True, "knn": True, "knn_k": 200, "knn_temperature": 0.07, "linear": True}}
    return resolve_config(recipe=recipe(args.method), tree=tree, overrides=args.set)


def run_ours(cfg: Config) -> dict:
    results = api.pretrain(cfg)
    return {
        "pipeline": f"contrastive {cfg.method['name']}: images decoded once into memory, batched augmentation "
                    "(TensorViews) in the training process, the method's own modules and loss",
        "images_per_s": results["images_per_s"],
        "train_seconds": results["train_seconds"],
        "peak_memory_mb": results["peak_memory_mb"],
        "steps": results["steps"],
        "pretrain_images": results["pretrain_images"],
        **{k: results[k] for k in ("knn_top1", "linear_top1", "raw_pixel_knn_top1")},
        "evaluation": results["evaluation"],
    }


def run_random(cfg: Config) -> dict:
    """The method's evaluated encoder as built, untrained: the baseline a pretraining run must beat."""
    torch.manual_seed(cfg.seed)  # as api.pretrain: these are the weights its training starts from
    splits = load_splits(cfg.data)
    train_set = splits.pretrain
    ctx = modality_of(train_set).context(cfg, train_set)
    method = api.build_method(cfg, ctx)
    preprocess = modality_of(train_set).preprocess(cfg, train_set)
    evaluation = api.evaluate_encoder(method.encoder(), preprocess, splits.eval_train, splits.eval_test, cfg,
                                      note=splits.note)
    return {
        "pipeline": f"contrastive {cfg.method['name']}: the evaluated encoder at its initial (random) weights, "
                    "no pretraining",
        "images_per_s": None, "train_seconds": 0.0, "peak_memory_mb": round(peak_memory_mb(torch.device("cpu")), 1),
        "steps": 0, "pretrain_images": len(train_set),
        **{k: evaluation[k] for k in ("knn_top1", "linear_top1", "raw_pixel_knn_top1")},
        "evaluation": evaluation["evaluation"],
    }


def _lightly_simclr(cfg: Config, backbone: torch.nn.Module, feature_dim: int):
    """SimCLRTransform, SimCLRProjectionHead and NTXentLoss, two forward passes as lightly's examples."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    v, method = cfg.views, method_config(cfg)
    model = torch.nn.Sequential(backbone, SimCLRProjectionHead(feature_dim, feature_dim, method.projection_dim))
    transform = SimCLRTransform(input_size=32, cj_prob=v.jitter_p, cj_strength=v.jitter_strength,
                                min_scale=v.crop_scale[0], random_gray_scale=v.grayscale_p, gaussian_blur=v.blur_p,
                                hf_prob=v.hflip_p, normalize={"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)})
    criterion = NTXentLoss(temperature=method.temperature)

    def step(x0, x1):
        return criterion(model(x0), model(x1))

    pipeline = ("torchvision ImageFolder + lightly SimCLRTransform in a DataLoader (2 workers, JPEG decoded every "
                "epoch), SimCLRProjectionHead, NTXentLoss, two forward passes (lightly's examples)")
    return model, transform, step, None, pipeline


def _lightly_moco_v2(cfg: Config, backbone: torch.nn.Module, feature_dim: int):
    """lightly's MoCo example: MoCoProjectionHead, a deep-copied momentum encoder updated with
    update_momentum, batch_shuffle / batch_unshuffle around the key encoder, and NTXentLoss with its
    memory bank (MemoryBankModule) of ``queue_size`` keys."""
    import copy

    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform

    v, method = cfg.views, method_config(cfg)
    jb, jc, js, jh = jitter_amounts(v)
    transform = MoCoV2Transform(input_size=32, cj_prob=v.jitter_p, cj_bright=jb, cj_contrast=jc, cj_sat=js, cj_hue=jh,
                                min_scale=v.crop_scale[0], random_gray_scale=v.grayscale_p, gaussian_blur=v.blur_p,
                                hf_prob=v.hflip_p, normalize={"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)})
    head = MoCoProjectionHead(feature_dim, method.hidden_dim or feature_dim, method.dim)
    model = torch.nn.Sequential(backbone, head)
    model_momentum = copy.deepcopy(model)
    deactivate_requires_grad(model_momentum)
    criterion = NTXentLoss(temperature=method.temperature, memory_bank_size=(method.queue_size, method.dim))

    def step(x_query, x_key):
        update_momentum(model, model_momentum, m=method.momentum)
        query = model(x_query)
        with torch.no_grad():
            shuffled, shuffle = batch_shuffle(x_key)
            key = batch_unshuffle(model_momentum(shuffled), shuffle).detach()
        return criterion(query, key)

    pipeline = ("torchvision ImageFolder + lightly MoCoV2Transform in a DataLoader (2 workers, JPEG decoded every "
                "epoch), MoCoProjectionHead, update_momentum, batch_shuffle/batch_unshuffle (one batch-norm group: "
                "lightly has no split batch norm), NTXentLoss(memory_bank_size=(queue_size, dim)), as lightly's "
                "MoCo example")
    return model, transform, step, model_momentum, pipeline


def _lightly_byol(cfg: Config, backbone: torch.nn.Module, feature_dim: int):
    """lightly's BYOL example: BYOLProjectionHead, BYOLPredictionHead, deep-copied target updated with
    update_momentum at cosine_schedule's coefficient before each forward, NegativeCosineSimilarity, and
    BYOLTransform's two views set to the recipe's groups (blur and solarize per view)."""
    import copy

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    method = method_config(cfg)
    first, second = (g.view for g in IMAGE.view_groups(cfg, 32))

    def view(cls, v):
        jb, jc, js, jh = jitter_amounts(v)
        return cls(input_size=32, cj_prob=v.jitter_p, cj_bright=jb, cj_contrast=jc, cj_sat=js, cj_hue=jh,
                   min_scale=v.crop_scale[0], random_gray_scale=v.grayscale_p, gaussian_blur=v.blur_p,
                   solarization_prob=v.solarize_p, hf_prob=v.hflip_p,
                   normalize={"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)})

    transform = BYOLTransform(view_1_transform=view(BYOLView1Transform, first),
                              view_2_transform=view(BYOLView2Transform, second))
    projector = BYOLProjectionHead(feature_dim, method.hidden_dim, method.projection_dim)
    predictor = BYOLPredictionHead(method.projection_dim, method.hidden_dim, method.projection_dim)
    model = torch.nn.ModuleDict({"backbone": backbone, "projector": projector, "predictor": predictor})
    target = torch.nn.ModuleDict({"backbone": copy.deepcopy(backbone), "projector": copy.deepcopy(projector)})
    deactivate_requires_grad(target)
    criterion = NegativeCosineSimilarity()
    state = {"step": 0, "total": None}

    def step(x0, x1):
        m = cosine_schedule(state["step"], state["total"], method.momentum, 1.0)
        update_momentum(model["backbone"], target["backbone"], m=m)
        update_momentum(model["projector"], target["projector"], m=m)
        state["step"] += 1
        p0 = model["predictor"](model["projector"](model["backbone"](x0)))
        p1 = model["predictor"](model["projector"](model["backbone"](x1)))
        with torch.no_grad():
            z0 = target["projector"](target["backbone"](x0))
            z1 = target["projector"](target["backbone"](x1))
        # ours minimises (2 - 2 cos) + (2 - 2 cos); lightly's example halves -cos. Twice the sum of -cos has
        # our gradient, so the optimiser sees the same problem (the loss is ours minus 4).
        return 2 * (criterion(p0, z1) + criterion(p1, z0))

    pipeline = ("torchvision ImageFolder + lightly BYOLTransform (BYOLView1Transform / BYOLView2Transform at the "
                "recipe's groups) in a DataLoader (2 workers, JPEG decoded every epoch), BYOLProjectionHead, "
                "BYOLPredictionHead, deep-copied target with update_momentum(cosine_schedule), "
                "NegativeCosineSimilarity (x2, our gradient scale), as lightly's BYOL example")
    return model, transform, step, target, pipeline, state


def run_lightly(cfg: Config, split: Path) -> dict:
    import lightly
    from torchvision.datasets import ImageFolder

    # Same seed, then the backbone first, as api.pretrain does: both modes start from identical weights.
    torch.manual_seed(cfg.seed)
    backbone, feature_dim = build_backbone(cfg.backbone, input_shape=(3, 32, 32))
    build = {"simclr": _lightly_simclr, "moco-v2": _lightly_moco_v2, "byol": _lightly_byol}[cfg.method["name"]]
    model, transform, train_step, momentum_model, pipeline, *schedule = build(cfg, backbone, feature_dim)
    dataset = ImageFolder(str(split / "train"), transform=transform)
    batch = cfg.train.batch_size
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=2)
    # Our optimiser and schedule rather than lightly's, so the optimiser is not a variable of the comparison
    # (lightly's LARS would also adapt biases and norm weights unless the user split the groups).
    peak_lr = scaled_lr(cfg.optim.lr, batch, cfg.optim.lr_scaling)
    optimizer = build_optimizer(model, cfg.optim, peak_lr)
    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    for state in schedule:  # a momentum schedule over the run's steps (BYOL)
        state["total"] = total_steps

    model.train()
    if momentum_model is not None:
        momentum_model.train()
    step = images = 0
    start = time.perf_counter()
    for _ in range(cfg.train.epochs):
        for (x0, x1), _labels in loader:
            lr = lr_at(step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, optim=cfg.optim, peak=peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(x0, x1)
            if not torch.isfinite(loss):
                sys.exit(f"lightly mode: the loss became {loss.item()} at step {step}; its numbers would be void")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            step += 1
            images += x0.shape[0]
    train_seconds = time.perf_counter() - start
    peak = peak_memory_mb(torch.device("cpu"))  # taken here, as ours is, before evaluation decodes the split

    splits = load_splits(cfg.data)
    evaluation = api.evaluate_encoder(backbone, Preprocess(3, 32, CIFAR_MEAN, CIFAR_STD), splits.eval_train,
                                      splits.eval_test, cfg, note=splits.note)
    return {
        "pipeline": f"lightly {lightly.__version__}: {pipeline}; our optimiser and schedule",
        "lightly": lightly.__version__,
        "images_per_s": round(images / train_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "peak_memory_mb": round(peak, 1),
        "steps": step,
        "pretrain_images": len(dataset),
        **{k: evaluation[k] for k in ("knn_top1", "linear_top1", "raw_pixel_knn_top1")},
        "evaluation": evaluation["evaluation"],
    }


def run_mode(args: argparse.Namespace, split: Path) -> dict:
    torch.set_num_threads(args.threads)
    cfg = make_config(args, split, args.mode)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    measured = {"ours": run_ours, "random": run_random}.get(args.mode, lambda c: run_lightly(c, split))(cfg)
    return {
        "method": args.method,
        "mode": args.mode,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([_relative(sys.executable), *sys.argv]),
        "budget": budget(args, cfg),
        "backbone_note": BACKBONE_NOTE,
        **measured,
        # The largest reaped child's peak RSS: lightly's DataLoader workers, our one-off decode workers.
        "peak_child_memory_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "total_seconds": round(time.perf_counter() - t0, 2),  # data preparation, training and evaluation
        "machine": {"processor": platform.processor() or platform.machine(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before]},  # a busy machine skews all
    }


def budget(args: argparse.Namespace, cfg: Config) -> dict:
    """What must be equal for two entries to be compared."""
    return {"recipe": str(recipe(args.method).relative_to(ROOT)), "backbone": cfg.backbone["name"],
            "epochs": cfg.train.epochs,
            "batch_size": cfg.train.batch_size, "seed": cfg.seed, "threads": args.threads,
            "limit_per_class": args.limit_per_class, "overrides": args.set,
            "split": f"last {HELD_OUT_PER_CLASS} of each class (sorted names) held out as test"
                     + (f"; only the first {args.limit_per_class} per class of each side" if args.limit_per_class
                        else "")}


# ------------------------------------------------------------------------------------------------ results


def comparison(runs: dict, method: str) -> dict | None:
    """Ours over lightly for ``method``, when both entries ran under the same budget."""
    ours, lightly = runs.get(f"{method}/ours"), runs.get(f"{method}/lightly")
    if ours is None or lightly is None or ours["budget"] != lightly["budget"]:
        return None
    return {
        "images_per_s_ours_over_lightly": round(ours["images_per_s"] / lightly["images_per_s"], 3),
        "knn_top1_ours_over_lightly": round(ours["knn_top1"] / lightly["knn_top1"], 3),
        "linear_top1_ours_over_lightly": round(ours["linear_top1"] / lightly["linear_top1"], 3),
        "runs": {"ours": ours["date"], "lightly": lightly["date"]},
    }


def record(entry: dict, path: Path) -> dict:
    """Merge ``entry`` into the results file (replacing its method and mode's previous entry); returns the
    whole file."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["benchmark"] = ("cifar10_cpu: pretraining on CIFAR-10 (45,000 training JPEGs, 5,000 held out), one entry "
                         "per method and pipeline: training images/s and frozen-feature kNN / linear-probe top-1")
    data.setdefault("runs", {})[f"{entry['method']}/{entry['mode']}"] = entry
    comparisons = data.setdefault("comparisons", {})
    comparisons.pop(entry["method"], None)  # a comparison of entries with different budgets would mislead
    if (c := comparison(data["runs"], entry["method"])) is not None:
        comparisons[entry["method"]] = c
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return data


def print_table(data: dict, path: Path) -> None:
    # Each row says when it ran: rows of other methods and modes come from earlier runs.
    print(f"\n{'run':<17}{'images/s':>10}{'kNN top1':>10}{'linear':>9}{'raw kNN':>9}{'train s':>9}"
          f"{'peak MB':>9}  {'ran at':<21}budget")
    for key, r in data["runs"].items():
        b = r["budget"]
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        print(f"{key:<17}{ips:>10}{r['knn_top1']:>10.4f}{r['linear_top1']:>9.4f}"
              f"{r['raw_pixel_knn_top1']:>9.4f}{r['train_seconds']:>9.1f}{r['peak_memory_mb']:>9.0f}  {r['date']:<21}"
              f"{b['epochs']} epochs x batch {b['batch_size']}, {r['pretrain_images']} images, "
              f"{b['threads']} threads" + (f", limit {b['limit_per_class']}/class" if b["limit_per_class"] else ""))
    for method, c in data.get("comparisons", {}).items():
        print(f"{method} ours / lightly: images/s {c['images_per_s_ours_over_lightly']:.2f}x, "
              f"kNN {c['knn_top1_ours_over_lightly']:.3f}, linear {c['linear_top1_ours_over_lightly']:.3f}")
    print(f"{BACKBONE_NOTE}.\nwritten to {path}")


# ------------------------------------------------------------------------------------------------ main


def _relative(path: str) -> str:
    p = Path(path)
    return os.path.relpath(p) if p.is_relative_to(Path.cwd()) else path


def child_argv(args: argparse.Namespace, mode: str) -> list[str]:
    """This command for one mode, so that ``both`` runs each in a fresh process: peak RSS is a per-process
    high-water mark, and ours would otherwise count in lightly's."""
    argv = [sys.executable, sys.argv[0], "--method", args.method, "--mode", mode, "--epochs", str(args.epochs),
            "--threads",
            str(args.threads), "--cache", str(args.cache), "--archive", str(args.archive), "--out", str(args.out)]
    if args.batch_size is not None:
        argv += ["--batch-size", str(args.batch_size)]
    if args.limit_per_class is not None:
        argv += ["--limit-per-class", str(args.limit_per_class)]
    for item in args.set:
        argv += ["--set", item]
    return argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="simclr", help="a method with a configs/<method>-cifar10.yaml recipe")
    parser.add_argument("--mode", choices=("ours", "lightly", "both", "random"), default="ours",
                        help=f"lightly and both exist for {', '.join(LIGHTLY_METHODS)}; random evaluates the "
                             f"untrained encoder")
    parser.add_argument("--epochs", type=int, default=4, help="pretraining epochs, the fixed budget (default 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (512)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads for every mode (default: os.cpu_count())")
    parser.add_argument("--cache", type=Path, default=Path(".bench/cifar10"),
                        help="where the JPEGs are unpacked and the split is built (default .bench/cifar10)")
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--limit-per-class", type=int, default=None, metavar="N",
                        help="smoke test: only the first N train and N test images of each class")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override applied to both modes, e.g. optim.warmup_epochs=1")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results file (default {RESULTS.relative_to(ROOT)}; with --limit-per-class "
                             f"<cache>/cifar10_cpu_smoke.json, so smoke runs never replace real entries)")
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS if args.limit_per_class is None else args.cache / "cifar10_cpu_smoke.json"
    if not recipe(args.method).is_file():
        sys.exit(f"no recipe {recipe(args.method)}; --method needs a method with a CIFAR-10 recipe")
    if args.mode in ("lightly", "both") and args.method not in LIGHTLY_METHODS:
        sys.exit(f"--mode {args.mode}: the lightly side-by-side exists for {', '.join(LIGHTLY_METHODS)}")
    if args.mode in ("lightly", "both") and importlib.util.find_spec("lightly") is None:
        sys.exit(f"--mode {args.mode} needs lightly 1.6, which is not installed in {sys.prefix}. Install the "
                 f"benchmark environment from benchmarks/requirements.txt: {INSTALL_HINT}")

    split = materialise_split(unpack(args.archive, args.cache), args.cache, args.limit_per_class)
    print(f"split: {split}", flush=True)
    if args.mode == "both":
        for mode in ("ours", "lightly"):
            argv = child_argv(args, mode)
            print(f"running {mode}: {shlex.join(argv)}", flush=True)
            # The child's own table would show a half-updated file; its log and errors (stderr) still show.
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        data = json.loads(args.out.read_text())
        if args.method in data.get("comparisons", {}):
            data["comparisons"][args.method]["command"] = shlex.join([_relative(sys.executable), *sys.argv])
            args.out.write_text(json.dumps(data, indent=2) + "\n")
    else:
        data = record(run_mode(args, split), args.out)
    print_table(data, args.out)


if __name__ == "__main__":
    main()
