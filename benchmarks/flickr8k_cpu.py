"""CLIP-style image-caption training, CPU: `clip` on the Flickr8k training images with both towers trained and
with the text tower locked, image <-> caption recall@1/5/10 on the dev images beside chance, and zero-shot
classification of the CIFAR-10 benchmark's held-out images from class-name prompts.

Run (from the repository root, on an otherwise idle machine):
    .venv/bin/python benchmarks/flickr8k_cpu.py --runs trained locked --epochs 3
Writes (merging into) benchmarks/results/flickr8k_cpu.json, one entry per run.

Data: ../shared/data/flickr8k-128.tar.gz: the 6,000 images of Flickr_8k.trainImages.txt (five captions each; a
step pairs one random crop of each image with one of its captions) are trained on, the 1,000 of
Flickr_8k.devImages.txt (5,000 captions) are the retrieval test (the test images are not in the archive).
Zero-shot: the 5,000 images the CIFAR-10 benchmark holds out (the last 500 of every class of
../shared/data/cifar10-train-jpeg.tar.gz, benchmarks/cifar10_cpu.py's split), each given the class whose prompt
embedding ("a photo of a {class}.") is nearest. Recipe: configs/clip.yaml (ResNet-18 at 64 px, all-MiniLM-L6-v2).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar10_cpu  # noqa: E402  (the CIFAR-10 benchmark's held-out split)

from contrastive import api  # noqa: E402
from contrastive.configure import resolve_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "clip.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "flickr8k_cpu.json"
RUNS = {"trained": "method.lock_text=false", "locked": "method.lock_text=true"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--cifar-cache", type=Path, default=Path(".bench/cifar10"))
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides of every run")
    parser.add_argument("--output", type=Path, default=Path(".bench/flickr8k"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    images = cifar10_cpu.unpack(Path(args.data_dir) / "cifar10-train-jpeg.tar.gz", args.cifar_cache)
    split = cifar10_cpu.materialise_split(images, args.cifar_cache, None)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.runs:
        overrides = [f"data.data_dir={args.data_dir}", "train.device=cpu", "train.progress=false",
                     "train.tensorboard=false", f"train.output={args.output / name}", f"modalities.image-text.zero_shot={split}",
                     RUNS[name], *args.set] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
        load_before = os.getloadavg()  # a busy machine skews every time
        res = api.pretrain(resolve_config(recipe=RECIPE, overrides=overrides))
        results[name] = {
            "what": f"clip, text tower {'locked' if name == 'locked' else 'trained'}",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
            "recipe": str(RECIPE.relative_to(ROOT)), "overrides": overrides[5:],
            "epochs": res["epochs"], "steps": res["steps"], "train_seconds": res["train_seconds"],
            "pairs_per_s": res["images_per_s"], "peak_memory_mb": res["peak_memory_mb"],
            "retrieval": res["retrieval"], "retrieval_chance": res["retrieval_chance"],
            "zero_shot_top1": res["zero_shot_top1"], "zero_shot_chance": res["zero_shot_chance"],
            "evaluation": res["evaluation"],
            "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "load_average_before": [round(x, 2) for x in load_before]},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        r = res["retrieval"]
        print(f"{name}: i->t R@1/5/10 {r['image_to_text@1']:.3f}/{r['image_to_text@5']:.3f}/"
              f"{r['image_to_text@10']:.3f}, t->i {r['text_to_image@1']:.3f}/{r['text_to_image@5']:.3f}/"
              f"{r['text_to_image@10']:.3f}; zero-shot {res['zero_shot_top1']:.4f} (chance "
              f"{res['zero_shot_chance']:.2f}); {res['train_seconds']:.0f} s", flush=True)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
