"""Pictures of runs: training curves, a 2-D map of embeddings, and the bars of a comparison.

Drawn with matplotlib's Agg canvas directly (no pyplot), so importing this module never changes the
backend of a caller's interactive session and works on a machine without a display.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from contrastive.errors import DataError
from contrastive.files import atomic_write

# Ten distinguishable colours (matplotlib's tab10), then tab20's for up to 20 classes.
_MAX_CLASS_COLOURS = 20


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """The figure as a PNG at ``path``, written whole (``files.atomic_write``)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """metrics.csv as columns of floats (an empty cell is NaN)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; training curves are drawn from a run's metrics.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{path} has no rows; train.log_every may be longer than the run")
    return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else math.nan for r in rows])
            for k in rows[0]}


def training_curves(metrics_csv: str | Path, png: str | Path, *, title: str = "",
                    knn: Sequence[tuple[int, float]] = ()) -> Path:
    """Loss and learning rate against the optimiser step from ``metrics.csv``, and a third panel with the
    kNN top-1 at the steps where it was measured (``knn``: (step, accuracy) pairs, e.g. the end of
    pretraining). Returns the PNG's path."""
    m = read_metrics(metrics_csv)
    if "step" not in m or "loss" not in m:
        raise DataError(f"{metrics_csv} has no step and loss columns; is it a metrics.csv a run wrote?")
    panels = 3 if knn else 2
    fig = _figure(4.0 * panels, 3.2)
    axes = fig.subplots(1, panels)
    axes[0].plot(m["step"], m["loss"], color="tab:blue")
    axes[0].set(xlabel="optimiser step", ylabel="training loss", title="loss")
    if "lr" in m:
        axes[1].plot(m["step"], m["lr"], color="tab:orange")
    axes[1].set(xlabel="optimiser step", ylabel="learning rate", title="learning rate")
    if knn:
        steps, accs = zip(*knn)
        axes[2].plot(steps, accs, "o-", color="tab:green")
        for s, a in knn:
            axes[2].annotate(f"{a:.3f}", (s, a), textcoords="offset points", xytext=(0, 6), ha="center")
        axes[2].set(xlabel="optimiser step", ylabel="top-1", title="kNN top-1 (frozen features)",
                    xlim=(0, max(float(np.nanmax(m["step"])), max(steps)) * 1.05), ylim=(0, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, png)


def embedding_map(features: np.ndarray, labels: np.ndarray, png: str | Path, *, classes: Sequence[str] | None = None,
                  max_points: int = 5000, seed: int = 0, title: str = "") -> Path:
    """A t-SNE map (scikit-learn, PCA initialisation) of ``features [N, D]``, one colour per class of
    ``labels [N]``; at most ``max_points`` rows, drawn class-balanced under ``seed``. Returns the PNG's path."""
    from sklearn.manifold import TSNE

    features, labels = np.asarray(features, dtype=np.float32), np.asarray(labels)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise DataError(f"an embedding map needs features [N, D] and labels [N]; got {features.shape} and "
                        f"{labels.shape}")
    if (labels < 0).any():
        raise DataError("the embedding map colours points by class, but some rows are unlabeled (-1); embed "
                        "a labelled split (--split test)")
    present = np.unique(labels)
    if len(present) > _MAX_CLASS_COLOURS:
        raise DataError(f"{len(present)} classes are too many to tell apart by colour (at most "
                        f"{_MAX_CLASS_COLOURS}); embed a subset of the classes")
    rng = np.random.default_rng(seed)
    if len(labels) > max_points:
        per_class = max(max_points // len(present), 1)
        keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in present])
        features, labels = features[np.sort(keep)], labels[np.sort(keep)]
    # t-SNE's perplexity must stay below the number of points
    perplexity = min(30.0, max((len(labels) - 1) / 3, 1.0))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    fig = _figure(7.0, 6.0)
    ax = fig.subplots()
    palette = "tab10" if len(present) <= 10 else "tab20"
    import matplotlib

    cmap = matplotlib.colormaps[palette]
    for i, c in enumerate(present):
        sel = labels == c
        name = classes[c] if classes is not None and c < len(classes) else str(c)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(i), label=name, alpha=0.8, linewidths=0)
    ax.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    import textwrap

    ax.set(xticks=[], yticks=[])
    ax.set_title(textwrap.fill(title or f"t-SNE of {len(labels)} embeddings, coloured by class", 70), fontsize=10)
    return _save(fig, png)


def comparison_bars(groups: Sequence[tuple[str, Sequence[tuple[str, float]]]], png: str | Path, *,
                    xlabel: str = "test top-1") -> Path:
    """One panel per group (a dataset and label fraction): a horizontal bar per row with its value.
    ``groups``: (panel title, [(row label, value in [0, 1])]). Returns the PNG's path."""
    if not groups:
        raise DataError("nothing to draw: no comparison rows")
    import textwrap

    height = max(2.5, 0.75 * max(len(rows) for _, rows in groups) + 1.2)
    fig = _figure(7.5 * len(groups), height)
    axes = np.atleast_1d(fig.subplots(1, len(groups)))
    colours = {"scratch": "tab:gray", "linear": "tab:orange", "fine-tuned": "tab:blue", "distilled": "tab:green"}
    for ax, (title, rows) in zip(axes, groups):
        labels = [r[0] for r in rows][::-1]
        values = [r[1] for r in rows][::-1]
        colour = [next((c for k, c in colours.items() if k in lab), "tab:purple") for lab in labels]
        bars = ax.barh(range(len(rows)), values, color=colour)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3)
        ax.set_yticks(range(len(rows)), [textwrap.fill(lab, 30) for lab in labels], fontsize=8)
        ax.set(xlim=(0, 1.12), xlabel=xlabel)
        ax.set_title(textwrap.fill(title, 60), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, png)
