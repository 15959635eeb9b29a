"""Sentences: ``.txt`` / ``.csv`` / ``.tsv`` files and the shared STS-B and SICK sets (``rows.py``, ``readers.py``),
tokenised once by the encoder's own tokenizer and served as token ids cut to each batch's longest sentence; STS
Spearman (``sts.py``) and SentEval probes (``senteval.py``) beside a bag-of-words baseline as the evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from contrastive.config import Config, DataConfig
from contrastive.data.datasets import SampleDataset, Splits
from contrastive.errors import ConfigError, DataError
from contrastive.evaluation import save_embeddings
from contrastive.methods import method_config, method_spec
from contrastive.methods.base import Method
from contrastive.modalities.base import DataShape, Modality, Reasons, Trial, register_modality
from contrastive.modalities.text.rows import (
    TEXT_SUFFIXES,
    TextRows,
    is_text_file,
    open_text_file,
    sick_split,
    stsb_split,
    text_root,
)
from contrastive.modalities.text.senteval import BagOfWords, senteval
from contrastive.modalities.text.sts import encode_sentences, evaluate_sts
from contrastive.nn.text import TokenEncoder, load_tokenizer, text_max_tokens, text_tokenizer_path
from contrastive.registry import lookup

# Words of the bag-of-words baseline: the probe standardises every column, which magnifies the rare words of a
# larger vocabulary (TREC, 10 probe epochs: linear 0.78 with 1,000 words, 0.58 with 5,000)
BOW_FEATURES = 1000
STS_SETS = ("stsb-dev", "stsb-train", "sick-train", "sick-trial", "sick-test")


@dataclass
class TextConfig:
    sts: list = field(default_factory=lambda: ["stsb-dev", "sick-test"], metadata={"help": "The STS sets whose "
                      "Spearman correlation (cosine similarity against the human scores, all pairs at once, as "
                      "SimCSE's evaluation) is measured: any of stsb-dev, stsb-train, sick-train, sick-trial, "
                      "sick-test, read from data.data_dir (the shared text-sts-senteval set); [] for none."})
    senteval: list = field(default_factory=lambda: ["mr", "cr", "subj", "mpqa", "trec", "sst2"], metadata={"help":
                           "SentEval classification sets probed with the frozen sentence embeddings (eval's kNN and "
                           "linear probe; MR, CR, SUBJ and MPQA by stratified cross-validation, TREC and SST on their "
                           "test split), beside a bag-of-words baseline under the same probe when eval.baseline is on; "
                           "SimCSE's transfer tasks less MRPC. Any of mr, cr, subj, mpqa, trec, sst2, sst5; [] for "
                           "none."})
    senteval_folds: int = field(default=10, metadata={"help": "Cross-validation folds of the SentEval sets without a "
                                "test split (SentEval's 10)."})


def trim_padding(ids: Tensor, pad_id: int) -> Tensor:
    """Token ids [..., L] cut after the last position where any row holds a token (one host sync)."""
    used = (ids != pad_id).flatten(0, -2).any(dim=0)  # [L]
    longest = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return ids[..., :longest]


@dataclass(frozen=True)
class TextPreprocess:
    """Sentences are tokenised by the tokenizer in the directory ``tokenizer``, truncated at ``max_tokens``; a
    batch of token ids [B, L] padded with ``pad_id`` is cut after its longest sentence (the encoder derives the
    attention mask from the padding id)."""

    tokenizer: str
    max_tokens: int
    pad_id: int
    modality: str = "text"

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype != torch.long or ids.ndim != 2:
            raise DataError(f"a text encoder reads token ids int64 [B, L]; got {ids.dtype} {tuple(ids.shape)}")
        return trim_padding(ids, self.pad_id)


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


def encoder_section(cfg: Config, kind: str) -> dict:
    """The config section of the run's encoder of ``kind`` data: ``backbone:``, or the method's own tower
    (``MethodSpec.towers``: CLIP's text tower is ``method.text``)."""
    where = (method_spec(cfg.method["name"]).towers or {}).get(kind, "backbone")
    if where == "backbone":
        return cfg.backbone
    section = getattr(method_config(cfg), where.removeprefix("method."))
    if not isinstance(section, dict):
        raise ConfigError(f"{where} of method {cfg.method['name']} is not an encoder section")
    return section


def text_tower(module: nn.Module) -> TokenEncoder:
    """The token encoder inside a text embedder: it carries the tokenizer the sentences are cut with."""
    found = next((m for m in module.modules() if isinstance(m, TokenEncoder)), None)
    if found is None:
        raise ConfigError(f"{type(module).__name__} holds no token encoder (nn.text.TokenEncoder) to read text with")
    return found


class TextModality(Modality):
    name = "text"
    reads = "text"
    accepts = "a text file (.txt, .csv, .tsv)"
    noun = "rows"
    config_class = TextConfig
    labelled_evaluation = False  # evaluated on its own sets: STS and SentEval

    # -------------------------------------------------------------- detection and reading

    def claims(self, path: Path) -> bool:
        return is_text_file(path)

    def open(self, path: Path, cfg: DataConfig, classes: list[str] | None) -> Splits:
        return open_text_file(path, cfg.encoding)

    def probe(self, cfg: DataConfig, *, evaluate: bool = True) -> DataShape:
        """The rows and their width (sentences, pairs, triples), read whole: text is small beside its encoder."""
        named = cfg.name in self.datasets()
        rows = (lookup("datasets", cfg.name)(cfg) if named else
                open_text_file(Path(cfg.name).expanduser(), cfg.encoding)).pretrain
        return DataShape(len(rows), 0, rows.width, f"{cfg.name}: {len(rows):,} rows of {rows.width} sentence(s)")

    # -------------------------------------------------------------- training

    def prepare(self, dataset: SampleDataset, cfg: Config) -> SampleDataset:
        section = encoder_section(cfg, self.name)
        path = text_tokenizer_path(section)
        return dataset.tokenized(load_tokenizer(path), text_max_tokens(section), path)

    def input_shape(self, cfg: Config, dataset: SampleDataset) -> tuple[int, ...]:
        return tuple(dataset.sample_shape[-1:])  # a view is one sentence's token ids

    def views(self, cfg: Config, dataset: SampleDataset) -> TokenViews:
        if cfg.views.backend != "tensor" or cfg.views.groups:
            raise ConfigError("views.backend=pil and views.groups make views of images; sentences are served as "
                              "token ids (the method makes its own views: method.delete, method.swap, ...)")
        if dataset.samples is None:
            raise DataError(f"{dataset.name}: the sentences are not tokenised (the text modality's prepare)")
        return TokenViews(dataset.pad_id, dataset.sample_shape[-1])

    def trial(self, cfg: Config, dataset: SampleDataset, views: Any, device: torch.device) -> Trial:
        """Real sentences, the longest first: random ids cannot stand for the lengths that decide the memory."""
        longest = torch.argsort((dataset.samples != dataset.pad_id).flatten(1).sum(1), descending=True)

        def make(n: int, generator: torch.Generator) -> list[Tensor]:
            index = torch.arange(n) % len(dataset)
            return views(dataset.samples[longest[index]].to(device), generator, index=index.to(device))

        one = make(1, torch.Generator(device=device).manual_seed(0))
        return Trial(make, 2 * sum(v[0].numel() * v.element_size() for v in one),
                     f"sentences of up to {dataset.sample_shape[-1]} tokens")

    def planned(self, cfg: Config, shape: DataShape, device: torch.device) -> tuple[tuple[int, ...], Trial]:
        """Rows of ``max_tokens`` ids (the most a sentence may take), one view per column of the recipe's rows."""
        section = encoder_section(cfg, self.name)
        length = text_max_tokens(section)

        def make(n: int, generator: torch.Generator) -> list[Tensor]:
            return [torch.randint(1000, 2000, (n, length), generator=generator, device=device)
                    for _ in range(max(shape.channels, 1))]

        return (length,), Trial(make, 2 * 8 * length * max(shape.channels, 1), f"sentences of {length} tokens")

    # -------------------------------------------------------------- what an encoder reads

    def preprocess(self, cfg: Config, dataset: SampleDataset) -> TextPreprocess:
        return TextPreprocess(dataset.tokenizer, dataset.max_tokens, dataset.pad_id)

    def preprocess_from_dict(self, d: dict) -> TextPreprocess:
        return TextPreprocess(str(d["tokenizer"]), int(d["max_tokens"]), int(d["pad_id"]))

    def for_encoder(self, dataset: SampleDataset, preprocess: Any) -> SampleDataset:
        super().for_encoder(dataset, preprocess)
        return dataset.tokenized(load_tokenizer(preprocess.tokenizer), preprocess.max_tokens, preprocess.tokenizer)

    # -------------------------------------------------------------- evaluation

    def can_evaluate(self, splits: Splits, cfg: Config) -> bool:
        s = self.settings(cfg)
        return bool(s.sts or s.senteval)

    def check_evaluation(self, cfg: Config) -> None:
        s = self.settings(cfg)
        if s.sts or s.senteval:
            text_root(cfg.data)  # the shared STS and SentEval sets, or a DataError saying where they were looked for

    def evaluate_encoder(self, encoder: nn.Module, preprocess: TextPreprocess, splits: Splits | None, cfg: Config, *,
                         note: str, device: torch.device, protocols: tuple[str, ...] | None = None
                         ) -> dict[str, Any]:
        """STS Spearman (``modalities.text.sts``) and SentEval probes (``modalities.text.senteval``, with the
        bag-of-words baseline when ``eval.baseline``) of a frozen sentence encoder; the shared sets read from
        ``data.data_dir`` (``text/``)."""
        e, s = cfg.eval, self.settings(cfg)
        unknown = [name for name in s.sts if name not in STS_SETS]
        if unknown:
            raise ConfigError(f"modalities.text.sts names {unknown}; pick from {', '.join(STS_SETS)}")
        root = text_root(cfg.data)
        encoder = encoder.to(device)
        tokenizer = load_tokenizer(preprocess.tokenizer)
        options = {"batch_size": e.batch_size, "max_length": preprocess.max_tokens, "device": device}
        t0 = time.perf_counter()
        res: dict[str, Any] = {"evaluation": {"split": note, "sts": "Spearman correlation of cosine similarities "
                                              "with the gold scores, all pairs at once"}}
        for name in s.sts:
            corpus, split = name.split("-")
            pairs = (stsb_split if corpus == "stsb" else sick_split)(root, split)
            res[f"{corpus}_{split}_spearman"] = evaluate_sts(encoder, tokenizer, pairs, **options)
        if s.senteval:
            probe = {"folds": s.senteval_folds, "seed": cfg.seed, "knn_k": e.knn_k,
                     "knn_temperature": e.knn_temperature, "linear_epochs": e.linear_epochs,
                     "linear_lr": e.linear_lr, "linear_weight_decay": e.linear_weight_decay,
                     "linear_batch_size": e.linear_batch_size, "device": device}
            res["evaluation"]["senteval"] = (f"kNN (k={e.knn_k}) and linear probe ({e.linear_epochs} epochs) on "
                                             f"frozen embeddings; {s.senteval_folds}-fold stratified cross-validation "
                                             f"where a set has no test split")
            res["senteval"] = senteval(lambda x: encode_sentences(encoder, tokenizer, x, **options),
                                       root / "senteval-cls", list(s.senteval), **probe)
            res["senteval_linear_mean"] = sum(r["linear_top1"] for r in res["senteval"].values()) / len(s.senteval)
            if e.baseline:
                res["evaluation"]["bow_baseline"] = (f"the same probes on bag-of-words vectors (log(1 + count) of "
                                                     f"each set's {BOW_FEATURES:,} most frequent tokens, "
                                                     f"L2-normalised)")
                res["bow_senteval"] = senteval(lambda x: BagOfWords.fit(tokenizer, x, max_features=BOW_FEATURES)(x),
                                               root / "senteval-cls", list(s.senteval), **probe)
                res["bow_senteval_linear_mean"] = (sum(r["linear_top1"] for r in res["bow_senteval"].values())
                                                   / len(s.senteval))
        res["feature_seconds"] = round(time.perf_counter() - t0, 2)
        return res

    def summary(self, results: dict[str, Any]) -> list[tuple[str, str]]:
        labels = (("stsb_dev_spearman", "STS-B dev Spearman"), ("sick_test_spearman", "SICK test Spearman"),
                  ("senteval_linear_mean", "SentEval linear, mean"),
                  ("bow_senteval_linear_mean", "bag-of-words SentEval (baseline)"))
        return super().summary(results) + [(label, f"{results[key]:.4f}") for key, label in labels if key in results]

    # -------------------------------------------------------------- embedding

    def embed(self, encoder: nn.Module, method: Method | None, preprocess: Any, sets: list[SampleDataset],
              output: Path, *, batch_size: int, device: torch.device) -> dict[str, Any]:
        """One vector per sentence: in the joint space of a method that embeds text beside another kind of data
        (CLIP's text tower, through the tokenizer it was trained with), else by the encoder."""
        joint = method.embedders().get(self.name) if method is not None else None
        if joint is None:
            return super().embed(encoder, method, preprocess, sets, output, batch_size=batch_size, device=device)
        rows = [r for s in sets for r in s.rows]
        if not isinstance(rows[0], str):
            raise DataError(f"{sets[0].name} holds rows of several sentences; embed a file of one sentence a line")
        tower = text_tower(joint)
        feats = encode_sentences(joint.to(device), load_tokenizer(tower.tokenizer), rows, batch_size=batch_size,
                                 max_length=tower.max_tokens, device=device)
        paths = save_embeddings(feats, None, output)
        return {"features": [str(p) for p in paths], "images": len(rows), "sentences": len(rows),
                "dim": int(feats.shape[1])}

    # -------------------------------------------------------------- settings for data without a recipe

    def derive(self, method: str, data: DataConfig, layer: dict, device: torch.device
               ) -> tuple[dict, Reasons, DataShape]:
        """The method's own recipe: nothing is derived from sentences but the batch (``autoconfig``)."""
        reasons = Reasons()
        return self.own_recipe(method, data, reasons), reasons, self.probe(data)


TEXT = register_modality(TextModality())

__all__ = ["TEXT", "TEXT_SUFFIXES", "TextConfig", "TextModality", "TextPreprocess", "TextRows", "TokenViews",
           "encoder_section", "text_tower", "trim_padding"]
