import copy
import math

import pytest
import torch
from torch import nn

from contrastive.config import OptimConfig
from contrastive.errors import ConfigError
from contrastive.optim.lars import LARS
from contrastive.optim.optimizers import build_optimizer, param_groups
from contrastive.optim.schedules import cosine, lr_at, scaled_lr, warmup_cosine, warmup_step

# --------------------------------------------------------------------------------------------------
# schedules: 10 warm-up steps, then a 91-step cosine (steps 10..100) whose middle is step 55


def test_warmup_cosine_exact_values():
    lr = lambda s: warmup_cosine(s, total_steps=101, warmup_steps=10, base=1.0, final=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)  # base * 1 / 10: the first update already moves
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)  # end of warm-up
    assert lr(10) == pytest.approx(1.0)  # start of the cosine
    assert lr(55) == pytest.approx(0.55)  # middle of the cosine: (base + final) / 2
    assert lr(100) == 0.1  # last step: exactly final
    assert lr(150) == 0.1


def test_warmup_cosine_is_monotone_after_warmup():
    values = [warmup_cosine(s, 101, 10, 1.0, 0.0) for s in range(10, 101)]
    assert all(a > b for a, b in zip(values, values[1:]))
    warm = [warmup_cosine(s, 101, 10, 1.0, 0.0) for s in range(10)]
    assert all(a < b for a, b in zip(warm, warm[1:]))


def test_warmup_cosine_edge_cases():
    assert warmup_cosine(0, 50, 0, 2.0, 0.0) == 2.0  # no warm-up: starts at base
    assert warmup_cosine(49, 50, 0, 2.0, 0.0) == 0.0
    assert warmup_cosine(4, 5, 5, 2.0, 0.0) == pytest.approx(2.0)  # warm-up only


def test_cosine():
    assert cosine(0, 11, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine(5, 11, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine(10, 11, 0.996, 1.0) == 1.0
    assert cosine(0, 1, 0.996, 1.0) == 1.0


def test_step_schedule_multiplies_by_gamma_at_each_milestone():
    # MoCo v1 / InstDisc: lr 0.03, x0.1 at epochs 120 and 160; 10 steps an epoch, no warm-up
    cfg = OptimConfig(lr=0.03, schedule="step", milestones=[120, 160], gamma=0.1, warmup_epochs=0)
    lr = lambda s: lr_at(s, total_steps=2000, steps_per_epoch=10, optim=cfg, peak=0.03)  # noqa: E731
    assert [lr(0), lr(1199)] == [0.03, 0.03]
    assert lr(1200) == pytest.approx(0.003) and lr(1599) == pytest.approx(0.003)
    assert lr(1600) == pytest.approx(0.0003) and lr(1999) == pytest.approx(0.0003)
    assert warmup_step(4, 10, 1.0, [20], 0.1) == pytest.approx(0.5)  # warm-up as warmup_cosine's
    cos = OptimConfig(warmup_epochs=1, min_lr_ratio=0.1)
    assert lr_at(55, total_steps=101, steps_per_epoch=10, optim=cos, peak=1.0) == pytest.approx(0.55)


def test_scaled_lr():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)  # SimCLR B.1
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_lr(0.3, 4096, "none") == 0.3
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        scaled_lr(0.3, 256, "cubic")


# --------------------------------------------------------------------------------------------------
# parameter groups and optimiser choice


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).mean(dim=(2, 3))
        return self.frozen(self.ln(self.fc(h)))


def test_param_groups_split():
    net = _Net()
    decay, no_decay = param_groups(net, weight_decay=1e-4)
    assert decay["weight_decay"] == 1e-4 and decay["lars"] is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars"] is False
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight), id(net.fc.weight)}
    expected_exempt = [net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias, net.ln.weight, net.ln.bias]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected_exempt}
    everything = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in net.parameters() if p.requires_grad)


