"""DINO: the loss of the right crops against a naive cross-entropy, the teacher temperature schedule, the centre
update, the frozen last layer, the EMA teacher, the head, the view groups, exact resume, and 2 processes == 1."""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from multiprocess import run_as_torchrun
from torch import nn

from contrastive import api
from contrastive.config import ViewConfig
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.losses import dino_loss
from contrastive.methods.base import Batch, StepInfo
from contrastive.methods.dino import DINO, DINOConfig, teacher_temperature_at
from contrastive.methods.dino import view_groups as dino_groups
from contrastive.modalities import modality_of
from contrastive.modalities.image.views import GROUP_FIELDS, view_groups, view_shapes
from contrastive.nn.ema import momentum_at
from contrastive.nn.heads import DINOHead
from contrastive.training.checkpoint import load_checkpoint

N, C, S, L = 6, 3, 8, 4  # images, channels, global side, local side
K = 32  # out_dim of the toy head
STEP = StepInfo(step=3, epoch=15, total_steps=40, steps_per_epoch=2, epochs=20)


def _backbone() -> nn.Module:
    """BN-free and size-agnostic, so each crop can be encoded on its own by hand."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(C * 4, 24), nn.ReLU(), nn.Linear(24, 16))


def _method(seed=0, **cfg) -> DINO:
    torch.manual_seed(seed)
    return DINO(_backbone(), 16, DINOConfig(**{"out_dim": K, "hidden_dim": 20, "bottleneck_dim": 8, **cfg}))


def _batch(n_global=2, n_local=3, n=N, seed=1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = ([torch.randn(n, C, S, S, generator=g) for _ in range(n_global)]
             + [torch.randn(n, C, L, L, generator=g) for _ in range(n_local)])
    return Batch(views=views, index=torch.arange(n), label=torch.full((n,), -1), n_global=n_global)


def _perturb_teacher_and_centre(method: DINO, seed=2) -> None:
    """Move the teacher away from the student and the centre away from 0, as training does, so that a loss with
    the student in the teacher's place, or without the centre, would differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        method.center.copy_(0.2 * torch.randn(1, K, generator=g))


def _by_hand(method: DINO, batch: Batch):
    """Student logits of every crop and teacher logits of the global crops, one crop at a time, from the parts."""
    with torch.no_grad():
        student = [method.head.last_layer(F.normalize(method.head.mlp(method.backbone(v)), dim=1))
                   for v in batch.views]
        teacher = [method.teacher_head(method.teacher_backbone(v)) for v in batch.global_views]
    return student, teacher


def _naive_loss(student, teacher, center, tau_s, tau_t) -> float:
    """Eq. 3 with loops: mean over (teacher crop i, student crop v != i) of the mean over images of
    -sum_k P_t log P_s, in float64."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        p_t = torch.softmax((t.double() - center.double()) / tau_t, dim=1)
        for v, s in enumerate(student):
            if v == i:
                continue
            log_p_s = torch.log_softmax(s.double() / tau_s, dim=1)
            total += float(-(p_t * log_p_s).sum(dim=1).mean())
            pairs += 1
    return total / pairs


def test_loss_is_dino_loss_of_the_teachers_global_crops_and_every_student_crop():
    method = _method()
    _perturb_teacher_and_centre(method)
    batch = _batch()
    out = method(batch, step=STEP)
    student, teacher = _by_hand(method, batch)
    tau_t = 0.04 + 0.03 * 15 / 29  # epoch 15 of the 30-epoch warm-up
    assert method.teacher_temperature(STEP) == pytest.approx(tau_t, abs=1e-15)
    expected = _naive_loss(student, teacher, method.center, 0.1, tau_t)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(out.loss.detach(), dino_loss(student, teacher, method.center, 0.1, tau_t))
    torch.testing.assert_close(out.updates["teacher"], torch.stack(teacher))
    # the embedding is the student's normalised bottleneck of the first global crop
    z = F.normalize(method.head.mlp(method.backbone(batch.views[0])), dim=1)
    torch.testing.assert_close(out.embedding, z.detach())
    # what a wrong forward would compute gives another number
    every_crop = [method.teacher_head(method.teacher_backbone(v)).detach() for v in batch.views]
    wrong = [_naive_loss(student, every_crop, method.center, 0.1, tau_t),  # the teacher on the local crops too
             _naive_loss(student, teacher, method.center, 0.1, 0.04),  # the temperature of epoch 0
             _naive_loss(student, teacher, torch.zeros(1, K), 0.1, tau_t),  # no centre
             _naive_loss(student[:2], teacher, method.center, 0.1, tau_t)]  # the student without its local crops
    assert all(abs(w - expected) > 1e-3 for w in wrong)


def test_crops_of_one_size_share_a_backbone_batch():
    """As MultiCropWrapper: batch norm in the backbone sees the global crops together and the local crops together."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(C, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    method = DINO(backbone, 4, DINOConfig(out_dim=K, hidden_dim=20, bottleneck_dim=8))
    batch = _batch()
    out = method(batch, step=STEP)
    g, loc = batch.views[:2], batch.views[2:]
    with torch.no_grad():
        features = torch.cat([method.backbone(torch.cat(g)), method.backbone(torch.cat(loc))])
        student = method.head(features).chunk(5)
        teacher = method.teacher_head(method.teacher_backbone(torch.cat(g))).chunk(2)
    tau_t = 0.04 + 0.03 * 15 / 29
    torch.testing.assert_close(out.loss.detach(), dino_loss(student, teacher, method.center, 0.1, tau_t))


