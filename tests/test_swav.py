"""SwAV: the loss from its parts, the prototypes (unit rows, frozen first), the queue, the paper's views,
resume, and two processes against one."""

import os

import pytest
import torch
import torch.nn.functional as F
from multiprocess import run_as_torchrun
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from contrastive import api, distributed
from contrastive.config import OptimConfig, ViewConfig
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.losses import sinkhorn, swav_loss
from contrastive.methods.base import Batch, StepInfo
from contrastive.methods.swav import SwAV, SwAVConfig, paper_views
from contrastive.modalities.image.views import TensorViews, view_groups
from contrastive.optim.optimizers import build_optimizer
from contrastive.training.checkpoint import load_checkpoint


def _swav(seed=0, batch_size=8, world_size=1, **kw):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    cfg = SwAVConfig(**{"hidden_dim": 16, "projection_dim": 8, "num_prototypes": 12, **kw})
    return SwAV(backbone, 8, cfg, batch_size=batch_size, world_size=world_size)


def _batch(n=8, seed=1, n_global=2, n_local=3):
    """2 global crops of 6 px, then local crops of 3 px."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 3, 6, 6, generator=g) for _ in range(n_global)]
    views += [torch.randn(n, 3, 3, 3, generator=g) for _ in range(n_local)]
    return Batch(views=views, index=torch.arange(n), label=torch.full((n,), -1), n_global=n_global)


def _info(step, steps_per_epoch=2, rank=0):
    return StepInfo(step=step, epoch=step // steps_per_epoch, total_steps=100, steps_per_epoch=steps_per_epoch,
                    epochs=100 // steps_per_epoch, seed=5, rank=rank)


def _by_hand(swav, batch):
    """The embeddings of every crop: the backbone on each size's crops together, the head on all at once."""
    g, loc = batch.views[:2], batch.views[2:]
    h = torch.cat([swav.backbone(torch.cat(g)), swav.backbone(torch.cat(loc))])
    return list(F.normalize(swav.projector(h), dim=1).split(batch.views[0].shape[0]))


def test_loss_is_swapped_prediction_of_the_global_crops_sinkhorn_codes():
    swav, batch = _swav(), _batch()
    out = swav(batch, step=_info(0))
    z = _by_hand(swav, batch)
    scores = [v @ swav.prototypes.weight.T for v in z]  # [n, K] per crop
    codes = [sinkhorn(scores[0], 0.05, 3), sinkhorn(scores[1], 0.05, 3)]
    torch.testing.assert_close(out.loss, swav_loss(scores, codes, 0.1))
    torch.testing.assert_close(out.updates["embeddings"], torch.stack(z[:2]).detach())
    torch.testing.assert_close(out.embedding, z[0].detach())
    assert out.loss.item() > 0.5
    # the test tells apart codes of other crops and a head run per crop (its batch norm sees one crop)
    assert not torch.allclose(out.loss, swav_loss(scores, [sinkhorn(scores[2]), sinkhorn(scores[3])], 0.1))
    per_crop = [F.normalize(swav.projector(swav.backbone(v)), dim=1) @ swav.prototypes.weight.T for v in batch.views]
    assert not torch.allclose(out.loss, swav_loss(per_crop, [sinkhorn(per_crop[0]), sinkhorn(per_crop[1])], 0.1))
    out.loss.backward()
    assert all(p.grad is not None for p in swav.parameters())


def test_forward_changes_no_state():
    swav, batch = _swav(queue_length=16, epoch_queue_starts=0), _batch()
    swav.after_step(swav(batch, step=_info(0)).updates, _info(0))
    before = {k: v.clone() for k, v in swav.state_dict().items() if "running" not in k and "tracked" not in k}
    swav(_batch(seed=2), step=_info(1))
    for k, v in before.items():
        assert torch.equal(swav.state_dict()[k], v), k


def test_prototypes_are_unit_rows_at_construction_and_after_every_step():
    swav = _swav()
    torch.testing.assert_close(swav.prototypes.weight.norm(dim=1), torch.ones(12))
    assert not torch.allclose(nn.Linear(8, 12, bias=False).weight.norm(dim=1), torch.ones(12), atol=1e-2)
    out = swav(_batch(), step=_info(0))
    with torch.no_grad():
        swav.prototypes.weight.mul_(torch.linspace(0.5, 3.0, 12).unsqueeze(1)).add_(0.1)  # as a step might
    moved = swav.prototypes.weight.detach().clone()
    swav.after_step(out.updates, _info(0))
    torch.testing.assert_close(swav.prototypes.weight, F.normalize(moved, dim=1), rtol=0, atol=1e-7)
    torch.testing.assert_close(swav.prototypes.weight.norm(dim=1), torch.ones(12))


