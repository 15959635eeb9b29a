"""The methods that learn from labels (siamese, triplet, supcon): the P x K sampler, each method's loss against
the pure loss on exactly its inputs, refusals of unlabeled data, two processes equal to one, exact resume."""

import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from multiprocess import run_as_torchrun
from PIL import Image
from torch import nn

from contrastive import api, distributed
from contrastive.cli import main
from contrastive.configure import resolve_config
from contrastive.data.samplers import check_labelled, pk_batches, samples_per_class
from contrastive.errors import ConfigError, DataError
from contrastive.losses import contrastive_margin_loss, pairwise_margin_loss, supcon_loss, triplet_loss
from contrastive.methods.base import Batch, BuildContext, StepInfo
from contrastive.methods.siamese import Siamese, SiameseConfig
from contrastive.methods.supcon import SupCon, SupConConfig
from contrastive.methods.triplet import Triplet, TripletConfig
from contrastive.training.checkpoint import load_checkpoint
from contrastive.training.trainer import epoch_batches


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the sampler

# 6 classes of unequal sizes, shuffled: 52 samples
LABELS = torch.tensor(sum(([c] * n for c, n in enumerate([10, 9, 8, 12, 7, 6])), []))[torch.randperm(52, generator=_gen(9))]


def test_pk_batches_hold_p_classes_of_k_samples_and_repeat_under_a_seed():
    batches = pk_batches(LABELS, 3, 4, _gen(0))
    assert len(batches) == 52 // 12
    for b in batches:
        assert b.shape == (12,) and len(set(b.tolist())) == 12  # no sample twice in a batch
        labels = LABELS[b].tolist()
        assert sorted(Counter(labels).values()) == [4, 4, 4]
        assert all(len(set(labels[i:i + 4])) == 1 for i in (0, 4, 8))  # each class's K samples consecutive
    assert all(torch.equal(a, b) for a, b in zip(batches, pk_batches(LABELS, 3, 4, _gen(0))))
    assert not all(torch.equal(a, b) for a, b in zip(batches, pk_batches(LABELS, 3, 4, _gen(1))))


def test_within_an_epoch_no_sample_repeats_before_its_class_runs_out():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 9)
    batches = pk_batches(labels, 2, 3, _gen(3), num_batches=6)  # 36 draws from 19 samples: classes run short
    drawn = {c: [] for c in range(3)}
    for b in batches:
        assert len(set(b.tolist())) == 6  # a class refilled mid-batch still gives distinct samples
        for i in b.tolist():
            drawn[int(labels[i])].append(i)
    for c, seq in drawn.items():
        size = int((labels == c).sum())
        first = seq[:size]
        assert len(set(first)) == len(first), c  # a permutation of the class before any repeat
    # the largest class is drawn the most: classes are drawn in proportion to what they have left
    assert len(drawn[2]) >= max(len(drawn[0]), len(drawn[1]))


def test_a_class_smaller_than_k_repeats_its_samples():
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    (batch,) = pk_batches(labels, 2, 3, _gen(0), num_batches=1)
    zeros = [i for i in batch.tolist() if labels[i] == 0]
    assert len(zeros) == 3 and set(zeros) == {0, 1}


def test_the_sampler_names_what_is_wrong():
    with pytest.raises(ConfigError, match=r"train.batch_size=250 must be a multiple of method.classes_per_batch=18"):
        samples_per_class(250, 18)
    with pytest.raises(ConfigError, match="at least 2 samples per class"):
        samples_per_class(10, 10)
    assert samples_per_class(72, 18) == 4
    with pytest.raises(ConfigError, match="method.classes_per_batch=7 is more than the 6 classes"):
        pk_batches(LABELS, 7, 2, _gen(0))
    partly = LABELS.clone()
    partly[[3, 8]] = -1
    with pytest.raises(DataError, match="my-folder: 2 of 52 training images have no label.*method.name=triplet"):
        check_labelled(partly, "my-folder", "triplet")