def test_teacher_temperature_schedule():
    # main_dino.py: np.linspace(0.04, 0.07, 30) for epochs 0..29, then 0.07
    values = [teacher_temperature_at(e, 0.04, 0.07, 30) for e in (0, 15, 29, 30, 40)]
    assert values == pytest.approx([0.04, 0.04 + 0.03 * 15 / 29, 0.07, 0.07, 0.07], abs=1e-15)
    assert values[1] == pytest.approx(0.0555172413793, abs=1e-12)
    method = _method()
    at = [method.teacher_temperature(StepInfo(step=0, epoch=e, total_steps=1)) for e in (0, 15, 30, 40)]
    assert at == pytest.approx([0.04, 0.0555172413793, 0.07, 0.07], abs=1e-12)
    assert teacher_temperature_at(0, 0.04, 0.07, 0) == 0.07  # no warm-up
    assert teacher_temperature_at(0, 0.04, 0.07, 1) == 0.04 and teacher_temperature_at(1, 0.04, 0.07, 1) == 0.07


def test_after_step_moves_the_centre_by_the_mean_teacher_logit():
    method = _method()
    _perturb_teacher_and_centre(method)
    old = method.center.clone()
    out = method(_batch(), step=STEP)
    _, teacher = _by_hand(method, _batch())
    method.after_step({k: v.detach() for k, v in out.updates.items()}, STEP)
    rows = torch.cat(teacher).double()  # [2 * N, K]: both global crops of every image
    expected = 0.9 * old.double() + 0.1 * rows.mean(dim=0, keepdim=True)
    torch.testing.assert_close(method.center.double(), expected, rtol=1e-6, atol=1e-7)
    assert method.center.shape == (1, K) and (method.center - old).abs().max() > 1e-3


def test_forward_changes_no_state_and_only_the_student_gets_gradients():
    method = _method()
    _perturb_teacher_and_centre(method)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method(_batch(), step=STEP).loss.backward()
    assert all(torch.equal(v, before[k]) for k, v in method.state_dict().items())
    teacher = [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher)
    wn = method.head.last_layer.parametrizations.weight
    g, v = wn.original0, wn.original1  # norm_last_layer: g stays 1, v learns
    assert not g.requires_grad and g.grad is None and v.grad.abs().sum() > 0
    student = [p for p in method.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student)


def test_teacher_follows_the_ema_rule_and_is_evaluated():
    method = _method()
    teacher_before = {k: v.clone() for k, v in method.teacher_backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in method.teacher_head.state_dict().items()}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    out = method(_batch(), step=STEP)
    out.loss.backward()
    opt.step()
    method.after_step(out.updates, STEP)
    m = 1 - 0.004 * (math.cos(math.pi * 3 / 40) + 1) / 2  # main_dino.py's momentum_schedule[it] at it = 3 of 40
    assert method.momentum(STEP) == pytest.approx(m, abs=1e-15) and m == momentum_at("cosine", 0.996, 3, 40)
    for student, teacher, before in [(method.backbone, method.teacher_backbone, teacher_before),
                                     (method.head, method.teacher_head, head_before)]:
        online = student.state_dict()
        for name, t in teacher.state_dict().items():
            expected = before[name].double() * m + online[name].double() * (1 - m)
            torch.testing.assert_close(t.double(), expected, rtol=1e-6, atol=1e-8, msg=name)
    moved = method.teacher_backbone[2].weight - teacher_before["2.weight"]
    assert moved.abs().max() > 1e-5  # the student moved, and the teacher a little after it
    assert method.encoder() is method.teacher_backbone and method.feature_dim == 16
    assert method.projection_head() is method.teacher_head.mlp


