"""MoCo v3: the loss against a naive reference, which views are paired, the heads of builder.py, the momentum
schedule and update, gradients only in the query encoder, 2 processes == 1, and exact resume."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from contrastive import distributed
from contrastive.losses import info_nce_batch
from contrastive.methods.base import Batch, BuildContext, StepInfo
from contrastive.methods.moco_v3 import MoCoV3, MoCoV3Config
from contrastive.nn.ema import momentum_at, momentum_copy

N, C, S = 8, 3, 4  # images, channels, side of the toy views
STEP = StepInfo(step=0, epoch=0, total_steps=10)


def _backbone(batch_norm: bool = True) -> nn.Module:
    norm = [nn.BatchNorm1d(24)] if batch_norm else []
    return nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, 24), *norm, nn.ReLU(), nn.Linear(24, 16))


def _method(temperature=0.5, seed=0, **cfg) -> MoCoV3:
    torch.manual_seed(seed)
    cfg = MoCoV3Config(temperature=temperature, hidden_dim=32, projection_dim=8, **cfg)
    return MoCoV3(_backbone(), 16, cfg)


def _views(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, C, S, S, generator=g) for _ in range(2)]


def _batch(views):
    n = views[0].shape[0]
    return Batch(views=views, index=torch.arange(n), label=torch.full((n,), -1))


def _perturb_keys(method: MoCoV3, seed=2) -> None:
    """Move the key encoder away from the query encoder, as training does, so that a query compared with its
    own encoder's key would give another loss."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*method.momentum_backbone.parameters(), *method.momentum_projector.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _naive_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> float:
    """ctr(q, k) of Algorithm 1 with explicit loops: each query's positive is the key of its own image, its
    negatives every other key; the mean of -log softmax, times 2 tau."""
    q, k = q.double().tolist(), k.double().tolist()

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for i in range(len(q)):
        logits = [cos(q[i], k[j]) / tau for j in range(len(k))]
        top = max(logits)
        log_denominator = top + math.log(sum(math.exp(v - top) for v in logits))
        total += log_denominator - logits[i]
    return 2 * tau * total / len(q)


def _by_hand(method: MoCoV3, views):
    """q1, q2, k1, k2 from the method's own modules, one view at a time."""
    x1, x2 = views
    with torch.no_grad():
        q1, q2 = (method.predictor(method.projector(method.backbone(x))) for x in (x1, x2))
        k1, k2 = (method.momentum_projector(method.momentum_backbone(x)) for x in (x1, x2))
    return q1, q2, k1, k2


def test_forward_loss_is_the_naive_symmetrised_loss_of_q1_with_k2_and_q2_with_k1():
    method = _method()
    _perturb_keys(method)
    views = _views()
    loss = method(_batch(views), step=STEP).loss
    q1, q2, k1, k2 = _by_hand(method, views)
    tau = 0.5
    expected = _naive_ctr(q1, k2, tau) + _naive_ctr(q2, k1, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(loss.detach(), info_nce_batch(q1, k2, tau) + info_nce_batch(q2, k1, tau))
    # the pairings a wrong forward would make give other values, so the check above tells them apart
    for wrong in [(q1, k1, q2, k2), (q1, k2, q1, k2), (q2, k1, q2, k1)]:
        a, b, c, d = wrong
        assert abs(_naive_ctr(a, b, tau) + _naive_ctr(c, d, tau) - expected) > 1e-3


def test_naive_reference_has_the_known_values_at_the_extremes():
    # keys equal to their queries and orthogonal to each other: every logit 0 but the positive's 1/tau
    q = torch.eye(4)
    tau = 0.5
    per_query = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3))
    assert _naive_ctr(q, q, tau) == pytest.approx(2 * tau * per_query)
    assert info_nce_batch(q, q, tau).item() == pytest.approx(2 * tau * per_query, rel=1e-6)


