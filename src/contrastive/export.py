"""Export a model to a file that runs without this package: TorchScript (``torch.jit.load``) or ONNX
(onnxruntime and any other ONNX runtime), with its input preprocessing written beside it as JSON.

What is exported: from a pretraining run's checkpoint.pt or encoder.pt, the evaluated encoder
(``Method.encoder()``: images -> features); from a classifier.pt (``finetune`` or ``distill``), the whole
classifier (images -> logits). The input is the float32 image batch [B, C, S, S] after the preprocessing
the JSON describes (scale to [0, 1], resize to S, subtract the mean, divide by the std, per channel);
the batch dimension is free.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.files import atomic_path, atomic_write_text
from contrastive.modalities import modality_named
from contrastive.runs import load_run, run_file
from contrastive.stages.classifier import is_classifier_file, load_classifier, plain_batchnorm
from contrastive.training.checkpoint import read_file

FORMATS = ("torchscript", "onnx")
INPUT_NAME = "images"


def load_exportable(path: str | Path) -> tuple[nn.Module, Any, str, dict]:
    """(model in eval mode, its preprocessing, output name "features" or "logits", description)."""
    if is_classifier_file(read_file(path)):
        model, info = load_classifier(path)
        return model, info["preprocess"], "logits", {"classes": info["classes"]}
    run = load_run(path)
    return run.encoder, run.preprocess, "features", {"feature_dim": run.feature_dim}


def export(checkpoint: str | Path, fmt: str, output: str | Path, *, check_batch: int = 4,
           force: bool = False) -> dict[str, Any]:
    """Write ``checkpoint``'s model as ``fmt`` to ``output`` and ``<output stem>.preprocess.json`` beside it,
    then run the written file on a random batch and compare with the PyTorch model (``max_abs_diff``; for
    ONNX only when onnxruntime is installed, else ``checked`` says so). The file read is never written over;
    an existing output is replaced only with ``force``; both files are written whole or not at all."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    output = Path(output)
    spec_path = output.with_name(output.stem + ".preprocess.json")
    source = Path(checkpoint) / "classifier.pt" if (Path(checkpoint) / "classifier.pt").is_file() else \
        run_file(checkpoint, encoder=True)
    for target in (output, spec_path):
        if target.exists() and target.resolve() == source.resolve():
            raise ConfigError(f"--output {output} would write over {source}, the file being exported; give another "
                              f"file name")
        if target.is_dir():
            raise ConfigError(f"--output {output}: {target} is a folder; give a file name such as model.onnx")
        if target.exists() and not force:
            raise ConfigError(f"--output {output}: {target} exists; give another file name, or --force to replace it")
    model, pre, out_name, extra = load_exportable(source)
    shape, spec = modality_named(pre.modality, str(checkpoint)).exported_input(pre)  # what the file reads
    model = plain_batchnorm(model).eval().float().cpu()
    # batch 2 in the example: a batch of 1 would let batch-size-specific shapes pass unnoticed
    example = torch.zeros(2, *shape)
    with atomic_path(output) as tmp:
        if fmt == "torchscript":
            with _torchscript_quiet():
                torch.jit.trace(model, example).save(str(tmp))
        else:
            _export_onnx(model, example, tmp, out_name)
    spec = {"input": {"name": INPUT_NAME, **spec}, "output": {"name": out_name, **extra}}
    atomic_write_text(spec_path, json.dumps(spec, indent=2) + "\n")
    res = {"model": str(output), "preprocess": str(spec_path), "format": fmt, "output": out_name,
           "input_shape": ["batch", *shape]}
    res.update(_check(model, fmt, output, torch.randn(check_batch, *shape, generator=torch.Generator().manual_seed(0))))
    return res


@contextmanager
def _torchscript_quiet() -> Iterator[None]:
    """torch marks TorchScript deprecated at every trace and load; exporting to it is what was asked."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _export_onnx(model: nn.Module, example: torch.Tensor, output: Path, out_name: str) -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter builds the graph with it)
    except ImportError:
        raise ConfigError("ONNX export needs the onnx and onnxscript packages: pip install 'contrastive[export]'") \
            from None
    batch = torch.export.Dim("batch", min=1)
    for name in ("onnx_ir", "onnxscript"):  # their optimiser passes log every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[out_name],
                                dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(output), external_data=False)


@torch.no_grad()
def _check(model: nn.Module, fmt: str, path: Path, x: torch.Tensor) -> dict:
    expected = model(x)
    if fmt == "torchscript":
        with _torchscript_quiet():
            got = torch.jit.load(str(path))(x)
    else:
        try:
            import onnxruntime
        except ImportError:
            return {"checked": "no: onnxruntime is not installed (pip install 'contrastive[export]')"}
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
    return {"checked": f"the exported file against the PyTorch model on a random batch of {len(x)}",
            "max_abs_diff": float((got - expected).abs().max())}
