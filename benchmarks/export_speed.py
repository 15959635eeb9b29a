"""Inference speed of an exported model on the CPU: images/s of the PyTorch model, its TorchScript export and
its ONNX export under onnxruntime, at one batch size and thread count.

Run (after `pip install -e '.[export]'`):
    .venv/bin/python benchmarks/export_speed.py --model runs/distill/classifier.pt --batch-size 256 --threads 2
The model is any file `contrastive export` takes (classifier.pt, checkpoint.pt, encoder.pt); it is exported
into a temporary folder, every runtime gets the same float32 batch, and the result is merged into
benchmarks/results/export_speed.json under the model's path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from contrastive.export import export, load_exportable
from contrastive.stages.classifier import count_parameters

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "export_speed.json"


def images_per_s(run, batch: int, repeats: int) -> float:
    """Median over ``repeats`` timed calls (after two warm-up calls) of batch / seconds."""
    run()
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    import onnxruntime

    torch.set_num_threads(args.threads)
    model, pre, output, _ = load_exportable(args.model)
    x = torch.randn(args.batch_size, pre.channels, pre.size, pre.size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file, ts_file = Path(tmp) / "model.onnx", Path(tmp) / "model.pt"
        export(args.model, "onnx", onnx_file)
        export(args.model, "torchscript", ts_file)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        with warnings.catch_warnings():  # torch marks TorchScript deprecated at every load
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(ts_file))
        xn = x.numpy()
        model = model.eval()
        with torch.inference_mode():
            speeds = {
                "pytorch": images_per_s(lambda: model(x), args.batch_size, args.repeats),
                "torchscript": images_per_s(lambda: scripted(x), args.batch_size, args.repeats),
                "onnxruntime": images_per_s(lambda: session.run(None, {"images": xn}), args.batch_size,
                                            args.repeats),
            }
            diff = float(np.abs(session.run(None, {"images": xn})[0] - model(x).numpy()).max())
    entry = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "model": args.model, "output": output, "parameters": count_parameters(model),
        "input": [args.batch_size, pre.channels, pre.size, pre.size], "threads": args.threads,
        "images_per_s": {k: round(v, 1) for k, v in speeds.items()},
        "onnxruntime_over_pytorch": round(speeds["onnxruntime"] / speeds["pytorch"], 2),
        "onnx_max_abs_diff": diff,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "timing": f"median of {args.repeats} calls after 2 warm-up calls, float32, no gradient",
    }
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "export_speed", "runs": {}}
    data["runs"][args.model] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
