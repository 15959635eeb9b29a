"""What the kind of data decides, so that the trainer and the evaluation never ask which kind it is.

A dataset says its modality (``dataset.modality``, "image" unless it says otherwise); its entry here gives
the training views (through ``views.make_views``), the memory check's trial views, the preprocessing an
encoder saves for evaluation, the baseline features evaluation compares with, and the backbones that read
it, how a run's data is made ready for its encoder (``prepare``: text is tokenised by the encoder's tokenizer)
and how a pretrained encoder is evaluated (``evaluate``). Images: crops of uint8 batches, raw pixels as the
baseline, kNN and linear probe. Audio: random windows of NaN-padded clips (``data/audio.py``), MFCC statistics as
the baseline. Text: token ids cut to each batch's longest sentence; STS Spearman and SentEval probes beside a
bag-of-words baseline. Image-caption pairs: one crop of each image and one of its captions, drawn per step;
retrieval recall@K on the held-out side and zero-shot classification.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.config import Config, DataConfig, EvalConfig
from contrastive.data.preprocess import AudioPreprocess, Preprocess, TextPreprocess, trim_padding
from contrastive.errors import ConfigError, DataError

log = logging.getLogger("contrastive")


def _is_audio_backbone(section: dict) -> bool:
    from contrastive.nn.audio import AUDIO_BACKBONES

    return section.get("name") in AUDIO_BACKBONES


def _is_text_backbone(section: dict) -> bool:
    from contrastive.nn.text import TEXT_BACKBONES

    return section.get("name") in TEXT_BACKBONES


class _Defaults:
    """What a modality does when it has nothing special to do."""

    def prepare(self, dataset: Any, cfg: Config) -> Any:
        """The run's training data as its encoder reads it (text: tokenised by the encoder's tokenizer)."""
        return dataset

    def for_encoder(self, dataset: Any, preprocess: Any) -> Any:
        """``dataset`` as an encoder saved with ``preprocess`` reads it (text: tokenised by its tokenizer)."""
        return dataset

    def trial_views(self, views: Any, dataset: Any, device: torch.device):
        """``(n, generator) -> views`` for the memory check's trial steps; None: random floats of the trial sizes."""
        return None

    def evaluate(self, method: Any, preprocess: Any, splits: Any, cfg: Config, *, note: str) -> dict[str, Any]:
        """After pretraining: the kNN and linear probe of ``method.encoder()`` on the labelled sides, with the
        modality's baseline."""
        from contrastive.api import evaluate_encoder

        return evaluate_encoder(method.encoder(), preprocess, splits.eval_train, splits.eval_test, cfg, note=note)

    def can_evaluate(self, splits: Any, cfg: Config) -> bool:
        """Whether ``evaluate`` has something to evaluate on (images, audio: a labelled test side)."""
        return splits.eval_test is not None


class ImageModality(_Defaults):
    name = "image"
    dims = 2  # a view is [n, C, S, S]
    baseline_key = "raw_pixel"
    baseline_protocols = ("knn",)

    def views(self, cfg: Config, dataset: Any):
        from contrastive.data.views import make_views, run_view_groups

        return make_views(cfg.views, dataset.mean, dataset.std, dataset.channels, dataset.image_size,
                          run_view_groups(cfg))

    def trial_sizes(self, cfg: Config, dataset: Any) -> tuple[list[int], int]:
        """(the side of every view of a batch, in batch order; how many are global): the memory check's trial."""
        from contrastive.data.views import run_view_groups, view_groups, view_shapes

        return view_shapes(view_groups(cfg.views, dataset.image_size, run_view_groups(cfg)), dataset.image_size)

    def describe(self, sizes: list[int]) -> str:
        return f"{sizes[0]} px views"

    def check_backbone(self, section: dict) -> None:
        if _is_audio_backbone(section) or _is_text_backbone(section):
            what = "sentences" if _is_text_backbone(section) else "audio waveforms"
            raise ConfigError(f"backbone.name={section['name']} reads {what}, and this data is images; pick an "
                              f"image backbone (small_cnn, resnet18, ...)")

    def preprocess(self, dataset: Any, size: int | None) -> Preprocess:
        return Preprocess.for_dataset(dataset, size)

    def check_preprocess(self, preprocess: Any, dataset: Any) -> None:
        if not isinstance(preprocess, Preprocess):
            raise DataError(f"the encoder was trained on {preprocess.modality}; {dataset.name} holds images")

    def describe_baseline(self, preprocess: Preprocess, e: EvalConfig) -> str:
        return f"the same kNN on the encoder's input at {self._pixels(preprocess, e).size} px (resized, normalised pixels)"

    def baseline_features(self, dataset: Any, preprocess: Preprocess, e: EvalConfig,
                          device: torch.device) -> tuple[Tensor, Tensor]:
        from contrastive.evaluation.features import raw_pixel_features

        # every image's pixels are held at once, as floats: at most eval.raw_pixel_size px
        return raw_pixel_features(dataset, preprocess=self._pixels(preprocess, e), batch_size=e.batch_size,
                                  device=device)

    @staticmethod
    def _pixels(preprocess: Preprocess, e: EvalConfig) -> Preprocess:
        return dataclasses.replace(preprocess, size=min(preprocess.size, e.raw_pixel_size or preprocess.size))


