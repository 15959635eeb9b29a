"""CPC on sound, CPU: what `cpc-audio` learns from the spoken digits, for digit and for speaker identity.

Run (from the repository root, on an otherwise idle machine):
    .venv/bin/python benchmarks/spoken_digits_cpu.py                 # the recipe's length
    .venv/bin/python benchmarks/spoken_digits_cpu.py --epochs 10
Writes benchmarks/results/spoken_digits_cpu.json.

Data: ../shared/data/fsdd-recordings.tar.gz (the Free Spoken Digit Dataset: 3,000 8 kHz clips, 10 digits x 6
speakers x 50 recordings); pretraining and the probes' training side are recordings 5-49 (2,700 clips), the test
side recordings 0-4 (300 clips), the dataset's usual split. Recipe: configs/cpc-audio-spoken-digits.yaml.
Three encoders under the same kNN (k=200, T=0.07) and linear probe, each for digit and for speaker labels
(`data.label`): the pretrained encoder (the mean of the GRU's context vectors over the clip), the same
architecture at its initial random weights (the seed's, those pretraining starts from), and the mean and std
over time of MFCCs computed by librosa.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from contrastive import api
from contrastive.configure import resolve_config
from contrastive.modalities import load_splits, modality_of

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "cpc-audio-spoken-digits.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "spoken_digits_cpu.json"
KEYS = ("knn_top1", "linear_top1", "mfcc_knn_top1", "mfcc_linear_top1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--output", type=Path, default=Path(".bench/spoken-digits/cpc-audio"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    overrides = [f"data.data_dir={args.data_dir}", "train.device=cpu", "train.progress=false",
                 "train.tensorboard=false", f"train.output={args.output}"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    cfg = resolve_config(recipe=RECIPE, overrides=overrides)
    load_before = os.getloadavg()  # a busy machine skews every number

    pretrained = api.pretrain(cfg)  # evaluates digits (data.label's default) beside the MFCC baseline
    speaker = api.evaluate(args.output / "checkpoint.pt", cfg.data, protocols=("knn", "linear"),
                           overrides=["data.label=speaker"])
    rows = {"cpc-audio": {"digit": {k: pretrained[k] for k in ("knn_top1", "linear_top1")},
                          "speaker": {k: speaker[k] for k in ("knn_top1", "linear_top1")}},
            "mfcc": {"digit": {k: pretrained[f"mfcc_{k}"] for k in ("knn_top1", "linear_top1")},
                     "speaker": {k: speaker[f"mfcc_{k}"] for k in ("knn_top1", "linear_top1")}},
            "random-init": {}}
    for label in ("digit", "speaker"):
        c = resolve_config(recipe=RECIPE, overrides=[*overrides, f"data.label={label}"])
        splits = load_splits(c.data)
        torch.manual_seed(c.seed)  # as api.pretrain: the weights its training starts from
        method = api.build_method(c, modality_of(splits.pretrain).context(c, splits.pretrain))
        pre = modality_of(splits.pretrain).preprocess(splits.pretrain, None)
        res = api.evaluate_encoder(method.encoder(), pre, splits.eval_train, splits.eval_test, c, note=splits.note)
        rows["random-init"][label] = {k: res[k] for k in ("knn_top1", "linear_top1")}
    entry = {
        "benchmark": "spoken_digits_cpu: cpc-audio on FSDD (train recordings 5-49, test 0-4), digit and speaker "
                     "probes beside MFCC statistics and the untrained encoder",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "recipe": str(RECIPE.relative_to(ROOT)), "epochs": pretrained["epochs"], "steps": pretrained["steps"],
        "train_seconds": pretrained["train_seconds"], "windows_per_s": pretrained["images_per_s"],
        "peak_memory_mb": pretrained["peak_memory_mb"], "evaluation": pretrained["evaluation"],
        "results": rows,
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_average_before": [round(x, 2) for x in load_before]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(entry, indent=2) + "\n")
    print(f"\n{'features':<14}{'digit kNN':>11}{'digit lin':>11}{'speaker kNN':>13}{'speaker lin':>13}")
    for name, r in rows.items():
        print(f"{name:<14}{r['digit']['knn_top1']:>11.4f}{r['digit']['linear_top1']:>11.4f}"
              f"{r['speaker']['knn_top1']:>13.4f}{r['speaker']['linear_top1']:>13.4f}")
    print(f"{entry['epochs']} epochs, {entry['train_seconds']} s of training; written to {args.out}")


if __name__ == "__main__":
    main()
