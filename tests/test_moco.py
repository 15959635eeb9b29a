"""MoCo v1/v2: the loss against a naive reference, the forward's pairs, queue and EMA updates, resume, DDP."""

import os

import pytest
import torch
import torch.nn.functional as F
from multiprocess import run_as_torchrun
from torch import nn

from contrastive import api, distributed
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.losses import info_nce_queue
from contrastive.methods import method_config
from contrastive.methods.base import Batch, BuildContext, StepInfo
from contrastive.methods.moco import MoCo, MoCoV2Config
from contrastive.modalities import modality_of
from contrastive.nn.shuffle_bn import shuffled_forward
from contrastive.runs import rebuild_method
from contrastive.training.checkpoint import load_checkpoint


def test_info_nce_queue_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    t = 0.2
    total = 0.0
    for i in range(5):
        pos = float(q[i] @ k[i]) / t
        negs = [float(q[i] @ queue[j]) / t for j in range(12)]
        denom = sum(torch.tensor(x).exp().item() for x in [pos] + negs)
        total += -(pos - torch.tensor(denom).log().item())
    assert info_nce_queue(q, k, queue, t).item() == pytest.approx(total / 5, rel=1e-5)


def _moco(symmetric=False, shuffle=True, splits=2, seed=0, **kw):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU())
    cfg = MoCoV2Config(dim=8, queue_size=32, temperature=0.2, momentum=0.9, symmetric=symmetric,
                       shuffle_bn=shuffle, bn_splits=splits, **kw)
    return MoCo(backbone, 16, cfg, local_batch=8)


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(views=[torch.randn(n, 3, 4, 4, generator=g) for _ in range(2)], index=torch.arange(n),
                 label=torch.full((n,), -1))


STEP = StepInfo(step=3, epoch=0, total_steps=10, steps_per_epoch=10, epochs=1, seed=5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_contrasts_the_right_pairs_against_the_old_queue(symmetric):
    moco, batch = _moco(symmetric=symmetric), _batch()
    out = moco(batch, step=STEP)
    x1, x2 = batch.views
    gen = STEP.generator("cpu", per_rank=False)  # the forward's shuffles, drawn again in the same order
    q1 = F.normalize(moco.encoder_q(x1), dim=1)
    k2 = F.normalize(shuffled_forward(moco.encoder_k, x2, gen), dim=1)
    expected = info_nce_queue(q1, k2, moco.queue.keys, 0.2)
    keys = [k2]
    if symmetric:  # the second direction uses the same queue: a key is never its own negative
        q2 = F.normalize(moco.encoder_q(x2), dim=1)
        k1 = F.normalize(shuffled_forward(moco.encoder_k, x1, gen), dim=1)
        expected = expected + info_nce_queue(q2, k1, moco.queue.keys, 0.2)
        keys = [k1, k2]
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.updates["keys"], torch.stack(keys))
    # swapping the views gives another loss: the test above would catch a forward that mixed them up
    assert not torch.allclose(out.loss, info_nce_queue(F.normalize(moco.encoder_q(x2), dim=1), k2,
                                                       moco.queue.keys, 0.2))


def test_forward_changes_no_state_and_keys_get_no_gradient():
    moco, batch = _moco(), _batch()
    before = {k: v.clone() for k, v in moco.state_dict().items() if "running" not in k and "tracked" not in k}
    out = moco(batch, step=STEP)
    out.loss.backward()
    for k, v in before.items():
        assert torch.equal(moco.state_dict()[k], v), k
    assert all(p.grad is None for p in moco.encoder_k.parameters())
    assert all(p.grad is not None for p in moco.encoder_q.parameters())


def test_after_step_updates_the_key_encoder_then_enqueues_every_views_keys():
    moco, batch = _moco(symmetric=True), _batch()
    out = moco(batch, step=STEP)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)  # as an optimiser step would
    k_before = [p.clone() for p in moco.encoder_k.parameters()]
    q_now = [p.clone() for p in moco.encoder_q.parameters()]
    moco.after_step(out.updates, STEP)
    for k, b, q in zip(moco.encoder_k.parameters(), k_before, q_now):
        torch.testing.assert_close(k, 0.9 * b + 0.1 * q)
    # 16 keys (two views of 8) at slots 0..15, first view's keys first
    torch.testing.assert_close(moco.queue.keys[:16], out.updates["keys"].flatten(0, 1), rtol=0, atol=0)
    assert int(moco.queue.ptr) == 16


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="method.bn_splits=3"):
        MoCo(nn.Linear(4, 4), 4, MoCoV2Config(bn_splits=3), world_size=2, local_batch=8)
    with pytest.raises(ConfigError, match="method.queue_size=8"):
        MoCo(nn.Linear(4, 4), 4, MoCoV2Config(queue_size=8, bn_splits=1), local_batch=16)
    with pytest.raises(ConfigError, match="views.n_views=2"):
        _moco()(Batch(views=[torch.randn(8, 3, 4, 4)], index=torch.arange(8), label=torch.zeros(8)), step=STEP)


# ------------------------------------------------------------------------------------------------------------
# end to end through the trainer: resume, evaluation, and two processes against one

FAST = ["data.image_size=8", "train.batch_size=64", "train.progress=false", "train.log_every=1",
        "method.queue_size=256", "method.dim=16", "method.bn_splits=2", "views.crop_scale=[0.5,1.0]"]