def test_prototypes_stay_frozen_for_the_first_epoch_then_move():
    """Driven as the trainer drives it, with SGD and momentum: 2 steps an epoch, the prototypes frozen for 1 epoch."""
    swav = _swav(freeze_prototypes_epochs=1.0)
    optimizer = build_optimizer(swav, OptimConfig(name="sgd", weight_decay=1e-4), lr=0.5)
    start_w, start_b = swav.prototypes.weight.detach().clone(), swav.backbone[0].weight.detach().clone()
    for step in range(4):
        info = _info(step)
        out = swav(_batch(seed=step), step=info)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        assert swav.prototypes.weight.grad is not None  # the loss reaches them; the hook drops it
        swav.before_optimizer_step(info)
        optimizer.step()
        swav.after_step({k: v.detach() for k, v in out.updates.items()}, info)
        change = (swav.prototypes.weight - start_w).abs().max().item()
        if step < 2:
            assert change < 1e-6, step  # the re-normalisation of unit rows may move the last bit
            assert swav.prototypes.weight.grad is None and not optimizer.state[swav.prototypes.weight]
        else:
            assert change > 1e-3, step
    assert (swav.backbone[0].weight - start_b).abs().max().item() > 1e-3  # the rest trained all along
    torch.testing.assert_close(swav.prototypes.weight.norm(dim=1), torch.ones(12))


def test_freezing_counts_steps_of_the_run_not_epochs_done():
    swav = _swav(freeze_prototypes_epochs=0.5)
    for step, frozen in [(0, True), (1, True), (2, False), (7, False)]:
        swav.prototypes.weight.grad = torch.ones_like(swav.prototypes.weight)
        swav.before_optimizer_step(_info(step, steps_per_epoch=4))
        assert (swav.prototypes.weight.grad is None) == frozen, step


# ------------------------------------------------------------------------------------------------------------
# the queue


def test_queue_is_a_fixed_buffer_empty_until_its_epoch_then_filled_in_order():
    swav = _swav(queue_length=16, epoch_queue_starts=1)  # two global batches of 8 per crop
    assert swav.queue.shape == (2, 16, 8) and not swav.queue.any() and int(swav.queue_rows) == 0
    assert {"queue", "queue_rows"} <= set(swav.state_dict())
    out = swav(_batch(seed=0), step=_info(1))
    swav.after_step(out.updates, _info(1))  # epoch 0: not yet
    assert not swav.queue.any() and int(swav.queue_rows) == 0
    written = []
    for step in (2, 3, 4):  # epoch 1 on
        out = swav(_batch(seed=step), step=_info(step))
        swav.after_step(out.updates, _info(step))
        written.append(out.updates["embeddings"])
    # [A, n, d] at rows 0-7, then 8-15, then wrapped around onto 0-7
    torch.testing.assert_close(swav.queue[:, :8], written[2], rtol=0, atol=0)
    torch.testing.assert_close(swav.queue[:, 8:], written[1], rtol=0, atol=0)
    assert int(swav.queue_rows) == 24
    # strict loading of an empty queue into a filled one and back: the shapes never change
    _swav(queue_length=16, epoch_queue_starts=1).load_state_dict(swav.state_dict())


