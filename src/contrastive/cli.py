"""The ``contrastive`` command: pretrain, eval (knn | linear), embed, finetune, distill, export, report.

Flags cover the common settings; any config field can be set with trailing ``key=value`` overrides
(``optim.lr=0.3 views.jitter_strength=0.5``). ``contrastive pretrain --print-config`` shows every field with
why its default is what it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from contrastive import api, distributed
from contrastive.config import Config, DataConfig, build_dataclass, to_dict
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError, ContrastiveError
from contrastive.methods import method_config
from contrastive.modalities import modalities, modality_named
from contrastive.nn.backbones import backbone_config
from contrastive.registry import names
from contrastive.training.checkpoint import load_checkpoint


def _data_flags(p: argparse.ArgumentParser, *, pretrain: bool) -> None:
    paths = "; ".join(m.accepts for m in modalities() if m.accepts)
    p.add_argument("--data", help=f"dataset name ({', '.join(names('datasets'))}) or a path ({paths})"
                   + ("; default digits" if pretrain else "; or give --train-data instead"))
    p.add_argument("--data-dir", help="folder holding a named dataset's files (or to download them into)")
    p.add_argument("--train-data", help="labelled data for the evaluation's training side")
    p.add_argument("--test-data", help="labelled data to evaluate on")
    p.add_argument("--holdout", type=float, help="fraction of a single labelled folder held out for evaluation")
    p.add_argument("--image-size", type=int, help="side every image is decoded to")


def _data_tree(a: argparse.Namespace) -> dict:
    pairs = {"name": a.data, "data_dir": a.data_dir, "train_data": a.train_data, "test_data": a.test_data,
             "holdout": a.holdout, "image_size": a.image_size}
    return {k: v for k, v in pairs.items() if v is not None}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="contrastive", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a method, then evaluate it (kNN, linear probe, raw-pixel kNN)")
    p.add_argument("--method", help=f"method name ({', '.join(names('methods'))}); default simclr")
    _data_flags(p, pretrain=True)
    p.add_argument("--config", help="YAML recipe; default configs/<method>-<dataset>.yaml when it exists")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--backbone", help=", ".join(names("backbones")))
    p.add_argument("--output", help="run folder; one that holds another run is refused (default: a new folder "
                   "runs/<date>-<time>-<method>, runs/latest pointing at it)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output (its files are removed "
                   "first)")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="run folder or checkpoint to continue from, with its config unless --config "
                   "is given, writing into its folder unless --output is given")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after pretraining")
    p.add_argument("--print-config", action="store_true", help="print the resolved config with help and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.3")

    e = sub.add_parser("eval", help="evaluate a checkpoint's frozen backbone on a labelled dataset")
    e.add_argument("protocol", choices=["knn", "linear"])
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt, encoder.pt, or the run folder holding them")
    _data_flags(e, pretrain=False)
    e.add_argument("--output", help="folder for results.json (default: <checkpoint folder>/eval-<protocol>); one "
                   "that holds another run's results is refused")
    e.add_argument("--overwrite", action="store_true", help="replace the results already in --output")
    e.add_argument("--device", help="auto, cpu, cuda")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of eval.* fields, e.g. eval.knn_k=20")

    m = sub.add_parser("embed", help="write a checkpoint's features of a dataset to a .npy file")
    m.add_argument("--checkpoint", required=True, help="checkpoint.pt, encoder.pt, or the run folder holding them")
    _data_flags(m, pretrain=False)
    m.add_argument("--output", required=True, help="features file, ending in .npy (labels go beside it)")
    m.add_argument("--split", default="all", choices=["all", "pretrain", "test"])
    m.add_argument("--device", default="auto")
    m.add_argument("--map", metavar="PNG", help="also draw a 2-D t-SNE map of the features, coloured by class")
    stage_parsers(sub)
    return top


def stage_parsers(sub) -> None:
    """finetune, distill, export, report: the road from a pretrained encoder to a shipped model."""
    f = sub.add_parser("finetune", help="fine-tune a pretrained encoder on a labelled subset (or, with --scratch, "
                       "train the same classifier from random weights)")
    f.add_argument("--checkpoint", help="checkpoint.pt (or encoder.pt for --from-layer 0) of a pretraining run")
    f.add_argument("--scratch", action="store_true", help="the supervised baseline: a randomly initialised backbone")
    f.add_argument("--backbone", help="with --scratch: the backbone (resnet18, small_cnn, ...); its fields as "
                   "backbone.<field>=value")
    f.add_argument("--labels", required=True, help="10%%, 1%%, N-per-class, or a labels.json an earlier run wrote")
    f.add_argument("--labels-seed", type=int, default=0, help="seed of the labelled subset (default 0)")
    f.add_argument("--from-layer", type=int, default=0, help="0: fine-tune the encoder; k: the encoder and the first "
                   "k layers of the projection head (SimCLR v2: 1)")
    _data_flags(f, pretrain=False)
    _stage_flags(f, "finetune")

    d = sub.add_parser("distill", help="train a student on unlabeled images to match a fine-tuned teacher")
    d.add_argument("--teacher", required=True, help="classifier.pt (or the folder) of a finetune run")
    d.add_argument("--student", required=True, help="student backbone; its fields as backbone.<field>=value "
                   "(backbone.widths=[16,32,64,128] for a narrower small_cnn)")
    _data_flags(d, pretrain=False)
    _stage_flags(d, "distill")

    x = sub.add_parser("export", help="export an encoder (or a fine-tuned / distilled classifier) to TorchScript "
                       "or ONNX, with its preprocessing as JSON beside it")
    x.add_argument("--checkpoint", required=True, help="checkpoint.pt, encoder.pt or classifier.pt")
    x.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    x.add_argument("--output", required=True, help="file to write (e.g. model.onnx); never the file exported")
    x.add_argument("--force", action="store_true", help="replace --output (and its .preprocess.json) if "
                   "they exist")

    r = sub.add_parser("report", help="a Markdown table and a PNG comparing finetune / scratch / distill runs")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--output", help="folder for report.md and report.png (default: the current folder)")


def _stage_flags(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--recipe", help="stage recipe (YAML with finetune/scratch/distill sections); default "
                   "configs/semi-supervised/<dataset>.yaml, else default.yaml (SimCLR v2)")
    p.add_argument("--output", required=True, help="run folder; one that holds another run is refused")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output (its files are removed "
                   "first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"overrides of the {stage} recipe section (epochs=5, optim.lr=0.1) or backbone.<field>=value")


def _pretrain(a: argparse.Namespace) -> int:
    tree: dict = {"data": _data_tree(a)}
    if a.method:
        tree["method"] = {"name": a.method}
    train = {"epochs": a.epochs, "batch_size": a.batch_size, "output": a.output, "device": a.device,
             "resume": a.resume}
    tree["train"] = {k: v for k, v in train.items() if v is not None}
    if a.backbone:
        tree["backbone"] = {"name": a.backbone}
    if a.seed is not None:
        tree["seed"] = a.seed
    if a.overwrite:
        tree["train"]["overwrite"] = True
    if a.no_eval:
        tree["eval"] = {"enabled": False}
    recipe = a.config
    if a.resume:  # the run goes on as it was configured, in its own folder
        ckpt = api.run_file(a.resume)
        tree["train"]["resume"] = str(ckpt)
        if a.output is None and not any(o.startswith("train.output=") for o in a.overrides):
            tree["train"]["output"] = str(ckpt.parent)
        if recipe is None:
            recipe = load_checkpoint(ckpt)["config"]
    cfg = resolve_config(recipe=recipe, tree=tree, overrides=a.overrides)
    if a.print_config:
        _print_config(cfg)
        return 0
    res = api.pretrain(cfg)
    if distributed.is_main():  # under torchrun, one report
        _report(res, Path(res["checkpoint"]).parent)
    return 0


def _eval_data(a: argparse.Namespace) -> DataConfig:
    """The data to evaluate or embed: --data, or without it --train-data in its place (with --test-data as
    the test side, else its own split)."""
    tree = _data_tree(a)
    if a.data is None:
        if a.train_data is None:
            raise ConfigError(f"{a.command} needs data: --data, or --train-data (with --test-data for the test side)")
        tree["name"] = tree.pop("train_data")
    return build_dataclass(DataConfig, tree, "data")


def _eval(a: argparse.Namespace) -> int:
    data = _eval_data(a)
    run = Path(a.checkpoint) if Path(a.checkpoint).is_dir() else Path(a.checkpoint).parent
    out = Path(a.output) if a.output else run / f"eval-{a.protocol}"
    overrides = list(a.overrides) + ([f"train.device={a.device}"] if a.device else [])
    res = api.evaluate(a.checkpoint, data, protocols=(a.protocol,), overrides=overrides, output=out,
                       overwrite=a.overwrite)
    _report(res, out)
    return 0


def _embed(a: argparse.Namespace) -> int:
    data = _eval_data(a)
    res = api.embed(a.checkpoint, data, a.output, split=a.split, device=a.device)
    print(f"wrote {res['images']} x {res['dim']} features of {data.name} ({res['split']}): "
          f"{', '.join(res['features'])}")
    if a.map:
        print(f"map: {_embedding_map(res, a.map)}")
    return 0


def _embedding_map(res: dict, png: str) -> Path:
    import numpy as np

    from contrastive.errors import DataError
    from contrastive.plots import embedding_map

    if len(res["features"]) < 2:
        raise DataError("--map colours the points by class, and this data has no labels")
    feats, labels = (np.load(p) for p in res["features"][:2])
    return embedding_map(feats, labels, png, classes=res.get("classes"),
                         title=f"t-SNE of the {res['split']} embeddings of {res['images']} images, coloured by class "
                               f"({res['note']})")


def _split_backbone(overrides: list[str], name: str | None) -> tuple[dict | None, list[str]]:
    """backbone.<field>=value overrides -> a backbone section (with ``name``); the rest stay stage overrides."""
    from contrastive.errors import ConfigError
    from contrastive.trees import parse_override

    section: dict = {} if name is None else {"name": name}
    rest = []
    for o in overrides:
        keys, value = parse_override(o)
        if keys[0] == "backbone":
            if name is None:
                raise ConfigError(f"{o}: backbone fields apply to --scratch --backbone or a --student only")
            section[".".join(keys[1:])] = value
        else:
            rest.append(o)
    return (section if name is not None else None), rest


def _needs_data(a: argparse.Namespace, command: str) -> argparse.Namespace:
    if a.data is None:
        from contrastive.errors import ConfigError

        raise ConfigError(f"{command} needs --data: the dataset (name or folder) whose training images it learns "
                          f"from and whose test split it evaluates on")
    return a


def _finetune(a: argparse.Namespace) -> int:
    from contrastive.errors import ConfigError
    from contrastive.stages.finetune import finetune

    if a.scratch and not a.backbone:
        raise ConfigError("--scratch needs --backbone NAME (the architecture to train from random weights)")
    if a.backbone and not a.scratch:
        raise ConfigError("--backbone applies to --scratch; a --checkpoint brings its own backbone")
    section, overrides = _split_backbone(a.overrides, a.backbone)
    data = build_dataclass(DataConfig, _data_tree(_needs_data(a, "finetune")), "data")
    res = finetune(data, a.labels, a.output, checkpoint=a.checkpoint, scratch=section, from_layer=a.from_layer,
                   recipe=a.recipe, overrides=overrides, seed=a.seed, labels_seed=a.labels_seed, device=a.device,
                   overwrite=a.overwrite)
    lab = res["labels"]
    lines = [f"{res['stage']} on {lab['images']} labelled images ({lab['spec']}, {res['labels_file']}), "
             f"{res['budget']['epochs']} epochs, {res['budget']['train_seconds']:.0f} s:"]
    if "linear_top1" in res:
        lines.append(f"  {'linear probe top-1 (frozen)':<32} {res['linear_top1']:.4f}")
    lines += [f"  {'test top-1':<32} {res['top1']:.4f}", f"results: {Path(a.output) / 'results.json'}"]
    print("\n".join(lines))
    return 0


def _distill(a: argparse.Namespace) -> int:
    from contrastive.stages.distill import distill

    section, overrides = _split_backbone(a.overrides, a.student)
    data = build_dataclass(DataConfig, _data_tree(_needs_data(a, "distill")), "data")
    res = distill(a.teacher, section, data, a.output, recipe=a.recipe, overrides=overrides, seed=a.seed,
                  device=a.device, overwrite=a.overwrite)
    print(f"student {res['parameters']:,} parameters, teacher {res['teacher_parameters']:,}; "
          f"{res['budget']['epochs']} epochs, {res['budget']['train_seconds']:.0f} s\n"
          f"  {'student test top-1':<32} {res['top1']:.4f}\n  {'teacher test top-1':<32} {res['teacher_top1']:.4f}\n"
          f"results: {Path(a.output) / 'results.json'}")
    return 0


def _export(a: argparse.Namespace) -> int:
    from contrastive.export import export

    res = export(a.checkpoint, a.format, a.output, force=a.force)
    diff = f", max |difference| {res['max_abs_diff']:.2e}" if "max_abs_diff" in res else ""
    print(f"wrote {res['model']} ({res['format']}, images {res['input_shape']} -> {res['output']}) and "
          f"{res['preprocess']}\nchecked: {res['checked']}{diff}")
    return 0


def _report_runs(a: argparse.Namespace) -> int:
    from contrastive.report import report

    res = report(a.runs, a.output)
    print(Path(res["markdown"]).read_text())
    print(f"wrote {res['markdown']}" + (f" and {res['png']}" if "png" in res else ""))
    return 0


def _report(res: dict, folder: Path) -> None:
    lines = [f"  {label:<32} {value}" for label, value in modality_named(res["modality"]).summary(res)]
    if "evaluation" in res:
        ev = res["evaluation"]
        where = f" on {ev['test_images']} images" if "test_images" in ev else ""
        lines.insert(0, f"evaluated{where} ({ev['split']}):")
    if "images_per_s" in res:
        lines.append(f"  {'training images/s':<32} {res['images_per_s']:.1f} ({res['device']})")
        lines.append(f"  {'peak memory MiB':<32} {res['peak_memory_mb']:.0f}")
    lines.append(f"results: {folder / 'results.json'}")
    print("\n".join(lines))


def _print_config(cfg: Config) -> None:
    def walk(obj, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif key == "auto":
                continue  # printed last, one choice a line
            else:
                print(f"{key} = {to_dict(value)!r}\n    {f.metadata.get('help', '')}")

    walk(cfg, "")
    sections = [("method", method_config(cfg)), ("backbone", backbone_config(cfg.backbone)[1])]
    sections += [(f"modalities.{name}", modality_named(name).settings(cfg)) for name in names("modalities")
                 if modality_named(name).config_class is not None]
    for section, typed in sections:
        hints = typing.get_type_hints(type(typed))
        for f in dataclasses.fields(typed):
            print(f"{section}.{f.name} = {getattr(typed, f.name)!r}  ({hints[f.name]})\n"
                  f"    {f.metadata.get('help', '')}")
    if cfg.auto:
        print("auto: derived from the data and the device (no recipe for this method and data):")
        for key, reason in cfg.auto.items():
            print(f"  {key} = {reason}")


def error_message(e: BaseException) -> str:
    """The message of a ContrastiveError, without the worker traceback a DataLoader wraps around it."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a, extra = p.parse_known_args(argv)
    # key=value overrides may come anywhere, also between flags: collect the ones argparse left over
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        if not hasattr(a, "overrides"):
            p.error(f"{a.command} takes no key=value overrides: {' '.join(extra)}")
        a.overrides = list(a.overrides) + extra
    # under torchrun only rank 0 (RANK unset in a single process) logs progress; the others warn only
    quiet = os.environ.get("RANK", "0") != "0"
    logging.basicConfig(level=logging.WARNING if quiet else logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        # log lines (the memory check, the time estimate) print above the progress bar, not into it
        commands = {"pretrain": _pretrain, "eval": _eval, "embed": _embed, "finetune": _finetune,
                    "distill": _distill, "export": _export, "report": _report_runs}
        with logging_redirect_tqdm():
            return commands[a.command](a)
    except ContrastiveError as e:
        print(f"contrastive: error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