class AudioModality(_Defaults):
    name = "audio"
    dims = 1  # a view is [n, C, T]
    baseline_key = "mfcc"
    baseline_protocols = ("knn", "linear")

    def views(self, cfg: Config, dataset: Any):
        from contrastive.data.views import make_views, run_view_groups

        return make_views(cfg.views, dataset.mean, dataset.std, dataset.channels, dataset.image_size,
                          run_view_groups(cfg), modality=self.name)

    def trial_sizes(self, cfg: Config, dataset: Any) -> tuple[list[int], int]:
        return [cfg.views.window] * cfg.views.n_views, cfg.views.n_views

    def describe(self, sizes: list[int]) -> str:
        return f"{sizes[0]}-sample windows"

    def check_backbone(self, section: dict) -> None:
        if not _is_audio_backbone(section):
            from contrastive.nn.audio import AUDIO_BACKBONES

            raise ConfigError(f"backbone.name={section.get('name')} reads images, and this data is audio; pick an audio "
                              f"backbone ({', '.join(AUDIO_BACKBONES)}) and an audio method (cpc-audio)")

    def preprocess(self, dataset: Any, size: int | None) -> AudioPreprocess:
        return AudioPreprocess.for_dataset(dataset)  # whole clips: no size

    def check_preprocess(self, preprocess: Any, dataset: Any) -> None:
        if not isinstance(preprocess, AudioPreprocess):
            raise DataError(f"the encoder was trained on images; {dataset.name} holds audio clips")
        preprocess.check(dataset)

    def describe_baseline(self, preprocess: AudioPreprocess, e: EvalConfig) -> str:
        return (f"the same kNN and linear probe on the mean and std over time of {e.n_mfcc} MFCCs (librosa; 25 ms "
                f"windows, 10 ms hop)")

    def baseline_features(self, dataset: Any, preprocess: AudioPreprocess, e: EvalConfig,
                          device: torch.device) -> tuple[Tensor, Tensor]:
        from contrastive.evaluation.features import mfcc_features

        return mfcc_features(dataset, n_mfcc=e.n_mfcc)


class TokenViews:
    """Token ids of a batch [n, L] (sentences) or [n, k, L] (k-tuples) -> views [n, L'] each, cut after the
    batch's longest sentence: one view of sentences (the method makes its own: SimCSE's two dropout passes, its
    word-level views), the k columns of tuples (an anchor, its positive, a hard negative)."""

    n_global = None

    def __init__(self, pad_id: int, size: int):
        self.pad_id = pad_id
        self.size = size

    def __call__(self, tokens: Tensor, generator: torch.Generator, index: Tensor | None = None) -> list[Tensor]:
        if tokens.ndim == 2:
            return [trim_padding(tokens, self.pad_id)]
        return [trim_padding(tokens[:, j], self.pad_id) for j in range(tokens.shape[1])]


def _text_encoder_section(cfg: Config, data: str) -> dict:
    """The text encoder's section of a run: ``backbone:`` for text data; the method's ``text:`` (CLIP's text
    tower) for image-caption data."""
    if data == "text":
        return cfg.backbone
    from contrastive.methods import method_config

    section = getattr(method_config(cfg), "text", None)
    if not isinstance(section, dict):
        raise ConfigError(f"method {cfg.method['name']} has no text tower (method.text) to read captions with; "
                          f"image-caption data trains clip (--method clip)")
    return section