def test_build_optimizer_choices():
    net = _Net()
    sgd = build_optimizer(net, OptimConfig(name="sgd", momentum=0.8), lr=0.5)
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["momentum"] == 0.8 and not g["nesterov"] and g["lr"] == 0.5 for g in sgd.param_groups)
    adamw = build_optimizer(net, OptimConfig(name="adamw", betas=[0.9, 0.95], weight_decay=0.05), lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95)
    lars = build_optimizer(net, OptimConfig(name="lars", lars_eta=0.02), lr=0.3)
    assert isinstance(lars, LARS)
    assert [(g["lars"], g["eta"]) for g in lars.param_groups] == [(True, 0.02), (False, 0.02)]
    with pytest.raises(ConfigError, match="optim.name"):
        build_optimizer(net, OptimConfig(name="adagrad"), lr=0.1)


def test_setting_group_lr_takes_effect():
    net = nn.Linear(3, 1, bias=False)
    opt = build_optimizer(net, OptimConfig(name="sgd", weight_decay=0.0), lr=1.0)
    for group in opt.param_groups:
        group["lr"] = 0.25
    before = net.weight.detach().clone()
    net.weight.grad = torch.ones_like(net.weight)
    opt.step()
    torch.testing.assert_close(net.weight.detach(), before - 0.25)


# --------------------------------------------------------------------------------------------------
# LARS against a hand-written reference of its docstring's update


def _reference_lars(w, v, g, *, lr, m, wd, eta, lars):
    g = g + wd * w
    w_norm, g_norm = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
    trust = eta * w_norm / g_norm if lars and w_norm > 0 and g_norm > 0 else 1.0
    v = m * v + lr * trust * g
    return w - v, v


def test_lars_matches_reference_for_two_steps():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    grads = [[torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)] for _ in range(2)]
    params = [nn.Parameter(w.clone()) for w in weights]
    opt = LARS(
        [
            {"params": [params[0]], "weight_decay": 0.1, "lars": True},
            {"params": [params[1]], "weight_decay": 0.0, "lars": False},
        ],
        lr=0.5, momentum=0.9, eta=0.02,
    )  # fmt: skip
    ref_w = [w.clone() for w in weights]
    ref_v = [torch.zeros_like(w) for w in weights]
    settings = [dict(wd=0.1, lars=True), dict(wd=0.0, lars=False)]
    for step, lr in enumerate([0.5, 0.2]):  # the lr changes between steps, as under a schedule
        for group in opt.param_groups:
            group["lr"] = lr
        for i, p in enumerate(params):
            p.grad = grads[step][i].clone()
            ref_w[i], ref_v[i] = _reference_lars(ref_w[i], ref_v[i], grads[step][i], lr=lr, m=0.9, eta=0.02,
                                                 **settings[i])  # fmt: skip
        opt.step()
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach(), ref_w[i], atol=1e-6, rtol=0)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_v[i], atol=1e-6, rtol=0)


def test_lars_zero_norms_give_no_nan():
    zero_w = nn.Parameter(torch.zeros(3, 3))
    zero_g = nn.Parameter(torch.ones(3, 3))
    opt = LARS([zero_w, zero_g], lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.001)
    zero_w.grad = torch.full((3, 3), 2.0)  # ||w|| = 0 -> trust 1
    zero_g.grad = torch.zeros(3, 3)  # ||g|| = 0 -> trust 1, no update
    opt.step()
    torch.testing.assert_close(zero_w.detach(), torch.full((3, 3), -0.2))
    torch.testing.assert_close(zero_g.detach(), torch.ones(3, 3))


def test_lars_state_dict_round_trip_gives_identical_next_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    cfg = OptimConfig(name="lars", weight_decay=1e-2, lars_eta=0.01)
    opt = build_optimizer(net, cfg, lr=0.3)
    x = torch.randn(16, 6)

    def step(model, optimizer):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    for _ in range(2):
        step(net, opt)
    resumed = copy.deepcopy(net)
    resumed_opt = build_optimizer(resumed, cfg, lr=0.3)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    step(net, opt)
    step(resumed, resumed_opt)
    for a, b in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# a method's tagged parameter groups, the weight-decay schedule, per-parameter clipping


