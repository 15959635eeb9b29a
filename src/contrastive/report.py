"""``contrastive report RUN_DIR...``: the runs of a semi-supervised comparison side by side, as a Markdown
table and a PNG.

For each dataset and label subset (the same labelled images, recognised by the subset's fingerprint) the
rows are: supervised from scratch, the linear probe on the frozen pretrained encoder, the fine-tuned
encoder (one pair of rows per pretraining method), and the distilled student. Pretraining runs given
as well get a table of their own (kNN and linear probe on all labels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contrastive.errors import DataError
from contrastive.files import atomic_write_text

ORDER = {"scratch": 0, "linear": 1, "finetune": 2, "distill": 3}


def read_run(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise DataError(f"{folder} has no results.json; give the output folders of pretrain, finetune or distill runs")
    try:
        res = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    res["run"] = str(folder)
    return res


def architecture(section: dict | str | None) -> str:
    """``{"name": "small_cnn", "widths": [16, 32]}`` -> "small_cnn (widths [16, 32])"; a bare name as it is."""
    if not section:
        return "?"
    if isinstance(section, str):
        return section
    rest = ", ".join(f"{k} {v}" for k, v in section.items() if k != "name")
    return f"{section['name']} ({rest})" if rest else section["name"]


def rows_of(res: dict) -> list[dict]:
    """The comparison rows one stage run gives (a fine-tuning run: its linear probe and the fine-tuned model)."""
    stage = res.get("stage")
    b = res.get("budget", {})
    budget = f"{b.get('epochs')} epochs, {b.get('steps')} steps, {b.get('train_seconds', 0):.0f} s"
    arch = architecture(res.get("backbone"))
    common = {"parameters": res.get("parameters"), "run": res["run"], "architecture": arch}
    if stage == "scratch":
        return [{"kind": "scratch", "row": f"supervised from scratch, {arch}", "top1": res["top1"], "budget": budget,
                 **common}]
    if stage == "finetune":
        method = res.get("method") or "pretrained"
        layer = f", from head layer {res['from_layer']}" if res.get("from_layer") else ""
        out = []
        if "linear_top1" in res:
            probe = res.get("linear_probe", {})
            out.append({"kind": "linear", "row": f"linear probe, frozen {method} {arch}{layer}",
                        "top1": res["linear_top1"], "budget": f"{probe.get('epochs', '?')} probe epochs on cached "
                        f"features", **common, "method": method})
        out.append({"kind": "finetune", "row": f"fine-tuned {method} {arch}{layer}", "top1": res["top1"],
                    "budget": budget, **common, "method": method})
        return out
    if stage == "distill":
        teacher = res.get("teacher_source", {})
        by = teacher.get("method") or architecture(teacher.get("backbone"))
        return [{"kind": "distill", "row": f"distilled student {arch} <- {by} teacher", "top1": res["top1"],
                 "budget": budget, "teacher_top1": res.get("teacher_top1"), **common}]
    return []


def report(run_dirs: list[str | Path], output: str | Path | None = None) -> dict[str, Any]:
    """Write report.md, report.png and report.json into ``output`` (default: the current folder). A report.md
    there is replaced only when the report.json beside it says an earlier report wrote it."""
    if not run_dirs:
        raise DataError("give at least one run folder")
    runs = [read_run(d) for d in run_dirs]
    out = Path(output) if output is not None else Path.cwd()
    if (out / "report.md").exists() and not _an_earlier_report(out):
        raise DataError(f"{out / 'report.md'} exists and no report of this command wrote it; give --output <a folder>")
    groups: dict[tuple, dict] = {}
    pretrain = []
    for res in runs:
        if "stage" not in res:
            if "pretrain_images" not in res:
                raise DataError(f"{res['run']}/results.json was written by neither pretrain, finetune nor distill")
            pretrain.append(res)
            continue
        labels = res.get("labels") or {}
        key = (res["dataset"], labels.get("fingerprint"))
        group = groups.setdefault(key, {"dataset": res["dataset"], "labels": labels, "rows": []})
        group["rows"].extend(rows_of(res))
    if not groups and not pretrain:
        raise DataError("none of the runs has results to compare")
    for group in groups.values():
        group["rows"].sort(key=lambda r: (ORDER[r["kind"]], r.get("method") or "", -r["top1"]))
        group["missing"] = [name for kind, name in (("scratch", "supervised from scratch (finetune --scratch)"),
                                                    ("linear", "linear probe (finetune from a checkpoint)"),
                                                    ("finetune", "fine-tuned (finetune --checkpoint)"),
                                                    ("distill", "distilled student (distill)"))
                            if not any(r["kind"] == kind for r in group["rows"])]
    ordered = sorted(groups.values(), key=lambda g: (g["dataset"], -g["labels"].get("fraction", 0)))
    out.mkdir(parents=True, exist_ok=True)
    md = _markdown(ordered, pretrain)
    atomic_write_text(out / "report.md", md)
    files = {"markdown": str(out / "report.md")}
    if ordered:
        from contrastive.plots import comparison_bars

        panels = [(_title(g), [(r["row"], r["top1"]) for r in g["rows"]]) for g in ordered]
        files["png"] = str(comparison_bars(panels, out / "report.png"))
    summary = {"groups": ordered, "pretraining": [_pretrain_row(r) for r in pretrain], **files}
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _an_earlier_report(folder: Path) -> bool:
    try:
        earlier = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(earlier, dict) and {"groups", "pretraining", "markdown"} <= set(earlier)


def _title(group: dict) -> str:
    lab = group["labels"]
    return f"{group['dataset']}: {lab.get('spec', '?')} of the labels ({lab.get('images', '?')} images)"


def _pretrain_row(res: dict) -> dict:
    return {"method": res.get("method"), "backbone": res.get("backbone"), "epochs": res.get("epochs"),
            "steps": res.get("steps"), "knn_top1": res.get("knn_top1"), "linear_top1": res.get("linear_top1"),
            "train_seconds": res.get("train_seconds"), "images_per_s": res.get("images_per_s"), "run": res["run"]}


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _markdown(groups: list[dict], pretrain: list[dict]) -> str:
    lines = ["# Semi-supervised comparison", ""]
    for g in groups:
        lab = g["labels"]
        lines += [f"## {_title(g)}", "",
                  f"Dataset `{g['dataset']}`; labelled subset {lab.get('spec')} chosen with seed {lab.get('seed')} "
                  f"(fingerprint `{lab.get('fingerprint')}`); top-1 on the test side.", "",
                  "| row | test top-1 | parameters | budget | run |", "|---|---|---|---|---|"]
        for r in g["rows"]:
            lines.append(f"| {r['row']} | {_fmt(r['top1'])} | {_fmt(r['parameters'])} | {r['budget']} | "
                         f"`{r['run']}` |")
        for r in g["rows"]:
            if r["kind"] == "distill" and r.get("teacher_top1") is not None:
                lines.append(f"\n{r['row']}: teacher top-1 {r['teacher_top1']:.4f}, student "
                             f"{r['top1']:.4f}, margin {r['teacher_top1'] - r['top1']:+.4f}.")
        if g["missing"]:
            lines.append(f"\nMissing rows: {'; '.join(g['missing'])}.")
        lines.append("")
    if pretrain:
        lines += ["## Pretraining runs", "", "Frozen-encoder evaluation on all the training labels.", "",
                  "| method | backbone | epochs | steps | kNN top-1 | linear top-1 | train s | run |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in map(_pretrain_row, pretrain):
            lines.append(f"| {r['method']} | {architecture(r['backbone'])} | {_fmt(r['epochs'])} | "
                         f"{_fmt(r['steps'])} | "
                         f"{_fmt(r['knn_top1'])} | {_fmt(r['linear_top1'])} | {r['train_seconds'] or 0:.0f} | "
                         f"`{r['run']}` |")
        lines.append("")
    return "\n".join(lines)
