"""BYOL: the loss on the right pairs against a naive reference, no gradient into the target, the EMA update
with the scheduled τ, the heads of Sec. 3.3, the paper's asymmetric views, 2 views only, and exact resume."""

import math
import os

import pytest
import torch
from multiprocess import run_as_torchrun
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from contrastive import distributed
from contrastive.config import ViewConfig
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.losses import byol_loss
from contrastive.methods.base import Batch, StepInfo
from contrastive.methods.byol import BYOL, BYOLConfig
from contrastive.modalities.image.views import TensorViews, view_groups
from contrastive.nn.ema import momentum_at, momentum_copy
from contrastive.registry import lookup

N, C, S = 8, 3, 4  # images, channels, side of the toy views
STEP = StepInfo(step=3, epoch=0, total_steps=10)


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 16))


def _method(seed=0, **cfg) -> BYOL:
    torch.manual_seed(seed)
    return BYOL(_backbone(), 16, BYOLConfig(**{"hidden_dim": 32, "projection_dim": 8, **cfg}))


def _views(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, C, S, S, generator=g) for _ in range(2)]


def _batch(views):
    n = views[0].shape[0]
    return Batch(views=views, index=torch.arange(n), label=torch.full((n,), -1))


def _perturb_target(method: BYOL, seed=2) -> None:
    """Move the target away from the online network, as training does, so that a prediction compared with
    the online network's own projection would give another loss."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*method.target_backbone.parameters(), *method.target_projector.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _by_hand(method: BYOL, views):
    """p1, p2 (online predictions) and t1, t2 (target projections) from the method's modules, view by view."""
    with torch.no_grad():
        z1, z2 = (method.projector(method.backbone(x)) for x in views)
        p1, p2 = method.predictor(z1), method.predictor(z2)
        t1, t2 = (method.target_projector(method.target_backbone(x)) for x in views)
    return p1, p2, t1, t2


def _naive(p: torch.Tensor, z: torch.Tensor) -> float:
    """Eq. 2 with loops: the mean over rows of || p/|p| - z/|z| ||^2."""
    total = 0.0
    for a, b in zip(p.double().tolist(), z.double().tolist()):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
        total += sum((x / na - y / nb) ** 2 for x, y in zip(a, b))
    return total / len(p)


def test_loss_is_byol_loss_of_p1_with_target_z2_and_p2_with_target_z1():
    method = _method()
    _perturb_target(method)
    views = _views()
    out = method(_batch(views), step=STEP)
    p1, p2, t1, t2 = _by_hand(method, views)
    expected = _naive(p1, t2) + _naive(p2, t1)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(out.loss.detach(), byol_loss(p1, t2) + byol_loss(p2, t1))
    # the pairings a wrong forward would make give other values, so the check above tells them apart
    rolled = (t2.roll(1, 0), t1.roll(1, 0))  # another image's target
    for a, b, c, d in [(p1, t1, p2, t2), (p1, rolled[0], p2, rolled[1]), (p1, t2, p1, t2)]:
        assert abs(_naive(a, b) + _naive(c, d) - expected) > 1e-2
    # the online projection of view 1, detached, is what the collapse watch sees
    assert not out.embedding.requires_grad
    torch.testing.assert_close(out.embedding, method.projector(method.backbone(views[0])).detach())


def test_the_target_gets_no_gradient_and_forward_moves_no_weight():
    method = _method()
    before = {k: v.clone() for k, v in method.named_parameters()}
    method(_batch(_views()), step=STEP).loss.backward()
    target = [*method.target_backbone.parameters(), *method.target_projector.parameters()]
    assert target and all(not p.requires_grad and p.grad is None for p in target)
    online = [*method.backbone.parameters(), *method.projector.parameters(), *method.predictor.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    assert all(torch.equal(p, before[k]) for k, p in method.named_parameters())
    # the optimiser sees the online network only
    from contrastive.optim.optimizers import param_groups

    trained = {id(p) for g in param_groups(method, 1e-6) for p in g["params"]}
    assert trained == {id(p) for p in online}


def test_heads_are_the_papers_and_the_encoder_is_the_online_backbone():
    torch.manual_seed(0)
    method = BYOL(_backbone(), 16, BYOLConfig())
    for head in (method.projector, method.predictor):
        assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in [*method.projector, *method.predictor] if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 4096), (4096, 256), (256, 4096), (4096, 256)]
    assert method.encoder() is method.backbone and method.projection_head() is method.projector
    assert method.feature_dim == 16 and method.cfg.momentum == 0.996 and method.cfg.momentum_schedule == "cosine"
    # the target starts as a copy of the online network (ξ = θ)
    for a, b in zip(method.target_projector.state_dict().values(), method.projector.state_dict().values()):
        assert torch.equal(a, b)