class TextModality(_Defaults):
    name = "text"
    dims = 1  # a view is [n, L] token ids
    baseline_key = "bow"
    baseline_protocols = ()

    def prepare(self, dataset: Any, cfg: Config) -> Any:
        from contrastive.nn.text import load_tokenizer, text_max_tokens, text_tokenizer_path

        self.check_backbone(cfg.backbone)
        section = _text_encoder_section(cfg, self.name)
        path = text_tokenizer_path(section)
        return dataset.tokenized(load_tokenizer(path), text_max_tokens(section), path)

    def for_encoder(self, dataset: Any, preprocess: Any) -> Any:
        from contrastive.nn.text import load_tokenizer

        self.check_preprocess(preprocess, dataset)
        return dataset.tokenized(load_tokenizer(preprocess.tokenizer), preprocess.max_tokens, preprocess.tokenizer)

    def views(self, cfg: Config, dataset: Any) -> TokenViews:
        if cfg.views.backend != "tensor" or cfg.views.groups:
            raise ConfigError("views.backend=pil and views.groups make views of images; sentences are served as "
                              "token ids (the method makes its own views: method.delete, method.swap, ...)")
        if dataset.images is None:
            raise DataError(f"{dataset.name}: the sentences are not tokenised (the text modality's prepare)")
        return TokenViews(dataset.pad_id, dataset.image_size)

    def trial_sizes(self, cfg: Config, dataset: Any) -> tuple[list[int], int | None]:
        return [dataset.image_size] * dataset.width, None

    def trial_views(self, views: Any, dataset: Any, device: torch.device):
        def make(n: int, generator: torch.Generator) -> list[Tensor]:
            index = torch.arange(n) % len(dataset)  # real sentences: the longest rows decide the memory
            rows = dataset.images[torch.argsort((dataset.images != dataset.pad_id).flatten(1).sum(1),
                                                descending=True)[index]]
            return views(rows.to(device), generator, index=index.to(device))
        return make

    def describe(self, sizes: list[int]) -> str:
        return f"sentences of up to {sizes[0]} tokens"

    def check_backbone(self, section: dict) -> None:
        from contrastive.nn.text import TEXT_BACKBONES

        if not _is_text_backbone(section):
            raise ConfigError(f"backbone.name={section.get('name')} does not read sentences, and this data is text; "
                              f"pick a text encoder ({', '.join(TEXT_BACKBONES)}) and a text method (simcse, "
                              f"simcse-sup)")

    def preprocess(self, dataset: Any, size: int | None) -> TextPreprocess:
        return TextPreprocess(dataset.tokenizer, dataset.max_tokens, dataset.pad_id)

    def check_preprocess(self, preprocess: Any, dataset: Any) -> None:
        if not isinstance(preprocess, TextPreprocess):
            raise DataError(f"the encoder was trained on {getattr(preprocess, 'modality', 'image')} data; "
                            f"{dataset.name} holds sentences")

    def can_evaluate(self, splits: Any, cfg: Config) -> bool:
        return bool(cfg.eval.sts or cfg.eval.senteval)

    def evaluate(self, method: Any, preprocess: Any, splits: Any, cfg: Config, *, note: str) -> dict[str, Any]:
        from contrastive.data.text_data import text_root
        from contrastive.device import resolve_device

        device = resolve_device(cfg.train.device)
        return evaluate_text_encoder(method.encoder().to(device), preprocess, cfg, text_root(cfg.data),
                                     device=device, note=note)


# Words of the bag-of-words baseline: the probe standardises every column, which magnifies the rare words of a
# larger vocabulary (TREC, 10 probe epochs: linear 0.78 with 1,000 words, 0.58 with 5,000)
BOW_FEATURES = 1000
STS_SETS = ("stsb-dev", "stsb-train", "sick-train", "sick-trial", "sick-test")


