"""Defaults derived from the data and the device: each data shape resolves to settings that fit a CPU, the
resolved config says why, explicit settings win, and the choice repeats."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contrastive import autoconfig, machine
from contrastive.config import DataConfig, to_dict
from contrastive.trees import read_yaml
from contrastive.configure import resolve_config
from contrastive.modalities import image
from contrastive.modalities.image import IMAGE
from contrastive.runs import write_config

CPU = ["train.device=cpu"]  # the choices under test are a CPU's, also where a GPU is present


def write_images(folder: Path, n: int, size: tuple[int, int], *, classes: tuple[str, ...] = (), mode: str = "RGB",
                 prefix: str = ""):
    rng = np.random.default_rng(0)
    for i in range(n):
        where = folder / classes[i % len(classes)] if classes else folder
        where.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(where / f"{prefix}{i:03d}.jpg")
    return folder


def test_folder_of_32px_images_gets_the_cifar_recipe_with_a_cpu_backbone(tmp_path, caplog):
    root = write_images(tmp_path / "small", 40, (32, 32), classes=("a", "b"))
    with caplog.at_level(logging.INFO, logger="contrastive.config"):
        cfg = resolve_config(tree={"data": {"name": str(root)}}, overrides=CPU)
    # the CIFAR-10 recipe's own numbers (SimCLR B.9) came along: temperature 0.5, colour strength 0.5, no blur
    assert cfg.method["temperature"] == 0.5 and cfg.views.jitter_strength == 0.5 and cfg.views.blur_p == 0.0
    assert cfg.data.image_size == 32 and cfg.backbone == {"name": "small_cnn"}
    assert cfg.train.epochs == image.CPU_MAX_EPOCHS
    # 40 images, 4 held out: 36 for pretraining, and at least 4 steps an epoch -> 8
    assert cfg.train.batch_size == 8
    assert cfg.auto["recipe"].startswith("simclr-cifar10.yaml: the method's CIFAR-scale recipe")
    assert "CPU" in cfg.auto["backbone.name"] and "resnet18" in cfg.auto["backbone.name"]
    assert "--backbone" in cfg.auto["backbone.name"] and "--batch-size" in cfg.auto["train.batch_size"]
    assert "4 steps an epoch over 36 images" in cfg.auto["train.batch_size"]
    assert "1000" in cfg.auto["train.epochs"]
    for key in cfg.auto:  # every choice is in the log, with its reason
        assert f"  {key} = {cfg.auto[key]}" in caplog.text


def test_folder_of_500px_photos_gets_the_imagenet_recipe_at_a_cpu_size(tmp_path):
    root = write_images(tmp_path / "photos", 12, (640, 500))
    write_images(tmp_path / "photos", 4, (500, 375), prefix="b", mode="L")  # mixed sizes and modes
    shape = IMAGE.probe(DataConfig(name=str(root)))
    assert (shape.samples, shape.size) == (16, 500) and "typically 500 px" in shape.how and "375-500" in shape.how
    cfg = resolve_config(tree={"data": {"name": str(root)}}, overrides=CPU + ["eval.enabled=false"])
    # ImageNet-scale SimCLR (simclr.yaml): temperature 0.1, blur on, s = 1
    assert cfg.method["temperature"] == 0.1 and cfg.views.blur_p == 0.5 and cfg.views.jitter_strength == 1.0
    assert cfg.data.image_size == image.CPU_MAX_SIDE == 96
    assert cfg.backbone == {"name": "small_cnn"} and "resnet50" in cfg.auto["backbone.name"]
    assert cfg.auto["recipe"].startswith("simclr.yaml: the method's ImageNet-scale recipe")
    assert "typically 500 px; at most 96 px on a CPU" in cfg.auto["data.image_size"]
    assert cfg.train.batch_size == 4  # 16 images (an unlabeled folder: none held out), 4 steps an epoch
    assert cfg.train.epochs == 100  # the ImageNet recipe's 100 is within the CPU's limit: kept
    assert cfg.auto["train.epochs"].startswith("100: the recipe's")


def test_named_dataset_without_a_recipe_for_the_method(tmp_path):
    """simclr-v2 has recipes for CIFAR-10 and ImageNet only: on STL-10 (96 px) it takes the ImageNet-scale
    one, on digits (8 px) the CIFAR-scale one, decoded up to 16 px. Nothing is read from disk."""
    stl = resolve_config(tree={"method": {"name": "simclr-v2"}, "data": {"name": "stl10", "data_dir": str(tmp_path)}},
                         overrides=CPU)
    assert stl.auto["recipe"].startswith("simclr-v2.yaml") and stl.method["projection_layers"] == 3
    assert stl.data.image_size == 96 and stl.backbone == {"name": "small_cnn"} and stl.train.batch_size == 512
    assert "on a CPU, SimCLR's CIFAR-10 batch at most" in stl.auto["train.batch_size"]
    digits = resolve_config(tree={"method": {"name": "simclr-v2"}}, overrides=CPU)
    assert digits.auto["recipe"].startswith("simclr-v2-cifar10.yaml")
    assert digits.data.image_size == 16 and "decoded at 16" in digits.auto["data.image_size"]
    assert digits.train.batch_size == 256  # 1437 images / 4 steps = 359 -> 256
    # a method and dataset with a recipe of their own: the recipe, untouched
    assert resolve_config(tree={"data": {"name": "cifar10"}}, overrides=CPU).auto == {}


def test_explicit_settings_win_and_later_choices_build_on_them(tmp_path):
    root = write_images(tmp_path / "small", 40, (32, 32))
    cfg = resolve_config(tree={"data": {"name": str(root), "image_size": 24}, "backbone": {"name": "resnet18"}},
                         overrides=CPU + ["train.batch_size=6", "train.epochs=3"])
    assert (cfg.data.image_size, cfg.backbone["name"], cfg.train.batch_size, cfg.train.epochs) == (24, "resnet18", 6, 3)
    assert set(cfg.auto) == {"recipe"}  # nothing was chosen but the recipe family
    # the family follows the size the encoder will see: large photos decoded at 32 px get CIFAR's recipe
    big = write_images(tmp_path / "big", 8, (300, 300))
    cfg = resolve_config(tree={"data": {"name": str(big), "image_size": 32}}, overrides=CPU)
    assert cfg.auto["recipe"].startswith("simclr-cifar10.yaml") and "data.image_size" not in cfg.auto
    # an explicit recipe: nothing derived at all
    recipe = Path(__file__).parents[1] / "configs" / "simclr.yaml"
    assert resolve_config(recipe=recipe, tree={"data": {"name": str(root)}}).auto == {}


def test_the_choice_repeats_and_config_yaml_reproduces_it(tmp_path):
    root = write_images(tmp_path / "small", 40, (32, 32))
    a, b = (to_dict(resolve_config(tree={"data": {"name": str(root)}}, overrides=CPU)) for _ in range(2))
    assert a.pop("auto").keys() == b.pop("auto").keys()  # the reasons quote the free memory of the moment
    assert a == b
    a = resolve_config(tree={"data": {"name": str(root)}}, overrides=CPU)
    write_config(a, tmp_path / "config.yaml")
    assert read_yaml(tmp_path / "config.yaml")["auto"] == a.auto  # the reasons are in config.yaml
    assert to_dict(resolve_config(recipe=tmp_path / "config.yaml")) == to_dict(a)


def test_the_batch_is_lowered_to_what_fits_in_memory(tmp_path, monkeypatch):
    root = write_images(tmp_path / "small", 400, (16, 16))
    monkeypatch.setattr(machine, "available_memory", lambda device: (40 * 2**20, "a test"))
    cfg = resolve_config(tree={"data": {"name": str(root)}}, overrides=CPU)
    assert cfg.train.batch_size == 32  # 64 would leave 4 steps an epoch, but its step needs ~30 MiB of the 20
    assert "fits in 50% of the" in cfg.auto["train.batch_size"]


def test_a_method_without_any_recipe_uses_its_defaults(tmp_path):
    from contrastive.methods.base import MethodSpec
    from contrastive.methods.simclr import SimCLR, SimCLRConfig
    from contrastive.registry import register

    register("methods", "autoconfig-test-method")(MethodSpec(
        config_class=SimCLRConfig, build=lambda ctx, cfg: SimCLR(*ctx.build_backbone(), cfg)))
    root = write_images(tmp_path / "small", 40, (32, 32))
    cfg = resolve_config(tree={"method": {"name": "autoconfig-test-method"}, "data": {"name": str(root)}},
                         overrides=CPU)
    assert cfg.auto["recipe"].startswith("none: autoconfig-test-method has no recipe")
    assert cfg.method == {"name": "autoconfig-test-method"} and cfg.train.batch_size == 8
    assert cfg.backbone == {"name": "small_cnn"} and cfg.data.image_size == 32


@pytest.mark.parametrize("free", [10 * 2**30, 2**30, 40 * 2**20])
def test_batch_search_respects_the_memory_estimate(free, monkeypatch, tmp_path):
    """The chosen batch is a power of two whose estimated step fits in half the free memory (less the decoded
    data), and twice it would not fit unless the CPU limit of 512 binds."""
    from contrastive.api import BuildContext, build_method
    from contrastive.methods.base import StepInfo
    from contrastive.training import budget

    monkeypatch.setattr(machine, "available_memory", lambda device: (free, "test"))
    cfg = resolve_config(tree={"data": {"name": "cifar100", "data_dir": str(tmp_path)},
                               "method": {"name": "simclr-v2"}}, overrides=CPU)
    batch = cfg.train.batch_size
    assert batch & (batch - 1) == 0 and 2 <= batch <= 512
    decoded = 50000 * 3 * 32 * 32
    room = autoconfig.MEMORY_SHARE * (free - decoded if decoded <= free / 2 else free)
    ctx = BuildContext(input_shape=(3, 32, 32), dataset_size=50000, num_classes=None, batch_size=batch,
                       world_size=1, steps_per_epoch=1, epochs=1, backbone_section=cfg.backbone)
    trial = IMAGE.shape_trial(cfg, 3, 32, torch.device("cpu"))
    mem = budget.measure_step(build_method(cfg, ctx), trial, device=torch.device("cpu"), amp_dtype=None,
                              step=StepInfo(step=0, epoch=0, total_steps=1))
    assert mem.need(batch) <= room
    assert batch == 512 or mem.need(2 * batch) > room
    assert (batch == 512) == (free == 10 * 2**30)


@pytest.mark.parametrize("method", ["supcon", "cmc"])
def test_methods_that_need_labels_or_colour_get_derived_settings_on_a_labelled_rgb_folder(tmp_path, method):
    # the trial step of the batch search builds the method: it must know the folder's classes (SupCon refuses
    # unlabeled data) and have statistics to build with (CMC un-normalises its views)
    root = write_images(tmp_path / "small", 40, (32, 32), classes=("a", "b"))
    cfg = resolve_config(tree={"method": {"name": method}, "data": {"name": str(root)}}, overrides=CPU)
    assert cfg.train.batch_size == 8 and cfg.backbone["name"] == "small_cnn"
    assert IMAGE.probe(DataConfig(name=str(root))).classes == 2


def test_a_method_that_needs_labels_is_refused_on_an_unlabeled_folder_by_name(tmp_path):
    from contrastive.errors import ConfigError

    root = write_images(tmp_path / "flat", 40, (32, 32))
    assert IMAGE.probe(DataConfig(name=str(root))).classes is None
    with pytest.raises(ConfigError, match="method.name=supcon.*class sub-folders"):
        resolve_config(tree={"method": {"name": "supcon"}, "data": {"name": str(root)}}, overrides=CPU)
