"""Images: folders of image files (class sub-folders optional) and the named image datasets; SimCLR-style crops
made batched on the training device (``views.py``); resized, normalised pixels as what an encoder reads
(``preprocess.py``); the kNN on raw pixels as the baseline; settings derived from the images' size and the device
for data without a recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from contrastive.config import Config, DataConfig
from contrastive.data.datasets import SampleDataset, Splits
from contrastive.errors import ConfigError, DataError
from contrastive.evaluation import extract_features
from contrastive.methods import method_spec
from contrastive.modalities.base import (
    Baseline,
    DataShape,
    Modality,
    Reasons,
    Trial,
    get_key,
    open_tree,
    register_modality,
    split_layout,
)
from contrastive.modalities.image import named
from contrastive.modalities.image.folder import IMAGE_EXTENSIONS, open_folder, scan_folder, survey_sizes
from contrastive.modalities.image.preprocess import Preprocess
from contrastive.modalities.image.views import global_size, make_views, view_groups, view_shapes
from contrastive.trees import deep_merge

SMALL_SIDE = 64  # CIFAR-scale recipes up to this side (the CIFAR stem's rule in nn/convnets.py)
MIN_SIDE = 16  # smaller images are decoded up to it, so random crops keep some pixels (digits: 8 -> 16)
GPU_MAX_SIDE = 224  # ImageNet's training size (SimCLR, Appendix A)
CPU_MAX_SIDE = 96  # STL-10's size: the ImageNet views at a side a CPU trains at hundreds of images/s
CPU_MAX_EPOCHS = 100  # SimCLR's ablations train 100 epochs (Chen et al. 2020, Sec. 3); hours on a CPU


@dataclass
class ImageConfig:
    raw_pixel_size: int | None = field(default=32, metadata={"help": "Side the raw-pixel baseline resizes images "
                                       "to when the encoder's input is larger: 32 px leaves CIFAR-sized data as it is "
                                       "and bounds the baseline's memory (50,000 images at 224 px would be 30 GB of "
                                       "floats); null: the encoder's input side."})


class ImageModality(Modality):
    name = "image"
    reads = "image"
    accepts = "a folder of images (class sub-folders optional)"
    noun = "images"
    config_class = ImageConfig
    baseline_key = "raw_pixel"
    baseline_label = "raw-pixel"
    fallback = True  # a folder no other kind of data claims is a folder of images

    # -------------------------------------------------------------- detection and reading

    def claims(self, path: Path) -> bool:
        return path.is_dir()

    def open(self, path: Path, cfg: DataConfig, classes: list[str] | None) -> Splits:
        return open_tree(path, cfg, classes, _open_images)

    def probe(self, cfg: DataConfig, *, evaluate: bool = True) -> DataShape:
        """A named dataset's known shape, or a folder's listing and image headers (``survey_sizes``)."""
        if cfg.name in named.SHAPES:
            channels, size, images = named.SHAPES[cfg.name]
            return DataShape(images, size, channels, f"{cfg.name}: {images:,} pretraining images, {channels} "
                                                     f"channel(s), {size} px", named.CLASSES.get(cfg.name))
        path = Path(cfg.name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"no shape known for dataset {cfg.name!r}; pass a recipe with --config")
        layout = split_layout(path)
        folder = layout[0] if layout else path
        files, labels, classes = scan_folder(folder, log_ignored=False)
        survey = survey_sizes(files)
        images = len(files)
        held = evaluate and layout is None and classes is not None and cfg.train_data is None and cfg.test_data is None
        if held:
            images -= round(cfg.holdout * images)
        return DataShape(images, survey.typical, 3, f"{folder}: {len(files):,} images"
                                                    f"{f' ({images:,} for pretraining)' if held else ''}, "
                                                    f"{survey.describe()}", None if classes is None else len(classes))

    def check_same_input(self, pretrain: SampleDataset, other: SampleDataset) -> None:
        if other.channels != pretrain.channels:
            raise DataError(f"{other.name} has {other.channels}-channel images but the pretraining data "
                            f"{pretrain.name} has {pretrain.channels}; the evaluation feeds both through the same "
                            f"encoder")

    # -------------------------------------------------------------- training

    def view_groups(self, cfg: Config, in_size: int):
        """The run's view groups: ``views.groups``, else the method's paper groups, else one group."""
        return view_groups(cfg.views, in_size, method_spec(cfg.method["name"]).view_groups)

    def view_size(self, cfg: Config, in_size: int) -> int:
        """The global views' side for images decoded at ``in_size``: what the encoder sees, and what evaluation
        preprocesses to."""
        return global_size(self.view_groups(cfg, in_size), in_size)

    def input_shape(self, cfg: Config, dataset: SampleDataset) -> tuple[int, ...]:
        size = self.view_size(cfg, dataset.image_size)
        return (dataset.channels, size, size)

    def views(self, cfg: Config, dataset: SampleDataset):
        flat = [c for c, s in enumerate(dataset.std) if not s > 0]
        if flat:  # dividing by it would make every view inf or NaN, and the loss NaN with the wrong advice
            raise DataError(f"{dataset.name}: channel {flat[0]} has one value in every pixel of every image (std 0), "
                            f"so the views cannot be normalised and nothing tells the images apart; check the data "
                            f"(images of one flat colour?)")
        return make_views(cfg.views, dataset.mean, dataset.std, dataset.channels, dataset.image_size,
                          method_spec(cfg.method["name"]).view_groups)

    def trial(self, cfg: Config, dataset: SampleDataset, views: Any, device: torch.device) -> Trial:
        return self.shape_trial(cfg, dataset.channels, dataset.image_size, device)

    def shape_trial(self, cfg: Config, channels: int, in_size: int, device: torch.device) -> Trial:
        """Random floats of every view's size (a crop's memory does not depend on its pixels)."""
        groups = self.view_groups(cfg, in_size)
        sizes, n_global = view_shapes(groups, in_size)

        def make(n: int, generator: torch.Generator) -> list[Tensor]:
            return [torch.randn(n, channels, s, s, generator=generator, device=device) for s in sizes]

        # per image: its views and the float copy of the uint8 image they are cut from
        return Trial(make, (sum(s * s for s in sizes) + max(sizes) ** 2) * channels * 4, f"{sizes[0]} px views",
                     n_global)

    # -------------------------------------------------------------- what an encoder reads

    def preprocess(self, cfg: Config, dataset: SampleDataset) -> Preprocess:
        return Preprocess.for_dataset(dataset, self.view_size(cfg, dataset.image_size))

    def preprocess_from_dict(self, d: dict) -> Preprocess:
        return Preprocess.from_dict(d)

    def for_encoder(self, dataset: SampleDataset, preprocess: Any) -> SampleDataset:
        super().for_encoder(dataset, preprocess)
        if dataset.channels != preprocess.channels:
            raise DataError(f"the encoder was trained on {preprocess.channels}-channel images; {dataset.name} has "
                            f"{dataset.channels} channels")
        return dataset

    def data_for(self, data: DataConfig, preprocess: Any) -> DataConfig:
        """Decode at the encoder's input size unless data.image_size says otherwise, so a checkpoint sees its
        evaluation images exactly as it saw its training images."""
        if data.image_size is not None or getattr(preprocess, "modality", None) != "image":
            return data
        return dataclasses.replace(data, image_size=preprocess.size)

    def exported_input(self, preprocess: Preprocess) -> tuple[tuple[int, ...], dict]:
        """The float32 image batch [B, C, S, S] after the preprocessing the JSON describes."""
        c, s = preprocess.channels, preprocess.size
        return (c, s, s), {"layout": "NCHW", "dtype": "float32", "channels": c, "size": s,
                           "mean": list(preprocess.mean), "std": list(preprocess.std),
                           "steps": ["uint8 pixels / 255", f"resize to {s}x{s} (bilinear, antialiased)",
                                     "(x - mean) / std per channel"]}

    # -------------------------------------------------------------- evaluation

    def baseline(self, cfg: Config, preprocess: Preprocess, device: torch.device) -> Baseline:
        """The kNN on raw pixels (:func:`raw_pixel_features`), at most ``modalities.image.raw_pixel_size`` px:
        every image's pixels are held at once, as floats."""
        limit = self.settings(cfg).raw_pixel_size
        pixels = dataclasses.replace(preprocess, size=min(preprocess.size, limit or preprocess.size))
        return Baseline(self.baseline_key, f"the same kNN on the encoder's input at {pixels.size} px (resized, "
                                           f"normalised pixels)", ("knn",),
                        lambda ds: raw_pixel_features(ds, preprocess=pixels, batch_size=cfg.eval.batch_size,
                                                      device=device))

    # -------------------------------------------------------------- settings for data without a recipe

    def derive(self, method: str, data: DataConfig, layer: dict, device: torch.device
               ) -> tuple[dict, Reasons, DataShape]:
        """The recipe family by the size the encoder will see (CIFAR-scale up to SMALL_SIDE px, else
        ImageNet-scale), the decode size (the images' typical side, at least MIN_SIDE, at most 224 on a GPU and
        CPU_MAX_SIDE on a CPU), the backbone (``small_cnn`` on a CPU, where a ResNet-50 would take weeks) and the
        epochs (at most CPU_MAX_EPOCHS on a CPU)."""
        shape = self.probe(data, evaluate=get_key(layer, "eval.enabled") is not False)
        cpu = device.type == "cpu"
        reasons = Reasons()
        small = (get_key(layer, "views.size") or get_key(layer, "data.image_size") or shape.size) <= SMALL_SIDE
        scale = (f"CIFAR-scale recipe, for images of at most {SMALL_SIDE} px" if small else
                 f"ImageNet-scale recipe, for images larger than {SMALL_SIDE} px")
        cifar = [f"{method}-cifar10.yaml", f"{method}-cifar100.yaml"]
        recipe, kept = reasons.recipe(method, *((cifar, [f"{method}.yaml"]) if small else ([f"{method}.yaml"], cifar)),
                                      scale)
        tree: dict = {}
        size = get_key(layer, "data.image_size")
        if size is None:
            cap = CPU_MAX_SIDE if cpu else GPU_MAX_SIDE
            size = max(shape.size, MIN_SIDE) if small else min(shape.size, cap)
            if size > shape.size:
                why = f"the images are {shape.size} px, decoded at {MIN_SIDE} so random crops keep some pixels"
            elif size < shape.size:
                why = (f"the images are typically {shape.size} px; at most {cap} px on a "
                       f"{'CPU (STL-10 size, hundreds of images/s)' if cpu else 'GPU (ImageNet training size)'}")
            else:
                why = "the images' typical side"
            tree["data"] = {"image_size": size}
            reasons.note("data.image_size", size, why, "--image-size")
        if get_key(layer, "backbone.name") is None:
            backbone = get_key(recipe, "backbone.name") or "small_cnn"  # Config's default backbone
            if cpu and backbone != "small_cnn":
                tree["backbone"] = {"name": "small_cnn"}  # a section of its own: the recipe's fields do not carry over
                reasons.note("backbone.name", "small_cnn", f"on a CPU it trains at hundreds of images/s, where the "
                             f"recipe's {backbone} would take days to weeks", "--backbone")
            else:
                reasons.note("backbone.name", backbone, kept + ("" if cpu else " on a GPU"), "--backbone")
        reasons.epochs(layer, recipe, tree, CPU_MAX_EPOCHS if cpu else None, kept,
                       "on a CPU, the length of SimCLR's ablations")
        return deep_merge(recipe, tree), reasons, dataclasses.replace(shape, size=size,
                                                                  memory=shape.samples * shape.channels * size * size)

    def planned(self, cfg: Config, shape: DataShape, device: torch.device) -> tuple[tuple[int, ...], Trial]:
        """(the encoder's input shape, the memory check's trial) of ``cfg`` on data of ``shape``, before reading
        it."""
        size = cfg.data.image_size or shape.size
        view = self.view_size(cfg, size)
        return (shape.channels, view, view), self.shape_trial(cfg, shape.channels, size, device)


