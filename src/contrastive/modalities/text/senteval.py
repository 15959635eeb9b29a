"""SentEval-style classification probes of a frozen sentence encoder, and a bag-of-words baseline.

The transfer tasks of SentEval (Conneau & Kiela 2018, Sec. 3-4) as SimCSE reports them (Gao et al. 2021,
Appendix E): MR, CR, SUBJ and MPQA have no standard split and are scored by 10-fold cross-validation (mean test
accuracy over the folds, stratified as SentEval's ``StratifiedKFold(n_splits=10, shuffle=True)``); TREC, SST-2 and
SST-5 are trained on train and scored on test. The classifiers are the project's own: the weighted kNN
(``evaluation.knn``) and the linear probe (``evaluation.linear``), with ``EvalConfig``'s settings, not SentEval's
logistic regression with an L2 penalty tuned by inner cross-validation, so numbers are close to, not equal to,
published SentEval numbers; say which protocol next to each.

:class:`BagOfWords` is the baseline an encoder must beat: log(1 + count) of the most frequent word pieces,
through the same probes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.config import EvalConfig
from contrastive.errors import ConfigError, DataError
from contrastive.evaluation.knn import knn_device, knn_top1
from contrastive.evaluation.linear import linear_probe
from contrastive.modalities.text.readers import SENTEVAL_TASKS, read_senteval

PROTOCOLS = ("knn", "linear")
_EVAL_DEFAULTS = {f.name: f.default for f in fields(EvalConfig)}


def senteval_folds(labels: Tensor, k: int, seed: int) -> list[Tensor]:
    """Stratified k-fold split of ``labels int [N]``: the ``k`` test-index tensors (int64, each sorted), disjoint
    and together covering ``0..N-1``.

    As scikit-learn's ``StratifiedKFold(shuffle=True)``, which SentEval uses: the rows, ordered by class, are dealt
    to the folds in turn, so every fold holds each class's rows in proportion (a class's count differs by at most
    1 between folds, and so does a fold's size); which rows of a class go to which fold is drawn by a generator
    seeded with ``seed``, so one seed gives one split. The global RNG is left untouched.
    """
    if labels.dim() != 1:
        raise DataError(f"labels for a k-fold split must be a vector [N], got shape {tuple(labels.shape)}")
    n = labels.shape[0]
    if not 2 <= k <= n:
        raise DataError(f"a k-fold split of {n} examples needs 2 <= k <= {n}, got k={k}; lower the number of folds")
    labels = labels.cpu().long()
    generator = torch.Generator().manual_seed(seed)
    ordered = []  # row indices, class by class, shuffled within each class
    for c in torch.unique(labels).tolist():  # ascending classes: the order of the deal is fixed
        rows = torch.nonzero(labels == c).flatten()
        ordered.append(rows[torch.randperm(len(rows), generator=generator)])
    ordered_rows = torch.cat(ordered)  # [N]
    fold_of_position = torch.arange(n) % k  # the deal: position p of the class-ordered rows goes to fold p mod k
    return [ordered_rows[fold_of_position == f].sort().values for f in range(k)]


def _check_splits(features: dict[str, Tensor], labels: dict[str, Tensor]) -> None:
    if set(features) != set(labels):
        raise DataError(f"features have splits {sorted(features)} but labels have {sorted(labels)}; give both for "
                        f"the same splits")
    if not ({"train", "test"} <= set(features) or "all" in features):
        raise DataError(f"splits {sorted(features)}: a SentEval task needs 'train' and 'test' (TREC, SST) or 'all' "
                        f"(MR, CR, SUBJ, MPQA, cross-validated), as read_senteval gives them")


def probe_task(
    features: dict[str, Tensor],
    labels: dict[str, Tensor],
    *,
    folds: int = 10,
    seed: int = 0,
    knn_k: int = _EVAL_DEFAULTS["knn_k"],
    knn_temperature: float = _EVAL_DEFAULTS["knn_temperature"],
    linear_epochs: int = _EVAL_DEFAULTS["linear_epochs"],
    linear_lr: float = _EVAL_DEFAULTS["linear_lr"],
    linear_weight_decay: float = _EVAL_DEFAULTS["linear_weight_decay"],
    linear_batch_size: int = _EVAL_DEFAULTS["linear_batch_size"],
    device: str | torch.device = "cpu",
    protocols: Sequence[str] = PROTOCOLS,
) -> dict[str, Any]:
    """Score one task's frozen features with the weighted kNN and/or the linear probe.

    ``features`` and ``labels`` are keyed by split as :func:`readers.read_senteval` gives them:
    ``features[split] [n, D]``, ``labels[split] int [n]`` with classes ``0..C-1``. With ``train`` and ``test``
    (TREC, SST-2, SST-5) the classifiers are fitted on train and scored once on test; a ``dev`` split, when
    present, is unused (the settings are fixed, not tuned on it). With only ``all`` (MR, CR, SUBJ, MPQA) the
    score is the mean test accuracy over ``folds`` stratified folds (:func:`senteval_folds` under ``seed``), each
    fold scored by classifiers fitted on the other folds. The kNN and linear-probe settings default to
    ``EvalConfig``'s; the linear probe's batch order is seeded with ``seed``.

    Returns ``{"knn_top1": float, "linear_top1": float, "n": int, "protocol": "10-fold CV" | "train/test"}``,
    accuracies in ``[0, 1]`` for the requested ``protocols`` only; ``n`` is the number of examples scored (the
    test split, or every row under cross-validation).
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ConfigError(f"protocols={list(protocols)}: pick one or more of {', '.join(PROTOCOLS)}")
    _check_splits(features, labels)
    num_classes = max((int(y.max()) for y in labels.values() if y.numel()), default=-1) + 1

    def score(train: Tensor, train_y: Tensor, test: Tensor, test_y: Tensor) -> dict[str, float]:
        out = {}
        if "knn" in protocols:
            out["knn_top1"] = knn_top1(train, train_y, test, test_y, num_classes=num_classes, k=knn_k,
                                       temperature=knn_temperature, device=knn_device(train, device))
        if "linear" in protocols:
            out["linear_top1"] = linear_probe(train, train_y, test, test_y, num_classes=num_classes,
                                              epochs=linear_epochs, lr=linear_lr, weight_decay=linear_weight_decay,
                                              batch_size=linear_batch_size, seed=seed, device=device)["top1"]
        return out

    if "train" in features and "test" in features:
        result: dict[str, Any] = score(features["train"], labels["train"], features["test"], labels["test"])
        return {**result, "n": int(labels["test"].shape[0]), "protocol": "train/test"}

    x, y = features["all"], labels["all"]
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise DataError(f"split 'all': features of shape {tuple(x.shape)} and labels of shape {tuple(y.shape)}; "
                        f"give [N, D] features and one label per row")
    per_fold = []
    for test_rows in senteval_folds(y, folds, seed):
        train_mask = torch.ones(len(y), dtype=torch.bool)
        train_mask[test_rows] = False
        per_fold.append(score(x[train_mask], y[train_mask], x[test_rows], y[test_rows]))
    result = {name: sum(f[name] for f in per_fold) / len(per_fold) for name in per_fold[0]}
    return {**result, "n": int(y.shape[0]), "protocol": f"{folds}-fold CV"}