def test_queue_is_used_once_full_with_sinkhorn_over_queue_and_batch():
    swav = _swav(queue_length=16, epoch_queue_starts=0)
    batch, info = _batch(seed=9), _info(5)
    z = _by_hand(swav, batch)
    scores = [v @ swav.prototypes.weight.T for v in z]
    alone = [sinkhorn(s) for s in scores[:2]]
    swav.after_step(swav(_batch(seed=0), step=info).updates, info)  # half full: not used yet
    half = swav.codes(scores[:2], info)
    for c, a in zip(half, alone):
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    swav.after_step(swav(_batch(seed=1), step=info).updates, info)  # full
    assert int(swav.queue_rows) == 16
    full = swav.codes(scores[:2], info)
    for i in range(2):
        queued = swav.queue[i] @ swav.prototypes.weight.T  # [16, K]
        expected = sinkhorn(torch.cat([queued, scores[i]]), 0.05, 3)[16:]  # the batch's rows only
        torch.testing.assert_close(full[i], expected)
        assert not torch.allclose(full[i], alone[i], atol=1e-3)
        torch.testing.assert_close(full[i].sum(dim=1), torch.ones(8))
    # and forward uses them
    torch.testing.assert_close(swav(batch, step=info).loss, swav_loss(scores, full, 0.1))


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="method.queue_length=100 must be a multiple of train.batch_size=64"):
        _swav(queue_length=100, batch_size=64)
    with pytest.raises(ConfigError, match="method.queue_length=9 must be a multiple of the 2 processes"):
        _swav(queue_length=9, world_size=2, batch_size=None)
    with pytest.raises(ConfigError, match="method.epsilon=0"):
        _swav(epsilon=0)
    with pytest.raises(ConfigError, match="at least 2 views"):
        _swav()(_batch(n_global=1, n_local=0), step=_info(0))
    with pytest.raises(ConfigError, match="method.crops_for_assign=2 but the views have 1 global"):
        _swav()(_batch(n_global=1, n_local=2), step=_info(0))
    # one assigned global crop and local crops: fine (--crops_for_assign 0)
    assert torch.isfinite(_swav(crops_for_assign=1)(_batch(n_global=1, n_local=2), step=_info(0)).loss)


def test_paper_views_are_2x224_and_6x96_multi_crop():
    from contrastive.modalities.image.views import GROUP_FIELDS

    assert all(set(g) == {"count", "global", *GROUP_FIELDS} for g in paper_views(224))
    groups = view_groups(ViewConfig(), 224, paper_views)
    assert [(g.count, g.is_global, g.view.size) for g in groups] == [(2, True, 224), (6, False, 96)]
    glob, loc = groups[0].view, groups[1].view
    assert (glob.crop_scale, loc.crop_scale) == ([0.14, 1.0], [0.05, 0.14])
    for v in (glob, loc):
        assert (v.jitter_p, v.jitter_strength, v.jitter, v.grayscale_p, v.blur_p, v.hflip_p) == (
            0.8, 1.0, None, 0.2, 0.5, 0.5)
    # cv2's 23-tap kernel and sigma 0.1-2 px on every crop, as src/multicropdataset.py: same pixels at 96
    assert loc.blur_sigma[1] * 96 / 224 == pytest.approx(2.0) and int(loc.blur_kernel_frac * 96) in (22, 23)
    # a views field the paper's groups set is refused rather than ignored
    with pytest.raises(ConfigError, match="views.grayscale_p=0.0 would be ignored"):
        view_groups(ViewConfig(grayscale_p=0.0), 224, paper_views)
    views = TensorViews(ViewConfig(), [0.5] * 3, [0.25] * 3, 3, in_size=32, method_groups=paper_views)
    out = views(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert [v.shape[-1] for v in out] == [32, 32] + [14] * 6 and views.n_global == 2


# ------------------------------------------------------------------------------------------------------------
# end to end: resume with the queue on, and two processes against one

FAST = ["data.image_size=8", "train.batch_size=64", "train.progress=false", "train.log_every=1",
        "eval.enabled=false", "backbone.widths=[8,16]", "method.hidden_dim=32", "method.projection_dim=16",
        "method.num_prototypes=20", "method.queue_length=256", "method.epoch_queue_starts=1",
        "method.freeze_prototypes_epochs=0.5",
        "views.groups=[{count: 2, crop_scale: [0.5, 1.0], hflip_p: 0.0}, {count: 2, size: 4, global: false, "
        "crop_scale: [0.2, 0.5], hflip_p: 0.0}]"]


def _cfg(out, *extra):
    return resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "swav"}},
                          overrides=FAST + [f"train.output={out}", *extra])


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_with_the_queue_half_full_or_full_at_the_checkpoint(tmp_path):
    """22 steps an epoch; the queue (4 global batches) fills over steps 22-25 and is used from step 26: the
    checkpoints at step 24 (half full) and 30 (full and in use) resume to the uninterrupted run's state."""
    full = api.pretrain(_cfg(tmp_path / "full", "train.epochs=2"))
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert full["steps"] == 44 and int(a["method"]["queue_rows"]) == (44 - 22) * 64
    for stop, rows in [(24, 128), (30, 512)]:
        part = tmp_path / f"part{stop}"
        api.pretrain(_cfg(part, "train.epochs=2", f"train.max_steps={stop}"))
        assert int(load_checkpoint(part / "checkpoint.pt")["method"]["queue_rows"]) == rows
        resumed = api.pretrain(_cfg(part, "train.epochs=2", f"train.resume={part / 'checkpoint.pt'}"))
        assert resumed["steps"] == 44
        b = load_checkpoint(part / "checkpoint.pt")
        assert a["method"].keys() == b["method"].keys()
        for k in a["method"]:
            assert torch.equal(a["method"][k], b["method"][k]), (stop, k)


