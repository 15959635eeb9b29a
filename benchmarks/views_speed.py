"""Images per second of making 2 SimCLR views: batched TensorViews vs per-image PILViews.

Run: ``.venv/bin/python benchmarks/views_speed.py [--quick]``. Writes benchmarks/results/views_speed.json.

Images are CIFAR-10 training JPEGs when ../shared/data/cifar10-train-jpeg.tar.gz has been unpacked
(``--cifar-dir``, default .bench/cifar10/train, where benchmarks/cifar10_cpu.py unpacks it), upsampled
with bicubic for the 96 px case; otherwise random uint8 (the JSON says which). An "image" is one input
image turned into 2 views. Every number is the median over repeats of wall time in this process (the
DataLoader case: one epoch with warm workers).
On a busy shared machine the multi-threaded number collapses (OpenMP threads wait on a taken core);
the one-thread numbers are the like-for-like comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from contrastive.config import ViewConfig
from contrastive.data.datasets import PerItemViews
from contrastive.modalities.image.views import PILViews, TensorViews

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def load_images(cifar_dir: Path, n: int, side: int) -> tuple[torch.Tensor, str]:
    """n images uint8 [n, 3, side, side] and where they came from."""
    files = sorted(cifar_dir.glob("*/*.jpg"))[:: max(1, 50000 // n)][:n] if cifar_dir.is_dir() else []
    if len(files) < n:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g), "random uint8"
    arrays = []
    for f in files:
        img = Image.open(f).convert("RGB")
        if img.size != (side, side):
            img = img.resize((side, side), Image.BICUBIC)
        arrays.append(np.asarray(img))
    source = f"CIFAR-10 train JPEGs ({cifar_dir})" + ("" if side == 32 else f", bicubic-upsampled to {side}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), source


def median_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up: allocator, thread pools, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_images / statistics.median(times)


class _Items(torch.utils.data.Dataset):
    """(image uint8 [3, H, W], label, index) items, as the library's datasets yield."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], 0, i


def bench_case(name: str, cfg: ViewConfig, images: torch.Tensor, args: argparse.Namespace) -> dict:
    side = images.shape[-1]
    repeats = 3 if args.quick else 7
    tensor_views = TensorViews(cfg, CIFAR_MEAN, CIFAR_STD, channels=3, in_size=side)
    gen = torch.Generator().manual_seed(0)
    row = {"case": name, "batch": len(images), "side": side}
    threads = torch.get_num_threads()
    # One thread is the like-for-like comparison with one PIL process; on a shared machine the
    # multi-threaded number also suffers most from other load (OpenMP threads wait for each other).
    torch.set_num_threads(1)
    row["tensor_batched_1_thread"] = median_rate(lambda: tensor_views(images, gen), len(images), repeats)
    pil_views = PILViews(cfg, CIFAR_MEAN, CIFAR_STD, channels=3, in_size=side)
    n_pil = min(len(images), 128 if args.quick else 512)
    # One thread, as in a DataLoader worker (its ToDtype / Normalize are torch ops).
    row["pil_single_process"] = median_rate(lambda: [pil_views(img) for img in images[:n_pil]], n_pil,
                                            max(1, repeats // 2))
    torch.set_num_threads(threads)
    row[f"tensor_batched_{threads}_threads"] = median_rate(lambda: tensor_views(images, gen), len(images), repeats)

    if not args.no_loader:
        loader = DataLoader(PerItemViews(_Items(images), pil_views), batch_size=256, num_workers=2,
                            persistent_workers=True)
        row["pil_dataloader_2_workers"] = median_rate(lambda: [b for b in loader], len(images),
                                                      max(1, repeats // 2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images (about 30 s)")
    parser.add_argument("--no-loader", action="store_true", help="skip the 2-worker DataLoader case")
    parser.add_argument("--cifar-dir", type=Path, default=Path(".bench/cifar10/train"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "views_speed.json")
    args = parser.parse_args()

    # CIFAR-10 recipe: s = 0.5, no blur (SimCLR B.9); 96 px (STL-10 size): s = 1 and blur p = 0.5 as on ImageNet.
    cases = [
        ("cifar 3x32x32", ViewConfig(jitter_strength=0.5), 32, 512),
        ("96px 3x96x96", ViewConfig(jitter_strength=1.0, blur_p=0.5), 96, 256 if args.quick else 512),
    ]
    rows, sources = [], []
    for name, cfg, side, batch in cases:
        images, source = load_images(args.cifar_dir, batch, side)
        sources.append(source)
        rows.append(bench_case(name, cfg, images, args))

    result = {
        "benchmark": "views_speed: input images/s, each image -> 2 SimCLR views",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": torch.multiprocessing.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "load_average_before": list(os.getloadavg()),  # other work on a shared machine skews every number
        "quick": args.quick,
        "images": sources,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    cols = [c for c in rows[0] if c.startswith(("tensor", "pil"))]
    print(f"{'case':<15}{'batch':>6}" + "".join(f"{c:>26}" for c in cols) + f"{'1 thread / pil':>16}")
    for r in rows:
        print(f"{r['case']:<15}{r['batch']:>6}" + "".join(f"{r[c]:>26.0f}" for c in cols)
              + f"{r['tensor_batched_1_thread'] / r['pil_single_process']:>15.1f}x")
    print(f"images: {'; '.join(sorted(set(sources)))}; written to {args.out}")


if __name__ == "__main__":
    main()