def senteval(
    encode: Callable[[list[str]], Tensor],
    root: str | Path,
    tasks: Sequence[str],
    **probe_options: Any,
) -> dict[str, dict]:
    """Probe ``encode`` on SentEval classification ``tasks`` read from ``root`` (the unpacked ``senteval-cls/``).

    ``encode`` maps a list of n sentences to float features ``[n, D]``; it is called once per task, on all of the
    task's sentences (every split, in file order), so an encoder fitted on its input (:class:`BagOfWords`) is
    fitted per task, without the labels. ``probe_options`` go to :func:`probe_task`. Returns
    ``{task: probe_task's result}`` in the order of ``tasks``. Every task name is checked before anything is
    encoded.
    """
    unknown = [t for t in tasks if t not in SENTEVAL_TASKS]
    if unknown:
        raise DataError(f"unknown SentEval task(s) {', '.join(map(repr, unknown))}; pick from "
                        f"{', '.join(SENTEVAL_TASKS)}")
    results = {}
    for task in tasks:
        splits = read_senteval(root, task)
        sentences = [s.text for rows in splits.values() for s in rows]
        encoded = encode(sentences)
        if not isinstance(encoded, Tensor) or encoded.dim() != 2 or encoded.shape[0] != len(sentences):
            shape = tuple(encoded.shape) if isinstance(encoded, Tensor) else type(encoded).__name__
            raise DataError(f"task {task}: encode gave {shape} for {len(sentences)} sentences; it must return "
                            f"a float tensor [n, D], one row per sentence in the given order")
        features, labels, start = {}, {}, 0
        for split, rows in splits.items():
            features[split] = encoded[start:start + len(rows)].float()
            labels[split] = torch.tensor([s.label for s in rows], dtype=torch.long)
            start += len(rows)
        results[task] = probe_task(features, labels, **probe_options)
    return results