def evaluate_text_encoder(encoder: Any, preprocess: TextPreprocess, cfg: Config, root: Path, *,
                          device: torch.device, note: str) -> dict[str, Any]:
    """STS Spearman (``eval.sts``) and SentEval probes (``eval.senteval``, with the bag-of-words baseline when
    ``eval.raw_pixel_baseline``) of a frozen sentence encoder; the shared sets read from ``root`` (``text/``)."""
    import time

    from contrastive.data.text_data import sick_split, stsb_split
    from contrastive.evaluation.senteval import BagOfWords, senteval
    from contrastive.evaluation.sts import encode_sentences, evaluate_sts
    from contrastive.nn.text import load_tokenizer

    e = cfg.eval
    unknown = [s for s in e.sts if s not in STS_SETS]
    if unknown:
        raise ConfigError(f"eval.sts names {unknown}; pick from {', '.join(STS_SETS)}")
    tokenizer = load_tokenizer(preprocess.tokenizer)
    options = {"batch_size": e.batch_size, "max_length": preprocess.max_tokens, "device": device}
    t0 = time.perf_counter()
    res: dict[str, Any] = {"evaluation": {"split": note, "sts": "Spearman correlation of cosine similarities with the "
                                          "gold scores, all pairs at once"}}
    for name in e.sts:
        corpus, split = name.split("-")
        pairs = (stsb_split if corpus == "stsb" else sick_split)(root, split)
        res[f"{corpus}_{split}_spearman"] = evaluate_sts(encoder, tokenizer, pairs, **options)
    if e.senteval:
        probe = {"folds": e.senteval_folds, "seed": cfg.seed, "knn_k": e.knn_k, "knn_temperature": e.knn_temperature,
                 "linear_epochs": e.linear_epochs, "linear_lr": e.linear_lr,
                 "linear_weight_decay": e.linear_weight_decay, "linear_batch_size": e.linear_batch_size,
                 "device": device}
        res["evaluation"]["senteval"] = (f"kNN (k={e.knn_k}) and linear probe ({e.linear_epochs} epochs) on frozen "
                                         f"embeddings; {e.senteval_folds}-fold stratified cross-validation where a "
                                         f"set has no test split")
        res["senteval"] = senteval(lambda s: encode_sentences(encoder, tokenizer, s, **options),
                                   root / "senteval-cls", list(e.senteval), **probe)
        res["senteval_linear_mean"] = sum(r["linear_top1"] for r in res["senteval"].values()) / len(e.senteval)
        if e.raw_pixel_baseline:
            res["evaluation"]["bow_baseline"] = (f"the same probes on bag-of-words vectors (log(1 + count) of each "
                                                 f"set's {BOW_FEATURES:,} most frequent tokens, L2-normalised)")
            res["bow_senteval"] = senteval(lambda s: BagOfWords.fit(tokenizer, s, max_features=BOW_FEATURES)(s),
                                           root / "senteval-cls", list(e.senteval), **probe)
            res["bow_senteval_linear_mean"] = (sum(r["linear_top1"] for r in res["bow_senteval"].values())
                                               / len(e.senteval))
    res["feature_seconds"] = round(time.perf_counter() - t0, 2)
    return res


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


def caption_tokens(captions: list[list[str]], tokenizer: Any, max_tokens: int, name: str) -> tuple[Tensor, Tensor]:
    """Every image's captions as token ids [N, K, L] (K: the most captions of an image; missing rows padding) and
    the count of each image's captions [N]."""
    from contrastive.data.text_data import tokenize

    flat = [c for caps in captions for c in caps]
    ids = tokenize(flat, tokenizer, max_tokens, name=name)  # [M, L]
    counts = torch.tensor([len(c) for c in captions], dtype=torch.long)
    out = torch.full((len(captions), int(counts.max()), ids.shape[1]), int(tokenizer.pad_token_id), dtype=torch.long)
    at = torch.cumsum(counts, 0) - counts
    for k in range(out.shape[1]):
        has = counts > k
        out[has, k] = ids[at[has] + k]
    return out, counts


class ImageTextModality(ImageModality):
    name = "image-text"
    baseline_key = "chance"
    baseline_protocols = ()

    def prepare(self, dataset: Any, cfg: Config) -> Any:
        from contrastive.nn.text import load_tokenizer, text_max_tokens, text_tokenizer_path

        section = _text_encoder_section(cfg, self.name)
        path = text_tokenizer_path(section)
        tokenizer = load_tokenizer(path)
        dataset.caption_ids, dataset.caption_counts = caption_tokens(dataset.captions, tokenizer,
                                                                     text_max_tokens(section), dataset.name)
        dataset.pad_id = int(tokenizer.pad_token_id)
        return dataset

    def views(self, cfg: Config, dataset: Any) -> ImageTextViews:
        if cfg.views.n_views != 1 or cfg.views.groups or cfg.views.backend != "tensor":
            raise ConfigError("image-caption data pairs one crop of each image with one of its captions: set "
                              "views.n_views=1, no views.groups, views.backend=tensor")
        return ImageTextViews(super().views(cfg, dataset), dataset.caption_ids, dataset.caption_counts,
                              dataset.pad_id)

    def trial_views(self, views: Any, dataset: Any, device: torch.device):
        def make(n: int, generator: torch.Generator) -> list[Tensor]:
            index = torch.arange(n) % len(dataset)
            return views(dataset.images[index].to(device), generator, index=index.to(device))
        return make

    def describe(self, sizes: list[int]) -> str:
        return f"{sizes[0]} px crops and their captions"

    def can_evaluate(self, splits: Any, cfg: Config) -> bool:
        return splits.eval_test is not None or cfg.eval.zero_shot is not None

    def evaluate(self, method: Any, preprocess: Any, splits: Any, cfg: Config, *, note: str) -> dict[str, Any]:
        from contrastive.device import resolve_device

        return evaluate_image_text(method, preprocess, splits.eval_test, cfg, device=resolve_device(cfg.train.device),
                                   note=note)