STEPS, GLOBAL_BATCH = 8, 16


def _steps(output: str) -> None:
    """8 steps, 2 an epoch, of the global batch of 16 split over the processes; the queue (2 global batches)
    fills at steps 2-3 and is used from step 4; prototypes frozen for steps 0-1. Batch norm runs in eval mode:
    CPU processes normalise by their own half of the batch (no SyncBatchNorm on gloo), which is not what is
    compared here. Saves each step's loss and codes over the global batch, and the final state."""
    distributed.init_from_env(torch.device("cpu"))
    world, rank = distributed.world_size(), distributed.rank()
    swav = _swav(queue_length=32, epoch_queue_starts=1, freeze_prototypes_epochs=1.0, batch_size=GLOBAL_BATCH,
                 world_size=world)
    for m in swav.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    model = DistributedDataParallel(swav) if world > 1 else swav
    optimizer = torch.optim.SGD(swav.parameters(), lr=0.05, momentum=0.9)
    per = GLOBAL_BATCH // world
    record = []
    for step in range(STEPS):
        info = _info(step, rank=rank)
        whole = _batch(n=GLOBAL_BATCH, seed=step)
        batch = Batch(views=[v[rank * per:(rank + 1) * per] for v in whole.views], index=whole.index[:per],
                      label=whole.label[:per], n_global=2)
        with torch.no_grad():  # the codes forward computes, again (forward changes no state), and without queue
            scores = [swav.prototypes(z) for z in swav.project(batch.views)[:2]]
            codes, alone = swav.codes(scores, info), [sinkhorn(s) for s in scores]
        out = model(batch, step=info)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        swav.before_optimizer_step(info)
        optimizer.step()
        swav.after_step({k: v.detach() for k, v in out.updates.items()}, info)
        record.append({"loss": distributed.all_reduce_mean(out.loss.detach()),
                       "codes": torch.stack([distributed.all_gather(c) for c in codes]),
                       "alone": torch.stack([distributed.all_gather(c) for c in alone])})
    if rank == 0:
        torch.save({"steps": record, "state": swav.state_dict()}, os.path.join(output, "swav.pt"))


@pytest.mark.slow
def test_two_processes_equal_one_codes_loss_and_queue(tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    run_as_torchrun(_steps, str(tmp_path / "ddp"))
    _steps(str(tmp_path / "single"))
    ddp, single = (torch.load(tmp_path / d / "swav.pt") for d in ("ddp", "single"))
    for step, (a, b) in enumerate(zip(ddp["steps"], single["steps"])):
        assert a["codes"].shape == b["codes"].shape == (2, GLOBAL_BATCH, 12)
        torch.testing.assert_close(a["codes"], b["codes"], rtol=0, atol=1e-6, msg=f"codes of step {step}")
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=1e-6, msg=f"loss of step {step}")
        # the queue is in use from step 4 on, and only then
        assert torch.allclose(b["codes"], b["alone"], atol=1e-4) == (step < 4), step
    assert int(ddp["state"]["queue_rows"]) == int(single["state"]["queue_rows"]) == (STEPS - 2) * GLOBAL_BATCH
    for k, v in single["state"].items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=0, atol=1e-6, msg=k)
    assert single["state"]["queue"].abs().min() > 0  # every row written


def test_recipes():
    from contrastive.methods import method_config
    from contrastive.trees import recipe_dir

    imagenet = resolve_config(recipe=recipe_dir() / "swav.yaml")
    m = method_config(imagenet)
    assert (m.num_prototypes, m.epsilon, m.temperature, m.sinkhorn_iterations, m.queue_length) == (
        3000, 0.05, 0.1, 3, 0)
    assert (imagenet.train.batch_size, imagenet.optim.name, imagenet.optim.lr_scaling) == (4096, "lars", "linear")
    assert imagenet.optim.lr * 4096 / 256 == pytest.approx(4.8)  # main_swav.py --base_lr 4.8
    assert imagenet.views.groups is None  # the paper's multi-crop: 2 x 224 + 6 x 96
    cifar = method_config(resolve_config(tree={"method": {"name": "swav"}, "data": {"name": "cifar10"}}))
    assert (cifar.queue_length, cifar.epoch_queue_starts, cifar.freeze_prototypes_epochs) == (3840, 50, 2)