class BagOfWords:
    """Bag-of-words sentence features: log(1 + count) of each kept token in the sentence, each row L2-normalised.

    The vocabulary is the ``max_features`` most frequent tokens (total occurrences; ties to the lower token id)
    of the sentences it is fitted on, special tokens ([CLS], [SEP], [PAD], [UNK], ...) excluded; column j counts
    ``vocabulary[j]``, most frequent first. Tokens are the word pieces of a Hugging Face tokenizer (the encoder's
    own, so both see the same units), or token-id lists given directly. A sentence without any kept token is a
    zero row.

    Used as a baseline with :func:`senteval` (see :func:`bow_encoder`), it is fitted per task on that task's
    sentences, all splits, without their labels: an unsupervised step, like the encoder's pretraining; the
    probe alone sees labels, and only of the training rows.
    """

    def __init__(self, vocabulary: Sequence[int], tokenizer: Any | None = None):
        if len(vocabulary) == 0 or len(set(vocabulary)) != len(vocabulary) or min(vocabulary) < 0:
            raise DataError("a bag-of-words vocabulary must be a non-empty list of distinct token ids >= 0")
        self.vocabulary = [int(t) for t in vocabulary]
        self.tokenizer = tokenizer
        # token id -> column, -1 for a token outside the vocabulary
        self._column = torch.full((max(self.vocabulary) + 1,), -1, dtype=torch.long)
        self._column[torch.tensor(self.vocabulary)] = torch.arange(len(self.vocabulary))

    @classmethod
    def fit(cls, tokenizer: Any, sentences: Sequence[str], max_features: int = 5000) -> BagOfWords:
        """Fit on ``sentences`` tokenised by the Hugging Face ``tokenizer`` (kept for :meth:`__call__`).
        A SentEval task has 5,000-16,000 distinct word pieces under all-MiniLM-L6-v2's tokenizer (CR 5,223,
        TREC 8,756, SUBJ 15,906): 5000 keeps those seen at least 4-6 times in MR, SUBJ and SST, and reaches
        pieces seen once in TREC, CR and MPQA. The linear probe standardises each column, which magnifies the
        rarest ones; a smaller ``max_features`` can score higher there (TREC: 0.78 with 1000 against 0.58 with
        5000, 20 epochs)."""
        ids = _token_ids(tokenizer, sentences)
        return cls.fit_ids(ids, max_features=max_features, special_ids=tokenizer.all_special_ids,
                           tokenizer=tokenizer)

    @classmethod
    def fit_ids(cls, token_ids: Sequence[Sequence[int]], max_features: int = 5000,
                special_ids: Sequence[int] = (), tokenizer: Any | None = None) -> BagOfWords:
        """Fit on sentences given as token-id lists, leaving out ``special_ids``."""
        if max_features < 1:
            raise ConfigError(f"max_features={max_features}: keep at least one token")
        special = set(special_ids)
        counts = Counter(t for ids in token_ids for t in ids if t not in special)
        if not counts:
            raise DataError(f"no tokens to build a bag-of-words vocabulary from ({len(token_ids)} sentences, "
                            f"all empty or special tokens)")
        ranked = sorted(counts, key=lambda t: (-counts[t], t))
        return cls(ranked[:max_features], tokenizer=tokenizer)

    def __call__(self, sentences: Sequence[str] | Sequence[Sequence[int]]) -> Tensor:
        """Features float32 ``[n, V]`` of n sentences: strings (tokenised with the fitted tokenizer) or
        token-id lists."""
        if len(sentences) == 0:
            return torch.zeros(0, len(self.vocabulary))
        if isinstance(sentences[0], str):
            if self.tokenizer is None:
                raise DataError("this bag of words was fitted on token ids and has no tokenizer; give token-id "
                                "lists, or fit it with BagOfWords.fit(tokenizer, sentences)")
            sentences = _token_ids(self.tokenizer, sentences)
        rows = [torch.as_tensor(ids, dtype=torch.long) for ids in sentences]
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        row_of = torch.repeat_interleave(torch.arange(len(rows)), lengths)
        inside = (ids >= 0) & (ids < len(self._column))
        columns = torch.full_like(ids, -1)
        columns[inside] = self._column[ids[inside]]
        kept = columns >= 0
        counts = torch.zeros(len(rows) * len(self.vocabulary))
        counts.index_add_(0, row_of[kept] * len(self.vocabulary) + columns[kept], torch.ones(int(kept.sum())))
        # F.normalize divides by max(norm, eps): a zero row stays zero
        return F.normalize(torch.log1p(counts.view(len(rows), -1)), dim=1)


def _token_ids(tokenizer: Any, sentences: Sequence[str]) -> list[list[int]]:
    # no [CLS]/[SEP] and no truncation: a bag of words counts every word piece of the sentence
    return tokenizer(list(sentences), add_special_tokens=False, truncation=False)["input_ids"]


def bow_encoder(tokenizer: Any, max_features: int = 5000) -> Callable[[list[str]], Tensor]:
    """An ``encode`` for :func:`senteval`: fits a :class:`BagOfWords` on the sentences it is given (one task's,
    without labels) and returns their features."""
    return lambda sentences: BagOfWords.fit(tokenizer, sentences, max_features=max_features)(sentences)