def raw_pixel_features(dataset: SampleDataset, *, preprocess: Any, batch_size: int = 512,
                       device: str | torch.device = "cpu", num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """The baseline learned features must beat: the encoder's own input, flattened, with no encoder.

    ``preprocess`` is the encoder's (resize + per-channel normalisation), so the baseline sees the pixels
    exactly as the encoder does (the caller may pass it at a smaller size to bound memory); centring by the
    channel means matters for cosine similarity, which on un-centred pixels mostly measures brightness.
    Preprocessing runs on ``device``. Returns ``(float32 [N, C*S*S] on the CPU, labels int64 [N])``.
    """
    return extract_features(nn.Flatten(), dataset, preprocess=preprocess, batch_size=batch_size, device=device,
                            num_workers=num_workers)


def _open_images(path: Path, cfg: DataConfig, classes: list[str] | None, like: SampleDataset | None) -> SampleDataset:
    """An image folder; a test side (``like`` its train side) is decoded at the train side's size."""
    if like is not None:
        cfg = dataclasses.replace(cfg, image_size=like.image_size)
    return open_folder(path, cfg, classes)


IMAGE = register_modality(ImageModality())

__all__ = ["IMAGE", "IMAGE_EXTENSIONS", "ImageConfig", "ImageModality", "Preprocess"]
