"""The typed run configuration: every section and field, with why its default is what it is, and how a tree of
values (a recipe, a checkpoint's config) becomes one. How a run's config is resolved from recipes, flags and
``key=value`` overrides is ``configure.py``'s.

Every field carries a ``help`` string that says why its default is what it is. Unknown keys are an error
that names them. The method and backbone sections are open: ``method.name`` / ``backbone.name`` pick a
registered part, and the other keys of that section are checked against that part's own config dataclass.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from contrastive.errors import ConfigError


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    name: str = _f("digits", "Dataset to pretrain on: a named dataset (digits, fashion-mnist, mnist, cifar10, "
                   "cifar100, stl10; spoken-digits; sts-sentences, sick-triples; flickr8k), or a path: a folder of "
                   "images or of WAV files (class sub-folders optional; unlabeled data is fine), a folder of images "
                   "with a captions file, a text file. The kind of data it holds decides the rest (modalities/).")
    data_dir: str | None = _f(None, "Where a named dataset's files live (or are downloaded to); None uses the "
                              "dataset's usual place (see the dataset's docs).")
    cache_dir: str | None = _f(None, "Where a dataset's archive is unpacked (once, keyed by its content); None: "
                               "~/.cache/contrastive/data.")
    train_data: str | None = _f(None, "Labelled data for the evaluation's training side (kNN bank, probe "
                                "training); None uses the pretraining dataset's own train split.")
    test_data: str | None = _f(None, "Labelled data to evaluate on; None uses the dataset's test split, a "
                               "folder's test/ or val/ sub-folder, or a seeded held-out fraction.")
    holdout: float = _f(0.1, "Fraction of a single labelled folder held out for evaluation when it has no "
                        "test/ or val/ sub-folder; the report says so.")
    split_seed: int = _f(0, "Seed of the held-out split (and of digits' 80/20 split), fixed apart from "
                         "the training seed so every run evaluates on the same images.")
    image_size: int | None = _f(None, "Side the loader decodes every image to (square); None keeps the "
                                "dataset's native size (a folder: its images' median shorter side; digits: "
                                "upsampled 8 -> 32 so crops have room).")
    in_memory: bool | None = _f(None, "Decode the whole dataset once into a uint8 tensor (CIFAR-10: 150 MB) "
                                "instead of decoding every epoch; None: when the decoded set takes at most half "
                                "the memory available, else decode per batch (the log says so).")
    skip_corrupt: bool = _f(False, "Skip unreadable images and count them in the log, rather than stop "
                            "with an error naming the file.")
    download: bool = _f(True, "Download a named dataset through torchvision when it is not found locally.")
    encoding: str | None = _f(None, "Text encoding of text data and captions files (for example latin-1); None: "
                              "UTF-8, and a file that is not valid UTF-8 is an error naming its line.")
    num_workers: int = _f(2, "DataLoader worker processes; the loader only decodes, augmentation runs "
                          "batched on the training device.")
    label: str | None = _f(None, "Which labelling of the data the evaluation (kNN, linear probe) uses, for data "
                           "with several: spoken-digits has digit and speaker; None: the data's first (digit; a "
                           "folder's class sub-folders).")


@dataclass
class ViewConfig:
    backend: str = _f("tensor", "tensor: batched augmentation of uint8 batches on the training device "
                      "(measured faster, see benchmarks/views_speed.py); pil: per-image torchvision "
                      "transforms in the loader workers.")
    n_views: int = _f(2, "Views per image; SimCLR contrasts 2 (Chen et al. 2020, Sec. 2.1).")
    size: int | None = _f(None, "Output side of each view; None uses the decoded image size.")
    crop_scale: list = _f([0.08, 1.0], "Random resized crop area range; (0.08, 1) is Inception-style "
                          "cropping as SimCLR uses (Appendix A).")
    crop_ratio: list = _f([0.75, 1.3333333333333333], "Aspect-ratio range of the crop (3/4, 4/3).")
    hflip_p: float = _f(0.5, "Horizontal flip probability (SimCLR Appendix A).")
    jitter_p: float = _f(0.8, "Colour jitter probability; 0.8 in SimCLR Appendix A.")
    jitter_strength: float = _f(1.0, "Colour distortion strength s: brightness, contrast, saturation "
                                "0.8s and hue 0.2s (SimCLR Appendix A; s=0.5 for CIFAR-10, B.9).")
    jitter: list | None = _f(None, "Colour jitter amounts [brightness, contrast, saturation, hue] as torchvision's "
                             "ColorJitter takes them, for recipes not written in SimCLR's s (InstDisc and MoCo v1: "
                             "[0.4, 0.4, 0.4, 0.4]); None: from jitter_strength.")
    grayscale_p: float = _f(0.2, "Random grayscale probability; 0.2 in SimCLR Appendix A.")
    blur_p: float = _f(0.0, "Gaussian blur probability; SimCLR uses 0.5 on ImageNet and none on CIFAR-10.")
    blur_sigma: list = _f([0.1, 2.0], "Blur sigma range in pixels of a 224 image, scaled by size/224; "
                          "(0.1, 2.0) in SimCLR Appendix A.")
    blur_kernel_frac: float = _f(0.1, "Blur kernel side as a fraction of the image side (10%, SimCLR A).")
    solarize_p: float = _f(0.0, "Solarize probability (BYOL uses it; SimCLR does not).")
    groups: list | None = _f(None, "View groups, for views that differ (BYOL's asymmetric pair, SwAV's and DINO's "
                             "multi-crop): a list of mappings, each with `count` (views of the group), `global` "
                             "(a global view: DINO's teacher and SwAV's codes see only these; default: true for the "
                             "groups of the largest size) and any of the fields above from size to solarize_p "
                             "that differ from them. Global groups come first in the batch and share one size, "
                             "which evaluation uses. None: the method's own groups (see its docs), else n_views "
                             "views of the fields above.")


@dataclass
class OptimConfig:
    name: str = _f("lars", "sgd, adamw or lars; SimCLR trains with LARS (You et al. 2017) for large batches.")
    lr: float = _f(1.0, "Base learning rate before scaling by batch size (see lr_scaling).")
    lr_scaling: str = _f("linear", "linear: lr * batch/256 (SimCLR B.1); sqrt: lr * sqrt(batch) "
                         "(SimCLR v2); none: lr as given.")
    momentum: float = _f(0.9, "SGD / LARS momentum.")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    weight_decay: float = _f(1e-4, "Weight decay on weights only, never on biases or norm layers "
                             "(SimCLR excludes them from LARS adaptation and decay).")
    weight_decay_end: float | None = _f(None, "Weight decay at the end of a cosine schedule from weight_decay (DINO: "
                                        "0.04 -> 0.4, 'a cosine schedule from 0.04 to 0.4', Sec. 5); None: constant.")
    lars_eta: float = _f(0.001, "LARS trust coefficient (You et al. 2017).")
    warmup_epochs: float = _f(10.0, "Linear warm-up length in epochs before the cosine decay (SimCLR B.1).")
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of the peak; SimCLR decays to 0.")
    schedule: str = _f("cosine", "After the warm-up: cosine (SimCLR, MoCo v2) decays to min_lr_ratio; step "
                       "multiplies by gamma at each milestone epoch (InstDisc, MoCo v1: x0.1 at 120 and 160).")
    milestones: list = _f([120, 160], "Epochs at which the step schedule multiplies the learning rate by gamma.")
    gamma: float = _f(0.1, "Factor of the step schedule at each milestone.")
    grad_clip: float | None = _f(None, "Clip the gradient norm to this value; None: no clipping.")
    grad_clip_mode: str = _f("global", "global: the norm of all gradients together (torch's clip_grad_norm_); "
                             "per_parameter: each tensor's own norm, as DINO's clip_gradients (clip 3.0).")


@dataclass
class TrainConfig:
    epochs: int = _f(100, "Pretraining epochs.")
    batch_size: int = _f(256, "Images per optimiser step over all processes.")
    precision: str = _f("auto", "fp32, bf16 or fp16 autocast; auto: bf16 on a GPU with native bf16 (A100, H100, "
                        "RTX 30xx and newer), fp16 with loss scaling on older GPUs with tensor cores (V100, T4, "
                        "RTX 20xx, where bf16 is only emulated and slow), else fp32 (the CPU); the choice is logged.")
    device: str = _f("auto", "auto (cuda when available), cpu, cuda or cuda:N. Under torchrun, auto and cuda give "
                     "each process its own GPU (cuda:LOCAL_RANK, or cuda:0 when the launcher shows each process "
                     "one GPU); an explicit cuda:N is for one process per machine.")
    output: str | None = _f(None, "Folder for checkpoints, metrics.csv, config.yaml and results.json; a folder that "
                            "holds another run is refused (see overwrite). None: a new folder runs/<date>-<time>-"
                            "<method>, with runs/latest pointing at it.")
    overwrite: bool = _f(False, "Replace the run already in train.output (its run files are removed first); "
                         "without it such a folder is refused, so no run is lost to a repeated command.")
    checkpoint_every: int = _f(10, "Write a checkpoint every N epochs (and always at the end).")
    resume: str | None = _f(None, "Checkpoint to resume from; the run continues exactly where it stopped.")
    log_every: int = _f(10, "Write a metrics.csv row every N optimiser steps.")
    progress: bool = _f(True, "Show a progress bar with loss, learning rate and images/s.")
    tensorboard: bool | None = _f(None, "Write TensorBoard logs; None: when tensorboard is installed; true: "
                                  "required (an error when it is missing).")
    max_steps: int | None = _f(None, "Stop after this many optimiser steps (the schedule still spans "
                               "all epochs); for fixed-budget benchmarks.")
    time_budget_s: float | None = _f(None, "Stop after this many seconds of training (the schedule "
                                     "spans all epochs); for fixed-budget benchmarks. Not resumable exactly.")
    sync_batchnorm: bool | None = _f(None, "Batch-norm statistics over all processes, SimCLR's 'Global BN' "
                                     "(Sec. 2.2: per-device BN lets positives be found by local statistics); "
                                     "None: on for multi-GPU runs. Needs CUDA.")
    channels_last: bool = _f(True, "Use channels-last memory format for convolutions (faster on CPU and GPU).")
    compile: bool = _f(False, "torch.compile the method; pays off on long GPU runs.")
    dist_timeout_s: float = _f(3600.0, "Seconds a process waits in a collective for the others (rank 0 "
                               "downloading a dataset, writing a checkpoint) before the run fails; torch's NCCL "
                               "default of 10 minutes is shorter than a slow download.")
    data_on_device: bool | None = _f(None, "Keep an in-memory dataset's uint8 images on the GPU, so a batch is "
                                     "an index there and never a host copy; None: when they take at most a "
                                     "quarter of the GPU's free memory (CIFAR-10: 150 MB). Otherwise batches "
                                     "are gathered into pinned memory and copied without blocking.")
    cudnn_benchmark: bool = _f(True, "Let cuDNN time its convolution algorithms on the first batch of each "
                               "shape and keep the fastest; views have one fixed size, so it pays at once. "
                               "false for repeatable GPU runs. CUDA only; logged.")
    tf32: bool = _f(False, "TF32 (10-bit mantissa) in fp32 matmuls and convolutions on Ampere and newer GPUs: "
                    "several times faster fp32. Off: precision=auto trains in bf16 on those GPUs anyway, and the "
                    "losses are computed in fp32 on purpose. CUDA only; logged.")
    memory_check: bool = _f(True, "Before the first epoch, estimate a step's memory from trial steps at small "
                            "batches and stop with the largest batch that fits when train.batch_size does not; "
                            "off: trust the batch size (the estimate errs on the large side).")


@dataclass
class EvalConfig:
    enabled: bool | None = _f(None, "Run kNN and linear-probe evaluation at the end of pretraining; None: when "
                              "there are labels to evaluate with (an unlabeled folder pretrains only, and "
                              "says so); true: an error without them.")
    knn: bool = _f(True, "Weighted kNN (Wu et al. 2018): cosine similarity, k neighbours, temperature.")
    knn_k: int = _f(200, "Neighbours in the weighted kNN; 200 in InstDisc (Wu et al. 2018, Sec. 3.4).")
    knn_temperature: float = _f(0.07, "Weight exp(sim / T); T=0.07 as in InstDisc.")
    linear: bool = _f(True, "Linear probe on frozen, once-extracted features.")
    linear_epochs: int = _f(100, "Epochs of the linear probe over cached features.")
    linear_lr: float = _f(0.01, "AdamW learning rate of the linear probe over standardised features.")
    linear_weight_decay: float = _f(1e-4, "Weight decay of the linear probe.")
    linear_batch_size: int = _f(512, "Mini-batch size of the linear probe.")
    baseline: bool = _f(True, "Also evaluate the baseline of the data's kind that learned features must beat "
                        "(images: the kNN on raw pixels; audio: the kNN and linear probe on MFCC statistics; "
                        "sentences: the SentEval probes on bag-of-words vectors).")
    batch_size: int = _f(512, "Batch size of feature extraction.")


@dataclass
class Config:
    seed: int = _f(0, "Seed of weights, data order and augmentations; a run is a function of it.")
    method: dict = _f({"name": "simclr"}, "Method section: name plus that method's own fields.")
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    backbone: dict = _f({"name": "small_cnn"}, "Backbone section: name (resnet18, resnet34, resnet50, small_cnn, "
                        "...) plus that backbone's own fields.")
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    modalities: dict = _f({}, "Settings of one kind of data, a section per modality (image, audio, text, "
                          "image-text) checked against that modality's own fields (see its docs or --print-config); "
                          "only the section of the data's own kind may be set.")
    auto: dict = _f({}, "Settings derived from the data and the device when the method has no recipe for the "
                    "data (see contrastive/autoconfig.py), each with its reason; a record: the values are in "
                    "their sections.")


# --------------------------------------------------------------------------------------------------
# building, merging, validating


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert, int -> float) a value against a field's annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot, no exponent sign) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan passes every range check (nan < low is False)
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}: expected a list such as [0.08, 1.0], got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def build_dataclass(cls: type, values: dict, where: str) -> Any:
    """Instantiate ``cls`` from a nested dict, naming any unknown key with the valid ones."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        moved = _MOVED.get((where, unknown[0])) or _RENAMED.get((where, unknown[0]))
        hint = f" (now {moved[0]}.{moved[1]})" if moved else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}{hint}; valid keys{' of ' + where if where else ''}: "
            f"{', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = build_dataclass(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


