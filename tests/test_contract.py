"""The method contract as the trainer drives it: batches with indices and labels, updates to after_step, the
build context, per-step randomness, resume of every piece of state, and safe checkpoint loading."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from contrastive import api
from contrastive.configure import resolve_config
from contrastive.errors import CheckpointError
from contrastive.losses import nt_xent
from contrastive.methods.base import (
    STREAM_GLOBAL,
    Batch,
    BuildContext,
    Method,
    MethodSpec,
    StepInfo,
    StepOutput,
    step_seed,
)
from contrastive.methods.simclr import SimCLR, SimCLRConfig
from contrastive.modalities import modality_of
from contrastive.registry import register
from contrastive.training.checkpoint import load_checkpoint


@dataclass
class ProbeConfig:
    dropout: float = 0.5


class Probe(Method):
    """A method that records what the trainer hands it, uses dropout (the global generator) and
    StepInfo's generator, keeps a sum of its updates in a buffer, and holds a frozen part in eval mode."""

    def __init__(self, ctx: BuildContext, cfg: ProbeConfig):
        super().__init__()
        self.ctx = ctx
        self.backbone, self.feature_dim = ctx.build_backbone()
        self.drop = nn.Dropout(cfg.dropout)
        self.frozen = nn.BatchNorm1d(self.feature_dim)
        self.register_buffer("seen", torch.zeros(ctx.dataset_size))  # how often each sample was trained on
        self.register_buffer("noise", torch.zeros(()))
        self.batches: list[Batch] = []
        self.train_calls: list[bool] = []  # the mode of every train() call on the method itself

    def train(self, mode: bool = True):
        self.train_calls.append(mode)
        super().train(mode)
        self.frozen.eval()  # a teacher's batch norm stays frozen whatever the trainer does
        return self

    def forward(self, batch: Batch, *, step: StepInfo) -> StepOutput:
        self.batches.append(batch)
        h = self.drop(self.backbone(batch.views[0]))
        noise = torch.rand((), generator=step.generator(h.device))
        loss = (h - self.backbone(batch.views[1])).pow(2).mean() + 0 * self.frozen(h).sum()
        return StepOutput(loss=loss, metrics={"h_mean": h.mean().detach()},
                          updates={"index": batch.index, "noise": noise})

    def after_step(self, updates, step):
        self.seen.index_add_(0, updates["index"], torch.ones(len(updates["index"])))
        self.noise.add_(updates["noise"])


register("methods", "probe")(MethodSpec(ProbeConfig, Probe))

# no memory check: its trial forward passes would reach the Probe too
FAST = ["data.image_size=8", "train.batch_size=128", "train.progress=false", "train.log_every=1",
        "eval.enabled=false", "views.crop_scale=[0.5,1.0]", "train.memory_check=false"]


def _cfg(out, *extra, method="probe"):
    return resolve_config(tree={"data": {"name": "digits"}, "method": {"name": method}},
                          overrides=FAST + [f"train.output={out}", *extra])


def _trainer(cfg):
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    data = load_splits(cfg.data).pretrain
    torch.manual_seed(cfg.seed)
    method = api.build_method(cfg, modality_of(data).context(cfg, data))
    return Trainer(cfg, method, data, cfg.train.output), data


def test_the_batch_carries_indices_and_labels_and_updates_reach_after_step(tmp_path):
    trainer, data = _trainer(_cfg(tmp_path, "train.epochs=2"))
    trainer.method.train_calls.clear()
    trainer.fit()
    m = trainer.method
    assert (m.ctx.dataset_size, m.ctx.num_classes, m.ctx.batch_size, m.ctx.world_size) == (1437, 10, 128, 1)
    assert (m.ctx.steps_per_epoch, m.ctx.epochs, m.ctx.image_size, m.ctx.channels) == (11, 2, 8, 1)
    assert len(m.batches) == 22
    for b in m.batches:  # each sample's own label travels with its index
        assert torch.equal(b.label, data.labels[b.index])
    # every index trained on was counted by after_step: 11 full batches per epoch, each sample at most once
    flat = torch.cat([b.index for b in m.batches[:11]])
    assert len(set(flat.tolist())) == 11 * 128
    assert m.seen.sum() == 22 * 128 and m.seen.max() <= 2
    # the method's train() decided, and was asked once for the whole 2-epoch run: a call per epoch (or per
    # step) would hand the mode back to the trainer
    assert m.train_calls == [True]
    assert not m.frozen.training and m.backbone.training
    # the progress log reads the loss from StepOutput.loss even when metrics hold no "loss"
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "h_mean"} <= set(header)


