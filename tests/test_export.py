"""Exported TorchScript and ONNX files give the PyTorch model's outputs in a process that cannot import
contrastive, and encoder.pt loads into the plain torchvision model."""

import json
import subprocess
import sys
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from contrastive import api
from contrastive.config import Config
from contrastive.configure import resolve_config
from contrastive.data.labels import choose
from contrastive.errors import ConfigError
from contrastive.export import export
from contrastive.methods.base import BuildContext
from contrastive.modalities.image.preprocess import Preprocess
from contrastive.nn.backbones import build_backbone
from contrastive.nn.shuffle_bn import SplitBatchNorm
from contrastive.stages.classifier import Classifier, backbone_source, save_classifier
from contrastive.trees import recipe_dir

PRE = Preprocess(3, 16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))

# Runs in a fresh interpreter where importing contrastive fails, as on a machine without it installed.
RUNNER = """
import sys
sys.modules["contrastive"] = None
import json, numpy as np, onnxruntime, torch
x = np.load(sys.argv[1])
ts = torch.jit.load(sys.argv[2])(torch.from_numpy(x)).detach().numpy()
onnx = onnxruntime.InferenceSession(sys.argv[3], providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
np.save(sys.argv[4], ts)
np.save(sys.argv[5], onnx)
print(json.dumps(sorted(m for m, mod in sys.modules.items() if m.startswith("contrastive") and mod is not None)))
"""


def _simclr(backbone: dict):
    cfg = Config(method={"name": "simclr", "projection_dim": 8}, backbone=backbone)
    ctx = BuildContext(input_shape=(3, PRE.size, PRE.size), dataset_size=32, num_classes=3, batch_size=8, world_size=1,
                       steps_per_epoch=4, epochs=1, backbone_section=dict(backbone))
    torch.manual_seed(0)
    method = api.build_method(cfg, ctx)
    for m in method.modules():  # non-trivial running statistics, so eval-mode batch norm is really exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return method, cfg, ctx


def _run_outside(tmp_path, x, ts, onnx_file):
    np.save(tmp_path / "x.npy", x.numpy())
    out = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "x.npy"), str(ts), str(onnx_file),
                          str(tmp_path / "ts.npy"), str(tmp_path / "onnx.npy")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []  # nothing of contrastive was loaded
    return np.load(tmp_path / "ts.npy"), np.load(tmp_path / "onnx.npy")


@pytest.mark.slow
def test_exported_encoder_and_classifier_match_pytorch_without_contrastive(tmp_path):
    method, cfg, ctx = _simclr({"name": "small_cnn", "widths": [8, 16]})
    api.save_encoder(method, cfg, ctx, PRE, tmp_path / "encoder.pt")
    enc, dim = build_backbone({"name": "small_cnn", "widths": [4, 8]}, input_shape=(3, PRE.size, PRE.size))
    student = Classifier(enc, dim, 3)
    nn.init.normal_(student.fc.weight)
    save_classifier(student, tmp_path / "classifier.pt", source=backbone_source({"name": "small_cnn", "widths": [4, 8]},
                                                                                3, PRE.size),
                    preprocess=PRE, classes=["a", "b", "c"],
                    labels=asdict(choose(torch.arange(6) % 3, "1-per-class", 0, dataset="toy")))
    x = torch.randn(5, 3, PRE.size, PRE.size, generator=torch.Generator().manual_seed(1))  # a batch size not traced
    for name, model, width in (("encoder", method.encoder().eval(), 16), ("classifier", student.eval(), 3)):
        ts = export(tmp_path / f"{name}.pt", "torchscript", tmp_path / f"{name}-ts.pt")
        ox = export(tmp_path / f"{name}.pt", "onnx", tmp_path / f"{name}.onnx")
        assert ts["max_abs_diff"] < 1e-4 and ox["max_abs_diff"] < 1e-4
        spec = json.loads((tmp_path / f"{name}.preprocess.json").read_text())
        assert spec["input"]["size"] == 16 and spec["input"]["mean"] == [0.5, 0.4, 0.3]
        assert spec["output"]["name"] == ("features" if name == "encoder" else "logits")
        with torch.no_grad():
            expected = model(x).numpy()
        got_ts, got_onnx = _run_outside(tmp_path, x, tmp_path / f"{name}-ts.pt", tmp_path / f"{name}.onnx")
        assert expected.shape == (5, width)
        np.testing.assert_allclose(got_ts, expected, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got_onnx, expected, atol=1e-4, rtol=1e-4)


