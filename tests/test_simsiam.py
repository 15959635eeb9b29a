"""SimSiam: the loss on the right pairs against a naive reference, the stop-gradient checked on parameter
gradients, the heads of builder.py, no state, and the predictor's learning rate fixed in a trainer run."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.losses import negative_cosine
from contrastive.methods.base import Batch, StepInfo
from contrastive.methods.simsiam import SimSiam, SimSiamConfig
from contrastive.modalities import modality_of

N, C, S = 8, 3, 4  # images, channels, side of the toy views
STEP = StepInfo(step=0, epoch=0, total_steps=10)


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 16))


def _method(seed=0, **cfg) -> SimSiam:
    torch.manual_seed(seed)
    cfg = SimSiamConfig(**{"projection_dim": 12, "hidden_dim": 20, "predictor_hidden_dim": 6, **cfg})
    return SimSiam(_backbone(), 16, cfg)


def _views(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, C, S, S, generator=g) for _ in range(2)]


def _batch(views):
    n = views[0].shape[0]
    return Batch(views=views, index=torch.arange(n), label=torch.full((n,), -1))


def _naive_d(p: torch.Tensor, z: torch.Tensor) -> float:
    """D(p, z) of Algorithm 1 with loops: minus the mean cosine of the rows."""
    total = 0.0
    for a, b in zip(p.double().tolist(), z.double().tolist()):
        total += sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return -total / len(p)


def test_loss_is_half_d_of_p1_with_z2_plus_half_d_of_p2_with_z1():
    method = _method()
    views = _views()
    out = method(_batch(views), step=STEP)
    with torch.no_grad():
        z1, z2 = (method.projector(method.backbone(x)) for x in views)
        p1, p2 = method.predictor(z1), method.predictor(z2)
    expected = _naive_d(p1, z2) / 2 + _naive_d(p2, z1) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(out.loss.detach(), negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2)
    # the pairings a wrong forward would make give other values
    for a, b, c, d in [(p1, z1, p2, z2), (p1, z2.roll(1, 0), p2, z1.roll(1, 0)), (p1, z2, p1, z2)]:
        assert abs(_naive_d(a, b) / 2 + _naive_d(c, d) / 2 - expected) > 1e-2
    assert -1 <= out.loss.item() <= 1
    torch.testing.assert_close(out.embedding, z1)  # the projection, detached, for the collapse watch
    assert not out.embedding.requires_grad


def _grads(method: SimSiam, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in method.named_parameters() if p.requires_grad])
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))


def test_no_gradient_passes_through_the_stop_gradient_branch():
    """The parameter gradients equal those of a loss whose targets z are constants computed beforehand, and
    differ from those of the same loss without the stop-gradient."""
    method = _method()
    views = _views()
    with torch.no_grad():  # z1, z2 as constants; batch norm normalises by the batch, so they are the forward's
        c1, c2 = (method.projector(method.backbone(x)).clone() for x in views)
    got = _grads(method, method(_batch(views), step=STEP).loss)

    def explicit(stop: bool) -> torch.Tensor:
        z1, z2 = (method.projector(method.backbone(x)) for x in views)
        t1, t2 = (c1, c2) if stop else (z1, z2)
        p1, p2 = method.predictor(z1), method.predictor(z2)
        return -(F.cosine_similarity(p1, t2).mean() + F.cosine_similarity(p2, t1).mean()) / 2

    constant, through = _grads(method, explicit(True)), _grads(method, explicit(False))
    assert got.keys() == constant.keys() and all(g is not None for g in got.values())
    for name, g in got.items():
        torch.testing.assert_close(g, constant[name], rtol=1e-5, atol=1e-7, msg=name)
    # without the stop-gradient the encoder would get other gradients, the predictor the same ones
    encoder = [n for n in got if not n.startswith("predictor.")]
    flat = {k: torch.cat([g[n].flatten() for n in encoder]) for k, g in (("got", got), ("through", through))}
    assert (flat["got"] - flat["through"]).norm() > 0.1 * flat["got"].norm()
    for name in got.keys() - set(encoder):
        torch.testing.assert_close(got[name], through[name], rtol=1e-5, atol=1e-7, msg=name)


def test_heads_as_builder_py():
    torch.manual_seed(0)
    method = SimSiam(_backbone(), 16, SimSiamConfig())
    assert [type(m) for m in method.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    proj = [m for m in method.projector if isinstance(m, nn.Linear)]
    # the hidden width is the backbone's feature dimension (prev_dim); the output 2048
    assert [(m.in_features, m.out_features) for m in proj] == [(16, 16), (16, 16), (16, 2048)]
    assert all(m.bias is None for m in proj)  # every Linear is followed by BN
    assert not method.projector[-1].affine  # BatchNorm1d(dim, affine=False) after the last layer
    assert all(b.affine for b in method.projector if isinstance(b, nn.BatchNorm1d) and b is not method.projector[-1])
    assert [type(m) for m in method.predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    first, last = method.predictor[0], method.predictor[-1]
    assert (first.in_features, first.out_features, last.out_features) == (2048, 512, 2048)
    assert first.bias is None and last.bias is not None
    assert method.encoder() is method.backbone and method.projection_head() is method.projector
    cifar = SimSiam(_backbone(), 16, SimSiamConfig(projection_layers=2, hidden_dim=2048))
    assert [m.out_features for m in cifar.projector if isinstance(m, nn.Linear)] == [2048, 2048]


def test_no_state_besides_weights_and_batch_norm_and_after_step_changes_nothing():
    method = _method()
    assert {n.split(".")[0] for n, _ in method.named_children()} == {"backbone", "projector", "predictor"}
    buffers = [n for n, _ in method.named_buffers()]
    assert all(n.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for n in buffers)
    out = method(_batch(_views()), step=STEP)
    assert out.updates == {}
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.after_step(out.updates, STEP)
    assert all(torch.equal(v, before[k]) for k, v in method.state_dict().items())


def test_param_groups_tag_the_predictor_fixed_lr():
    method = _method()
    groups = {g["name"]: g for g in method.param_groups()}
    assert set(groups) == {"encoder", "predictor"} and groups["predictor"]["fixed_lr"] is True
    assert not groups["encoder"].get("fixed_lr", False)
    assert {id(p) for p in groups["predictor"]["params"]} == {id(p) for p in method.predictor.parameters()}
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in method.parameters()) and len(every) == len(set(every))
    unfixed = {g["name"]: g for g in _method(fix_predictor_lr=False).param_groups()}
    assert unfixed["predictor"]["fixed_lr"] is False


def test_three_views_are_refused():
    with pytest.raises(ConfigError, match="views.n_views=2"):
        _method()(_batch(_views() + _views(seed=3)[:1]), step=STEP)
    with pytest.raises(ConfigError, match="method.projection_layers=0"):
        _method(projection_layers=0)


@pytest.mark.slow
def test_the_predictor_lr_stays_fixed_while_the_rest_follows_the_schedule(tmp_path):
    from contrastive import api
    from contrastive.modalities import load_splits
    from contrastive.optim.schedules import lr_at
    from contrastive.training.trainer import Trainer

    cfg = resolve_config(tree={"data": {"name": "digits"}}, overrides=[
        "method.name=simsiam", "data.image_size=8", "train.batch_size=128", "train.epochs=2", "train.max_steps=9",
        "train.progress=false", "eval.enabled=false", "method.projection_dim=16", "method.predictor_hidden_dim=4",
        "optim.name=sgd", "optim.lr=0.05", "optim.lr_scaling=linear", "optim.warmup_epochs=0.5",
        f"train.output={tmp_path}"])
    data = load_splits(cfg.data).pretrain
    torch.manual_seed(0)
    method = api.build_method(cfg, modality_of(data).context(cfg, data))
    trainer = Trainer(cfg, method, data, tmp_path)
    seen = []  # (step, {group name: [lr of its sub-groups]}) as the optimiser used them
    after_step = method.after_step

    def record(updates, step):
        lrs = {}
        for g in trainer.optimizer.param_groups:
            lrs.setdefault(g["name"], []).append(g["lr"])
        seen.append((step.step, lrs))
        after_step(updates, step)
    method.after_step = record
    trainer.fit()
    peak = 0.05 * 128 / 256
    assert [s for s, _ in seen] == list(range(9))
    predictor = {id(p) for g in trainer.optimizer.param_groups if g["name"] == "predictor" for p in g["params"]}
    assert predictor == {id(p) for p in method.predictor.parameters()}
    scheduled = []
    for step, lrs in seen:
        assert lrs["predictor"] == [peak, peak]  # weights and biases/norms alike, warm-up included
        expected = lr_at(step, total_steps=22, steps_per_epoch=11, optim=cfg.optim, peak=peak)
        assert lrs["encoder"] == [expected, expected]
        scheduled.append(expected)
    # the schedule moves: 6 warm-up steps up to the peak, which the encoder reaches at step 5 only, then the cosine
    assert scheduled[0] == pytest.approx(peak / 6) and scheduled[5] == pytest.approx(peak)
    assert all(a < b for a, b in zip(scheduled[:6], scheduled[1:6])) and scheduled[5] > scheduled[6] > scheduled[8]