def test_after_step_moves_the_target_by_the_ema_with_the_scheduled_tau():
    method = _method(momentum=0.9)  # a low τ_base makes a wrong τ visible in float32
    _perturb_target(method)
    target_before = {k: v.clone() for k, v in method.target_backbone.state_dict().items()}
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)  # as an optimiser step would
    online = method.backbone.state_dict()
    method.after_step({}, STEP)
    # the update after step k = 3 of K = 10 uses τ = 1 - (1 - 0.9) (cos(3π/10) + 1) / 2 (Sec. 3.2)
    tau = 1 - 0.1 * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert method.momentum(STEP) == pytest.approx(tau, abs=1e-15)
    # τ of the next step, 0.9345 for 0.9206, would put the weights off by far more than the tolerance
    wrong = method.momentum(StepInfo(step=4, epoch=0, total_steps=10))
    worst = 0.0
    for name, t in method.target_backbone.state_dict().items():
        if not t.is_floating_point():  # batch counts are copied
            assert torch.equal(t, online[name]), name
            continue
        expected = target_before[name].double() * tau + online[name].double() * (1 - tau)
        torch.testing.assert_close(t.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
        off = target_before[name].double() * wrong + online[name].double() * (1 - wrong)
        worst = max(worst, (t.double() - off).abs().max().item())
    assert worst > 1e-2
    # the predictor has no target; the schedule starts at τ_base and reaches 1 for the update after the last step
    assert [n for n, _ in method.named_children()] == ["backbone", "projector", "predictor", "target_backbone",
                                                       "target_projector"]
    assert momentum_at("cosine", 0.996, 0, 100) == 0.996 and momentum_at("cosine", 0.996, 100, 100) == 1.0
    assert method.momentum(StepInfo(step=0, epoch=0, total_steps=10)) == 0.9
    assert _method(momentum=0.9, momentum_schedule="constant").momentum(STEP) == 0.9


def test_default_views_are_the_papers_asymmetric_pair():
    """Table 6: both views crop (0.08, 1), flip 0.5, jitter (0.4, 0.4, 0.2, 0.1) at p 0.8, grey 0.2, blur sigma
    [0.1, 2]; blur p 1.0 and 0.1, solarise p 0 and 0.2."""
    spec = lookup("methods", "byol")
    groups = view_groups(ViewConfig(), 224, spec.view_groups)
    assert [(g.count, g.is_global) for g in groups] == [(1, True), (1, True)]
    for g in groups:
        v = g.view
        assert (v.size or 224) == 224 and v.crop_scale == [0.08, 1.0] and v.hflip_p == 0.5
        assert v.jitter == [0.4, 0.4, 0.2, 0.1] and v.jitter_p == 0.8 and v.grayscale_p == 0.2
        assert v.blur_sigma == [0.1, 2.0] and v.blur_kernel_frac == 0.1
    assert [(g.view.blur_p, g.view.solarize_p) for g in groups] == [(1.0, 0.0), (0.1, 0.2)]
    # the views they make come out in that order: the first is always blurred, so smoother than the second
    # when nothing else differs
    same = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "hflip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0}
    views = TensorViews(ViewConfig(**same), [0.5] * 3, [0.25] * 3, channels=3, in_size=224,
                        method_groups=spec.view_groups)
    assert views.n_global == 2
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 224, 224), generator=g, dtype=torch.uint8)
    v1, v2 = views(images, g)

    def roughness(x):  # mean squared difference of horizontal neighbours
        return (x[..., 1:] - x[..., :-1]).pow(2).mean().item()
    assert roughness(v1) < 0.5 * roughness(v2)


def test_three_views_are_refused_with_a_clear_config_error(tmp_path):
    from contrastive import api

    with pytest.raises(ConfigError, match="BYOL compares exactly 2 views per image.*views.groups"):
        _method()(_batch(_views() + _views(seed=3)[:1]), step=STEP)
    base = {"data": {"name": "digits", "image_size": 8}, "method": {"name": "byol", "hidden_dim": 16},
            "train": {"output": str(tmp_path), "progress": False, "epochs": 1}, "eval": {"enabled": False}}
    with pytest.raises(ConfigError, match=r"BYOL compares exactly 2 views per image \(t and t.\), got 3"):
        api.pretrain(resolve_config(tree={**base, "views": {"groups": [{"count": 3}]}}))
    with pytest.raises(ConfigError, match="views.n_views=3"):
        api.pretrain(resolve_config(tree={**base, "views": {"n_views": 3}}))


