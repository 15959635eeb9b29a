"""The report's rows and pictures, the pictures' files, and the whole road on digits from the command line."""

import json

import numpy as np
import pytest

from contrastive.cli import main
from contrastive.errors import DataError
from contrastive.plots import embedding_map, training_curves
from contrastive.report import report

PNG = b"\x89PNG\r\n\x1a\n"
LABELS = {"spec": "10%", "seed": 0, "images": 450, "fraction": 0.1, "fingerprint": "abc", "dataset": "toy"}


def _run(tmp_path, name, **res):
    folder = tmp_path / name
    folder.mkdir()
    budget = {"epochs": 30, "steps": 100, "train_seconds": 12.0}
    (folder / "results.json").write_text(json.dumps({"dataset": "toy", "labels": LABELS, "budget": budget,
                                                     "parameters": 1000, **res}))
    return folder


def test_report_has_the_four_rows_and_writes_its_png(tmp_path):
    runs = [
        _run(tmp_path, "distill", stage="distill", top1=0.60, teacher_top1=0.62, backbone={"name": "small_cnn"},
             teacher_source={"kind": "pretrained", "method": "simclr"}),
        _run(tmp_path, "ft-simclr", stage="finetune", method="simclr", top1=0.62, linear_top1=0.55,
             backbone={"name": "small_cnn"}, from_layer=0),
        _run(tmp_path, "ft-moco", stage="finetune", method="moco-v2", top1=0.58, linear_top1=0.50,
             backbone={"name": "small_cnn"}, from_layer=0),
        _run(tmp_path, "scratch", stage="scratch", top1=0.45, backbone={"name": "small_cnn"}),
        _run(tmp_path, "pre", method="simclr", backbone="small_cnn", pretrain_images=100, epochs=5, steps=50,
             knn_top1=0.4, linear_top1=0.5, train_seconds=60.0),
    ]
    res = report(runs, tmp_path / "out")
    (group,) = res["groups"]
    assert [r["kind"] for r in group["rows"]] == ["scratch", "linear", "linear", "finetune", "finetune", "distill"]
    assert [r["top1"] for r in group["rows"]] == [0.45, 0.50, 0.55, 0.58, 0.62, 0.60]  # one pair per method
    assert group["missing"] == []
    md = (tmp_path / "out" / "report.md").read_text()
    for text in ("supervised from scratch, small_cnn | 0.4500", "linear probe, frozen simclr small_cnn | 0.5500",
                 "fine-tuned simclr small_cnn | 0.6200", "distilled student small_cnn <- simclr teacher | 0.6000",
                 "margin +0.0200", "## Pretraining runs", "| simclr | small_cnn | 5 | 50 | 0.4000 | 0.5000 | 60 |"):
        assert text in md
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == PNG


def test_report_groups_runs_by_label_subset_and_names_missing_rows(tmp_path, monkeypatch):
    a = _run(tmp_path, "a", stage="scratch", top1=0.4, backbone={"name": "small_cnn"})
    b = _run(tmp_path, "b", stage="finetune", method="simclr", top1=0.5, backbone={"name": "small_cnn"},
             labels={**LABELS, "spec": "1%", "fraction": 0.01, "fingerprint": "def"})
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    res = report([a, b])  # default output: the current folder
    assert [g["labels"]["spec"] for g in res["groups"]] == ["10%", "1%"]
    assert res["groups"][0]["missing"][0].startswith("linear probe")
    assert (here / "report.md").is_file() and (here / "report.png").is_file()
    report([a])  # its own earlier report is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("the user's own notes")
    with pytest.raises(DataError, match="report.md exists and no report of this command wrote it; give --output"):
        report([a, b], tmp_path / "mine")
    assert (tmp_path / "mine" / "report.md").read_text() == "the user's own notes"
    with pytest.raises(DataError, match="has no results.json"):
        report([tmp_path / "nowhere"])


def test_curves_and_map_pngs(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,lr,loss\n0,1,0.1,2.0\n0,2,0.2,1.5\n1,3,0.1,1.2\n")
    assert training_curves(tmp_path / "metrics.csv", tmp_path / "c.png", knn=[(3, 0.5)]).read_bytes()[:8] == PNG
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    feats = rng.normal(size=(60, 8)) + labels[:, None] * 4.0
    assert embedding_map(feats, labels, tmp_path / "m.png", classes=["x", "y", "z"]).read_bytes()[:8] == PNG
    with pytest.raises(DataError, match="unlabeled"):
        embedding_map(feats, labels - 1, tmp_path / "m.png")


@pytest.mark.slow
def test_the_road_on_digits_from_the_command_line(tmp_path, capsys):
    # the digits recipe with SimCLR v2's 3-layer head
    quick = ["train.progress=false", "train.batch_size=128", "eval.linear_epochs=5", "method.projection_dim=16",
             "method.hidden_dim=32", "method.projection_layers=3"]
    pre = tmp_path / "pre"
    assert main(["pretrain", "--method", "simclr", "--data", "digits", "--epochs", "2", "--output", str(pre),
                 *quick]) == 0
    assert (pre / "curves.png").read_bytes()[:8] == PNG
    ft, sc, di = tmp_path / "ft", tmp_path / "sc", tmp_path / "di"
    assert main(["finetune", "--checkpoint", str(pre / "checkpoint.pt"), "--data", "digits", "--labels", "10%",
                 "--from-layer", "1", "--output", str(ft), "epochs=3"]) == 0
    res = json.loads((ft / "results.json").read_text())
    assert res["feature_dim"] == 32 and res["labels"]["images"] == 145 and 0 <= res["top1"] <= 1
    assert "linear_top1" in res and res["budget"]["epochs"] == 3
    assert main(["finetune", "--scratch", "--backbone", "small_cnn", "--data", "digits", "--labels",
                 str(ft / "labels.json"), "--output", str(sc), "epochs=3", "backbone.widths=[8,16]"]) == 0
    scratch = json.loads((sc / "results.json").read_text())
    assert scratch["labels"]["fingerprint"] == res["labels"]["fingerprint"]  # the very same labelled images
    assert main(["distill", "--teacher", str(ft), "--student", "small_cnn", "--data", "digits", "--output", str(di),
                 "epochs=1", "label_weight=0.5", "backbone.widths=[8,16]"]) == 0
    dist = json.loads((di / "results.json").read_text())
    assert dist["teacher_top1"] == pytest.approx(res["top1"]) and dist["parameters"] < dist["teacher_parameters"]
    assert main(["export", "--checkpoint", str(di / "classifier.pt"), "--format", "onnx", "--output",
                 str(tmp_path / "student.onnx")]) == 0
    assert main(["report", str(sc), str(ft), str(di), str(pre), "--output", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.png").is_file()
    out = capsys.readouterr().out
    assert "supervised from scratch" in out and "distilled student" in out and "max |difference|" in out
    # a --from-layer the head cannot give is refused before any work
    assert main(["finetune", "--checkpoint", str(pre / "checkpoint.pt"), "--data", "digits", "--labels", "10%",
                 "--from-layer", "4", "--output", str(tmp_path / "bad")]) == 2
    assert "has 3 layer(s)" in capsys.readouterr().err