# Fields that moved into the section of the one kind of data that uses them (``modalities.<name>``), with the
# default they had there, and fields renamed. A config a run wrote before (its checkpoint's, its config.yaml) is
# read with its values moved: the defaults dropped, the others into the new section.
_MOVED = {
    ("views", "window"): ("modalities.audio", "window", 20480),
    ("views", "gain_db"): ("modalities.audio", "gain_db", [0.0, 0.0]),
    ("eval", "n_mfcc"): ("modalities.audio", "n_mfcc", 20),
    ("eval", "raw_pixel_size"): ("modalities.image", "raw_pixel_size", 32),
    ("eval", "sts"): ("modalities.text", "sts", ["stsb-dev", "sick-test"]),
    ("eval", "senteval"): ("modalities.text", "senteval", ["mr", "cr", "subj", "mpqa", "trec", "sst2"]),
    ("eval", "senteval_folds"): ("modalities.text", "senteval_folds", 10),
    ("eval", "zero_shot"): ("modalities.image-text", "zero_shot", None),
    ("eval", "prompts"): ("modalities.image-text", "prompts", ["a photo of a {}."]),
}
_RENAMED = {("eval", "raw_pixel_baseline"): ("eval", "baseline")}


def upgrade_tree(tree: dict) -> dict:
    """A config tree a run wrote (a checkpoint's config, a config.yaml) with the fields that have moved since
    (``_MOVED``, ``_RENAMED``) in their new places; a tree without them is returned as it is."""
    out = copy.deepcopy(tree)
    for (section, name), (new, field_name, default) in _MOVED.items():
        old = out.get(section)
        if isinstance(old, dict) and name in old:
            value = old.pop(name)
            if value != default:
                kind = new.split(".")[1]
                out.setdefault("modalities", {}).setdefault(kind, {})[field_name] = value
    for (section, name), (_, new_name) in _RENAMED.items():
        old = out.get(section)
        if isinstance(old, dict) and name in old:
            old.setdefault(new_name, old.pop(name))
    return out