def recall_chance(n_images: int, n_texts: int, captions_per_image: float, k: int) -> dict[str, float]:
    """Recall@k of a random ranking: image -> text, the chance that k texts drawn without replacement hold one
    of an image's c captions, 1 - C(T - c, k) / C(T, k); text -> image, k / I."""
    c = round(captions_per_image)
    miss = math.prod((n_texts - c - i) / (n_texts - i) for i in range(k))
    return {f"image_to_text@{k}": 1 - miss, f"text_to_image@{k}": min(k / n_images, 1.0)}


@torch.no_grad()
def evaluate_image_text(method: Any, preprocess: Preprocess, test: Any, cfg: Config, *, device: torch.device,
                        note: str) -> dict[str, Any]:
    """Image <-> caption recall@1/5/10 on the held-out side ``test`` (every caption of every image) and, with
    ``eval.zero_shot``, zero-shot top-1 on that dataset's test side, with chance levels beside."""
    import time

    from contrastive.evaluation.features import extract_features
    from contrastive.evaluation.retrieval import (
        RECALL_AT,
        class_embeddings,
        class_prompts,
        retrieval_recall,
        zero_shot_top1,
    )
    from contrastive.evaluation.sts import encode_sentences
    from contrastive.nn.text import load_tokenizer, text_max_tokens, text_tokenizer_path

    image_embedder = getattr(method, "image_embedder", None)
    if image_embedder is None:
        raise ConfigError(f"method {cfg.method['name']} does not embed images and captions in one space; "
                          f"image-caption evaluation is for clip")
    images, texts = method.image_embedder().to(device), method.text_embedder().to(device)
    section = _text_encoder_section(cfg, "image-text")
    tokenizer = load_tokenizer(text_tokenizer_path(section))
    options = {"batch_size": cfg.eval.batch_size, "max_length": text_max_tokens(section), "device": device}
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
    if cfg.eval.zero_shot is not None:
        from contrastive.data.splits import load_splits

        data = dataclasses.replace(cfg.data, name=cfg.eval.zero_shot, train_data=None, test_data=None,
                                   image_size=None, label=None)
        zs = load_splits(data)
        target = zs.eval_test
        if target is None or target.classes is None:
            raise DataError(f"eval.zero_shot={cfg.eval.zero_shot} has no labelled test side ({zs.note})")
        classes = [c.replace("_", " ") for c in target.classes]
        prompts = class_prompts(classes, tuple(cfg.eval.prompts))
        z_cls = class_embeddings(encode_sentences(texts, tokenizer, prompts, **options), len(classes))
        # the test images through the image tower at the tower's input size and statistics
        z_img, labels = extract_features(images, target, preprocess=preprocess, batch_size=cfg.eval.batch_size,
                                         device=device)
        res["zero_shot_top1"] = zero_shot_top1(z_img, labels, z_cls)
        res["zero_shot_chance"] = 1 / len(classes)
        res["evaluation"]["zero_shot"] = (f"{len(target)} test images of {cfg.eval.zero_shot} ({zs.note}); "
                                          f"{len(classes)} classes; prompts {list(cfg.eval.prompts)}")
    res["feature_seconds"] = round(time.perf_counter() - t0, 2)
    return res


MODALITIES = {m.name: m for m in (ImageModality(), AudioModality(), TextModality(), ImageTextModality())}


def modality_of(dataset: Any) -> ImageModality | AudioModality | TextModality | ImageTextModality:
    """The entry of ``dataset``'s modality."""
    name = getattr(dataset, "modality", "image")
    if name not in MODALITIES:
        raise DataError(f"{getattr(dataset, 'name', dataset)}: no support for {name!r} data (known: "
                        f"{', '.join(MODALITIES)})")
    return MODALITIES[name]


def data_modality(cfg: DataConfig) -> str:
    """The modality of the data ``cfg`` names, known without loading it: a named dataset's (its loader's
    ``modality`` attribute), or a folder's (``audio`` when it holds WAV files and no images)."""
    from contrastive.data.audio import is_audio_folder
    from contrastive.data.captions import is_caption_folder
    from contrastive.data.text_data import is_text_file
    from contrastive.registry import lookup, names

    if cfg.name in names("datasets"):
        return getattr(lookup("datasets", cfg.name), "modality", "image")
    path = Path(cfg.name).expanduser()
    if is_text_file(path):
        return "text"
    if path.is_dir() and is_caption_folder(path):
        return "image-text"
    return "audio" if path.is_dir() and is_audio_folder(path) else "image"