def test_the_trainer_splits_the_methods_batches_over_ranks(monkeypatch):
    method = _triplet(classes_per_batch=3)
    order = lambda g: method.batch_order(LABELS, 12, g, "t")  # noqa: E731
    whole = epoch_batches(52, 12, seed=5, epoch=2, batch_order=order)
    g = torch.Generator().manual_seed(5 * 1_000_003 + 2)  # the trainer's (seed, epoch) stream
    assert whole == [b.tolist() for b in pk_batches(LABELS, 3, 4, g)]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    halves = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        halves.append(epoch_batches(52, 12, seed=5, epoch=2, batch_order=order))
    assert [a + b for a, b in zip(*halves)] == whole
    # without P the trainer's permutation is used unchanged
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    free = _triplet(classes_per_batch=None)
    assert epoch_batches(52, 12, 5, 2, lambda g: free.batch_order(LABELS, 12, g, "t")) == epoch_batches(52, 12, 5, 2)


# ------------------------------------------------------------------------------------------------ the methods

C, S, N = 1, 4, 12


def _backbone():
    return nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, 10), nn.ReLU())


def _triplet(**kw) -> Triplet:
    torch.manual_seed(0)
    return Triplet(_backbone(), 10, TripletConfig(hidden_dim=8, embedding_dim=6, **kw))


def _batch(n_views=2, n=N, seed=0):
    g = _gen(seed)
    return Batch(views=[torch.randn(n, C, S, S, generator=g) for _ in range(n_views)], index=torch.arange(n),
                 label=torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2, 3])[:n])


INFO = StepInfo(step=0, epoch=0, total_steps=10)


def test_supcon_is_the_supcon_loss_of_both_views_projections():
    torch.manual_seed(0)
    method = SupCon(_backbone(), 10, SupConConfig(projection_dim=6, temperature=0.2))
    batch = _batch()
    out = method(batch, step=INFO)
    z = method.projector(method.backbone(torch.cat(batch.views)))
    assert torch.equal(out.loss, supcon_loss(z, torch.cat([batch.label, batch.label]), 0.2))
    # the two views of an image are positives of each other: without the views' pairing the value differs
    assert abs(out.loss.item() - supcon_loss(z, torch.cat([batch.label, batch.label + 10]), 0.2).item()) > 1e-3


@pytest.mark.parametrize("mining", ["batch-all", "batch-hard", "semi-hard"])
def test_triplet_is_the_triplet_loss_of_the_normalised_embeddings(mining):
    method = _triplet(mining=mining, margin=0.5)
    batch = _batch()
    out = method(batch, step=INFO)
    f = F.normalize(method.head(method.backbone(torch.cat(batch.views))), dim=1)
    assert torch.equal(out.loss, triplet_loss(f, torch.cat([batch.label, batch.label]), 0.5, mining))
    assert out.loss.item() > 0


def test_siamese_is_the_margin_loss_on_every_ordered_pair_of_views():
    torch.manual_seed(0)
    method = Siamese(_backbone(), 10, SiameseConfig(embedding_dim=6, margin=2.0))
    batch = _batch()
    out = method(batch, step=INFO)
    g = method.head(method.backbone(torch.cat(batch.views)))  # [2N, 6]
    labels = torch.cat([batch.label, batch.label])
    i, j = zip(*[(i, j) for i in range(2 * N) for j in range(2 * N) if i != j])
    i, j = torch.tensor(i), torch.tensor(j)
    expected = contrastive_margin_loss(g[i], g[j], labels[i] == labels[j], margin=2.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["siamese", "triplet", "supcon"])
def test_unlabeled_data_and_bad_fields_are_refused_by_name(name):
    cfg = resolve_config(tree={"method": {"name": name}, "data": {"name": "digits"}})
    ctx = BuildContext(input_shape=(1, 8, 8), dataset_size=40, num_classes=None, batch_size=8, world_size=1,
                       steps_per_epoch=5, epochs=1)
    with pytest.raises(ConfigError, match=f"method.name={name} learns from labels.*class sub-folders"):
        api.build_method(cfg, ctx)
    with pytest.raises(ConfigError, match="method.classes_per_batch=0"):
        api.build_method(resolve_config(tree={"method": {"name": name, "classes_per_batch": 0}}),
                         BuildContext(**{**ctx.__dict__, "num_classes": 3}))
    method = api.build_method(cfg, BuildContext(**{**ctx.__dict__, "num_classes": 3}))
    with pytest.raises(DataError, match="digits: 1 of 3 training images have no label"):
        method.batch_order(torch.tensor([0, -1, 1]), 2, _gen(), "digits")
    two_sizes = Batch(views=[torch.randn(4, 1, 8, 8), torch.randn(4, 1, 6, 6)], index=torch.arange(4),
                      label=torch.arange(4))
    with pytest.raises(ConfigError, match="views.groups of one size"):
        method(two_sizes, step=INFO)


