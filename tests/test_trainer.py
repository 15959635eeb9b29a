"""Training state: exact resume, checkpoint contents, the non-finite stop."""

import pytest
import torch

from contrastive import api
from contrastive.configure import resolve_config
from contrastive.errors import CheckpointError, ConfigError, NonFiniteLossError
from contrastive.modalities import modality_of
from contrastive.modalities.image import IMAGE
from contrastive.training.checkpoint import load_checkpoint
from contrastive.training.trainer import epoch_batches

FAST = ["data.image_size=16", "backbone.name=small_cnn", "train.batch_size=128", "train.progress=false",
        "eval.enabled=false", "train.log_every=1", "views.crop_scale=[0.5,1.0]", "method.projection_dim=16"]


def _cfg(tmp, *extra):
    return resolve_config(tree={"data": {"name": "digits"}}, overrides=FAST + [f"train.output={tmp}", *extra])


def _weights(path):
    return load_checkpoint(path)["method"]


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    # digits train split: 1437 images -> 11 steps an epoch at batch 128; 3 epochs = 33 steps
    full = api.pretrain(_cfg(tmp_path / "full", "train.epochs=3"))
    assert full["steps"] == 33
    # stop mid-epoch 2 (step 15), as a killed run would have left its last checkpoint
    part = api.pretrain(_cfg(tmp_path / "part", "train.epochs=3", "train.max_steps=15"))
    assert part["steps"] == 15 and part["stopped_early"] == "train.max_steps=15"
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 15)
    ckpt_path = tmp_path / "part" / "checkpoint.pt"
    resumed = api.pretrain(_cfg(tmp_path / "part", "train.epochs=3", f"train.resume={ckpt_path}"))
    assert resumed["steps"] == 33
    a, b = _weights(tmp_path / "full" / "checkpoint.pt"), _weights(tmp_path / "part" / "checkpoint.pt")
    assert a.keys() == b.keys()
    for k in a:  # bitwise, weights and buffers (batch-norm statistics included)
        assert torch.equal(a[k], b[k]), k
    # the resumed run's log continues the interrupted one: every step once
    steps = [int(line.split(",")[1]) for line in (tmp_path / "part" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 34))
    opt_a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["optimizer"]["state"]
    for k in opt_a:
        for name in opt_a[k]:
            assert torch.equal(torch.as_tensor(opt_a[k][name]), torch.as_tensor(opt_b[k][name]))


def test_checkpoint_holds_every_piece_of_state(tmp_path):
    api.pretrain(_cfg(tmp_path, "train.epochs=1", "train.max_steps=2"))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert {"config", "epoch", "step", "method", "optimizer", "scaler", "rng", "preprocess"} <= set(ckpt)
    assert ckpt["preprocess"]["size"] == 16 and ckpt["preprocess"]["channels"] == 1
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_resume_with_another_config_is_refused(tmp_path):
    api.pretrain(_cfg(tmp_path / "a", "train.epochs=1", "train.max_steps=1"))
    with pytest.raises(CheckpointError, match="optim"):
        api.pretrain(_cfg(tmp_path / "a", "train.epochs=1", "optim.lr=0.5",
                          f"train.resume={tmp_path / 'a' / 'checkpoint.pt'}"))


def test_non_finite_loss_stops_with_advice(tmp_path):
    with pytest.raises(NonFiniteLossError, match="Lower optim.lr"):
        api.pretrain(_cfg(tmp_path, "train.epochs=2", "optim.name=sgd", "optim.lr=1.0e30",
                          "optim.warmup_epochs=0"))


def test_batch_larger_than_dataset_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size=4096 is larger than the dataset"):
        api.pretrain(_cfg(tmp_path, "train.batch_size=4096"))


def test_epoch_batches_are_seeded_full_and_disjoint():
    a = epoch_batches(100, 32, seed=0, epoch=0)
    assert len(a) == 3 and all(len(b) == 32 for b in a)
    flat = [i for b in a for i in b]
    assert len(set(flat)) == 96
    assert a == epoch_batches(100, 32, seed=0, epoch=0)
    assert a != epoch_batches(100, 32, seed=0, epoch=1)


def _fit(cfg):
    """Build and train through the Trainer directly, returning it (gradients of the last step kept)."""
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    data = load_splits(cfg.data).pretrain
    torch.manual_seed(cfg.seed)
    method = api.build_method(cfg, modality_of(data).context(cfg, data))
    trainer = Trainer(cfg, method, data, cfg.train.output)
    trainer.fit()
    return trainer


