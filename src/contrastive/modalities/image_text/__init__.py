"""Image-caption pairs: folders of images with a captions file and ``flickr8k`` (``captions.py``), held in memory
with every caption tokenised once; a step's views are one crop of each image and one of its captions; the
evaluation retrieves captions by image and images by caption on the held-out images, beside chance, and
classifies a labelled image set zero-shot (``retrieval.py``), through the method's embedders of both kinds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.config import Config, DataConfig
from contrastive.data.datasets import SampleDataset, Splits
from contrastive.errors import ConfigError, DataError
from contrastive.evaluation import extract_features, save_embeddings
from contrastive.evaluation.embed import save_array
from contrastive.files import atomic_write_text
from contrastive.methods.base import Method
from contrastive.modalities.base import DataShape, Modality, Reasons, Trial, methods_for, register_modality
from contrastive.modalities.image import ImageModality
from contrastive.modalities.image_text.captions import ImageCaptions, is_caption_folder, open_caption_folder
from contrastive.modalities.image_text.retrieval import (
    RECALL_AT,
    class_embeddings,
    class_prompts,
    retrieval_recall,
    zero_shot_top1,
)
from contrastive.modalities.text import encoder_section, text_tower, trim_padding
from contrastive.modalities.text.sts import encode_sentences
from contrastive.nn.text import load_tokenizer, text_max_tokens, text_tokenizer_path


@dataclass
class ImageTextConfig:
    zero_shot: str | None = field(default=None, metadata={"help": "An image dataset or labelled folder whose test "
                                  "side is classified zero-shot, each image to the class whose prompts' text "
                                  "embedding is nearest (CLIP, Sec. 3.1.4); its data.* settings are the run's. None: "
                                  "no zero-shot."})
    prompts: list = field(default_factory=lambda: ["a photo of a {}."], metadata={"help": "The prompt templates of "
                          "zero-shot classification, {} the class name; several are averaged in embedding space "
                          "(CLIP's prompt ensemble)."})


# (training images, side) of the named sets, known without reading them
SHAPES = {"flickr8k": (6000, 128)}


class ImageTextViews:
    """One crop of each image (the image views, ``views.n_views`` 1) and one of its captions drawn uniformly
    from the step's generator: [n, C, S, S] and token ids [n, L'] cut after the batch's longest caption."""

    n_global = None

    def __init__(self, image_views: Any, captions: Tensor, counts: Tensor, pad_id: int):
        self.image_views = image_views
        self.size = image_views.size
        self.captions = captions  # [N, K, L] int64, rows past an image's count are padding
        self.counts = counts  # [N] captions of each image
        self.pad_id = pad_id
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _placed(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._on:  # copied once per device (a GPU copy from the host blocks)
            self._on[device] = (self.captions.to(device), self.counts.to(device))
        return self._on[device]

    def __call__(self, images: Tensor, generator: torch.Generator, index: Tensor | None = None) -> list[Tensor]:
        if index is None:
            raise ValueError("image-caption views need the batch's dataset indices (index=)")
        (image,) = self.image_views(images, generator)
        captions, counts = self._placed(images.device)
        index = index.to(images.device)
        u = torch.rand(len(index), generator=generator, device=images.device)
        pick = torch.minimum((u * counts[index]).long(), counts[index] - 1)  # [n] which caption
        return [image, trim_padding(captions[index, pick], self.pad_id)]


def recall_chance(n_images: int, n_texts: int, captions_per_image: float, k: int) -> dict[str, float]:
    """Recall@k of a random ranking: image -> text, the chance that k texts drawn without replacement hold one
    of an image's c captions, 1 - C(T - c, k) / C(T, k); text -> image, k / I."""
    c = round(captions_per_image)
    # k texts drawn from fewer than k + c always hold one of the c (and the product below would divide by zero)
    miss = 0.0 if k > n_texts - c else math.prod((n_texts - c - i) / (n_texts - i) for i in range(k))
    return {f"image_to_text@{k}": 1 - miss, f"text_to_image@{k}": min(k / n_images, 1.0)}


class ImageTextModality(ImageModality):
    name = "image-text"
    reads = "image"  # an image backbone; the captions are read by the method's own text tower
    accepts = "a folder of images with a captions file"
    config_class = ImageTextConfig
    labelled_evaluation = False  # retrieval on the held-out images and their captions
    baseline_key = None
    fallback = False

    # -------------------------------------------------------------- detection and reading

    def claims(self, path: Path) -> bool:
        return is_caption_folder(path)

    def open(self, path: Path, cfg: DataConfig, classes: list[str] | None) -> Splits:
        """A caption folder, a seeded ``data.holdout`` of its images held out to test retrieval on."""
        ds = open_caption_folder(path, cfg)
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.split_seed))
        held = round(cfg.holdout * len(ds))
        if held < 1 or held >= len(ds):
            raise DataError(f"{path}: data.holdout={cfg.holdout} of {len(ds)} images leaves no images to "
                            f"{'test retrieval on' if held < 1 else 'train on'}; change data.holdout")
        test, train = ds.take(perm[:held].sort().values), ds.take(perm[held:].sort().values)
        return Splits(train, None, test, note=f"{path}: {len(train):,} images with captions to pretrain on, "
                                              f"{held:,} ({cfg.holdout:.0%}, seed {cfg.split_seed}) held out to test "
                                              f"retrieval on")

    def probe(self, cfg: DataConfig, *, evaluate: bool = True) -> DataShape:
        """A named set's known shape, or a caption folder read (its images decoded: they are held in memory
        anyway)."""
        if cfg.name in SHAPES:
            images, size = SHAPES[cfg.name]
            return DataShape(images, size, 3, f"{cfg.name}: {images:,} training images at {size} px")
        splits = self.open(Path(cfg.name).expanduser(), cfg, None)
        return DataShape(len(splits.pretrain), splits.pretrain.image_size, splits.pretrain.channels, splits.note)

    # -------------------------------------------------------------- training

    def prepare(self, dataset: SampleDataset, cfg: Config) -> SampleDataset:
        section = self._text_section(cfg)
        return dataset.tokenized(load_tokenizer(text_tokenizer_path(section, "method.text")),
                                 text_max_tokens(section, "method.text"))

    def views(self, cfg: Config, dataset: SampleDataset) -> ImageTextViews:
        if cfg.views.n_views != 1 or cfg.views.groups or cfg.views.backend != "tensor":
            raise ConfigError("image-caption data pairs one crop of each image with one of its captions: set "
                              "views.n_views=1, no views.groups, views.backend=tensor")
        if dataset.caption_ids is None:
            raise DataError(f"{dataset.name}: the captions are not tokenised (the image-text modality's prepare)")
        return ImageTextViews(super().views(cfg, dataset), dataset.caption_ids, dataset.caption_counts,
                              dataset.pad_id)

    def trial(self, cfg: Config, dataset: SampleDataset, views: Any, device: torch.device) -> Trial:
        """Real images and captions through the run's views (a caption's length decides its memory)."""
        return dataclasses.replace(Modality.trial(self, cfg, dataset, views, device),
                                   what=f"{views.size} px crops and their captions")

    def _text_section(self, cfg: Config) -> dict:
        if cfg.method["name"] not in methods_for(self.name):
            raise ConfigError(f"method {cfg.method['name']} does not embed images and captions in one space; "
                              f"methods for image-caption data: {', '.join(methods_for(self.name))}")
        return encoder_section(cfg, "text")

    # -------------------------------------------------------------- evaluation

    def can_evaluate(self, splits: Splits, cfg: Config) -> bool:
        return splits.eval_test is not None or self.settings(cfg).zero_shot is not None

    def check_evaluation(self, cfg: Config) -> None:
        zero_shot = self.settings(cfg).zero_shot
        if zero_shot is not None:  # the labelled images classified zero-shot: there, and of a kind this reads
            from contrastive.modalities.splits import detect

            detect(dataclasses.replace(cfg.data, name=zero_shot))

    @torch.no_grad()
    def evaluate(self, method: Method, preprocess: Any, splits: Splits | None, cfg: Config, *, note: str,
                 device: torch.device) -> dict[str, Any]:
        """Image <-> caption recall@1/5/10 on the held-out side (every caption of every image) and, with
        ``modalities.image-text.zero_shot``, zero-shot top-1 on that dataset's test side, with chance levels
        beside."""
        towers = method.embedders()
        if not {"image", "text"} <= set(towers):
            raise ConfigError(f"method {cfg.method['name']} does not embed images and captions in one space; "
                              f"image-caption evaluation is for {', '.join(methods_for(self.name))}")
        images, texts = towers["image"].to(device), towers["text"].to(device)
        tower = text_tower(texts)
        tokenizer = load_tokenizer(tower.tokenizer)
        options = {"batch_size": cfg.eval.batch_size, "max_length": tower.max_tokens, "device": device}
        s = self.settings(cfg)
        test = splits.eval_test if splits is not None else None
        t0 = time.perf_counter()
        res: dict[str, Any] = {"evaluation": {"split": note}}
        if test is not None:
            z_img, _ = extract_features(images, test, preprocess=preprocess, batch_size=cfg.eval.batch_size,
                                        device=device)
            flat = [c for caps in test.captions for c in caps]
            owner = torch.tensor([i for i, caps in enumerate(test.captions) for _ in caps])
            z_txt = encode_sentences(texts, tokenizer, flat, **options)
            sim = torch.einsum("id,td->it", F.normalize(z_img, dim=1), F.normalize(z_txt, dim=1))  # [I, T]
            res["retrieval"] = retrieval_recall(sim, owner)
            per_image = len(flat) / len(test)
            res["retrieval_chance"] = {k: v for n in RECALL_AT
                                       for k, v in recall_chance(len(test), len(flat), per_image, n).items()}
            res["evaluation"]["retrieval"] = (f"{len(test)} held-out images of {test.name} against their {len(flat)} "
                                              f"captions, cosine similarity in the joint embedding space")
        if s.zero_shot is not None:
            from contrastive.modalities.splits import load_splits

            data = dataclasses.replace(cfg.data, name=s.zero_shot, train_data=None, test_data=None, image_size=None,
                                       label=None)
            zs = load_splits(data)
            target = zs.eval_test
            if target is None or target.classes is None:
                raise DataError(f"modalities.image-text.zero_shot={s.zero_shot} has no labelled test side ({zs.note})")
            classes = [c.replace("_", " ") for c in target.classes]
            prompts = class_prompts(classes, tuple(s.prompts))
            z_cls = class_embeddings(encode_sentences(texts, tokenizer, prompts, **options), len(classes))
            # the test images through the image tower at the tower's input size and statistics
            z_img, labels = extract_features(images, target, preprocess=preprocess, batch_size=cfg.eval.batch_size,
                                             device=device)
            res["zero_shot_top1"] = zero_shot_top1(z_img, labels, z_cls)
            res["zero_shot_chance"] = 1 / len(classes)
            res["evaluation"]["zero_shot"] = (f"{len(target)} test images of {s.zero_shot} ({zs.note}); "
                                              f"{len(classes)} classes; prompts {list(s.prompts)}")
        res["feature_seconds"] = round(time.perf_counter() - t0, 2)
        return res

    def summary(self, results: dict[str, Any]) -> list[tuple[str, str]]:
        lines = super().summary(results)
        lines += [(label, f"{results[key]:.4f}") for key, label in (("zero_shot_top1", "zero-shot top-1"),
                                                                    ("zero_shot_chance", "zero-shot chance"))
                  if key in results]
        for key, value in results.get("retrieval", {}).items():
            chance = results.get("retrieval_chance", {}).get(key)
            lines.append((f"recall {key}", f"{value:.4f}" + (f" (chance {chance:.4f})" if chance is not None else "")))
        return lines

    # -------------------------------------------------------------- embedding

    def embed(self, encoder: nn.Module, method: Method | None, preprocess: Any, sets: list[SampleDataset],
              output: Path, *, batch_size: int, device: torch.device) -> dict[str, Any]:
        """The images (``output``) and their captions (``<stem>.captions.npy``, the caption texts in
        ``<stem>.captions.txt`` and each caption's image row in ``<stem>.caption_image.npy``), all in the method's
        joint space."""
        towers = method.embedders() if method is not None else {}
        if not {"image", "text"} <= set(towers):
            raise ConfigError("embedding images with their captions needs a run of a method that embeds both in one "
                              f"space ({', '.join(methods_for(self.name))}) and its checkpoint.pt")
        feats = [extract_features(towers["image"].to(device), s, preprocess=preprocess, batch_size=batch_size,
                                  device=device)[0] for s in sets]
        captions = [c for s in sets for caps in s.captions for c in caps]
        owner, base = [], 0
        for s in sets:
            owner += [base + i for i, caps in enumerate(s.captions) for _ in caps]
            base += len(s)
        tower = text_tower(towers["text"])
        z_img = torch.cat(feats)
        z_txt = encode_sentences(towers["text"].to(device), load_tokenizer(tower.tokenizer), captions,
                                 batch_size=batch_size, max_length=tower.max_tokens, device=device)
        stem = output.with_suffix("")
        paths = save_embeddings(z_img, None, output) + save_embeddings(z_txt, None, Path(f"{stem}.captions.npy"))
        paths.append(save_array(torch.tensor(owner), Path(f"{stem}.caption_image.npy")))
        text_file = Path(f"{stem}.captions.txt")
        atomic_write_text(text_file, "".join(c.replace("\n", " ") + "\n" for c in captions))
        paths.append(text_file)
        return {"features": [str(p) for p in paths], "images": int(z_img.shape[0]), "captions": len(captions),
                "dim": int(z_img.shape[1])}

    # -------------------------------------------------------------- settings for data without a recipe

    def derive(self, method: str, data: DataConfig, layer: dict, device: torch.device
               ) -> tuple[dict, Reasons, DataShape]:
        """The method's own recipe for image-caption pairs; the batch is fitted by ``autoconfig``."""
        reasons = Reasons()
        return self.own_recipe(method, data, reasons), reasons, self.probe(data)

    def planned(self, cfg: Config, shape: DataShape, device: torch.device) -> tuple[tuple[int, ...], Trial]:
        """One crop and one caption of at most the text tower's length per image."""
        size = cfg.data.image_size or shape.size
        view = self.view_size(cfg, size)
        length = text_max_tokens(self._text_section(cfg), "method.text")
        crops = self.shape_trial(cfg, shape.channels, size, device)

        def make(n: int, generator: torch.Generator) -> list[Tensor]:
            return crops.make(n, generator) + [torch.randint(1000, 2000, (n, length), generator=generator,
                                                             device=device)]

        return (shape.channels, view, view), Trial(make, crops.input_bytes + 2 * 8 * length,
                                                   f"{view} px crops and their captions")


IMAGE_TEXT = register_modality(ImageTextModality())

__all__ = ["IMAGE_TEXT", "ImageCaptions", "ImageTextConfig", "ImageTextModality", "ImageTextViews", "recall_chance"]
