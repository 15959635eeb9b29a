"""Sentence data: plain text files, sentence-pair files, the STS and SentEval sets, and tokenised batches.

Readers return plain Python structures (``list[str]``, :class:`Pair`, :class:`Triple`,
:class:`LabelledSentence`); a malformed line is a DataError naming the file and the line. Tokenisation is the
encoder's own Hugging Face tokenizer (``nn.text.load_tokenizer``); :class:`TextCollate` pads each batch to its
longest sentence, not to a fixed length, so a batch of short sentences costs what short sentences cost.

The shared sets (``text-sts-senteval.tar.gz``, unpacked to ``text/``): STS-B ``stsb/stsb-en-{train,dev}.csv``
(``sentence1,sentence2,score`` with scores 0-5), SICK ``sick/SICK_{train,trial,test_annotated}.txt`` (tab
separated with a header: pair_ID, sentence_A, sentence_B, relatedness 1-5, entailment label), and the SentEval
classification sets ``senteval-cls/*`` (``label text`` lines; TREC, MR and SUBJ are latin-1).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from contrastive.errors import DataError

SICK_LABELS = ("ENTAILMENT", "NEUTRAL", "CONTRADICTION")

# SentEval task -> {split: file}; MR, CR, SUBJ and MPQA have no split (SentEval cross-validates them).
SENTEVAL_TASKS = {
    "mr": {"all": "rt-polarity.all"},
    "cr": {"all": "custrev.all"},
    "subj": {"all": "subj.all"},
    "mpqa": {"all": "mpqa.all"},
    "trec": {"train": "TREC.train.all", "test": "TREC.test.all"},
    "sst2": {"train": "stsa.binary.train", "dev": "stsa.binary.dev", "test": "stsa.binary.test"},
    "sst5": {"train": "stsa.fine.train", "dev": "stsa.fine.dev", "test": "stsa.fine.test"},
}
# files of the SentEval release that are not UTF-8 (bytes such as 0xe9 'é' on their own)
LATIN1_FILES = frozenset({"rt-polarity.all", "subj.all", "TREC.train.all", "TREC.test.all"})


@dataclass(frozen=True)
class Pair:
    """Two sentences and, where the file has one, a gold score (STS-B similarity 0-5, SICK relatedness 1-5)
    and a label (SICK's entailment judgement of ``first`` -> ``second``)."""
    first: str
    second: str
    score: float | None = None
    label: str | None = None


@dataclass(frozen=True)
class Triple:
    """Supervised SimCSE's training example (Gao et al. 2021, Sec. 4): a premise, a sentence it entails
    (the positive) and a sentence that contradicts it (the hard negative)."""
    premise: str
    entailment: str
    contradiction: str


@dataclass(frozen=True)
class LabelledSentence:
    text: str
    label: int


def _read_lines(path: str | Path, encoding: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the path of a text file (one sentence a line)")
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid {encoding} ({e.reason} at byte {e.start}); give the "
                        f"file's encoding (data.encoding, for example data.encoding=latin-1)") from None
    # only \n, \r\n and \r end a line: str.splitlines would also split at \x85, which rt-polarity.all has
    # inside a sentence (a cp1252 ellipsis read as latin-1)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines and not lines[-1] else lines


def read_sentences(path: str | Path, *, encoding: str = "utf-8") -> list[str]:
    """One sentence a line (SimCSE's unsupervised corpus, wiki1m, is such a file), stripped; blank lines are
    skipped. A file without any sentence is a DataError."""
    sentences = [s for s in (line.strip() for line in _read_lines(path, encoding)) if s]
    if not sentences:
        raise DataError(f"{path}: no sentences (the file is empty or blank); expected one sentence a line")
    return sentences


def _score(text: str, path: Path, line: int, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}, line {line}: score {text!r} is not a number") from None
    if not (low <= value <= high):
        raise DataError(f"{path}, line {line}: score {value} is outside [{low}, {high}]")
    return value


def read_pairs(path: str | Path, *, delimiter: str | None = None, header: bool = False,
               score_range: tuple[float, float] = (-math.inf, math.inf), encoding: str = "utf-8") -> list[Pair]:
    """Rows of ``sentence1, sentence2[, score]`` in a CSV (``,``, quoted as Excel writes it) or TSV file.

    ``delimiter`` defaults to the suffix's (``.csv``: comma, otherwise tab). Every row has the same number of
    fields, 2 (pairs, as a supervised SimCSE positive-pair file) or 3 (scored pairs, as STS-B); a score must lie
    in ``score_range``. ``header`` skips the first row.
    """
    path = Path(path)
    lines = _read_lines(path, encoding)
    delimiter = delimiter or ("," if path.suffix.lower() == ".csv" else "\t")
    rows = csv.reader(lines, delimiter=delimiter)
    pairs, width = [], None
    for row in rows:
        line = rows.line_num  # the row's last line: a quoted sentence may span lines
        if header and line == 1 or not row:
            continue
        if len(row) not in (2, 3) or width not in (None, len(row)):
            expected = f"{width}" if width else "2 or 3"
            raise DataError(f"{path}, line {line}: {len(row)} fields where {expected} were expected "
                            f"(sentence1{delimiter!r}sentence2[{delimiter!r}score]); quote a sentence that holds "
                            f"the delimiter")
        width = len(row)
        first, second = row[0].strip(), row[1].strip()
        if not first or not second:
            raise DataError(f"{path}, line {line}: an empty sentence")
        score = _score(row[2], path, line, *score_range) if width == 3 else None
        pairs.append(Pair(first, second, score))
    if not pairs:
        raise DataError(f"{path}: no sentence pairs")
    return pairs


def read_stsb(path: str | Path) -> list[Pair]:
    """An STS-B file of the stsb-multi-mt release: ``sentence1,sentence2,score``, no header, scores 0-5."""
    return read_pairs(path, delimiter=",", score_range=(0.0, 5.0))


def read_sick(path: str | Path) -> list[Pair]:
    """A SICK 2014 file: tab separated, the header ``pair_ID sentence_A sentence_B relatedness_score
    entailment_judgment``; relatedness 1-5 as the score, the judgement (A -> B) as the label."""
    path = Path(path)
    lines = _read_lines(path, "utf-8")
    expected = ["pair_ID", "sentence_A", "sentence_B", "relatedness_score", "entailment_judgment"]
    if not lines or lines[0].split("\t") != expected:
        raise DataError(f"{path}, line 1: not a SICK file; its header should be {' '.join(expected)} "
                        f"(tab separated)")
    pairs = []
    for line, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        row = text.split("\t")
        if len(row) != 5:
            raise DataError(f"{path}, line {line}: {len(row)} tab-separated fields where 5 were expected")
        if row[4] not in SICK_LABELS:
            raise DataError(f"{path}, line {line}: entailment label {row[4]!r} is none of {', '.join(SICK_LABELS)}")
        pairs.append(Pair(row[1].strip(), row[2].strip(), _score(row[3], path, line, 1.0, 5.0), row[4]))
    if not pairs:
        raise DataError(f"{path}: no sentence pairs")
    return pairs


def sick_triples(pairs: Sequence[Pair]) -> list[Triple]:
    """(premise, entailment, contradiction) triples for supervised SimCSE from SICK's judged pairs.

    A premise is a sentence that entails at least one other and contradicts at least one other. Entailment is
    read as judged (A -> B); contradiction is symmetric (if A contradicts B, B contradicts A), so a pair judged
    CONTRADICTION serves both of its sentences. Each entailed sentence makes one triple, its hard negative taken
    round-robin from the premise's contradictions, in file order (deterministic). SICK train gives 259.
    """
    entails: dict[str, list[str]] = defaultdict(list)
    contradicts: dict[str, list[str]] = defaultdict(list)
    for p in pairs:
        if p.label is None:
            raise DataError("sick_triples needs SICK's entailment labels; read the file with read_sick")
        if p.label == "ENTAILMENT":
            entails[p.first].append(p.second)
        elif p.label == "CONTRADICTION":
            contradicts[p.first].append(p.second)
            contradicts[p.second].append(p.first)
    return [Triple(premise, e, contradicts[premise][i % len(contradicts[premise])])
            for premise, hypotheses in entails.items() if premise in contradicts
            for i, e in enumerate(hypotheses)]


def read_labelled(path: str | Path, *, encoding: str | None = None) -> list[LabelledSentence]:
    """``label text`` lines (the SentEval classification files), the label an integer. ``encoding`` defaults to
    latin-1 for the SentEval files that need it (``LATIN1_FILES``) and UTF-8 otherwise.

    A line with a label and no text is an empty sentence, kept: CR has 4 and MPQA 3, and SentEval's own loader
    and the published set sizes count them."""
    path = Path(path)
    encoding = encoding or ("latin-1" if path.name in LATIN1_FILES else "utf-8")
    out = []
    for line, text in enumerate(_read_lines(path, encoding), start=1):
        if not text.strip():
            continue
        label, _, sentence = text.strip().partition(" ")
        try:
            value = int(label)
        except ValueError:
            raise DataError(f"{path}, line {line}: the label {label!r} is not an integer; expected 'label text' "
                            f"lines") from None
        out.append(LabelledSentence(sentence.strip(), value))
    if not out:
        raise DataError(f"{path}: no labelled sentences")
    return out


def read_senteval(root: str | Path, task: str) -> dict[str, list[LabelledSentence]]:
    """A SentEval classification task from ``root`` (the unpacked ``senteval-cls/``): {split: sentences}, the
    splits of ``SENTEVAL_TASKS[task]`` (``all`` for MR, CR, SUBJ, MPQA, which SentEval cross-validates)."""
    if task not in SENTEVAL_TASKS:
        raise DataError(f"unknown SentEval task {task!r}; pick one of {', '.join(SENTEVAL_TASKS)}")
    return {split: read_labelled(Path(root) / name) for split, name in SENTEVAL_TASKS[task].items()}


class TextCollate:
    """Tokenises a batch with the encoder's tokenizer, padded to the batch's longest sentence.

    A batch of sentences gives ``input_ids`` and ``attention_mask`` [B, L]; a batch of tuples (pairs, triples)
    gives [B, k, L], the k sentences of a row padded to one length so that they run through the encoder as one
    [B * k, L] batch (as SimCSE's code does). L is at most ``max_length`` (longer sentences are truncated).
    """

    def __init__(self, tokenizer: Any, max_length: int = 32):
        # 32 tokens: SimCSE's for Wikipedia sentences and NLI alike (its run scripts' --max_seq_length 32)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: Sequence[str | Sequence[str]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise DataError("an empty batch of sentences")
        if isinstance(batch[0], str):
            return self._tokenise(list(batch))
        k = len(batch[0])
        if any(isinstance(row, str) or len(row) != k for row in batch):
            raise DataError(f"a batch mixes sentences and tuples, or tuples of other lengths than {k}")
        flat = self._tokenise([s for row in batch for s in row])
        return {name: t.view(len(batch), k, -1) for name, t in flat.items()}

    def _tokenise(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(sentences, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
