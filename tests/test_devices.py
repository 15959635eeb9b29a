"""The GPU road, proven on the CPU: device consistency, host synchronisations, device and precision choice,
process-group options, trainer wiring, checkpoints and resume across precisions, torch.compile.

No GPU is needed. Device placement is checked by running on CPU inputs inside ``torch.device("meta")``
with a dispatch guard: a tensor made without ``device=`` lands on meta and the first op that mixes it with
a CPU tensor raises. Host synchronisations are counted at the dispatcher on the accelerator code path,
forced onto CPU tensors. What needs CUDA itself (device count, bf16 support, NCCL) is monkeypatched.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from contrastive import api, distributed, losses
from contrastive.config import ViewConfig
from contrastive.configure import resolve_config
from contrastive.data import augment
from contrastive.device import keep_on_device, resolve_device, resolve_precision
from contrastive.errors import ConfigError, NonFiniteLossError
from contrastive.evaluation import knn_device, knn_predict, knn_top1
from contrastive.methods.base import Batch, BuildContext, Method, MethodSpec, StepInfo, StepOutput
from contrastive.modalities import detect, load_splits, modality_of
from contrastive.modalities.image import raw_pixel_features
from contrastive.modalities.image.preprocess import Preprocess
from contrastive.modalities.image.views import TensorViews, eval_preprocess
from contrastive.registry import lookup, names, register
from contrastive.training import trainer as trainer_module
from contrastive.training.checkpoint import load_checkpoint
from contrastive.training.trainer import Trainer
from contrastive.trees import recipe_dir

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------------------------
# the device guard


class DeviceMixError(AssertionError):
    pass


# Ops whose job is to move data between devices.
_COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}


class DeviceGuard(TorchDispatchMode):
    """Raises when one op gets tensors on different devices. A 0-dim CPU tensor is a scalar torch accepts
    beside any device's tensors (``x * torch.tensor(2.0)``), so it is allowed."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _COPIES:
            devices = {t.device for t in tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                raise DeviceMixError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def guarded(fn, *args, **kwargs):
    """``fn`` on CPU inputs with meta the default device: any tensor made without ``device=`` is meta."""
    with torch.device("meta"), DeviceGuard():
        return fn(*args, **kwargs)


def test_the_guard_raises_on_mixed_devices_and_allows_cpu_scalars():
    with pytest.raises(DeviceMixError, match="mixes devices"):
        guarded(lambda: torch.ones(3, device="cpu") + torch.arange(3))
    with DeviceGuard():
        torch.ones(3, device="meta") * torch.tensor(2.0)  # a 0-dim CPU scalar is fine
        torch.ones(3).to("meta")  # moving data is what copies are for


def _on_cpu(*tensors):
    assert all(t.device.type == "cpu" for t in tree_leaves(tensors) if isinstance(t, torch.Tensor))


def _images(b, c, side, seed=0):
    return torch.randint(0, 256, (b, c, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# every random op on, so every branch of the views runs
ALL_ON = dict(hflip_p=0.5, jitter_p=0.8, grayscale_p=0.5, blur_p=0.5, blur_kernel_frac=0.2, solarize_p=0.5)


@pytest.mark.parametrize("path", ["indexed", "masked"])
@pytest.mark.parametrize("channels", [3, 1])
def test_views_stay_on_the_input_device(monkeypatch, path, channels):
    if path == "masked":
        monkeypatch.setattr(augment, "by_index", lambda x: False)
    views = TensorViews(ViewConfig(**ALL_ON), [0.5] * channels, [0.25] * channels, channels, in_size=16)
    out = guarded(views, _images(8, channels, 16), torch.Generator().manual_seed(0))
    _on_cpu(out)


def test_evaluation_preprocessing_stays_on_the_input_device():
    x = _images(4, 3, 16)
    for size in (16, 8):  # as it is, and resized
        _on_cpu(guarded(eval_preprocess, x, [0.5] * 3, [0.25] * 3, size))
    _on_cpu(guarded(Preprocess(3, 12, (0.5,) * 3, (0.25,) * 3), x))


def _loss_examples():
    g = torch.Generator().manual_seed(0)
    z = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=1)  # noqa: E731
    return {
        "nt_xent": lambda: (z(6, 8), z(6, 8), 0.5),
        "simcse_unsup": lambda: (z(6, 8), z(6, 8), 0.05),
        "simcse_sup": lambda: (z(6, 8), z(6, 8), z(6, 8), 0.05),
        "clip_loss": lambda: (z(6, 8), z(6, 8), torch.tensor(2.659).requires_grad_()),  # log(1 / 0.07)
        "info_nce_queue": lambda: (unit(6, 8).requires_grad_(), unit(6, 8), unit(32, 8), 0.2),
        "info_nce_batch": lambda: (z(6, 8), z(6, 8).detach(), 0.2),
        "invariance_spread": lambda: (unit(6, 8).requires_grad_(), unit(6, 8).requires_grad_(), 0.1),
        "nce_loss": lambda: (unit(6, 8).requires_grad_(), unit(6, 8), unit(6 * 5, 8).view(6, 5, 8), 0.07,
                             torch.tensor(40.0), 100),
        "nce_normaliser": lambda: (unit(6, 8), unit(6, 8), unit(6 * 5, 8).view(6, 5, 8), 0.07, 100),  # no gradient
        "nonparametric_softmax": lambda: (unit(6, 8).requires_grad_(), unit(20, 8), torch.arange(6) * 3, 0.07),
        "distillation_loss": lambda: (z(6, 10), z(6, 10).detach(), 2.0),
        "byol_loss": lambda: (z(6, 8), z(6, 8).detach()),
        "negative_cosine": lambda: (z(6, 8), z(6, 8).detach()),
        "sinkhorn": lambda: (torch.randn(6, 5, generator=g),),  # codes [6, 5], no gradient
        "swav_loss": lambda: ([z(6, 5) for _ in range(3)], [torch.rand(6, 5, generator=g) for _ in range(2)], 0.1),
        "dino_loss": lambda: ([z(6, 5) for _ in range(3)], [torch.randn(6, 5, generator=g) for _ in range(2)],
                              torch.zeros(1, 5), 0.1, 0.04),
        "center_update": lambda: (torch.zeros(1, 5), [torch.randn(6, 5, generator=g) for _ in range(2)], 0.9),
        "contrastive_margin_loss": lambda: (z(6, 8), z(6, 8), torch.tensor([True, False] * 3), 1.0),
        "triplet_loss": lambda: (z(6, 8), torch.tensor([0, 1, 0, 1, 2, 2]), 0.2, "semi-hard"),
        "supcon_loss": lambda: (z(6, 8), torch.tensor([0, 1, 0, 1, 2, 2]), 0.1),
        "pairwise_margin_loss": lambda: (z(6, 8), torch.tensor([0, 1, 0, 1, 2, 2]), 1.0),
        "cpc_info_nce": lambda: (z(6, 8), z(10, 8), torch.tensor([0, 2, 4, 6, 8, 9])),
        "cpc_accuracy": lambda: (z(6, 8), z(10, 8), torch.tensor([0, 2, 4, 6, 8, 9])),  # no gradient
        "cmc_info_nce": lambda: (unit(6, 8).requires_grad_(), unit(6, 8).requires_grad_(), 0.07),
    }


def test_every_loss_stays_on_the_input_device():
    examples = _loss_examples()
    # a loss added to losses/ needs an example here: none is skipped silently
    assert set(examples) == set(losses.__all__), f"add example inputs for {set(losses.__all__) - set(examples)}"
    for name, make in examples.items():
        inputs = make()
        loss = guarded(getattr(losses, name), *inputs)
        assert loss.device.type == "cpu" and torch.isfinite(loss).all(), name  # Sinkhorn's codes are [n, K]
        if loss.requires_grad:
            guarded(loss.backward)
            grads = [t.grad for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
            assert grads and all(g is not None for g in grads), name
            _on_cpu(grads)


def test_knn_stays_on_the_input_device():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = torch.arange(40) % 3
    for device in (None, "cpu"):
        preds = guarded(knn_predict, train, labels, test, num_classes=3, k=5, chunk_size=4, device=device)
        _on_cpu(preds)
        assert torch.equal(preds, knn_predict(train, labels, test, num_classes=3, k=5))


def _library_methods() -> list[str]:
    """Every method the library registers (not methods that tests register for themselves)."""
    return [n for n in names("methods") if lookup("methods", n).build.__module__.startswith("contrastive.methods.")]


def _tiny_method(name: str, n: int = 8):
    """The method built from its digits (else CIFAR-10, else spoken-digits) recipe for a batch of n images at
    16 px (audio: windows of 1,280 samples), a batch for it, and a StepInfo."""
    recipe = next((p for p in (recipe_dir() / f"{name}{d}.yaml" for d in ("-digits", "-cifar10", "-spoken-digits", ""))
                   if p.is_file()), None)
    assert recipe is not None, f"{name} has no digits or cifar10 recipe; add configs/{name}-digits.yaml"
    cfg = resolve_config(recipe=recipe)
    text = detect(cfg.data).name in ("text", "image-text")
    if text:  # a small text encoder in place of the recipe's MiniLM: the same code paths, a fraction of the time
        tiny = {"name": "text_transformer", "width": 32, "depth": 1, "heads": 2}
        cfg = resolve_config(recipe=recipe, tree={"method": {"text": tiny}} if "text" in cfg.method else
                             {"backbone": tiny})
    channels = 1 if recipe.stem.endswith("digits") else 3
    ctx = BuildContext(input_shape=(channels, 16, 16), dataset_size=64, num_classes=10, batch_size=n, world_size=1,
                       steps_per_epoch=4, epochs=2, backbone_section=cfg.backbone, mean=(0.5,) * channels,
                       std=(0.25,) * channels)
    torch.manual_seed(0)
    method = api.build_method(cfg, ctx)
    g = torch.Generator().manual_seed(1)
    side = [1280] if detect(cfg.data).name == "audio" else [16, 16]  # 16 frames of 80 samples
    views = [torch.randn(n, channels, *side, generator=g) for _ in range(cfg.views.n_views)]
    if text:  # token ids of words: sentences (the columns of triples for simcse-sup), or a crop and a caption
        ids = torch.randint(1000, 2000, (n, 12), generator=g)
        views = ([views[0], ids] if "text" in cfg.method else [ids] * (3 if name == "simcse-sup" else 1))
    batch = Batch(views=views, index=torch.randperm(64, generator=g)[:n], label=torch.arange(n) % 10)
    return method, batch, StepInfo(step=1, epoch=0, total_steps=8, steps_per_epoch=4, epochs=2)


def test_every_method_stays_on_the_input_device():
    """forward, backward and after_step of every registered method, on CPU inputs with meta the default device."""
    methods = _library_methods()
    assert {"simclr", "moco-v2"} <= set(methods)
    for name in methods:
        method, batch, info = _tiny_method(name)
        out = guarded(method, batch, step=info)
        guarded(out.loss.backward)
        with torch.no_grad():
            guarded(method.after_step, {k: v.detach() for k, v in out.updates.items()}, info)
        assert torch.isfinite(out.loss), name
        _on_cpu(out.loss, list(out.metrics.values()), list(out.updates.values()), list(method.state_dict().values()))


# a ViT's options (sin-cos position embedding, interpolation to another input size) with the sizes' smallest
_BACKBONE_SECTIONS = {"vit_tiny": {"position_embedding": "sincos", "patch_size": 8},
                      "vit_small": {"patch_size": 8}, "vit_base": {"patch_size": 8}}


@pytest.mark.slow
def test_every_backbone_stays_on_the_input_device():
    """forward and backward of every registered backbone, at its build size and (ViTs interpolate their
    position embedding) at another one."""
    from contrastive.nn.backbones import build_backbone

    backbones = [n for n in names("backbones") if lookup("backbones", n).build.__module__.startswith("contrastive.")]
    assert {"small_cnn", "resnet18"} <= set(backbones)
    for name in backbones:
        torch.manual_seed(0)
        section = {"name": name, **_BACKBONE_SECTIONS.get(name, {})}
        if name == "hf_text":  # a local model directory is all it needs
            from contrastive.nn.text import minilm_path

            section["path"] = minilm_path()
        reads = lookup("backbones", name).reads
        model, dim = build_backbone(section, input_shape=(3, 32 * 40) if reads == "audio" else (3, 32, 32))
        if reads == "text":  # token ids in, of two lengths; the gradient reaches the weights
            for length in (7, 12):
                out = guarded(model, torch.randint(1000, 2000, (2, length)))
                guarded(out.sum().backward)
                assert out.shape == (2, dim), name
                _on_cpu(out, [p.grad for p in model.parameters() if p.grad is not None])
            continue
        for side in (32, 48):
            shape = (side * 40,) if reads == "audio" else (side, side)  # waveforms, or images
            x = torch.randn(2, 3, *shape, requires_grad=True)
            out = guarded(model, x)
            guarded(out.sum().backward)
            assert out.shape == (2, dim) and x.grad is not None, name
            _on_cpu(out, x.grad)


# ------------------------------------------------------------------------------------------------------------
# host synchronisations, counted at the dispatcher


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for an accelerator: ``nonzero`` and boolean-mask indexing
    (the result's size), ``.item()`` / ``int()`` / ``bool()`` of a tensor (``_local_scalar_dense``), and a
    tensor made from Python data (``lift_fresh``: a blocking copy when it is made on the device)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.nonzero.default, aten._local_scalar_dense.default, aten.lift_fresh.default,
                    aten.masked_select.default):
            self.counts[func._overloadpacket.__name__] += 1
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.counts["boolean index"] += 1
        return func(*args, **kwargs)


def test_views_on_an_accelerator_never_synchronise(monkeypatch):
    views = TensorViews(ViewConfig(**ALL_ON), [0.5] * 3, [0.25] * 3, 3, in_size=16)
    x = _images(32, 3, 16)
    views(x, torch.Generator().manual_seed(0))  # the first call makes the per-device constants once
    with SyncCounter() as cpu_path:
        views(x, torch.Generator().manual_seed(1))
    # the CPU path indexes the selected samples, and the counter sees it: per view 16 jitter slots and ops,
    # grey, blur and solarize
    assert cpu_path.counts == {"nonzero": 2 * 19}
    monkeypatch.setattr(augment, "by_index", lambda x: False)
    with SyncCounter() as masked:
        views(x, torch.Generator().manual_seed(1))
    assert masked.counts == {}


def test_views_index_only_on_the_cpu():
    # the masked path above is forced; this is the choice that sends every accelerator to it
    assert augment.by_index(torch.empty(1))
    assert not augment.by_index(torch.empty(1, device="meta"))


CONFIGS = [dict(jitter_strength=0.5), ALL_ON, dict(ALL_ON, jitter=[0.4, 0.4, 0.4, 0.4], blur_kernel_frac=0.4)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("channels, side, size", [(3, 16, None), (1, 16, 12), (3, 24, 20)])
def test_indexed_and_masked_views_are_identical(monkeypatch, cfg, channels, side, size):
    views = TensorViews(ViewConfig(size=size, **cfg), [0.4] * channels, [0.2] * channels, channels, in_size=side)
    x = _images(13, channels, side, seed=side)
    indexed = views(x, torch.Generator().manual_seed(5))
    monkeypatch.setattr(augment, "by_index", lambda x: False)
    masked = views(x, torch.Generator().manual_seed(5))
    for a, b in zip(indexed, masked):
        assert torch.equal(a, b)
    assert not torch.equal(indexed[0], views(x, torch.Generator().manual_seed(6))[0])


@dataclasses.dataclass
class PlainConfig:
    nan_at: int = -1  # the step whose loss is made NaN


class Plain(Method):
    """A method whose own step makes no host synchronisation: the trainer's are what is counted."""

    def __init__(self, ctx: BuildContext, cfg: PlainConfig):
        super().__init__()
        self.backbone, self.feature_dim = ctx.build_backbone()
        self.nan_at = cfg.nan_at

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        a, b = (self.backbone(v) for v in batch.views)
        loss = (a - b).pow(2).mean() + (float("nan") if step.step == self.nan_at else 0.0)
        return StepOutput(loss=loss, metrics={"a_mean": a.mean().detach()})


register("methods", "plain-test")(MethodSpec(PlainConfig, Plain))

FAST = ["data.image_size=8", "train.batch_size=32", "train.progress=false", "eval.enabled=false",
        "views.crop_scale=[0.5,1.0]", "views.jitter_p=0.8", "views.blur_p=0.5", "views.blur_kernel_frac=0.4",
        "views.solarize_p=0.5"]


def _trainer(tmp_path, *extra, method="plain-test"):
    cfg = resolve_config(tree={"data": {"name": "digits"}, "method": {"name": method}},
                         overrides=FAST + [f"train.output={tmp_path}", *extra])
    data = load_splits(cfg.data).pretrain
    torch.manual_seed(cfg.seed)
    return Trainer(cfg, api.build_method(cfg, modality_of(data).context(cfg, data)), data, tmp_path)


def test_a_training_step_on_an_accelerator_never_synchronises(monkeypatch, tmp_path):
    """Views, the batch, forward, backward, the optimiser and the non-finite check: no host synchronisation
    between log rows; the log row reads the loss, the metric and the non-finite check."""
    monkeypatch.setattr(augment, "by_index", lambda x: False)
    trainer = _trainer(tmp_path, "train.epochs=1", "train.max_steps=4", "train.log_every=4", "optim.grad_clip=1.0")
    counts = []
    step = trainer._train_step

    def counted(*args, **kwargs):
        with SyncCounter() as c:
            out = step(*args, **kwargs)
        counts.append(c.counts)
        return out

    monkeypatch.setattr(trainer, "_train_step", counted)
    check = trainer._check_finite
    checks = []

    def counted_check():
        with SyncCounter() as c:
            check()
        checks.append(c.counts)

    monkeypatch.setattr(trainer, "_check_finite", counted_check)
    trainer.fit()
    # the views' per-device constants (mean, std, jitter ranges) are made on the first step, then never again
    assert counts == [{"lift_fresh": 3}, {}, {}, {}]
    assert checks[0] == {"_local_scalar_dense": 1}  # the log row's check: one read of the first bad step


def _supervised_syncs(epochs: int, optimizer: str) -> collections.Counter:
    """Host synchronisations of a whole fine-tuning loop (3 steps an epoch, clipping on, no metrics rows)."""
    from contrastive.config import OptimConfig
    from contrastive.nn.backbones import build_backbone
    from contrastive.stages.classifier import Classifier
    from contrastive.stages.supervised import crop_flip_views, train_loop

    torch.manual_seed(0)
    enc, dim = build_backbone({"name": "small_cnn", "widths": [4, 8]}, input_shape=(3, 16, 16))
    model = Classifier(enc, dim, 3)
    targets = torch.arange(24) % 3
    optim = OptimConfig(name=optimizer, lr=0.5, lr_scaling="none", weight_decay=1e-4, warmup_epochs=1, grad_clip=1.0)
    views = crop_flip_views(Preprocess(3, 16, (0.5,) * 3, (0.25,) * 3), 16, [0.5, 1.0], 0.5)
    with SyncCounter() as c:
        train_loop(model, _images(24, 3, 16), lambda x, idx, step: F.cross_entropy(model(x), targets[idx]),
                   epochs=epochs, batch_size=8, optim=optim, views=views, seed=0, device=torch.device("cpu"))
    return c.counts


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_a_supervised_training_step_on_an_accelerator_never_synchronises(monkeypatch, optimizer):
    """Fine-tuning's and distillation's loop: views, forward, backward, clipping, the optimiser and the non-finite
    check add no host synchronisation per step; without metrics rows the host reads once, at the end. (AdamW is
    left out: on CPU parameters its step counters are read with .item(); on a GPU they are host tensors.)"""
    monkeypatch.setattr(augment, "by_index", lambda x: False)
    # 3 and 9 steps: the views' per-device constants once (mean and std; crop and flip need no jitter ranges),
    # one read of the first non-finite step at the end
    assert _supervised_syncs(1, optimizer) == _supervised_syncs(3, optimizer) == {"lift_fresh": 2,
                                                                                  "_local_scalar_dense": 1}


def test_distillations_labelled_batch_never_synchronises(monkeypatch):
    from contrastive.stages.distill import labelled_batch
    from contrastive.stages.supervised import DeviceRows, crop_flip_views

    monkeypatch.setattr(augment, "by_index", lambda x: False)
    rows = DeviceRows(_images(30, 3, 16), torch.arange(30) % 4, device=torch.device("cpu"))
    views = crop_flip_views(Preprocess(3, 16, (0.5,) * 3, (0.25,) * 3), 16, [0.5, 1.0], 0.5)
    labelled_batch(rows, 6, views, 0, 0)  # the views' per-device constants
    with SyncCounter() as c:
        for step in range(1, 4):
            labelled_batch(rows, 6, views, 0, step)
    assert c.counts == {}
    _on_cpu(guarded(labelled_batch, rows, 6, views, 0, 4))  # the draw and the view are made where the rows are


@pytest.mark.parametrize("log_every", [1, 100])
def test_a_non_finite_loss_is_reported_at_its_step_and_never_saved(tmp_path, log_every):
    trainer = _trainer(tmp_path, "train.epochs=1", "train.max_steps=8", f"train.log_every={log_every}",
                       "method.nan_at=3")
    with pytest.raises(NonFiniteLossError, match=r"the loss became nan at epoch 0, step 3 .*Lower optim.lr"):
        trainer.fit()
    # caught at the next log row (step 4) or, with no log row before it, before the checkpoint at max_steps
    assert trainer.step == (4 if log_every == 1 else 8)
    assert not (tmp_path / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------------------------------------
# which device, which precision, which process group


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that shows ``visible`` GPUs (2 unless changed), and no torchrun variables."""
    state = {"visible": 2, "set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["visible"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: state["set"].append(d))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return state


def _torchrun(monkeypatch, local_rank, local_world):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("WORLD_SIZE", str(local_world))
    monkeypatch.setenv("RANK", str(local_rank))


def test_device_under_torchrun_is_this_processs_gpu(monkeypatch, two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    _torchrun(monkeypatch, 1, 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert two_gpus["set"][-1] == torch.device("cuda", 1)


def test_one_visible_gpu_per_process_is_cuda_0(monkeypatch, two_gpus):
    two_gpus["visible"] = 1  # srun --gpus-per-task=1: LOCAL_RANK 3 sees one GPU, its own
    _torchrun(monkeypatch, 3, 4)
    assert resolve_device("cuda") == torch.device("cuda", 0)


@pytest.mark.parametrize("device, local_rank, local_world, match", [
    ("cuda:0", 0, 2, "would put every process on GPU 0; use train.device=cuda"),
    ("cuda:0", 1, 2, "would put every process on GPU 0"),
    ("cuda", 3, 4, "LOCAL_RANK=3 but 2 GPUs visible .*--nproc-per-node=2"),
    ("cuda:2", 0, 1, "train.device=cuda:2 but 2 GPUs visible"),
    ("gpu0", 0, 1, "train.device='gpu0' is not a device"),
])
def test_contradictory_devices_are_refused(monkeypatch, two_gpus, device, local_rank, local_world, match):
    _torchrun(monkeypatch, local_rank, local_world)
    with pytest.raises(ConfigError, match=match):
        resolve_device(device)


def test_an_explicit_gpu_is_fine_for_one_process(two_gpus):
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


GPUS = {  # name: (capability, native bf16)
    "NVIDIA A100-SXM4-80GB": ((8, 0), True),
    "Tesla T4": ((7, 5), False),
    "Tesla V100-SXM2-16GB": ((7, 0), False),
    "Tesla P100-PCIE-16GB": ((6, 0), False),
}


@pytest.mark.parametrize("gpu, expected", [("NVIDIA A100-SXM4-80GB", torch.bfloat16), ("Tesla T4", torch.float16),
                                           ("Tesla V100-SXM2-16GB", torch.float16), ("Tesla P100-PCIE-16GB", None)])
def test_auto_precision_takes_bf16_only_where_it_is_native(monkeypatch, caplog, gpu, expected):
    capability, native = GPUS[gpu]
    # torch.cuda.is_bf16_supported() says True on every CUDA 11+ GPU, emulated or not
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: gpu)
    with caplog.at_level(logging.INFO, logger="contrastive.train"):
        assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    named = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[expected]
    assert f"train.precision=auto: {named}" in caplog.text and gpu in caplog.text
    if not native:
        with caplog.at_level(logging.WARNING, logger="contrastive.train"):
            assert resolve_precision("bf16", torch.device("cuda", 0)) == torch.bfloat16
        assert "emulates bf16, which is slow" in caplog.text
    assert resolve_precision("auto", torch.device("cpu")) is None


def test_the_process_group_gets_the_device_and_the_timeout(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.init_from_env(torch.device("cuda", 1), timeout_s=5400)
    assert calls[-1] == {"backend": "nccl", "timeout": datetime.timedelta(seconds=5400),
                         "device_id": torch.device("cuda", 1)}
    distributed.init_from_env(torch.device("cpu"), timeout_s=60)
    assert calls[-1] == {"backend": "gloo", "timeout": datetime.timedelta(seconds=60), "device_id": None}
    # the trainer passes train.dist_timeout_s
    _trainer(tmp_path, "train.dist_timeout_s=7200", "train.device=cpu")
    assert calls[-1]["timeout"] == datetime.timedelta(hours=2)


def test_dataset_goes_to_the_gpu_when_it_fits():
    assert keep_on_device(None, 150 * 2**20, 8 * 2**30)  # CIFAR-10 on an 8 GB card
    assert not keep_on_device(None, 3 * 2**30, 8 * 2**30)
    assert keep_on_device(True, 3 * 2**30, 8 * 2**30) and not keep_on_device(False, 1, 8 * 2**30)


def test_knn_runs_on_the_gpu_only_when_the_bank_fits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (2 * 2**30, 16 * 2**30))
    small, large = torch.empty(50_000, 512), torch.empty(1_281_167, 2048)
    assert knn_device(small, "cuda:0") == torch.device("cuda", 0)
    assert knn_device(large, "cuda:0") == torch.device("cpu")  # 10 GB of bank: not in 1 GB
    assert knn_device(small, "cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------------------------------------
# the trainer's wiring on a non-CPU device with two processes (meta stands in for the GPUs, DDP is recorded)


class RecordedDDP(nn.Module):
    made: list = []

    def __init__(self, module, **kwargs):
        super().__init__()
        self.module, self.kwargs = module, kwargs
        RecordedDDP.made.append(self)


@pytest.fixture
def meta_world(monkeypatch):
    """Trainers built here train on the meta device as one of two processes."""
    RecordedDDP.made = []
    monkeypatch.setattr(trainer_module, "resolve_device", lambda name: torch.device("meta"))
    monkeypatch.setattr(distributed, "init_from_env", lambda device, timeout_s: False)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(trainer_module, "DistributedDataParallel", RecordedDDP)


def _meta_trainer(tmp_path, method, *extra):
    cfg = resolve_config(tree={"data": {"name": "digits"}, "method": {"name": method}},
                         overrides=[f"train.output={tmp_path}", "data.image_size=16", *extra])
    data = load_splits(cfg.data).pretrain
    torch.manual_seed(0)
    return Trainer(cfg, api.build_method(cfg, modality_of(data).context(cfg, data, 2)), data, tmp_path)


@pytest.mark.parametrize("method", ["simclr", "moco-v2"])
def test_trainer_wiring_on_two_devices(meta_world, tmp_path, method):
    from contrastive.nn.shuffle_bn import SplitBatchNorm

    trainer = _meta_trainer(tmp_path, method)
    m = trainer.method
    (ddp,) = RecordedDDP.made
    assert trainer.model is ddp and ddp.module is m
    assert ddp.kwargs.get("forward_sync_buffers", ddp.kwargs.get("broadcast_buffers")) is False
    plain = [type(b).__name__ for b in m.modules() if isinstance(b, _BatchNorm)
             and not isinstance(b, (nn.SyncBatchNorm, SplitBatchNorm))]
    assert plain == []  # SyncBN where the method wants it; MoCo keeps its per-process split groups
    synced = sum(isinstance(b, nn.SyncBatchNorm) for b in m.modules())
    assert synced > 0 if method == "simclr" else synced == 0
    weights = [p for p in m.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(t.device.type == "meta" for t in m.state_dict().values())
    trained = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sorted(trained) == sorted(id(p) for p in m.parameters() if p.requires_grad)
    assert len(trained) == len(set(trained))


def test_checkpoint_state_is_on_the_cpu(meta_world, monkeypatch, tmp_path):
    trainer = _meta_trainer(tmp_path, "moco-v2", "optim.name=sgd")
    for p in trainer.method.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    trainer.optimizer.step()  # momentum buffers on the device
    # meta tensors hold no data: their "CPU copy" is an empty CPU tensor of the same shape
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: torch.empty_like(t, device="cpu") if t.is_meta else real_cpu(t))
    state = trainer.state_dict()
    tensors = [t for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
    assert len(tensors) > 2 * len(list(trainer.method.parameters()))  # weights, buffers and momentum
    assert all(t.device.type == "cpu" for t in tensors)


def test_encoder_pt_state_is_on_the_cpu(meta_world, monkeypatch, tmp_path):
    """encoder.pt as api.pretrain writes it from the trained method, here on a non-CPU (meta) device: every
    tensor in the file is a CPU copy, so a plain torch.load works on a machine without the run's GPU."""
    trainer = _meta_trainer(tmp_path, "moco-v2")
    encoder_state = trainer.method.encoder().state_dict()
    assert encoder_state and all(t.is_meta for t in encoder_state.values())
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: torch.empty_like(t, device="cpu") if t.is_meta else real_cpu(t))
    pre = Preprocess.for_dataset(trainer.dataset, trainer.cfg.views.size)
    api.save_encoder(trainer.method, trainer.cfg, trainer.context, pre, tmp_path / "encoder.pt")
    raw = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert list(raw["state_dict"]) == list(encoder_state)  # the encoder's weights and buffers, all of them
    tensors = [t for t in tree_leaves(raw) if isinstance(t, torch.Tensor)]
    assert len(tensors) == len(encoder_state) and all(t.device.type == "cpu" for t in tensors)
    assert all(raw["state_dict"][k].shape == v.shape for k, v in encoder_state.items())


# ------------------------------------------------------------------------------------------------------------
# resuming in another precision


def _resume_run(tmp_path, precision, max_steps, monkeypatch, resume=True):
    """A run on the CPU in ``precision``; fp16, which needs CUDA, is let through to CPU autocast."""
    real = trainer_module.resolve_precision
    monkeypatch.setattr(trainer_module, "resolve_precision",
                        lambda name, device: torch.float16 if name == "fp16" else real(name, device))
    extra = [f"train.precision={precision}", "train.epochs=1", f"train.max_steps={max_steps}", "train.log_every=1"]
    if resume:
        extra.append(f"train.resume={tmp_path / 'checkpoint.pt'}")
    trainer = _trainer(tmp_path, *extra, method="simclr")
    trainer.fit()
    return trainer


@pytest.mark.parametrize("before, after", [("bf16", "fp16"), ("fp32", "fp16"), ("fp16", "fp32"), ("fp16", "fp16")])
def test_resume_in_another_precision(monkeypatch, caplog, tmp_path, before, after):
    first = _resume_run(tmp_path, before, 2, monkeypatch, resume=False)
    saved = first.scaler.state_dict()
    with caplog.at_level(logging.INFO, logger="contrastive.train"):
        second = _resume_run(tmp_path, after, 4, monkeypatch)
    assert second.step == 4 and second.scaler.is_enabled() == (after == "fp16")
    if before != "fp16" and after == "fp16":
        assert "the loss scale starts afresh" in caplog.text
    if before == "fp16" and after != "fp16":
        assert "its loss scale is not needed" in caplog.text
    if before == after == "fp16":
        assert saved["scale"] == 65536.0 and second.scaler.get_scale() == saved["scale"]


# ------------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
def test_compiled_training_does_not_recompile_after_step_2(monkeypatch, tmp_path):
    import functools

    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = _trainer(tmp_path / "eager", "train.epochs=1", "train.max_steps=5", method="simclr")
    eager.fit()
    compiled = _trainer(tmp_path / "compiled", "train.epochs=1", "train.max_steps=5", "train.compile=true",
                        method="simclr")
    step = compiled._train_step

    def strict_after_2(*args, **kwargs):
        if compiled.step == 2:
            monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        return step(*args, **kwargs)

    monkeypatch.setattr(compiled, "_train_step", strict_after_2)
    compiled.fit()
    assert compiled.step == 5 and torch._dynamo.config.error_on_recompile
    for k, v in eager.method.state_dict().items():
        torch.testing.assert_close(compiled.method.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------------------
# the raw-pixel baseline's size


@pytest.mark.parametrize("cap, side", [(8, 8), (None, 16), (32, 16)])
def test_raw_pixel_baseline_is_at_most_raw_pixel_size(monkeypatch, cap, side):
    from contrastive.modalities import image

    seen = []
    real = image.raw_pixel_features

    def spy(ds, **kw):
        seen.append(kw["preprocess"].size)
        return real(ds, **kw)

    monkeypatch.setattr(image, "raw_pixel_features", spy)
    cfg = resolve_config(tree={"data": {"name": "digits"}},
                         overrides=["data.image_size=16", "eval.linear=false", f"modalities.image.raw_pixel_size={cap or 'null'}"])
    splits = load_splits(cfg.data)
    pre = Preprocess.for_dataset(splits.pretrain, 16)
    res = api.evaluate_encoder(nn.Flatten(), pre, splits.eval_train, splits.eval_test, cfg, note=splits.note)
    assert seen == [side, side] and f"at {side} px" in res["evaluation"]["raw_pixel_baseline"]
    small = dataclasses.replace(pre, size=side)
    (xtr, ytr), (xte, yte) = (raw_pixel_features(ds, preprocess=small) for ds in (splits.eval_train, splits.eval_test))
    assert xtr.shape[1] == side * side
    assert res["raw_pixel_knn_top1"] == knn_top1(xtr, ytr, xte, yte, num_classes=10, k=200, temperature=0.07)


def _no_cuda(*args, **kwargs):
    raise AssertionError("CUDA was initialised by a CPU run")


def test_cpu_training_on_a_gpu_machine_never_starts_cuda(monkeypatch, tmp_path):
    """train.device=cpu where CUDA is available: training, checkpoints and the default evaluation (kNN and the
    linear probe, whose AdamW is training.optim.AdamW) leave the GPU alone."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", _no_cuda)
    cfg = resolve_config(tree={"data": {"name": "digits"}}, overrides=[
        "train.device=cpu", "data.image_size=8", "train.batch_size=128", "train.epochs=1", "train.max_steps=2",
        "train.progress=false", f"train.output={tmp_path}"])
    res = api.pretrain(cfg)
    assert res["steps"] == 2 and 0 < res["knn_top1"] <= 1 and 0 < res["linear_top1"] <= 1
    assert "cuda" not in load_checkpoint(tmp_path / "checkpoint.pt")["rng"]


def test_adamw_steps_on_cpu_leave_cuda_alone_with_torchs_arithmetic(monkeypatch):
    """torch's AdamW.step() initialises CUDA where it is available, even for CPU parameters (its graph-capture
    check asks the current CUDA stream); training.optim.AdamW skips that check for CPU parameters only."""
    from contrastive.config import OptimConfig
    from contrastive.optim.optimizers import AdamW, build_optimizer, param_groups

    def run(make_optimizer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        opt = make_optimizer(model)
        for step in range(3):
            model(torch.randn(8, 6, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return model.state_dict()

    cfg = OptimConfig(name="adamw", lr=0.01, weight_decay=0.05)
    theirs = run(lambda m: torch.optim.AdamW(param_groups(m, 0.05), lr=0.01, betas=tuple(cfg.betas)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", _no_cuda)
    with pytest.raises(AssertionError, match="CUDA was initialised"):  # what torch's own does here
        run(lambda m: torch.optim.AdamW(m.parameters()))
    ours = run(lambda m: build_optimizer(m, cfg, 0.01))
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    checked = []
    monkeypatch.setattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check", lambda o: checked.append(o))
    AdamW([nn.Parameter(torch.zeros(3, device="meta"))])._accelerator_graph_capture_health_check()
    AdamW([nn.Parameter(torch.zeros(3))])._accelerator_graph_capture_health_check()
    assert len(checked) == 1  # parameters off the CPU (meta standing in for a GPU) keep torch's check
