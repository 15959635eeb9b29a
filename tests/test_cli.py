"""The command line, end to end on digits, and its errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from contrastive.cli import main
from contrastive.modalities import modality_of

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
    # three epochs of pretraining beat the same encoder at its initialisation, scored the same way
    from contrastive import api
    from contrastive.configure import resolve_config
    from contrastive.modalities import load_splits
    from contrastive.modalities.image.preprocess import Preprocess

    cfg = resolve_config(recipe=run / "config.yaml")
    splits = load_splits(cfg.data)
    torch.manual_seed(cfg.seed)
    untrained = api.build_method(cfg, modality_of(splits.pretrain).context(cfg, splits.pretrain)).encoder()
    before = api.evaluate_encoder(untrained, Preprocess.for_dataset(splits.pretrain, None), splits.eval_train,
                                  splits.eval_test, cfg, note=splits.note)
    assert res["knn_top1"] > before["knn_top1"] + 0.03

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


def test_pretrain_help_names_every_method_and_backbone(capsys):
    from contrastive.cli import parser
    from contrastive.registry import names
    # without any whitespace: argparse wraps to the terminal's width and may break a name at its hyphen
    text = "".join(parser()._subparsers._group_actions[0].choices["pretrain"].format_help().split())
    for name in names("methods") + names("backbones"):
        assert name in text, name
    assert "dino" in names("methods") and "vit_tiny" in names("backbones")


def test_unreadable_checkpoint_is_named(tmp_path, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    code, err = _err(capsys, ["eval", "knn", "--checkpoint", str(bad), "--data", "digits"])
    assert code == 2 and str(bad) in err and "cannot be read" in err and "Traceback" not in err
    import torch

    torch.save({"something": 1}, bad)
    code, err = _err(capsys, ["eval", "knn", "--checkpoint", str(bad), "--data", "digits"])
    assert code == 2 and "neither a checkpoint.pt nor an encoder.pt" in err


def _labelled(root, per_class=6, classes=("a", "b")):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 100 * c + 10 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


TINY = ["--batch-size", "4", "train.progress=false", "method.projection_dim=8", "data.num_workers=0"]


def test_no_eval_pretrains_on_every_image_and_a_later_eval_warns(tmp_path, capsys, caplog):
    root = _labelled(tmp_path / "imgs")
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(root), "--epochs", "1", "--no-eval", "--output", str(run), *TINY]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["pretrain_images"] == 12 and res["steps"] == 3 and "knn_top1" not in res
    # the held-out test side of an eval on the same folder was pretrained on: said in the log and results
    with caplog.at_level("WARNING", logger="contrastive"):
        assert main(["eval", "knn", "--checkpoint", str(run), "--data", str(root), "eval.knn_k=3"]) == 0
    ev = json.loads((run / "eval-knn" / "results.json").read_text())
    assert "were seen, unlabelled, during pretraining" in ev["evaluation"]["warning"]
    assert "--no-eval" in ev["evaluation"]["warning"] and "--test-data" in caplog.text
    # a separate test side: no warning
    other = _labelled(tmp_path / "other", per_class=2)
    assert main(["eval", "knn", "--checkpoint", str(run), "--data", str(root), "--test-data", str(other),
                 "--output", str(tmp_path / "ev2"), "eval.knn_k=3"]) == 0
    assert "warning" not in json.loads((tmp_path / "ev2" / "results.json").read_text())["evaluation"]


def test_eval_and_embed_take_train_and_test_data_without_data(tmp_path, capsys):
    run = tmp_path / "run"
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(flat / f"{i}.png")
    assert main(["pretrain", "--data", str(flat), "--epochs", "1", "--no-eval", "--output", str(run), *TINY]) == 0
    a, b = _labelled(tmp_path / "A"), _labelled(tmp_path / "B", per_class=3)
    assert main(["eval", "knn", "--checkpoint", str(run / "encoder.pt"), "--train-data", str(a), "--test-data",
                 str(b), "eval.knn_k=3"]) == 0
    ev = json.loads((run / "eval-knn" / "results.json").read_text())
    assert (ev["evaluation"]["train_images"], ev["evaluation"]["test_images"]) == (12, 6)
    assert ev["dataset"] == str(a) and 0 <= ev["knn_top1"] <= 1
    feats = tmp_path / "f.npy"
    assert main(["embed", "--checkpoint", str(run / "encoder.pt"), "--train-data", str(a), "--test-data", str(b),
                 "--output", str(feats)]) == 0
    assert np.load(feats).shape[0] == 18 and np.load(tmp_path / "f.labels.npy").tolist() == [0] * 6 + [1] * 6 + [0] * 3 + [1] * 3
    code = main(["eval", "knn", "--checkpoint", str(run / "encoder.pt"), "--test-data", str(b)])
    assert code == 2 and "--train-data" in capsys.readouterr().err


def test_resume_by_folder_continues_the_run_in_it(tmp_path):
    root = _labelled(tmp_path / "imgs")
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(root), "--epochs", "2", "--no-eval", "--output", str(run), *TINY,
                 "train.max_steps=4"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    # only the folder: the checkpoint in it, its config, and its folder for the output
    assert main(["pretrain", "--resume", str(run), "train.max_steps=6"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["pretrain", "--resume", str(empty)])
    assert code == 2


def test_an_unlabeled_folder_pretrains_without_evaluation_unless_asked_for(tmp_path, capsys, caplog):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(flat / f"{i}.png")
    with caplog.at_level("WARNING", logger="contrastive"):
        assert main(["pretrain", "--data", str(flat), "--epochs", "1", "--output", str(tmp_path / "run"), *TINY]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["pretrain_images"] == 8 and "knn_top1" not in res and "no evaluation after pretraining" in caplog.text
    code, err = _err(capsys, ["pretrain", "--data", str(flat), "--epochs", "1", "--output", str(tmp_path / "r2"),
                              *TINY, "eval.enabled=true"])
    assert code == 2 and "no labels to evaluate with" in err