def test_gradient_clipping_bounds_the_global_norm(tmp_path):
    trainer = _fit(_cfg(tmp_path, "train.epochs=1", "train.max_steps=1", "optim.grad_clip=0.01"))
    grads = [p.grad for p in trainer.method.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    # an unclipped SimCLR gradient is far larger than 0.01, so clipping scales it to exactly the bound
    assert norm.item() == pytest.approx(0.01, rel=1e-4)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    trainer = _fit(_cfg(tmp_path, "train.epochs=1", "train.max_steps=2", "train.precision=bf16"))
    assert trainer.amp_dtype == torch.bfloat16 and trainer.step == 2
    assert all(torch.isfinite(p).all() for p in trainer.method.parameters())


def test_fp16_without_cuda_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA device"):
        _fit(_cfg(tmp_path, "train.epochs=1", "train.precision=fp16"))


def test_sync_batchnorm_on_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.sync_batchnorm=true needs CUDA"):
        _fit(_cfg(tmp_path, "train.epochs=1", "train.sync_batchnorm=true"))


def test_pil_backend_trains_through_the_loader(tmp_path):
    trainer = _fit(_cfg(tmp_path, "train.epochs=1", "train.max_steps=2", "views.backend=pil", "data.num_workers=0"))
    assert trainer.step == 2
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3  # header + a row per step


@pytest.mark.parametrize("backend", ["tensor", "pil"])
def test_streaming_folder_skips_and_counts_corrupt_images(tmp_path, caplog, backend):
    import numpy as np
    from PIL import Image

    root = tmp_path / "imgs"
    for side, count in (("train", 8), ("test", 2)):
        for cls in ("a", "b"):
            (root / side / cls).mkdir(parents=True)
            for i in range(count - (side == "train" and cls == "b")):
                Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(root / side / cls / f"{i}.png")
    (root / "train" / "a" / "9.png").write_bytes(b"not an image")
    cfg = resolve_config(tree={"data": {"name": str(root)}}, overrides=[
        "data.in_memory=false", "data.skip_corrupt=true", "data.num_workers=0", "data.image_size=8",
        "backbone.name=small_cnn", "train.batch_size=4", "train.epochs=1", "train.progress=false",
        "eval.enabled=false", "method.projection_dim=8", f"views.backend={backend}",
        f"train.output={tmp_path / 'run'}"])
    with caplog.at_level("WARNING", logger="contrastive.train"):
        trainer = _fit(cfg)
    # train/ holds 16 files (one corrupt): 4 full batches cover every file once; the corrupt one's batch
    # trains on its 3 readable images
    assert trainer.step == 4 and trainer.skipped_images == 1
    assert "skipped 1 unreadable image" in caplog.text


def test_resume_at_max_steps_trains_no_further(tmp_path):
    api.pretrain(_cfg(tmp_path, "train.epochs=2", "train.max_steps=3"))
    again = api.pretrain(_cfg(tmp_path, "train.epochs=2", "train.max_steps=3",
                              f"train.resume={tmp_path / 'checkpoint.pt'}"))
    assert again["steps"] == 3


def test_max_steps_on_an_epoch_end_counts_the_epoch(tmp_path):
    res = api.pretrain(_cfg(tmp_path, "train.epochs=3", "train.max_steps=11"))  # 11 steps = 1 epoch
    assert (res["steps"], res["epochs"]) == (11, 1)


def test_resume_with_another_split_is_refused(tmp_path):
    api.pretrain(_cfg(tmp_path, "train.epochs=1", "train.max_steps=1"))
    with pytest.raises(CheckpointError, match="data was"):
        api.pretrain(_cfg(tmp_path, "train.epochs=1", "data.split_seed=7",
                          f"train.resume={tmp_path / 'checkpoint.pt'}"))


def test_nt_xent_runs_in_fp32_under_autocast():
    from contrastive.losses import nt_xent

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = nt_xent(z1, z2, 0.1)
    assert under.dtype == torch.float32
    assert under.item() == nt_xent(z1, z2, 0.1).item()


# ---------------------------------------------------------------------------------------------------
# trainer glue: the logged learning rate, bf16 autocast, the per-rank view seed, the memory check, the ETA


def _metrics(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("scaling, peak", [("linear", 0.6 * 128 / 256), ("sqrt", 0.6 * 128 ** 0.5)])
def test_logged_learning_rate_is_the_scaled_warmup_cosine_schedule(tmp_path, caplog, scaling, peak):
    """digits' 1437 images at batch 128: 11 steps an epoch, 33 in 3 epochs, 11 of warm-up. Written out here:
    warm-up lr (k + 1) / 11 * peak, then half a cosine from the peak at step 11 to 0 at step 32."""
    import math

    steps = 20 if scaling == "linear" else 3
    with caplog.at_level("INFO", logger="contrastive.train"):
        _fit(_cfg(tmp_path, "train.epochs=3", "optim.lr=0.6", f"optim.lr_scaling={scaling}", "optim.warmup_epochs=1",
                  f"train.max_steps={steps}", "optim.name=sgd"))
    rows = _metrics(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    for k, row in enumerate(rows):  # the row of step k + 1 logs the lr step k trained with
        expected = peak * (k + 1) / 11 if k < 11 else peak * 0.5 * (1 + math.cos(math.pi * (k - 11) / 21))
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-12), k
    if steps > 11:  # the time estimate follows the first 10 measured steps (the first step is not measured)
        assert "expected time: " in caplog.text and "images/s over steps 2-11: the run's 20 steps take" in caplog.text


@pytest.mark.parametrize("warmup, warned", [(3, True), (5, True), (2.9, False), (0, False)])
def test_a_warm_up_as_long_as_the_run_is_named(tmp_path, caplog, warmup, warned):
    with caplog.at_level("WARNING", logger="contrastive.train"):
        _fit(_cfg(tmp_path, "train.epochs=3", f"optim.warmup_epochs={warmup}", "train.max_steps=1"))
    said = f"optim.warmup_epochs={warmup:g} is as long as the run (train.epochs=3)" in caplog.text
    assert said == warned and ("set optim.warmup_epochs below 3, e.g. 0.3" in caplog.text) == warned


def test_bf16_autocast_runs_the_backbone_in_bf16_with_fp32_weights(tmp_path):
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    losses, dtypes = {}, {}
    for precision in ("bf16", "fp32"):
        cfg = _cfg(tmp_path / precision, "train.epochs=1", "train.max_steps=1", f"train.precision={precision}")
        data = load_splits(cfg.data).pretrain
        torch.manual_seed(cfg.seed)
        method = api.build_method(cfg, modality_of(data).context(cfg, data))
        conv = next(m for m in method.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o, p=precision: dtypes.update({p: o.dtype}))
        trainer = Trainer(cfg, method, data, cfg.train.output)
        trainer.fit()
        losses[precision] = float(_metrics(tmp_path / precision / "metrics.csv")[0]["loss"])
        assert all(p.dtype == torch.float32 for p in trainer.method.parameters())
    assert dtypes == {"bf16": torch.bfloat16, "fp32": torch.float32}
    # the same step in lower precision: close to the fp32 loss, not equal to it
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_views_are_seeded_per_step_and_rank(tmp_path, monkeypatch):
    from contrastive.methods.base import step_seed
    from contrastive.modalities import load_splits
    from contrastive.training import trainer as trainer_module

    cfg = _cfg(tmp_path, "train.epochs=1", "train.channels_last=false")
    data = load_splits(cfg.data).pretrain
    trainer = trainer_module.Trainer(cfg, api.build_method(cfg, modality_of(data).context(cfg, data)), data, tmp_path)
    images, index = data.samples[:8], torch.arange(8)
    views = {}
    for rank in (0, 1):
        monkeypatch.setattr(trainer_module.distributed, "rank", lambda r=rank: r)
        for step in (5, 6):
            trainer.step = step
            views[rank, step] = trainer._batch(images, index, data.labels[:8]).views[0]
            expected = trainer.views(images, torch.Generator().manual_seed(step_seed(cfg.seed, step, rank)))[0]
            assert torch.equal(views[rank, step], expected)
    assert not torch.equal(views[0, 5], views[1, 5]) and not torch.equal(views[0, 5], views[0, 6])


def _trainer(cfg):
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    data = load_splits(cfg.data).pretrain
    torch.manual_seed(cfg.seed)
    return Trainer(cfg, api.build_method(cfg, modality_of(data).context(cfg, data)), data, cfg.train.output)


def test_memory_check_refuses_a_batch_that_cannot_fit_and_names_one_that_does(tmp_path, monkeypatch):
    import re

    from contrastive.training import budget

    trainer = _trainer(_cfg(tmp_path, "train.epochs=1"))
    before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    rng = torch.get_rng_state()
    trial = IMAGE.shape_trial(trainer.cfg, 1, 16, torch.device("cpu"))  # two views of 16 px
    memory = budget.measure_step(trainer.method, trial, device=torch.device("cpu"), amp_dtype=None,
                                 step=trainer.step_info())
    assert memory.per_image > 0 and memory.per_pair > 0  # NT-Xent's [2n, 2n] logits grow with n^2
    # an artificially small machine: room for about 50 of the 128 images of a step
    free = memory.need(50) / budget.HEADROOM
    monkeypatch.setattr(budget, "available_memory", lambda device: (free, "a test's limit"))
    with pytest.raises(ConfigError, match=r"train.batch_size=128 does not fit in memory") as e:
        api.pretrain(_cfg(tmp_path, "train.epochs=1"))
    named = int(re.search(r"the largest batch that fits is (\d+)", str(e.value)).group(1))
    assert named == 50 and "--batch-size 50" in str(e.value)
    assert not (tmp_path / "checkpoint.pt").exists()  # stopped before the first step
    budget.check_step_fits(memory, batch_size=named, world_size=1, device=torch.device("cpu"), what="x")
    with pytest.raises(ConfigError):
        budget.check_step_fits(memory, batch_size=named + 1, world_size=1, device=torch.device("cpu"), what="x")
    # the trial steps left the method (batch-norm statistics included) and the generator as they were
    assert all(torch.equal(before[k], v) for k, v in trainer.method.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    # the check can be turned off
    monkeypatch.setattr(budget, "available_memory", lambda device: (1, "nothing"))
    api.pretrain(_cfg(tmp_path, "train.epochs=1", "train.max_steps=1", "train.memory_check=false"))


def test_step_memory_counts_saved_tensors_exactly():
    """A method whose forward saves a known amount: its view [n, D] (for the weight's gradient), x = w * view
    (for x x^T) and the exp of the [n, n] product. Bytes: 2 * 4 n D (linear) and 4 n^2 (quadratic), times
    the backward factor."""
    from contrastive.methods.base import Method, StepInfo, StepOutput
    from contrastive.training import budget

    class Toy(Method):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, batch, *, step):
            x = batch.views[0].flatten(1) * self.w  # [n, D]
            return StepOutput(loss=(x @ x.T / x.shape[1]).exp().mean())  # [n, n]

    from contrastive.modalities import Trial

    d = 3 * 5 * 5
    trial = Trial(lambda n, g: [torch.randn(n, 3, 5, 5, generator=g)], 2 * 4 * d, "5 px views", 1)
    mem = budget.measure_step(Toy(), trial, device=torch.device("cpu"), amp_dtype=None,
                              step=StepInfo(step=0, epoch=0, total_steps=1))
    assert mem.per_pair == budget.BACKWARD_FACTOR * 4
    assert mem.per_image == budget.BACKWARD_FACTOR * 2 * 4 * d + 2 * 4 * d  # saved, plus the view and its source
    assert mem.fixed == 3 * 4  # the weight's gradient and two optimiser slots
    assert mem.largest_batch(mem.need(37)) == 37 and mem.largest_batch(mem.need(37) - 1) == 36


def test_time_estimate_after_the_first_steps(monkeypatch):
    from contrastive.training import budget

    clock = iter([0.0, 2.0, 4.0, 6.0, 8.0])
    monkeypatch.setattr(budget.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(budget.TimeEstimate, "STEPS", 3)
    est = budget.TimeEstimate(start_step=100, end_step=1300, batch_size=64)
    # step 101 starts the measure; steps 102-104 take 2 s each: 32 images/s, 1200 steps take 40 min
    assert [est.tick(s) for s in (101, 102, 103)] == [None, None, None]
    text = est.tick(104)
    assert text.startswith("32 images/s over steps 102-104: the run's 1,200 steps take about 40 min 00 s, "
                           "39 min 52 s from now")
    assert est.tick(105) is None  # once


@pytest.mark.parametrize("method, batch, match", [
    ("simclr", 1, r"train.batch_size=1: simclr needs at least 2 samples a step \(min_batch"),
    ("invaspread", 1, r"invaspread needs at least 2 samples"),
    ("supcon", 1, r"supcon needs at least 2 samples"),
    ("byol", 1, r"leaves 1 sample\(s\) to each, and batch norm .* needs at least 2"),
    ("simsiam", 1, r"batch norm .* needs at least 2")])
def test_a_batch_too_small_to_learn_from_is_refused_naming_the_method_and_field(tmp_path, method, batch, match):
    cfg = resolve_config(tree={"method": {"name": method}, "data": {"name": "digits"}},
                         overrides=[f"train.batch_size={batch}", f"train.output={tmp_path}", "train.epochs=1",
                                    "eval.enabled=false", "train.progress=false"])
    with pytest.raises(ConfigError, match=match):
        api.pretrain(cfg)