def test_the_progress_bar_shows_the_last_logged_loss_of_a_method_without_a_loss_metric(tmp_path, capsys):
    """The Probe reports only h_mean: the bar's loss is StepOutput.loss, from the last log row (step 10 of 13)."""
    trainer, _ = _trainer(_cfg(tmp_path, "train.epochs=2", "train.max_steps=13", "train.log_every=5",
                               "train.progress=true"))
    trainer.fit()
    err = capsys.readouterr().err  # tqdm writes to stderr
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",")
    losses = {int(r.split(",")[col.index("step")]): float(r.split(",")[col.index("loss")]) for r in rows[1:]}
    assert sorted(losses) == [5, 10] and f"{losses[5]:.4f}" != f"{losses[10]:.4f}"
    last = err.rstrip().split("\r")[-1]  # the bar as it was left: 13 of 22 steps, the postfix of step 10
    assert "13/22" in last and f"loss={losses[10]:.4f}" in last, last
    assert "h_mean" not in err  # the bar shows the loss, lr and speed, not the method's other metrics


def test_resume_restores_buffers_and_per_step_randomness_exactly(tmp_path):
    """Dropout (global generator) and StepInfo.generator are functions of (seed, step, rank): a run stopped
    mid-epoch and resumed ends with the same weights and buffers as one that never stopped."""
    full, _ = _trainer(_cfg(tmp_path / "full", "train.epochs=2"))
    full.fit()
    part, _ = _trainer(_cfg(tmp_path / "part", "train.epochs=2", "train.max_steps=7"))
    part.fit()
    resumed, _ = _trainer(_cfg(tmp_path / "part", "train.epochs=2",
                               f"train.resume={tmp_path / 'part' / 'checkpoint.pt'}"))
    resumed.fit()
    a, b = full.method.state_dict(), resumed.method.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["noise"] > 0


def test_step_randomness_is_per_step_per_rank_and_per_stream():
    info = StepInfo(step=4, epoch=0, total_steps=10, seed=3, rank=1)
    draw = lambda i: torch.rand(3, generator=i.generator("cpu"))  # noqa: E731
    assert torch.equal(draw(info), draw(info))  # a function of (seed, step, rank)
    other_rank = StepInfo(step=4, epoch=0, total_steps=10, seed=3, rank=0)
    assert not torch.equal(draw(info), draw(other_rank))
    shared = lambda i: torch.rand(3, generator=i.generator("cpu", per_rank=False))  # noqa: E731
    assert torch.equal(shared(info), shared(other_rank))  # the same on every rank
    assert not torch.equal(draw(info), draw(StepInfo(step=5, epoch=0, total_steps=10, seed=3, rank=1)))
    seeds = {step_seed(3, 4, r, s) for r in range(4) for s in range(4)}
    assert len(seeds) == 16
    assert step_seed(0, 7, 0, STREAM_GLOBAL) != step_seed(0, 7, 1, STREAM_GLOBAL)  # dropout differs by rank


def test_simclr_loss_is_nt_xent_of_the_two_views_projections():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 16))
    model = SimCLR(backbone, 16, SimCLRConfig(temperature=0.5, projection_dim=8, projection_bn=False))
    v1, v2 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    out = model(Batch(views=[v1, v2], index=torch.arange(6), label=torch.zeros(6)), step=StepInfo(0, 0, 1))
    z1, z2 = model.projector(backbone(v1)), model.projector(backbone(v2))
    torch.testing.assert_close(out.loss, nt_xent(z1, z2, 0.5))
    # pairing a view with itself gives another value: a forward contrasting the wrong pairs would fail here
    assert not torch.allclose(out.loss, nt_xent(z1, z1, 0.5))
    assert not torch.allclose(out.loss, nt_xent(z1, z2[torch.randperm(6)], 0.5))


