"""Sentence data as the trainer serves it: rows of one sentence, or of a tuple (a pair, a triple), tokenised once.

A :class:`TextRows` dataset holds its rows as strings until the text modality tokenises them with the encoder's
own tokenizer (``tokenized``): then ``samples`` is one int64 tensor of token ids, ``[N, L]`` for sentences or
``[N, k, L]`` for k-tuples, padded with the tokenizer's padding id to the longest row and cut at the encoder's
``max_tokens``. The trainer indexes it like an image tensor; the views cut every batch to its own longest
sentence (``data/modality.py``), so a batch of short sentences costs what short sentences cost.

Sources (``data.name``):

- ``sts-sentences``: the distinct sentences of STS-B train and SICK train (both sides of every pair, 15,337),
  unlabeled: unsupervised SimCSE's corpus in miniature (the paper uses 10^6 Wikipedia sentences);
- ``sick-triples``: SICK train's (premise, entailment, contradiction) triples (``readers.sick_triples``), the
  supervised SimCSE data of the shared set (the paper uses SNLI + MNLI, 275k triples);
- a ``.txt`` file: one sentence a line (SimCSE's wiki1m format);
- a ``.csv`` / ``.tsv`` file: rows of 1, 2 or 3 sentences (sentences, positive pairs, or triples with a hard
  negative), SimCSE's header ``sent0,sent1[,hard_neg]`` skipped when present.

The shared STS and SentEval sets come from ``data.data_dir`` as ``text-sts-senteval.tar.gz`` or its unpacked
``text/`` folder (``text_root``); an archive is unpacked once into the cache folder.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from contrastive.config import DataConfig
from contrastive.data.datasets import SampleDataset, Splits
from contrastive.data.locate import data_root, unpacked
from contrastive.errors import DataError
from contrastive.modalities.base import register_dataset
from contrastive.modalities.text.readers import _read_lines, read_sentences, read_sick, read_stsb, sick_triples

log = logging.getLogger("contrastive.data")

TEXT_ARCHIVE = "text-sts-senteval.tar.gz"
TEXT_FOLDER = "text"
TEXT_SUFFIXES = (".txt", ".csv", ".tsv")
SIMCSE_HEADERS = (["sent0"], ["sent0", "sent1"], ["sent0", "sent1", "hard_neg"])


class TextRows(SampleDataset):
    """Rows of sentences (``str``) or of k-tuples of sentences, with labels (-1: none).

    Untokenised, items cannot be served; ``tokenized(tokenizer, max_tokens)`` gives the served copy."""

    modality = "text"

    def __init__(self, rows: Sequence[str | tuple[str, ...]], labels: Tensor | None = None, *, name: str,
                 classes: list[str] | None = None, tokens: Tensor | None = None, pad_id: int | None = None,
                 tokenizer: str | None = None, max_tokens: int | None = None):
        if not rows:
            raise DataError(f"{name}: no sentences")
        width = 1 if isinstance(rows[0], str) else len(rows[0])
        if any((1 if isinstance(r, str) else len(r)) != width for r in rows):
            raise DataError(f"{name}: rows of different widths (sentences, pairs, triples) in one dataset")
        self.rows = list(rows)
        self.width = width
        self.labels = torch.full((len(rows),), -1, dtype=torch.long) if labels is None else labels.long()
        self.name = name
        self.classes = classes
        self.samples = tokens
        self.pad_id = pad_id
        self.tokenizer = tokenizer  # the directory of the tokenizer that made ``images``
        self.max_tokens = max_tokens  # what the rows were truncated at

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """[L] (sentences) or [k, L] (k-tuples), L the tokens of the longest row (0 before tokenising)."""
        length = 0 if self.samples is None else int(self.samples.shape[-1])
        return (length,) if self.width == 1 else (self.width, length)

    def __repr__(self) -> str:
        what = "sentences" if self.width == 1 else f"{self.width}-tuples of sentences"
        return f"TextRows({self.name!r}, {len(self)} {what}, tokenised={self.samples is not None})"

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        if self.samples is None:
            raise DataError(f"{self.name}: the sentences are not tokenised yet (TextRows.tokenized)")
        return self.samples[i], int(self.labels[i]), i

    def tokenized(self, tokenizer: Any, max_tokens: int, tokenizer_path: str | None = None) -> "TextRows":
        """A copy holding the token ids of every row under ``tokenizer`` (a Hugging Face tokenizer), truncated
        to ``max_tokens`` and padded to the longest row."""
        if self.samples is not None and (self.tokenizer, self.max_tokens) == (tokenizer_path, max_tokens):
            return self
        tokens = tokenize(self.rows, tokenizer, max_tokens, name=self.name)
        return TextRows(self.rows, self.labels, name=self.name, classes=self.classes, tokens=tokens,
                        pad_id=int(tokenizer.pad_token_id), tokenizer=tokenizer_path, max_tokens=max_tokens)

    def take(self, indices: Sequence[int]) -> "TextRows":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TextRows([self.rows[i] for i in idx.tolist()], self.labels[idx], name=self.name,
                        classes=self.classes, tokens=None if self.samples is None else self.samples[idx],
                        pad_id=self.pad_id, tokenizer=self.tokenizer, max_tokens=self.max_tokens)


def tokenize(rows: Sequence[str | tuple[str, ...]], tokenizer: Any, max_tokens: int, *, name: str = "text",
             chunk: int = 4096) -> Tensor:
    """int64 token ids of ``rows``: [N, L] (sentences) or [N, k, L] (k-tuples, every sentence its own row of
    L), padded with the tokenizer's padding id to the longest, truncated at ``max_tokens``.

    The attention mask is not kept: it is ``ids != pad_id`` wherever the ids are read (``nn.text.TokenEncoder``),
    so a tokenizer that would put its padding id inside a sentence is refused here."""
    if tokenizer.pad_token_id is None:
        raise DataError(f"{name}: the tokenizer has no padding token; give a tokenizer with one (BERT's [PAD])")
    flat = [s for r in rows for s in ((r,) if isinstance(r, str) else r)]
    parts, longest = [], 1
    for start in range(0, len(flat), chunk):  # a chunk at a time: one call over a million sentences is slow to pad
        enc = tokenizer(flat[start:start + chunk], padding="longest", truncation=True, max_length=max_tokens,
                        return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        if ((ids == tokenizer.pad_token_id) & mask).any():
            raise DataError(f"{name}: the tokenizer's padding id {tokenizer.pad_token_id} occurs inside a "
                            f"sentence, so padding could not be told from text; use a tokenizer whose padding "
                            f"token is its own (BERT's [PAD])")
        parts.append(ids)
        longest = max(longest, ids.shape[1])
    out = torch.full((len(flat), longest), int(tokenizer.pad_token_id), dtype=torch.long)
    at = 0
    for ids in parts:
        out[at:at + len(ids), :ids.shape[1]] = ids
        at += len(ids)
    width = 1 if isinstance(rows[0], str) else len(rows[0])
    return out if width == 1 else out.view(len(rows), width, longest)


# --------------------------------------------------------------------------------------------------
# where the shared sets are


def text_root(cfg: DataConfig) -> Path:
    """The unpacked ``text/`` folder of the shared STS and SentEval sets: ``data.data_dir``'s ``text/``, or its
    ``text-sts-senteval.tar.gz`` unpacked once into ``data.cache_dir`` (``data.locate.unpacked``)."""
    root = data_root(cfg)
    folder, archive = root / TEXT_FOLDER, root / TEXT_ARCHIVE
    if (folder / "stsb").is_dir():
        return folder
    if not archive.is_file():
        raise DataError(f"the STS and SentEval sets are not in {root}: neither {folder}/ nor {archive} exists; pass "
                        f"data.data_dir=<the folder holding {TEXT_ARCHIVE} or its unpacked text/>, or turn the "
                        f"text evaluation off (modalities.text.sts=[] modalities.text.senteval=[])")
    cache = unpacked(archive, cfg, "text-sts-senteval")
    if not (cache / TEXT_FOLDER / "stsb").is_dir():
        raise DataError(f"{archive} did not unpack to {TEXT_FOLDER}/stsb/ in {cache}; is it the shared "
                        f"{TEXT_ARCHIVE}?")
    return cache / TEXT_FOLDER


def stsb_split(root: Path, split: str):
    return read_stsb(root / "stsb" / f"stsb-en-{split}.csv")


def sick_split(root: Path, split: str):
    name = {"train": "SICK_train.txt", "trial": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}[split]
    return read_sick(root / "sick" / name)


def sts_sentences(cfg: DataConfig) -> Splits:
    """The distinct sentences of STS-B train and SICK train, in order of first appearance, unlabeled."""
    root = text_root(cfg)
    pairs = stsb_split(root, "train") + sick_split(root, "train")
    rows = list(dict.fromkeys(s for p in pairs for s in (p.first, p.second)))
    return Splits(TextRows(rows, name="sts-sentences"), None, None,
                  note=f"pretraining on the {len(rows):,} distinct sentences of STS-B train and SICK train "
                       f"(unlabeled); the text evaluation reads STS-B dev, SICK test and SentEval "
                       f"(modalities.text.sts, modalities.text.senteval)")


def sick_triple_rows(cfg: DataConfig) -> Splits:
    """SICK train as supervised SimCSE's (premise, entailment, contradiction) triples."""
    triples = sick_triples(sick_split(text_root(cfg), "train"))
    rows = [(t.premise, t.entailment, t.contradiction) for t in triples]
    return Splits(TextRows(rows, name="sick-triples"), None, None,
                  note=f"pretraining on {len(rows)} (premise, entailment, contradiction) triples of SICK train; the "
                       f"text evaluation reads STS-B dev, SICK test and SentEval (modalities.text.sts, "
                       f"modalities.text.senteval)")