def test_encoder_pt_loads_into_plain_torchvision_resnet18(tmp_path):
    method, cfg, ctx = _simclr({"name": "resnet18", "cifar_stem": True})
    api.save_encoder(method, cfg, ctx, Preprocess(3, 32, (0.5,) * 3, (0.25,) * 3), tmp_path / "encoder.pt")
    # what README shows: torchvision's resnet18, the CIFAR stem swapped in, the classifier dropped
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)["state_dict"]
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.load_state_dict(state)  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), method.encoder().eval()(x))


def _moco_v2_encoder_pt(path):
    """moco-v2 as its digits recipe builds it (SplitBatchNorm in 8 groups), with running statistics that are not
    the initial 0 and 1, saved as encoder.pt; returns the encoder in eval mode."""
    cfg = resolve_config(recipe=recipe_dir() / "moco-v2-digits.yaml")
    ctx = BuildContext(input_shape=(1, 16, 16), dataset_size=64, num_classes=10, batch_size=16, world_size=1,
                       steps_per_epoch=4, epochs=1, backbone_section=dict(cfg.backbone))
    torch.manual_seed(0)
    method = api.build_method(cfg, ctx)
    encoder = method.encoder()
    splits = [m for m in encoder.modules() if isinstance(m, SplitBatchNorm)]
    assert splits and all(m.num_splits == 8 for m in splits)
    for m in splits:
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    api.save_encoder(method, cfg, ctx, Preprocess(1, 16, (0.3,), (0.2,)), path)
    return encoder.eval()


def test_moco_v2_encoder_exports_to_torchscript_with_plain_batch_norm(tmp_path):
    expected_encoder = _moco_v2_encoder_pt(tmp_path / "encoder.pt")
    res = export(tmp_path / "encoder.pt", "torchscript", tmp_path / "encoder-ts.pt")
    assert res["output"] == "features" and res["max_abs_diff"] < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is marked deprecated
        loaded = torch.jit.load(str(tmp_path / "encoder-ts.pt"))
    kinds = {m.original_name for m in loaded.modules()}
    assert "SplitBatchNorm" not in kinds and "PlainBatchNorm" in kinds
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))  # a batch size not traced
    with torch.no_grad():
        expected = expected_encoder(x)  # the method's own encoder: SplitBatchNorm in eval mode
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    assert expected.shape == (5, 256) and expected.std() > 0.1


@pytest.mark.slow
def test_moco_v2_encoder_exports_to_onnx_with_standard_operators(tmp_path):
    import onnx
    import onnxruntime

    expected_encoder = _moco_v2_encoder_pt(tmp_path / "encoder.pt")
    res = export(tmp_path / "encoder.pt", "onnx", tmp_path / "encoder.onnx")
    assert res["max_abs_diff"] < 1e-4
    graph = onnx.load(str(tmp_path / "encoder.onnx")).graph
    assert graph.node and all(node.domain in ("", "ai.onnx") for node in graph.node)  # standard operators only
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, expected_encoder(x).numpy(), rtol=1e-4, atol=1e-4)


def test_export_never_writes_over_its_input_and_replaces_an_output_only_when_forced(tmp_path):
    import hashlib

    method, cfg, ctx = _simclr({"name": "small_cnn", "widths": [4, 8]})
    api.save_encoder(method, cfg, ctx, PRE, tmp_path / "encoder.pt")
    digest = hashlib.sha256((tmp_path / "encoder.pt").read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match=r"would write over .*encoder.pt, the file being exported"):
        export(tmp_path / "encoder.pt", "torchscript", tmp_path / "encoder.pt")
    with pytest.raises(ConfigError, match=r"would write over .*encoder.pt, the file being exported"):
        export(tmp_path, "torchscript", tmp_path / "encoder.pt")  # the run folder: its encoder.pt is the input
    assert hashlib.sha256((tmp_path / "encoder.pt").read_bytes()).hexdigest() == digest
    export(tmp_path / "encoder.pt", "torchscript", tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes(b"the user's own file")
    with pytest.raises(ConfigError, match=r"model.pt exists; give another file name, or --force"):
        export(tmp_path / "encoder.pt", "torchscript", tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes() == b"the user's own file"
    res = export(tmp_path / "encoder.pt", "torchscript", tmp_path / "model.pt", force=True)
    assert res["max_abs_diff"] < 1e-5 and not list(tmp_path.glob(".*.tmp"))  # replaced whole, nothing left over