def test_heads_as_builder_py_for_a_convnet_and_a_vit():
    torch.manual_seed(0)
    convnet = MoCoV3(_backbone(), 16, MoCoV3Config())
    types = [type(m) for m in convnet.projector]
    assert types == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in convnet.predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]  # no last BN
    linears = [m for m in [*convnet.projector, *convnet.predictor] if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 4096), (4096, 256), (256, 4096), (4096, 256)]
    assert all(m.bias is None for m in linears)  # _build_mlp: every Linear without bias
    assert not convnet.projector[-1].affine  # the last BN has neither scale nor shift
    assert convnet.temperature == 1.0 and convnet.cfg.momentum == 0.99

    # a ViT backbone: 3-layer projector, a predictor that ends in BN, temperature 0.2
    pytest.importorskip("timm")
    ctx = BuildContext(input_shape=(3, 32, 32), dataset_size=64, num_classes=None, batch_size=8, world_size=1,
                       steps_per_epoch=8, epochs=1, backbone_section={"name": "vit_tiny", "patch_size": 4})
    from contrastive.methods.moco_v3 import _build

    with torch.device("meta"):
        vit = _build(ctx, MoCoV3Config())
    assert vit.feature_dim == 192 and vit.temperature == 0.2
    assert [m.out_features for m in vit.projector if isinstance(m, nn.Linear)] == [4096, 4096, 256]
    assert isinstance(vit.predictor[-1], nn.BatchNorm1d) and not vit.predictor[-1].affine
    assert all(m.bias is None for m in [*vit.projector, *vit.predictor] if isinstance(m, nn.Linear))
    # the fields given win over the architecture's defaults
    with torch.device("meta"):
        custom = _build(ctx, MoCoV3Config(temperature=0.5, projection_layers=2, predictor_last_bn=False))
    assert custom.temperature == 0.5 and not isinstance(custom.predictor[-1], nn.BatchNorm1d)
    assert len([m for m in custom.projector if isinstance(m, nn.Linear)]) == 2


def test_only_the_query_encoder_gets_gradients_and_is_the_encoder():
    method = _method()
    method(_batch(_views()), step=STEP).loss.backward()
    keys = [*method.momentum_backbone.parameters(), *method.momentum_projector.parameters()]
    assert keys and all(p.grad is None and not p.requires_grad for p in keys)
    queries = [*method.backbone.parameters(), *method.projector.parameters(), *method.predictor.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in queries)
    assert method.encoder() is method.backbone and method.feature_dim == 16


