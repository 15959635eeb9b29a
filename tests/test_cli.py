"""The command line, end to end on digits, and its errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from contrastive.cli import main

QUICK = ["--epochs", "3", "data.image_size=16", "train.progress=false", "train.batch_size=128",
         "eval.linear_epochs=20", "method.projection_dim=16"]


@pytest.mark.slow
def test_pretrain_eval_embed_on_digits(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--method", "simclr", "--data", "digits", "--output", str(run), *QUICK]) == 0
    res = json.loads((run / "results.json").read_text())
    for key in ("knn_top1", "linear_top1", "raw_pixel_knn_top1"):
        assert 0.0 <= res[key] <= 1.0
    assert res["evaluation"]["test_images"] == 360 and res["evaluation"]["train_images"] == 1437
    assert res["raw_pixel_knn_top1"] > 0.9  # digits are nearly separable in pixel space
    assert res["linear_top1"] > 0.5  # three epochs already learn far more than chance (0.1)
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file() and (run / "encoder.pt").is_file()
    out = capsys.readouterr().out
    assert "raw-pixel kNN top-1" in out

    # eval knn on the checkpoint reproduces the pretrain evaluation's kNN exactly (the data is decoded at
    # the encoder's 16 px by default)
    assert main(["eval", "knn", "--checkpoint", str(run / "checkpoint.pt"), "--data", "digits"]) == 0
    ev = json.loads((run / "eval-knn" / "results.json").read_text())
    assert ev["knn_top1"] == res["knn_top1"]
    # the plain encoder file gives the same features as the checkpoint
    assert main(["eval", "knn", "--checkpoint", str(run / "encoder.pt"), "--data", "digits",
                 "--output", str(tmp_path / "ev2")]) == 0
    assert json.loads((tmp_path / "ev2" / "results.json").read_text())["knn_top1"] == res["knn_top1"]

    feats = tmp_path / "feats.npy"
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--data", "digits",
                 "--output", str(feats)]) == 0
    x, y = np.load(feats), np.load(tmp_path / "feats.labels.npy")
    assert x.shape == (1797, 256) and x.dtype == np.float32 and y.shape == (1797,)


def _err(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_path_is_named(tmp_path, capsys):
    code, err = _err(capsys, ["pretrain", "--data", str(tmp_path / "nowhere"), "--epochs", "1"])
    assert code == 2 and str(tmp_path / "nowhere") in err and "Traceback" not in err


def test_unknown_method(capsys):
    code, err = _err(capsys, ["pretrain", "--method", "simclrr", "--epochs", "1"])
    assert code == 2 and "unknown method 'simclrr'" in err and "simclr-v2" in err


def test_unknown_config_key(capsys):
    code, err = _err(capsys, ["pretrain", "--epochs", "1", "optim.lrr=0.1"])
    assert code == 2 and "unknown config key optim.lrr" in err and "weight_decay" in err


def test_corrupt_image_names_the_file(tmp_path, capsys):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    bad = root / "b" / "broken.png"
    bad.write_bytes(b"this is not a png")
    code, err = _err(capsys, ["pretrain", "--data", str(root), "--epochs", "1", "--batch-size", "4",
                              "--no-eval", "--output", str(tmp_path / "run"), "train.progress=false"])
    assert code == 2 and str(bad) in err and "skip_corrupt" in err and "Traceback" not in err
    # with the option the run goes on without it
    assert main(["pretrain", "--data", str(root), "--epochs", "1", "--batch-size", "4", "--no-eval",
                 "--output", str(tmp_path / "run"), "train.progress=false", "data.skip_corrupt=true"]) == 0


def test_overrides_may_stand_between_flags(capsys):
    assert main(["pretrain", "train.epochs=7", "--print-config", "optim.lr=0.25", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "train.epochs = 7" in out and "optim.lr = 0.25" in out and "seed = 3" in out


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "contrastive", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout and "embed" in out.stdout


def test_unreadable_checkpoint_is_named(tmp_path, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    code, err = _err(capsys, ["eval", "knn", "--checkpoint", str(bad), "--data", "digits"])
    assert code == 2 and str(bad) in err and "cannot be read" in err and "Traceback" not in err
    import torch

    torch.save({"something": 1}, bad)
    code, err = _err(capsys, ["eval", "knn", "--checkpoint", str(bad), "--data", "digits"])
    assert code == 2 and "neither a checkpoint.pt nor an encoder.pt" in err