def test_triplet_fields_are_checked():
    with pytest.raises(ConfigError, match="method.mining='hard'"):
        _triplet(mining="hard")
    with pytest.raises(ConfigError, match="method.margin=0"):
        _triplet(margin=0.0)


def test_the_cli_refuses_an_unlabeled_folder(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(flat / f"{i}.png")
    for name in ("siamese", "triplet", "supcon"):
        code = main(["pretrain", "--method", name, "--data", str(flat), "--epochs", "1", "--batch-size", "4",
                     "--output", str(tmp_path / name), "train.progress=false"])
        err = capsys.readouterr().err
        assert code == 2 and f"method.name={name} learns from labels" in err and "class sub-folders" in err
        assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------ two processes

X = torch.randn(8, 5, generator=_gen(11))
Y = torch.tensor([0, 1, 0, 2, 1, 1, 0, 2])

LOSSES = {
    "supcon": lambda x, y: supcon_loss(x, y, 0.2),
    "batch-all": lambda x, y: triplet_loss(x, y, 0.5, "batch-all"),
    "batch-hard": lambda x, y: triplet_loss(x, y, 0.5, "batch-hard"),
    "semi-hard": lambda x, y: triplet_loss(x, y, 0.5, "semi-hard"),
    "pairwise-margin": lambda x, y: pairwise_margin_loss(x, y, 2.0),
}


def _loss_worker(out_dir: str) -> None:
    distributed.init_from_env(torch.device("cpu"))
    rank = distributed.rank()
    results = {}
    for name, fn in LOSSES.items():
        x = X[rank * 4:(rank + 1) * 4].clone().requires_grad_()
        loss = fn(x, Y[rank * 4:(rank + 1) * 4])
        loss.backward()
        results[name] = (loss.detach(), x.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    run_as_torchrun(_loss_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, fn in LOSSES.items():
        x = X.clone().requires_grad_()
        loss = fn(x, Y)
        loss.backward()
        assert loss.item() > 0, name
        # the mean over processes is the loss; each process's gradient of its own rows, averaged over the two
        # processes as DDP averages, is the single-process gradient
        assert (ranks[0][name][0] + ranks[1][name][0]).item() / 2 == pytest.approx(loss.item(), rel=1e-5), name
        torch.testing.assert_close(torch.cat([ranks[0][name][1], ranks[1][name][1]]) / 2, x.grad, rtol=1e-4,
                                   atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ training

FAST = ["data.image_size=8", "train.batch_size=50", "method.classes_per_batch=10", "train.progress=false",
        "train.tensorboard=false", "eval.enabled=false", "train.log_every=1", "train.epochs=1",
        "method.hidden_dim=32", "method.embedding_dim=16"]


def _cfg(out, *extra):
    return resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "triplet"}},
                          overrides=FAST + [f"train.output={out}", *extra])


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    # digits: 1437 training images -> 28 P x K batches (10 digits x 5) an epoch
    full = api.pretrain(_cfg(tmp_path / "full"))
    part = api.pretrain(_cfg(tmp_path / "part", "train.max_steps=12"))  # stops inside the epoch
    assert (full["steps"], part["steps"]) == (28, 12)
    ckpt = tmp_path / "part" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["epoch_batch"] == 12
    resumed = api.pretrain(_cfg(tmp_path / "part", f"train.resume={ckpt}"))
    assert resumed["steps"] == 28
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(ckpt)
    for k in a["method"]:
        assert torch.equal(a["method"][k], b["method"][k]), k

    def losses(p):
        rows = (p / "metrics.csv").read_text().splitlines()
        col = rows[0].split(",").index("loss")
        return [float(r.split(",")[col]) for r in rows[1:]]

    assert len(losses(tmp_path / "full")) == 28 and losses(tmp_path / "part") == losses(tmp_path / "full")