def _cfg(out, *extra):
    return resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "moco-v2"}},
                          overrides=FAST + ["eval.enabled=false", f"train.output={out}", *extra])


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_queue_and_key_encoder_included(tmp_path):
    full = api.pretrain(_cfg(tmp_path / "full", "train.epochs=2"))  # 22 steps an epoch
    api.pretrain(_cfg(tmp_path / "part", "train.epochs=2", "train.max_steps=29"))
    resumed = api.pretrain(_cfg(tmp_path / "part", "train.epochs=2",
                                f"train.resume={tmp_path / 'part' / 'checkpoint.pt'}"))
    assert full["steps"] == resumed["steps"] == 44
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert {"queue.keys", "queue.ptr"} <= set(a["method"]) and any(k.startswith("encoder_k.") for k in a["method"])
    for k in a["method"]:
        assert torch.equal(a["method"][k], b["method"][k]), k
    assert int(a["method"]["queue.ptr"]) == 44 * 64 % 256


@pytest.mark.slow
def test_evaluation_leaves_queue_and_encoders_untouched(tmp_path):
    cfg = _cfg(tmp_path, "train.epochs=1", "train.max_steps=3")
    api.pretrain(cfg)
    encoder, info = api.load_encoder(tmp_path / "checkpoint.pt")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    from contrastive.modalities import load_splits

    splits = load_splits(cfg.data)
    # the loaded encoder is the query backbone of the checkpoint
    sd = {k.removeprefix("encoder_q.0."): v for k, v in ckpt["method"].items() if k.startswith("encoder_q.0.")}
    assert sd.keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in sd.items())
    method = rebuild_method(cfg, BuildContext(**ckpt["context"]))
    method.load_state_dict(ckpt["method"], assign=True)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    api.evaluate_encoder(method.encoder(), info["preprocess"], splits.eval_train, splits.eval_test,
                         cfg, note="test", protocols=("knn",))
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k]), k


# Deterministic views (the whole image, no colour change) so that which process augments an image does not matter.
SAME_VIEWS = ["views.crop_scale=[1.0,1.0]", "views.crop_ratio=[1.0,1.0]", "views.hflip_p=0", "views.jitter_p=0",
              "views.grayscale_p=0", "train.epochs=1", "train.channels_last=false", "method.symmetric=true",
              "optim.warmup_epochs=0", "train.max_steps=4"]


def _run(output: str) -> None:
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    cfg = _cfg(output, *SAME_VIEWS)
    distributed.init_from_env(torch.device("cpu"))  # before the build: the method's BN groups depend on the world
    data = load_splits(cfg.data).pretrain
    torch.manual_seed(0)
    method = api.build_method(cfg, modality_of(data).context(cfg, data, distributed.world_size()))
    trainer = Trainer(cfg, method, data, output)
    trainer.fit()
    if distributed.is_main():
        grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
        torch.save(grads, os.path.join(output, "grads.pt"))


@pytest.mark.slow
def test_two_processes_equal_one_with_shuffled_batch_norm(tmp_path):
    """Two processes, each one batch-norm group, against one process with method.bn_splits=2 groups: the
    query groups are the two halves of the global batch in both, and the keys are encoded in the halves of
    one shared shuffle, so losses, gradients, weights and the queue agree. Four steps: batch norm makes the
    float rounding of the two runs drift apart by ~1e-3 over an epoch at this learning rate."""
    run_as_torchrun(_run, str(tmp_path / "ddp"))
    _run(str(tmp_path / "single"))
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    single = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    assert ddp["step"] == single["step"] == 4
    for k, v in single["method"].items():
        if "running_" in k or "num_batches" in k:
            continue  # each process keeps the statistics of its own group; they never enter the loss
        torch.testing.assert_close(ddp["method"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert int(ddp["method"]["queue.ptr"]) == int(single["method"]["queue.ptr"]) == (4 * 128) % 256

    def losses(p):
        rows = (p / "metrics.csv").read_text().splitlines()
        col = rows[0].split(",").index("loss")
        return [float(r.split(",")[col]) for r in rows[1:]]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
    g_ddp, g_single = torch.load(tmp_path / "ddp" / "grads.pt"), torch.load(tmp_path / "single" / "grads.pt")
    assert g_ddp.keys() == g_single.keys() and g_single
    for k in g_single:  # the last step's gradients: DDP's average equals the whole batch's gradient
        torch.testing.assert_close(g_ddp[k], g_single[k], rtol=1e-3, atol=1e-5, msg=k)


def test_recipes_are_the_papers():
    from contrastive.trees import recipe_dir

    v1 = method_config(resolve_config(recipe=recipe_dir() / "moco-v1.yaml"))
    assert (v1.queue_size, v1.momentum, v1.temperature, v1.head) == (65536, 0.999, 0.07, "linear")
    v2 = resolve_config(tree={"method": {"name": "moco-v2"}, "data": {"name": "cifar10"}})
    assert (v2.method["queue_size"], v2.method["momentum"], v2.method["temperature"]) == (4096, 0.99, 0.2)
    assert v2.backbone == {"name": "resnet18", "cifar_stem": True} and v2.optim.lr == 0.06