def config_from_tree(tree: dict) -> "Config":
    """The Config a tree a run wrote holds (see ``upgrade_tree``)."""
    return build_dataclass(Config, upgrade_tree(tree), "")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# (field, lowest allowed, whether the lowest itself is allowed): values outside fail before any work is done
_RANGES = [
    ("train.epochs", 1, True), ("train.batch_size", 1, True), ("train.checkpoint_every", 1, True),
    ("train.log_every", 1, True), ("train.max_steps", 1, True), ("train.time_budget_s", 0, False),
    ("optim.lr", 0, True), ("optim.weight_decay", 0, True), ("optim.lars_eta", 0, False),
    ("optim.warmup_epochs", 0, True), ("optim.weight_decay_end", 0, True), ("optim.min_lr_ratio", 0, True),
    ("optim.grad_clip", 0, False),
    ("data.num_workers", 0, True), ("data.image_size", 1, True), ("data.holdout", 0, False),
    ("eval.knn_k", 1, True), ("eval.knn_temperature", 0, False), ("eval.linear_epochs", 1, True),
    ("eval.linear_lr", 0, False), ("eval.linear_batch_size", 1, True), ("eval.batch_size", 1, True),
    ("train.dist_timeout_s", 0, False),
]


def check_fields(cfg: Config) -> None:
    """Value ranges of the typed fields; a ConfigError names the field. The open sections (``method:``,
    ``backbone:``) are checked against their parts when a run config is resolved (``configure.validate``)."""
    for key, low, inclusive in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and (value < low or (value == low and not inclusive)):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"{key}={value} is out of range: it must be {bound}")
    if cfg.optim.grad_clip_mode not in ("global", "per_parameter"):
        raise ConfigError(f"optim.grad_clip_mode={cfg.optim.grad_clip_mode!r}: choose global or per_parameter")
    if cfg.optim.schedule not in ("cosine", "step"):
        raise ConfigError(f"optim.schedule={cfg.optim.schedule!r}: choose cosine or step")
    if not 0 < cfg.optim.gamma <= 1:
        raise ConfigError(f"optim.gamma={cfg.optim.gamma} is out of range: it must lie in (0, 1]")
    if not all(isinstance(m, (int, float)) and m >= 0 for m in cfg.optim.milestones):
        raise ConfigError(f"optim.milestones={cfg.optim.milestones!r}: expected a list of epochs >= 0")
    if not cfg.data.holdout < 1:
        raise ConfigError(f"data.holdout={cfg.data.holdout} is out of range: it must be below 1")