for _name, _fn in (("sts-sentences", sts_sentences), ("sick-triples", sick_triple_rows)):
    register_dataset(_name, "text")(_fn)


def is_text_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in TEXT_SUFFIXES


def read_text_rows(path: str | Path, encoding: str | None = None) -> list[str | tuple[str, ...]]:
    """A ``.txt`` file's sentences (one a line), or a ``.csv`` / ``.tsv`` file's rows of 1-3 sentences (every row
    of one width; SimCSE's header ``sent0,sent1[,hard_neg]`` skipped)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return read_sentences(path, encoding=encoding or "utf-8")
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise DataError(f"{path}: not a text file this package reads ({', '.join(TEXT_SUFFIXES)})")
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    reader = csv.reader(_read_lines(path, encoding or "utf-8"), delimiter=delimiter)
    rows, width = [], None
    for row in reader:
        line = reader.line_num
        if not row or (line == 1 and [c.strip() for c in row] in SIMCSE_HEADERS):
            continue
        if len(row) not in (1, 2, 3) or width not in (None, len(row)):
            raise DataError(f"{path}, line {line}: {len(row)} fields where {width or '1, 2 or 3'} were expected "
                            f"(sentence[, positive[, hard negative]]); quote a sentence that holds the delimiter")
        width = len(row)
        cells = tuple(c.strip() for c in row)
        if not all(cells):
            raise DataError(f"{path}, line {line}: an empty sentence")
        rows.append(cells[0] if width == 1 else cells)
    if not rows:
        raise DataError(f"{path}: no sentences")
    return rows


def open_text_file(path: Path, encoding: str | None = None) -> Splits:
    rows = read_text_rows(path, encoding)
    what = "sentences" if isinstance(rows[0], str) else f"rows of {len(rows[0])} sentences"
    return Splits(TextRows(rows, name=str(path)), None, None,
                  note=f"{path}: {len(rows):,} {what} (unlabeled); the text evaluation reads STS-B dev, SICK test "
                       f"and SentEval from data.data_dir (modalities.text.sts, modalities.text.senteval)")
