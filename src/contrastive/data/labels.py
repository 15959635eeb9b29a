"""Which training images keep their labels: class-balanced label subsets, chosen under a seed and written to a
file so that two runs (fine-tuned and from scratch, or two methods) compare on the same labels.

SimCLR v2 (Chen et al. 2020b, Sec. 4) fine-tunes on "1% and 10% of the labeled ImageNet training
images in a class-balanced way (around 13 and 128 images per class respectively)". A subset is given as

- ``"10%"``, ``"1%"``, ``"0.5%"``: that fraction of each class (rounded, at least one image per class);
- ``"25-per-class"``: that many images of each class;
- a path to a labels file written by :func:`write_labels` (JSON), reused as it is.

The file names the dataset, its size and a fingerprint of its labels, and a file made for other data is
refused: its indices would point at other images.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from contrastive.errors import DataError
from contrastive.files import atomic_write_text

FORMAT = "contrastive-labels/1"
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_PER_CLASS = re.compile(r"^(\d+)-per-class$")


@dataclass(frozen=True)
class LabelSubset:
    """A labelled subset of one dataset: ``indices`` (sorted positions in that dataset) and what made it."""

    dataset: str  # the dataset's name (a folder's path)
    dataset_size: int
    labels_sha256: str  # fingerprint of the dataset's whole label vector, in order
    spec: str  # "10%", "25-per-class", as asked
    seed: int
    per_class: list[int]  # images kept of each class, class by class
    indices: list[int]

    @property
    def fraction(self) -> float:
        """Share of the dataset's images that keep their labels."""
        return len(self.indices) / self.dataset_size

    def summary(self) -> dict:
        """What results.json records of the subset: everything but the indices."""
        return {"spec": self.spec, "seed": self.seed, "images": len(self.indices), "fraction": self.fraction,
                "per_class": self.per_class, "dataset": self.dataset, "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        """sha256 of the chosen indices and the dataset's labels: equal exactly when two runs used the same
        labelled images of the same data."""
        h = hashlib.sha256(self.labels_sha256.encode())
        h.update(json.dumps(self.indices).encode())
        return h.hexdigest()[:16]


def labels_sha256(labels: Tensor) -> str:
    return hashlib.sha256(labels.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def parse_spec(spec: str) -> tuple[str, float]:
    """``"10%"`` -> ("fraction", 0.1); ``"25-per-class"`` -> ("per_class", 25). Anything else raises."""
    text = spec.strip()
    if m := _PERCENT.match(text):
        value = float(m.group(1)) / 100
        if not 0 < value <= 1:
            raise DataError(f"--labels {spec}: a percentage must lie in (0%, 100%]")
        return "fraction", value
    if m := _PER_CLASS.match(text):
        count = int(m.group(1))
        if count < 1:
            raise DataError(f"--labels {spec}: keep at least 1 image per class")
        return "per_class", count
    raise DataError(f"--labels {spec!r} is neither a percentage (10%, 1%), a count per class (25-per-class) "
                    f"nor an existing labels file")


def choose(labels: Tensor, spec: str, seed: int, *, dataset: str) -> LabelSubset:
    """A class-balanced subset of a dataset whose labels are ``labels`` int64 [N] (every one >= 0).

    For each class in turn, a permutation of its members drawn from one generator seeded with ``seed``
    gives its first k: k = round(fraction * n_c), at least 1, or the count asked per class (a class with
    fewer images raises). The same labels, spec and seed give the same indices.
    """
    kind, value = parse_spec(spec)
    if labels.ndim != 1 or len(labels) == 0 or bool((labels < 0).any()):
        raise DataError(f"{dataset}: choosing labelled images needs a label for every image")
    gen = torch.Generator().manual_seed(seed)
    chosen, per_class = [], []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().flatten()
        n = len(members)
        if n == 0:
            per_class.append(0)
            continue
        if kind == "fraction":
            k = min(max(math.floor(value * n + 0.5), 1), n)
        else:
            k = int(value)
            if k > n:
                raise DataError(f"--labels {spec}: class {c} of {dataset} has only {n} images; ask for at most "
                                f"{n}-per-class or a percentage")
        chosen.append(members[torch.randperm(n, generator=gen)[:k]])
        per_class.append(k)
    indices = torch.cat(chosen).sort().values.tolist()
    return LabelSubset(dataset=dataset, dataset_size=len(labels), labels_sha256=labels_sha256(labels), spec=spec,
                       seed=seed, per_class=per_class, indices=indices)


def write_labels(subset: LabelSubset, path: str | Path) -> Path:
    """The subset as JSON: the dataset it belongs to, how it was chosen, and the indices."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"format": FORMAT, **asdict(subset)}, indent=1) + "\n")
    return path


def read_labels(path: str | Path, labels: Tensor, *, dataset: str) -> LabelSubset:
    """A labels file, checked against the dataset it is about to index (name, size and labels)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"labels file {path} cannot be read as JSON ({e}); give a file that finetune wrote "
                        f"(labels.json in its output folder)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{path} is not a labels file of format {FORMAT}")
    raw.pop("format")
    try:
        subset = LabelSubset(**raw)
    except TypeError as e:
        raise DataError(f"labels file {path} is damaged ({e})") from None
    if subset.dataset_size != len(labels) or subset.labels_sha256 != labels_sha256(labels):
        raise DataError(f"labels file {path} was made for {subset.dataset} ({subset.dataset_size} images), not for "
                        f"{dataset} ({len(labels)} images, or the same count with other labels or order); choose "
                        f"a new subset with --labels 10% (or 1%, N-per-class) for this data")
    idx = subset.indices
    if not idx or idx != sorted(set(idx)) or not 0 <= idx[0] <= idx[-1] < len(labels):
        raise DataError(f"labels file {path}: its indices must be distinct, sorted and within 0..{len(labels) - 1}")
    return subset


def resolve(spec: str, labels: Tensor, seed: int, *, dataset: str) -> LabelSubset:
    """``--labels``: an existing file is read back (and checked); anything else is a spec to choose by."""
    path = Path(spec)
    if path.is_file():
        return read_labels(path, labels, dataset=dataset)
    if spec.endswith(".json"):
        raise DataError(f"labels file {spec} does not exist")
    return choose(labels, spec, seed, dataset=dataset)