def test_momentum_update_after_one_step_and_schedule():
    method = _method()
    keys_before = {k: v.clone() for k, v in method.momentum_backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(_batch(_views()), step=STEP).loss.backward()
    opt.step()
    method.after_step({}, STEP)
    # the update that follows step 0 of 10 uses m = 1 - (1 - 0.99) (cos(pi / 10) + 1) / 2
    m = 1 - 0.01 * (math.cos(math.pi * 1 / 10) + 1) / 2
    assert method.momentum(STEP) == pytest.approx(m, abs=1e-15)
    query = dict(method.backbone.named_parameters())
    for name, k in method.momentum_backbone.named_parameters():
        if k.ndim > 1:  # the optimiser step moved the query's weights
            assert not torch.equal(query[name], keys_before[name])
        # float32 rounding apart (the update may fuse the multiply and the add): a wrong m, even the one of
        # the step before (0.99 instead of 0.99024), moves these weights by up to 1e-4
        expected = keys_before[name].double() * m + query[name].double() * (1 - m)
        torch.testing.assert_close(k.double(), expected, rtol=1e-6, atol=1e-8, msg=name)
    # the schedule: 0.99 at the start, rising by a half cosine, 1 for the update after the last step
    ms = [momentum_at("cosine", 0.99, s, 10) for s in range(11)]
    assert ms[0] == 0.99 and ms[-1] == 1.0 and ms[5] == pytest.approx(0.995)
    assert all(a < b for a, b in zip(ms, ms[1:]))
    last = StepInfo(step=9, epoch=0, total_steps=10)
    before = [p.clone() for p in method.momentum_projector.parameters()]
    method.after_step({}, last)  # m = 1: the keys stay where they are
    assert all(torch.equal(a, b) for a, b in zip(before, method.momentum_projector.parameters()))
    constant = _method(momentum_schedule="constant", momentum=0.9)
    assert constant.momentum(STEP) == 0.9 and constant.momentum(last) == 0.9


@pytest.mark.parametrize("field,value,match", [
    ("momentum_schedule", "linear", "method.momentum_schedule='linear'"),
    ("momentum", 1.5, "method.momentum=1.5 is out of range"),
    ("temperature", 0.0, "method.temperature=0.0 is out of range"),
    ("predictor_layers", 0, "each head needs at least 1 layer"),
])
def test_bad_config_names_the_field(field, value, match):
    from contrastive.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        MoCoV3(_backbone(), 16, MoCoV3Config(**{field: value}))


def test_three_views_are_refused():
    from contrastive.errors import ConfigError

    with pytest.raises(ConfigError, match="views.n_views=2"):
        _method()(_batch(_views() + _views(seed=3)[:1]), step=STEP)


# ------------------------------------------------------------------------------------------------------------
# two gloo processes, each with half the batch, against one process with all of it


def _bn_free_method() -> MoCoV3:
    """MoCo v3 with every batch norm left out: a BN layer normalises by the statistics of the batch it sees,
    which are the half batch in each process and the whole batch in one, so with BN the two runs are
    different computations (the official code syncs BN across GPUs; CPU processes cannot)."""
    torch.manual_seed(0)
    method = MoCoV3(_backbone(batch_norm=False), 16, MoCoV3Config(temperature=0.5, hidden_dim=32, projection_dim=8))
    method.projector = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    method.predictor = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    method.momentum_backbone = momentum_copy(method.backbone)
    method.momentum_projector = momentum_copy(method.projector)
    _perturb_keys(method)
    return method


def _grads(method: MoCoV3) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = N // world
        method = _bn_free_method()
        ddp = DistributedDataParallel(method, **method.ddp_options)
        views = [v[rank * n:(rank + 1) * n] for v in _views()]
        loss = ddp(_batch(views), step=STEP).loss
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": _grads(method)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    method = _bn_free_method()
    loss = method(_batch(_views()), step=STEP).loss
    loss.backward()
    # each rank's queries meet the keys of the whole batch (all-gathered): the mean of the per-rank losses
    # is the whole-batch loss, and DDP's averaged gradients are the single-process gradients
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    single = _grads(method)
    for res in ranks:
        assert res["grads"].keys() == single.keys()
        for name, g in single.items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
    # with half the keys per process and no gather, the loss would differ: the test can tell
    q1, q2, k1, k2 = _by_hand(method, _views())
    local = info_nce_batch(q1[:4], k2[:4], 0.5) + info_nce_batch(q2[:4], k1[:4], 0.5)
    assert abs(local.item() - ranks[0]["loss"].item()) > 1e-3


# ------------------------------------------------------------------------------------------------------------
# exact resume through the trainer

FAST = ["method.name=moco-v3", "backbone.name=small_cnn", "data.image_size=8", "train.batch_size=128",
        "train.progress=false", "eval.enabled=false", "train.log_every=1", "views.crop_scale=[0.5,1.0]",
        "method.hidden_dim=32", "method.projection_dim=16", "train.epochs=2"]


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    from contrastive import api
    from contrastive.configure import resolve_config
    from contrastive.training.checkpoint import load_checkpoint

    def cfg(out, *extra):
        return resolve_config(tree={"data": {"name": "digits"}}, overrides=FAST + [f"train.output={out}", *extra])

    full = api.pretrain(cfg(tmp_path / "full"))
    assert full["steps"] == 22  # 1437 // 128 = 11 steps an epoch
    api.pretrain(cfg(tmp_path / "part", "train.max_steps=7"))  # stopped mid-epoch 1
    ckpt = tmp_path / "part" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["step"] == 7
    assert api.pretrain(cfg(tmp_path / "part", f"train.resume={ckpt}"))["steps"] == 22
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["method"]
    b = load_checkpoint(ckpt)["method"]
    assert a.keys() == b.keys() and any(k.startswith("momentum_backbone.") for k in a)
    for k in a:  # bitwise: query and key encoders, heads, batch-norm statistics
        assert torch.equal(a[k], b[k]), k
    # the key encoder has moved away from its starting point, the query, and from the query itself
    assert not torch.equal(a["momentum_projector.0.weight"], a["projector.0.weight"])