class _Tagged(nn.Module):
    """A body, a predictor at a fixed learning rate (SimSiam), and a head at a tenth of it without LARS."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.predictor = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def param_groups(self):
        return [{"name": "body", "params": self.body.parameters()},
                {"name": "predictor", "params": self.predictor.parameters(), "fixed_lr": True},
                {"name": "head", "params": self.head.parameters(), "lr_scale": 0.1, "lars": False}]


def test_declared_groups_keep_their_tags_and_split_off_biases_and_norms():
    from contrastive.optim.optimizers import set_step_values

    net = _Tagged()
    groups = {(g["name"], g["decay"]): g for g in param_groups(net, weight_decay=0.5)}
    assert set(groups) == {("body", True), ("body", False), ("predictor", True), ("predictor", False),
                           ("head", True), ("head", False)}
    assert [id(p) for p in groups["body", True]["params"]] == [id(net.body[0].weight)]
    assert {id(p) for p in groups["body", False]["params"]} == {id(net.body[0].bias), id(net.body[1].weight),
                                                                id(net.body[1].bias)}
    assert groups["head", True]["lars"] is False and groups["body", True]["lars"] is True
    assert groups["head", True]["weight_decay"] == 0.5 and groups["head", False]["weight_decay"] == 0.0

    opt = build_optimizer(net, OptimConfig(name="lars", weight_decay=0.5), lr=1.0)
    set_step_values(opt, lr=0.3, peak_lr=2.0, weight_decay=0.7)
    got = {(g["name"], g["decay"]): (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert got == {("body", True): (0.3, 0.7), ("body", False): (0.3, 0.0),
                   ("predictor", True): (2.0, 0.7), ("predictor", False): (2.0, 0.0),
                   ("head", True): (pytest.approx(0.03), 0.7), ("head", False): (pytest.approx(0.03), 0.0)}


@pytest.mark.parametrize("groups, message", [
    (lambda m: [{"name": "a", "params": m.body.parameters()}], "in no group"),
    (lambda m: [{"name": "a", "params": m.parameters()}, {"name": "b", "params": m.head.parameters()}], "in both"),
    (lambda m: [{"name": "a", "params": m.parameters(), "lr": 3}], "unknown tags"),
])
def test_declared_groups_must_cover_every_trainable_parameter_once(groups, message):
    net = _Tagged()
    net.param_groups = lambda: groups(net)
    with pytest.raises(ValueError, match=message):
        param_groups(net, 0.1)


def test_weight_decay_schedule_is_a_cosine_from_start_to_end():
    from contrastive.optim.schedules import weight_decay_at

    optim = OptimConfig(weight_decay=0.04, weight_decay_end=0.4)
    assert weight_decay_at(0, total_steps=101, optim=optim) == pytest.approx(0.04)
    assert weight_decay_at(50, total_steps=101, optim=optim) == pytest.approx(0.22)
    assert weight_decay_at(100, total_steps=101, optim=optim) == pytest.approx(0.4)
    assert weight_decay_at(50, total_steps=101, optim=OptimConfig(weight_decay=0.04)) == 0.04


def test_per_parameter_clipping_bounds_each_tensor_and_leaves_small_ones():
    from contrastive.optim.optimizers import clip_gradients

    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    grads = [torch.full_like(p, v) for p, v in zip(net.parameters(), (10.0, 0.01, -5.0, 0.02))]
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()
    clip_gradients(net, 1.0, "per_parameter")
    for p, g in zip(net.parameters(), grads):
        norm = g.norm().item()
        expected = g * (1.0 / (norm + 1e-6)) if norm > 1.0 else g
        assert torch.allclose(p.grad, expected, atol=1e-7)
    assert net[0].weight.grad.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(net[0].bias.grad, grads[1])  # below the bound: untouched