def test_last_layer_is_frozen_in_the_first_epoch_and_learns_after():
    from contrastive.config import OptimConfig
    from contrastive.optim.optimizers import build_optimizer

    for norm_last_layer in (True, False):
        method = _method(norm_last_layer=norm_last_layer)
        optimizer = build_optimizer(method, OptimConfig(name="adamw", weight_decay=0.04), lr=0.01)
        last = list(method.head.last_layer.parameters())
        assert len([p for p in last if p.requires_grad]) == (1 if norm_last_layer else 2)
        start = [p.clone() for p in last]
        others = [p.clone() for p in method.head.mlp.parameters()]

        def step(epoch):
            info = StepInfo(step=epoch, epoch=epoch, total_steps=4, steps_per_epoch=1, epochs=4)
            optimizer.zero_grad(set_to_none=True)
            method(_batch(), step=info).loss.backward()
            method.before_optimizer_step(info)
            optimizer.step()

        step(0)
        assert all(torch.equal(p, s) for p, s in zip(last, start))  # no gradient step, no weight decay
        assert all(not torch.equal(p, s) for p, s in zip(method.head.mlp.parameters(), others))
        step(1)
        trained = [(p, s) for p, s in zip(last, start) if p.requires_grad]
        assert all((p - s).abs().max() > 1e-4 for p, s in trained)


def test_freeze_last_layer_0_trains_it_from_the_start():
    method = _method(freeze_last_layer=0)
    method(_batch(), step=StepInfo(step=0, epoch=0, total_steps=4)).loss.backward()
    method.before_optimizer_step(StepInfo(step=0, epoch=0, total_steps=4))
    assert method.head.last_layer.parametrizations.weight.original1.grad is not None


def test_head_is_the_official_one():
    torch.manual_seed(0)
    head = DINOHead(384, 65536)
    types = [type(m) for m in head.mlp]
    assert types == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in head.mlp[::2]] == [(384, 2048), (2048, 2048), (2048, 256)]
    w = head.mlp[2].weight
    assert w.std().item() == pytest.approx(0.02, rel=0.01) and w.abs().max() < 0.02 * 6
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in head.mlp[::2])
    last = head.last_layer
    assert last.bias is None and last.weight.shape == (65536, 256)
    g, v = last.parametrizations.weight.original0, last.parametrizations.weight.original1
    assert torch.equal(g, torch.ones(65536, 1)) and not g.requires_grad and v.requires_grad
    torch.testing.assert_close(last.weight.norm(dim=1), torch.ones(65536))  # unit prototypes
    x = torch.randn(4, 384)
    z = F.normalize(head.mlp(x), dim=1)
    torch.testing.assert_close(head(x), z @ (v / v.norm(dim=1, keepdim=True)).T)
    bn = DINOHead(16, 8, hidden_dim=12, bottleneck_dim=4, use_bn=True, norm_last_layer=False)
    assert [type(m) for m in bn.mlp] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d, nn.GELU,
                                         nn.Linear]
    assert bn.last_layer.parametrizations.weight.original0.requires_grad
    assert [type(m) for m in DINOHead(16, 8, num_layers=1).mlp] == [nn.Linear]


def test_weight_norm_copies_and_round_trips_through_state_dict():
    method = _method(norm_last_layer=False)
    with torch.no_grad():
        method.head.last_layer.parametrizations.weight.original0.mul_(1.5)  # a trained g
    copy_ = copy.deepcopy(method)
    x = torch.randn(3, 16)
    torch.testing.assert_close(copy_.head(x), method.head(x))
    g_copy, g = (m.head.last_layer.parametrizations.weight.original0 for m in (copy_, method))
    assert g_copy is not g and torch.equal(g_copy, g)
    state = method.state_dict()
    assert {"head.last_layer.parametrizations.weight.original0", "teacher_head.last_layer.parametrizations.weight."
            "original1", "center"} <= set(state)
    with torch.device("meta"):
        rebuilt = DINO(_backbone(), 16, DINOConfig(out_dim=K, hidden_dim=20, bottleneck_dim=8, norm_last_layer=False))
    rebuilt.load_state_dict(state, strict=True, assign=True)
    assert all(torch.equal(v, state[k]) for k, v in rebuilt.state_dict().items())
    torch.testing.assert_close(rebuilt.head(x), method.head(x), rtol=0, atol=0)