def test_spelling_out_a_default_is_no_change_on_resume(tmp_path):
    api.pretrain(_cfg(tmp_path, "train.epochs=2", "train.max_steps=2", method="simclr"))
    spelled = _cfg(tmp_path, "train.epochs=2", "method.hidden_dim=null", "backbone.cifar_stem=null",
                   f"train.resume={tmp_path / 'checkpoint.pt'}", method="simclr")
    assert "hidden_dim" in spelled.method
    assert api.pretrain(spelled)["steps"] == 22
    with pytest.raises(CheckpointError, match="backbone was"):
        api.pretrain(_cfg(tmp_path, "train.epochs=2", "backbone.cifar_stem=false",
                          f"train.resume={tmp_path / 'checkpoint.pt'}", method="simclr"))


class _RunsCode:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_RunsCode.marker),))


def test_a_checkpoint_whose_unpickling_would_run_code_is_refused(tmp_path):
    _RunsCode.marker = str(tmp_path / "code-ran")
    evil = tmp_path / "checkpoint.pt"
    torch.save({"format": 2, "method": {}, "payload": _RunsCode()}, evil)
    for load in (load_checkpoint, api.load_encoder):
        with pytest.raises(CheckpointError, match="was not loaded.*could run code"):
            load(evil)
    assert not (tmp_path / "code-ran").exists()
    # what the trainer writes loads under the same rule
    api.pretrain(_cfg(tmp_path / "ok", "train.epochs=1", "train.max_steps=1", method="simclr"))
    assert load_checkpoint(tmp_path / "ok" / "checkpoint.pt")["step"] == 1


def test_encoder_pt_holds_cpu_tensors_and_rebuilds_the_evaluated_encoder(tmp_path):
    api.pretrain(_cfg(tmp_path, "train.epochs=1", "train.max_steps=2", "method.queue_size=256", "method.bn_splits=1",
                      method="moco-v2"))
    raw = torch.load(tmp_path / "encoder.pt", weights_only=True)  # a plain load, outside the library
    assert all(v.device.type == "cpu" for v in raw["state_dict"].values())
    encoder, info = api.load_encoder(tmp_path / "encoder.pt")
    from_ckpt, _ = api.load_encoder(tmp_path / "checkpoint.pt")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(encoder(x), from_ckpt(x))
    assert encoder(x).shape == (4, info["feature_dim"])
    assert not any(t.is_meta for t in encoder.state_dict().values())


def test_each_build_backbone_call_makes_an_independent_encoder():
    """CMC builds one encoder per view from one context: no shared parameter or buffer, its own random start,
    and training one leaves the other as it was."""
    ctx = BuildContext(input_shape=(1, 8, 8), dataset_size=64, num_classes=10, batch_size=8, world_size=1,
                       steps_per_epoch=8, epochs=1, backbone_section={"name": "small_cnn", "widths": [4, 8]})
    torch.manual_seed(0)
    (a, dim_a), (b, dim_b) = ctx.build_backbone(), ctx.build_backbone()
    assert dim_a == dim_b == 8 and a is not b
    tensors = lambda m: [*m.parameters(), *m.buffers()]  # noqa: E731
    assert not {id(t) for t in tensors(a)} & {id(t) for t in tensors(b)}
    assert not {t.untyped_storage().data_ptr() for t in tensors(a)} & {t.untyped_storage().data_ptr()
                                                                         for t in tensors(b)}
    weights = [n for n, p in a.named_parameters() if p.dim() > 1]
    assert weights and all(not torch.equal(a.get_parameter(n), b.get_parameter(n)) for n in weights)
    torch.manual_seed(0)
    again, _ = ctx.build_backbone()  # the first of the pair, under the same seed
    assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), a.state_dict().values()))
    before = {k: v.clone() for k, v in b.state_dict().items()}
    opt = torch.optim.SGD(a.parameters(), lr=0.5)
    a.train()
    a(torch.randn(8, 1, 8, 8)).pow(2).mean().backward()  # batch-norm statistics move too
    opt.step()
    assert not torch.equal(a.state_dict()[weights[0]], again.state_dict()[weights[0]])
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    assert all(p.grad is None for p in b.parameters())