@pytest.mark.parametrize("field,value,match", [
    ("momentum_schedule", "linear", "method.momentum_schedule='linear'"),
    ("momentum", 1.5, "method.momentum=1.5 is out of range"),
    ("hidden_dim", 0, "method.hidden_dim=0"),
])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        BYOL(_backbone(), 16, BYOLConfig(**{field: value}))


# ------------------------------------------------------------------------------------------------------------
# exact resume through the trainer, on BYOL's default view groups

FAST = ["method.name=byol", "backbone.name=small_cnn", "data.image_size=8", "train.batch_size=128",
        "train.progress=false", "eval.enabled=false", "train.log_every=1", "views.crop_scale=[0.5,1.0]",
        "method.hidden_dim=32", "method.projection_dim=16", "train.epochs=2"]


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    from contrastive import api
    from contrastive.training.checkpoint import load_checkpoint

    def cfg(out, *extra):
        return resolve_config(tree={"data": {"name": "digits"}}, overrides=FAST + [f"train.output={out}", *extra])

    full = api.pretrain(cfg(tmp_path / "full"))
    assert full["steps"] == 22  # 1437 // 128 = 11 steps an epoch
    api.pretrain(cfg(tmp_path / "part", "train.max_steps=7"))  # stopped mid-epoch 1
    ckpt = tmp_path / "part" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["step"] == 7
    assert api.pretrain(cfg(tmp_path / "part", f"train.resume={ckpt}"))["steps"] == 22
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(ckpt)
    assert a["method"].keys() == b["method"].keys()
    assert any(k.startswith("target_backbone.") and "running_mean" in k for k in a["method"])
    for k in a["method"]:  # bitwise: online and target networks, predictor, batch-norm statistics
        assert torch.equal(a["method"][k], b["method"][k]), k
    # the optimiser's momentum too
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in s)
    # the target has moved away from its starting point, the online network, and from the online network itself
    assert not torch.equal(a["method"]["target_projector.0.weight"], a["method"]["projector.0.weight"])


# ------------------------------------------------------------------------------------------------------------
# two gloo processes, each with half the batch, against one process with all of it: a step and the target update


def _bn_free_method() -> BYOL:
    """BYOL without batch norm: BN normalises by the batch it sees (half the batch per process here, all of it
    in one), so with BN the two runs would be different computations (the recipe syncs BN across GPUs)."""
    torch.manual_seed(0)
    method = BYOL(nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, 24), nn.ReLU(), nn.Linear(24, 16)), 16,
                  BYOLConfig(hidden_dim=32, projection_dim=8, momentum=0.9))
    method.projector = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    method.predictor = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    method.target_backbone = momentum_copy(method.backbone)
    method.target_projector = momentum_copy(method.projector)
    _perturb_target(method)
    return method


def _step(model: nn.Module, method: BYOL, views) -> torch.Tensor:
    """One SGD step on ``views`` and the target update after it; returns the loss."""
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    loss = model(_batch(views), step=STEP).loss
    loss.backward()
    opt.step()
    method.after_step({}, STEP)
    return loss.detach()


def _byol_worker(out_dir: str) -> None:
    distributed.init_from_env(torch.device("cpu"))
    rank, world = distributed.rank(), distributed.world_size()
    n = N // world
    method = _bn_free_method()
    ddp = DistributedDataParallel(method, **method.ddp_options)
    loss = _step(ddp, method, [v[rank * n:(rank + 1) * n] for v in _views()])
    torch.save({"loss": loss, "state": method.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    run_as_torchrun(_byol_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    method = _bn_free_method()
    start = {k: v.clone() for k, v in method.state_dict().items()}
    loss = _step(method, method, _views())
    # the loss is a mean over images, so the mean of the half-batch losses is the whole batch's
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    for k, v in method.state_dict().items():  # online weights after DDP's averaged gradients, and the target
        for r in ranks:
            torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the step and the target update both moved something, so equality above is not equality of untouched weights
    assert not torch.allclose(method.state_dict()["target_projector.0.weight"], start["target_projector.0.weight"])
    assert not torch.allclose(method.state_dict()["predictor.0.weight"], start["predictor.0.weight"])
