"""The one run loader: a run folder, checkpoint.pt or encoder.pt read back, also as written before the config had
its per-modality sections and the build context its input shape."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from contrastive import api
from contrastive.config import DataConfig
from contrastive.configure import resolve_config
from contrastive.errors import CheckpointError, ConfigError
from contrastive.runs import LOCK_NAME, claimed, load_run
from contrastive.stages.finetune import finetune

QUICK = ["train.epochs=1", "train.max_steps=3", "train.progress=false", "train.log_every=1"]

# what the fields that moved held by default where they were
BEFORE = {"views": {"window": 20480, "gain_db": [0.0, 0.0]},
          "eval": {"sts": ["stsb-dev", "sick-test"], "senteval": ["mr", "cr", "subj", "mpqa", "trec", "sst2"],
                   "senteval_folds": 10, "zero_shot": None, "prompts": ["a photo of a {}."], "n_mfcc": 20,
                   "raw_pixel_size": 32}}


def _written_before(raw: dict) -> dict:
    """A file of this version in the layout of the version before: the context's image channels and side, no
    modality on image preprocessing, every moved field in its old section, ``eval.raw_pixel_baseline``."""
    raw = {**raw, "config": {k: dict(v) if isinstance(v, dict) else v for k, v in raw["config"].items()}}
    ctx = dict(raw["context"])
    shape, modality = ctx.pop("input_shape"), ctx.pop("modality")
    ctx["channels"], ctx["image_size"] = shape[0], shape[-1]
    raw["context"] = ctx
    if modality == "image":
        raw["preprocess"] = {k: v for k, v in raw["preprocess"].items() if k != "modality"}
    cfg = raw["config"]
    sections = cfg.pop("modalities")
    cfg["views"].update(BEFORE["views"], **{k: v for k, v in sections.get("audio", {}).items() if k != "n_mfcc"})
    cfg["eval"].update(BEFORE["eval"], raw_pixel_baseline=cfg["eval"].pop("baseline"))
    for kind in sections.values():
        cfg["eval"].update({k: v for k, v in kind.items() if k in BEFORE["eval"]})
    return raw


def test_files_written_before_load_evaluate_and_resume_as_they_did(tmp_path):
    cfg = resolve_config(tree={"data": {"name": "digits"}, "train": {"output": str(tmp_path / "new")}},
                         overrides=QUICK + ["eval.linear=false"])
    res = api.pretrain(cfg)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    for name in ("checkpoint.pt", "encoder.pt"):
        raw = torch.load(tmp_path / "old" / name, weights_only=True)
        old = _written_before(raw)
        assert "modalities" not in old["config"] and "input_shape" not in old["context"]
        torch.save(old, tmp_path / "old" / name)
        new_run, old_run = load_run(tmp_path / "new" / name), load_run(tmp_path / "old" / name)
        assert old_run.config == new_run.config and old_run.context == new_run.context
        assert old_run.preprocess == new_run.preprocess
        assert all(torch.equal(a, b) for a, b in zip(old_run.encoder.state_dict().values(),
                                                      new_run.encoder.state_dict().values()))
    data = cfg.data
    again = api.evaluate(tmp_path / "old" / "encoder.pt", data, protocols=("knn",))
    assert again["knn_top1"] == res["knn_top1"]
    # a resume from the old checkpoint continues exactly as from the new one
    ends = {}
    for run in ("new", "old"):
        more = resolve_config(recipe=torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["config"],
                              overrides=[f"train.resume={tmp_path / run}", f"train.output={tmp_path / run}",
                                         "train.max_steps=5", "eval.enabled=false"])
        api.pretrain(more)
        ends[run] = torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["method"]
    assert ends["new"].keys() == ends["old"].keys()
    assert all(torch.equal(ends["new"][k], ends["old"][k]) for k in ends["new"])


def test_a_run_file_of_another_kind_is_named(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"")
    torch.save({"format": "something else"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="neither a checkpoint.pt nor an encoder.pt"):
        load_run(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="is a folder without a checkpoint.pt or encoder.pt"):
        load_run(tmp_path)


def test_results_json_is_strict_json_with_a_number_that_is_not_finite_as_null(tmp_path):
    import json

    from contrastive.runs import write_results

    write_results({"knn_top1": float("nan"), "nested": {"loss": float("inf")}, "ok": [1.5, float("-inf")]}, tmp_path)

    def refuse(name):
        raise ValueError(f"{name} in results.json")

    got = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert got == {"knn_top1": None, "nested": {"loss": None}, "ok": [1.5, None]}


QUICK_RUN = ["train.epochs=1", "train.max_steps=2", "train.progress=false", "eval.linear=false"]


def _digits(out=None, *extra):
    tree = {"data": {"name": "digits"}}
    if out is not None:
        tree["train"] = {"output": str(out)}
    return resolve_config(tree=tree, overrides=QUICK_RUN + list(extra))


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, caplog):
    first = api.pretrain(_digits(tmp_path / "run"))
    checkpoint = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"run holds a run already \(checkpoint.pt, encoder.pt, results.json\); give "
                                          r"a new folder, or --overwrite"):
        api.pretrain(_digits(tmp_path / "run", "seed=1"))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == checkpoint  # nothing of it was touched
    (tmp_path / "run" / ".results.json.x.tmp").write_text("left by a killed write")
    with caplog.at_level("INFO", logger="contrastive"):
        second = api.pretrain(_digits(tmp_path / "run", "seed=1", "train.overwrite=true"))
    assert "--overwrite: removing the earlier run's config.yaml, checkpoint.pt, encoder.pt" in caplog.text
    assert not (tmp_path / "run" / ".results.json.x.tmp").exists() and not (tmp_path / "run" / LOCK_NAME).exists()
    assert second["checkpoint"] == first["checkpoint"]
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() != checkpoint  # seed 1's run
    # the stages and the evaluation refuse a pretraining run's folder too
    with pytest.raises(ConfigError, match="holds a run already"):
        api.evaluate(tmp_path / "run", DataConfig(name="digits"), protocols=("knn",), output=tmp_path / "run")
    with pytest.raises(ConfigError, match="holds a run already"):
        finetune(DataConfig(name="digits"), "10%", tmp_path / "run", checkpoint=tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"--output .*file is a file; give a folder"):
        api.pretrain(_digits(tmp_path / "file"))


def test_an_output_inside_a_data_folder_is_refused_before_anything_is_written(tmp_path):
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(images / f"{i}.png")
    before = sorted(p.name for p in images.iterdir())
    tree = {"data": {"name": str(images)}, "train": {"output": str(images / "run")}}
    with pytest.raises(ConfigError, match=rf"--output {images / 'run'} is inside {images.resolve()}, a data folder "
                                          r"this run reads; the run's files \(curves.png\) would become data"):
        api.pretrain(resolve_config(tree=tree, overrides=QUICK_RUN))
    assert sorted(p.name for p in images.iterdir()) == before  # no folder, no lock, no config.yaml
    with pytest.raises(ConfigError, match=r"is inside .*images, a data folder this run reads"):
        finetune(DataConfig(name="digits", test_data=str(images)), "10%", images, checkpoint=tmp_path / "none")
    with claimed(tmp_path / "beside", data=DataConfig(name=str(images))):  # a folder beside the data is fine
        pass


def test_a_full_disk_is_named_and_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    import errno
    import shutil as sh
    from collections import namedtuple

    from contrastive import files
    from contrastive.errors import OutOfSpaceError

    target = tmp_path / "results.json"
    target.write_text("the earlier run's")

    def full(f):
        f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutOfSpaceError, match=rf"no space left on the disk of {tmp_path} to write results.json; "
                                              r"the earlier one is untouched"):
        files.atomic_write(target, full, binary=False)
    assert target.read_text() == "the earlier run's" and [p.name for p in tmp_path.iterdir()] == ["results.json"]

    def torch_writer(f):  # torch.save's C++ writer on a full disk, before the close that would say ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 4096))
    with pytest.raises(OutOfSpaceError, match="no space left"):
        files.atomic_write(tmp_path / "checkpoint.pt", torch_writer)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room to spare, a bug is not called a full disk
        files.atomic_write(tmp_path / "checkpoint.pt", torch_writer)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_run_without_an_output_gets_a_new_folder_and_latest_points_at_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = Path(api.pretrain(_digits())["checkpoint"]).parent
    b = Path(api.pretrain(_digits())["checkpoint"]).parent
    assert a.parent == b.parent == Path("runs") and a != b  # a second run in the same second gets a suffix
    assert all(re.fullmatch(r"\d{8}-\d{6}-simclr(-\d+)?", p.name) for p in (a, b))
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / b).resolve()
    assert yaml.safe_load((b / "config.yaml").read_text())["train"]["output"] == str(b)  # resumable as it is


def test_a_folder_another_live_process_writes_into_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, caplog):
    import os
    import socket
    import subprocess
    import sys

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()}\n")  # this test's own process: alive
    with pytest.raises(ConfigError, match=rf"another run is writing into .*run \(process {os.getpid()} on"):
        with claimed(folder):
            pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / LOCK_NAME).write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    with caplog.at_level("WARNING", logger="contrastive"), claimed(folder):
        assert (folder / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert f"held by process {int(dead.stdout)}, which is no longer running: taking it over" in caplog.text
    assert not (folder / LOCK_NAME).exists()


@pytest.mark.parametrize("method", ["simclr", "instdisc"])  # instdisc: a memory bank with a row per image
def test_a_resume_on_changed_data_or_processes_is_refused_naming_what_changed(tmp_path, method):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def add(n, start):
        for i in range(start, start + n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")

    add(40, 0)
    tree = {"method": {"name": method}, "data": {"name": str(folder)}, "train": {"output": str(tmp_path / "run")}}
    fixed = ["train.batch_size=8", "train.epochs=2", "train.max_steps=3", "train.progress=false", "train.device=cpu",
             "eval.enabled=false"]
    api.pretrain(resolve_config(tree=tree, overrides=fixed))
    again = dict(tree, train={**tree["train"], "resume": str(tmp_path / "run")})
    add(40, 40)  # the same folder, twice the images
    with pytest.raises(CheckpointError, match=r"the training data's size was 40 and is 80; the steps of an epoch "
                                              r"was 5 and is 10"):
        api.pretrain(resolve_config(tree=again, overrides=fixed + ["train.max_steps=6"]))
    for path in folder.glob("0[4-7]?.png"):
        path.unlink()
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    ckpt["context"]["world_size"] = 2  # as a two-process run would have saved it
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"the number of processes was 2 and is 1"):
        api.pretrain(resolve_config(tree=again, overrides=fixed + ["train.max_steps=6"]))