def test_teacher_has_no_stochastic_depth():
    pytest.importorskip("timm")
    from timm.layers import DropPath

    from contrastive.nn.backbones import build_backbone

    torch.manual_seed(0)
    backbone, dim = build_backbone({"name": "vit_tiny", "patch_size": 4, "drop_path_rate": 0.1}, input_shape=(3,
                                   8, 8))
    method = DINO(backbone, dim, DINOConfig(out_dim=K, hidden_dim=20, bottleneck_dim=8))
    student = [m.drop_prob for m in method.backbone.modules() if isinstance(m, DropPath)]
    teacher = [m.drop_prob for m in method.teacher_backbone.modules() if isinstance(m, DropPath)]
    assert len(student) == len(teacher) > 0 and max(student) == pytest.approx(0.1) and max(teacher) == 0
    x = torch.randn(4, 3, 8, 8)
    method.train()
    with torch.no_grad():
        torch.testing.assert_close(method.teacher_backbone(x), method.teacher_backbone(x))  # no random paths
        assert not torch.allclose(method.backbone(x), method.backbone(x))


def test_view_groups_are_main_dinos_multi_crop():
    groups = dino_groups(224)
    assert [(g["count"], g["global"], g.get("size")) for g in groups] == [(1, True, None), (1, True, None),
                                                                          (8, False, 96)]
    assert all(set(g) <= {"count", "global", *GROUP_FIELDS} for g in groups)
    assert [g["blur_p"] for g in groups] == [1.0, 0.1, 0.5] and [g["solarize_p"] for g in groups] == [0, 0.2, 0]
    assert [g["crop_scale"] for g in groups] == [[0.4, 1.0], [0.4, 1.0], [0.05, 0.4]]
    assert all(g["jitter"] == [0.4, 0.4, 0.2, 0.1] and g["jitter_p"] == 0.8 and g["grayscale_p"] == 0.2
               and g["hflip_p"] == 0.5 for g in groups)
    assert dino_groups(32)[2]["size"] == 14 and dino_groups(16)[2]["size"] == 7
    resolved = view_groups(ViewConfig(), 224, dino_groups)
    assert view_shapes(resolved, 224) == ([224, 224] + [96] * 8, 2)


def test_fewer_than_two_global_views_are_refused():
    with pytest.raises(ConfigError, match="views.groups"):
        _method()(_batch(n_global=1, n_local=3), step=STEP)


@pytest.mark.parametrize("field,value,match", [
    ("momentum_schedule", "linear", "method.momentum_schedule='linear'"),
    ("center_momentum", 1.5, "method.center_momentum=1.5 is out of range"),
    ("teacher_temperature", 0.0, "method.teacher_temperature=0.0 is out of range"),
    ("freeze_last_layer", -1, "method.freeze_last_layer=-1 is out of range"),
    ("out_dim", 0, "method.out_dim=0 is out of range"),
])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        DINO(_backbone(), 16, DINOConfig(**{field: value}))


def test_recipes_are_the_papers():
    from contrastive.methods import method_config
    from contrastive.trees import recipe_dir

    vit = resolve_config(recipe=recipe_dir() / "dino.yaml")
    m = method_config(vit)
    assert (m.out_dim, m.teacher_temperature, m.warmup_teacher_temperature, m.warmup_teacher_temperature_epochs,
            m.student_temperature, m.momentum, m.center_momentum, m.freeze_last_layer) == (65536, 0.07, 0.04, 30, 0.1,
                                                                                          0.996, 0.9, 1)
    assert vit.backbone["name"] == "vit_small" and vit.backbone["patch_size"] == 16
    assert vit.backbone["drop_path_rate"] == 0.1
    o = vit.optim
    assert (o.name, o.lr, o.weight_decay, o.weight_decay_end, o.warmup_epochs, o.grad_clip, o.grad_clip_mode) == (
        "adamw", 0.0005, 0.04, 0.4, 10, 3.0, "per_parameter")
    assert o.lr * vit.train.batch_size / 256 * o.min_lr_ratio == pytest.approx(1e-6)
    assert vit.views.groups is None  # the method's groups: 2 global + 8 local crops


# ------------------------------------------------------------------------------------------------------------
# end to end through the trainer: resume, and two processes against one

FAST = ["method.name=dino", "backbone.name=small_cnn", "data.image_size=8", "train.batch_size=128",
        "train.progress=false", "eval.enabled=false", "train.log_every=1", "method.out_dim=64", "method.hidden_dim=32",
        "method.bottleneck_dim=16", "train.epochs=2", "optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.04",
        "optim.weight_decay_end=0.4", "optim.warmup_epochs=1", "optim.grad_clip=3.0",
        "optim.grad_clip_mode=per_parameter",
        "views.groups=[{count: 2, crop_scale: [0.5, 1.0]}, {count: 2, global: false, size: 4}]"]


def _cfg(out, *extra):
    return resolve_config(tree={"data": {"name": "digits"}}, overrides=FAST + [f"train.output={out}", *extra])


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    full = api.pretrain(_cfg(tmp_path / "full"))
    assert full["steps"] == 22  # 1437 // 128 = 11 steps an epoch
    api.pretrain(_cfg(tmp_path / "part", "train.max_steps=7"))  # stopped mid-epoch 0: the last layer still frozen
    ckpt = tmp_path / "part" / "checkpoint.pt"
    part = load_checkpoint(ckpt)["method"]
    assert load_checkpoint(ckpt)["step"] == 7
    assert api.pretrain(_cfg(tmp_path / "part", f"train.resume={ckpt}"))["steps"] == 22
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["method"]
    b = load_checkpoint(ckpt)["method"]
    assert a.keys() == b.keys() and "center" in a and any(k.startswith("teacher_head.") for k in a)
    for k in a:  # bitwise: student, teacher, centre, batch-norm statistics
        assert torch.equal(a[k], b[k]), k
    v = "head.last_layer.parametrizations.weight.original1"
    torch.manual_seed(0)
    fresh = api.build_method(_cfg(tmp_path / "x"), api.BuildContext(**load_checkpoint(ckpt)["context"])).state_dict()
    assert torch.equal(part[v], fresh[v])  # 7 steps into epoch 0: the last layer has not moved
    assert not torch.equal(a[v], fresh[v])  # epoch 1 trained it
    assert a["center"].abs().sum() > 0 and not torch.equal(a["teacher_head.mlp.0.weight"], a["head.mlp.0.weight"])


# ViT-tiny and a head without BN have no batch norm (a per-process BN would see half the batch) and, at
# drop_path_rate 0, no randomness; the views are the whole image with no colour change, so which process augments
# an image does not matter.
SAME = ["backbone.name=vit_tiny", "backbone.patch_size=4", "backbone.drop_path_rate=0.0", "method.use_bn=false",
        "train.epochs=1",
        "train.max_steps=4", "train.channels_last=false", "optim.name=sgd", "optim.lr=0.5", "optim.warmup_epochs=0",
        "optim.weight_decay_end=null", "method.warmup_teacher_temperature_epochs=0",
        "views.groups=[{count: 2, crop_scale: [1.0, 1.0], crop_ratio: [1.0, 1.0], hflip_p: 0, jitter_p: 0, "
        "grayscale_p: 0}, {count: 2, global: false, size: 4, crop_scale: [1.0, 1.0], crop_ratio: [1.0, 1.0], "
        "hflip_p: 0, jitter_p: 0, grayscale_p: 0}]"]


def _run(output: str) -> None:
    from contrastive import distributed
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    cfg = _cfg(output, *SAME)
    distributed.init_from_env(torch.device("cpu"))
    data = load_splits(cfg.data).pretrain
    torch.manual_seed(0)
    method = api.build_method(cfg, modality_of(data).context(cfg, data, distributed.world_size()))
    centres, after_step = [], method.after_step

    def recording(updates, step):
        after_step(updates, step)
        centres.append(method.center.clone())

    method.after_step = recording
    Trainer(cfg, method, data, output).fit()
    torch.save(torch.stack(centres), os.path.join(output, f"centres{distributed.rank()}.pt"))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    pytest.importorskip("timm")
    run_as_torchrun(_run, str(tmp_path / "ddp"))
    _run(str(tmp_path / "single"))
    single = torch.load(tmp_path / "single" / "centres0.pt")
    assert single.shape == (4, 1, 64) and single.abs().min() > 0
    for rank in range(2):  # every rank holds the centre of the whole batch, step after step
        torch.testing.assert_close(torch.load(tmp_path / "ddp" / f"centres{rank}.pt"), single, rtol=0, atol=1e-6)

    def losses(p):
        rows = (p / "metrics.csv").read_text().splitlines()
        col = rows[0].split(",").index("loss")
        return [float(r.split(",")[col]) for r in rows[1:]]

    assert len(losses(tmp_path / "single")) == 4
    # float32 losses near 4 (an ulp is 4.8e-7), summed in another order over two processes: a few ulp apart
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=5e-6)
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["method"]
    one = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["method"]
    for k, v in one.items():  # student, teacher and centre agree after 4 steps
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-6, msg=k)
