"""InstDisc: the NCE loss, its normaliser Z, the full softmax, the memory bank, the noise draws, the method's
wiring, exact resume, evaluation, loading, and a two-process run equal to one process."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from contrastive import api, distributed
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.losses import nce_loss, nce_normaliser, nonparametric_softmax
from contrastive.methods import method_config
from contrastive.methods.base import Batch, StepInfo
from contrastive.methods.instdisc import InstDisc, InstDiscConfig
from contrastive.modalities import modality_of
from contrastive.training.checkpoint import load_checkpoint

# ------------------------------------------------------------------------------------------------ the losses


def test_nce_loss_by_hand():
    # τ = 1, Z = 2, N = 4 rows, m = 2 noise samples: m P_n = 1/2.
    # positive score 1: P = e/2, h = (e/2) / (e/2 + 1/2) = e / (e + 1)
    # noise scores 0 and -1: P = 1/2 and 1/(2e), 1 - h = 1/2 and (1/2) / (1/(2e) + 1/2) = e / (e + 1)
    # loss = -[log(e/(e+1)) + log(1/2) + log(e/(e+1))] = 2 log(1 + e) - 2 + log 2
    f = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[1.0, 0.0]])
    noise = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])
    loss = nce_loss(f, positive, noise, 1.0, torch.tensor(2.0), dataset_size=4)
    assert loss.item() == pytest.approx(2 * math.log(1 + math.e) - 2 + math.log(2), rel=1e-6)


def _random_rows(n, m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    return unit(n, d), unit(n, d), unit(n, m, d)


def test_nce_loss_equals_a_python_loop():
    n, m, d, big_n, tau, z = 5, 7, 6, 50, 0.1, 123.4
    f, positive, noise = _random_rows(n, m, d)
    total = 0.0
    for i in range(n):
        p = math.exp(float(f[i].double() @ positive[i].double()) / tau) / z
        total += math.log(p / (p + m / big_n))
        for k in range(m):
            p = math.exp(float(f[i].double() @ noise[i, k].double()) / tau) / z
            total += math.log(1 - p / (p + m / big_n))
    loss = nce_loss(f, positive, noise, tau, torch.tensor(z), dataset_size=big_n)
    assert loss.item() == pytest.approx(-total / n, rel=1e-5)


def test_nce_loss_is_finite_where_exp_then_log_is_not():
    # τ = 0.01 puts exp(score / τ) at e^100; the log-space form still gives the exact limit
    f = torch.tensor([[1.0, 0.0]])
    loss = nce_loss(f, f.clone(), -f.clone().unsqueeze(1), 0.01, torch.tensor(1.0), dataset_size=10)
    # log h(pos) ≈ 0 and log(1 - h(noise)) ≈ -log(1 + e^-100 * 10) ≈ 0
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_normaliser_is_n_times_the_mean_of_exp_scores():
    n, m, d, big_n, tau = 4, 9, 8, 1000, 0.07
    f, positive, noise = _random_rows(n, m, d, seed=1)
    values = []
    for i in range(n):
        values.append(math.exp(float(f[i].double() @ positive[i].double()) / tau))
        values += [math.exp(float(f[i].double() @ noise[i, k].double()) / tau) for k in range(m)]
    z = nce_normaliser(f, positive, noise, tau, big_n)
    assert not z.requires_grad and z.dtype == torch.float32
    assert z.item() == pytest.approx(big_n * sum(values) / len(values), rel=1e-5)


def test_full_softmax_equals_a_naive_cross_entropy():
    n, big_n, d, tau = 4, 11, 5, 0.1
    f, _, _ = _random_rows(n, 1, d, seed=2)
    bank = F.normalize(torch.randn(big_n, d, generator=torch.Generator().manual_seed(3)), dim=1)
    index = torch.tensor([3, 0, 10, 7])
    total = 0.0
    for i in range(n):
        logits = [float(f[i].double() @ bank[k].double()) / tau for k in range(big_n)]
        total += -(logits[index[i]] - math.log(sum(math.exp(v) for v in logits)))
    assert nonparametric_softmax(f, bank, index, tau).item() == pytest.approx(total / n, rel=1e-5)


# ------------------------------------------------------------------------------------------------ the method

D = 4  # embedding width of the small test methods


def _method(loss="nce", size=20, m=6, seed=0) -> InstDisc:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
    cfg = InstDiscConfig(loss=loss, temperature=0.1, embedding_dim=D, num_negatives=m, bank_momentum=0.5)
    return InstDisc(backbone, 8, cfg, size)


def _info(step=0, rank=0, seed=0):
    return StepInfo(step=step, epoch=0, total_steps=10, seed=seed, rank=rank)


def test_bank_update_is_the_proximal_rule_and_touches_only_the_batch():
    method = _method(size=5)
    method.bank.rows.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0],
                                         [0.6, 0.8, 0, 0]]))
    before = method.bank.rows.clone()
    f = torch.tensor([[0, 1.0, 0, 0], [0.6, 0, 0.8, 0]])
    method.after_step({"index": torch.tensor([0, 4]), "features": f, "z": torch.tensor(7.0)}, _info())
    # row 0: normalise(0.5 [1, 0, 0, 0] + 0.5 [0, 1, 0, 0]) = [1, 1, 0, 0] / √2
    # row 4: normalise(0.5 [0.6, 0.8, 0, 0] + 0.5 [0.6, 0, 0.8, 0]) = [0.6, 0.4, 0.4, 0] / √0.68
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(method.bank.rows[0], torch.tensor([r, r, 0, 0]))
    torch.testing.assert_close(method.bank.rows[4], torch.tensor([0.6, 0.4, 0.4, 0]) / math.sqrt(0.68))
    assert torch.equal(method.bank.rows[1:4], before[1:4])
    assert method.z.item() == 7.0


def test_noise_is_uniform_over_the_bank():
    method = _method(size=10, m=5000)
    draws = method.noise_index(20, _info(step=3), torch.device("cpu"))  # 100,000 draws
    assert draws.shape == (20, 5000) and draws.min() == 0 and draws.max() == 9
    counts = torch.bincount(draws.flatten(), minlength=10).double()
    # each count is Binomial(100000, 0.1): sd ≈ 95; 5 sd is a failure only for a biased sampler
    assert (counts - 10_000).abs().max() < 5 * math.sqrt(100_000 * 0.1 * 0.9)
    chi2 = float(((counts - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 33.7  # the 99.99% quantile of chi-square with 9 degrees of freedom


def test_noise_depends_on_seed_and_step_not_on_the_rank_split(monkeypatch):
    method = _method(size=100, m=7)
    whole = method.noise_index(8, _info(step=5), torch.device("cpu"))
    assert torch.equal(whole, method.noise_index(8, _info(step=5), torch.device("cpu")))
    assert not torch.equal(whole, method.noise_index(8, _info(step=6), torch.device("cpu")))
    assert not torch.equal(whole, method.noise_index(8, _info(step=5, seed=1), torch.device("cpu")))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    halves = [method.noise_index(4, _info(step=5, rank=r), torch.device("cpu")) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(views=[torch.randn(n, 3, 2, 2, generator=g)], index=torch.tensor([17, 2, 9, 0, 11, 5])[:n],
                 label=torch.full((n,), -1))


def test_forward_loss_is_nce_on_the_batch_rows_and_the_steps_noise():
    method = _method(size=20, m=6)
    batch, info = _batch(), _info(step=4, seed=3)
    state = {k: v.clone() for k, v in method.state_dict().items()}

    # first step: Z is estimated from this batch and handed to after_step
    out = method(batch, step=info)
    f = method.embed(batch.views[0])
    noise_idx = torch.randint(20, (6, 6), generator=info.generator("cpu", per_rank=False))
    positive, noise = method.bank.rows[batch.index], method.bank.rows[noise_idx]
    z = nce_normaliser(f, positive, noise, 0.1, 20)
    assert torch.equal(out.updates["z"], z)
    assert torch.equal(out.loss, nce_loss(f, positive, noise, 0.1, z, 20))
    assert torch.equal(out.updates["index"], batch.index) and torch.equal(out.updates["features"], f)
    for k, v in method.state_dict().items():  # forward changed nothing
        assert torch.equal(v, state[k]), k

    # once Z is set it is used as it is
    method.z.fill_(5.0)
    out = method(batch, step=info)
    assert torch.equal(out.loss, nce_loss(f, positive, noise, 0.1, torch.tensor(5.0), 20))
    assert out.updates["z"].item() == 5.0
    out.loss.backward()
    assert method.fc.weight.grad is not None and method.bank.rows.grad is None


def test_forward_loss_is_the_full_softmax_over_the_bank():
    method = _method(loss="softmax", size=20)
    batch = _batch()
    out = method(batch, step=_info())
    f = method.embed(batch.views[0])
    assert torch.equal(out.loss, nonparametric_softmax(f, method.bank.rows, batch.index, 0.1))
    assert "z" not in dict(method.named_buffers())


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_loss_is_float32_under_bf16_autocast(loss):
    method = _method(loss=loss, size=20)
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(batch, step=_info())
    assert out.loss.dtype == torch.float32 and out.updates["features"].dtype == torch.float32
    reference = method(batch, step=_info()).loss  # fp32 throughout; only the bf16 layers differ
    assert out.loss.item() == pytest.approx(reference.item(), rel=0.05)


def test_one_view_only_and_bad_fields_are_named():
    method = _method()
    two = Batch(views=[torch.randn(2, 3, 2, 2)] * 2, index=torch.arange(2), label=torch.arange(2))
    with pytest.raises(ConfigError, match="views.n_views=1"):
        method(two, step=_info())
    with pytest.raises(ConfigError, match="method.loss"):
        _method(loss="infonce")
    with pytest.raises(ConfigError, match="unknown config key method.negatives"):
        resolve_config(overrides=["method.name=instdisc", "method.negatives=3"])


# ------------------------------------------------------------------------------------------------ training

FAST = ["data.image_size=16", "train.batch_size=128", "train.progress=false", "train.tensorboard=false",
        "eval.enabled=false", "train.log_every=1", "method.num_negatives=64", "method.loss=nce"]


def _cfg(tmp, *extra):
    return resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "instdisc"}},
                          overrides=FAST + [f"train.output={tmp}", *extra])


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    # digits: 1437 training images -> 11 steps an epoch at batch 128; 2 epochs = 22 steps
    full = api.pretrain(_cfg(tmp_path / "full", "train.epochs=2"))
    part = api.pretrain(_cfg(tmp_path / "part", "train.epochs=2", "train.max_steps=7"))
    assert (full["steps"], part["steps"]) == (22, 7)
    ckpt = tmp_path / "part" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["method"]["z"].item() > 0  # estimated at step 0, kept
    resumed = api.pretrain(_cfg(tmp_path / "part", "train.epochs=2", f"train.resume={ckpt}"))
    assert resumed["steps"] == 22
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(ckpt)
    assert a["method"].keys() == b["method"].keys() and {"bank.rows", "z"} <= set(a["method"])
    for k in a["method"]:  # weights, bank and Z, bitwise
        assert torch.equal(a["method"][k], b["method"][k]), k
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][k][name]))


def test_evaluation_leaves_the_bank_alone_and_the_checkpoint_loads_as_the_encoder(tmp_path):
    from contrastive.modalities import load_splits
    from contrastive.modalities.image.preprocess import Preprocess
    from contrastive.training.trainer import Trainer

    cfg = _cfg(tmp_path, "train.epochs=1", "train.max_steps=3", "eval.linear=false",
               "eval.baseline=false")
    splits = load_splits(cfg.data)
    torch.manual_seed(cfg.seed)
    method = api.build_method(cfg, modality_of(splits.pretrain).context(cfg, splits.pretrain))
    Trainer(cfg, method, splits.pretrain, tmp_path).fit()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert method.z.item() > 0 and not torch.equal(state["bank.rows"], _fresh_bank(cfg, splits.pretrain))

    preprocess = Preprocess.for_dataset(splits.pretrain, 16)
    res = api.evaluate_encoder(method.encoder(), preprocess, splits.eval_train, splits.eval_test, cfg, note="t")
    assert 0 < res["knn_top1"] <= 1
    for k, v in method.state_dict().items():  # bank, Z and batch-norm statistics untouched
        assert torch.equal(v, state[k]), k

    encoder, info = api.load_encoder(tmp_path / "checkpoint.pt")
    assert info["feature_dim"] == method.feature_dim
    x = torch.randn(5, 1, 16, 16)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), method.encoder()(x), rtol=0, atol=0)


def _fresh_bank(cfg, dataset):
    torch.manual_seed(cfg.seed)
    return api.build_method(cfg, modality_of(dataset).context(cfg, dataset)).bank.rows


# ------------------------------------------------------------------------------------------------ two processes

# Views made deterministic (full-image crop, no flip or colour): the views of a step are seeded per rank, so
# with random views a two-process run would augment each image differently from one process. The backbone
# has no batch norm, whose statistics are per process on CPUs. Everything else (noise draws, Z, bank writes)
# is what the test checks.
DETERMINISTIC = ["views.crop_scale=[1.0,1.0]", "views.crop_ratio=[1.0,1.0]", "views.hflip_p=0",
                 "views.jitter_p=0", "views.grayscale_p=0", "data.image_size=8", "train.batch_size=64",
                 "train.epochs=1", "train.progress=false", "train.log_every=1", "method.loss=nce",
                 "method.num_negatives=32", "method.embedding_dim=16", "train.channels_last=false"]


def _run_trainer(output: str) -> dict:
    """Train, and return this process's method state (every rank's, not only the checkpoint's rank 0)."""
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    cfg = resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "instdisc"}},
                         overrides=DETERMINISTIC + [f"train.output={output}"])
    data = load_splits(cfg.data).pretrain
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
    method = InstDisc(backbone, 32, method_config(cfg), len(data))
    Trainer(cfg, method, data, output).fit()
    return method.state_dict()


def _trainer_worker(rank: int, world: int, port: int, output: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        torch.save(_run_trainer(output), os.path.join(output, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_trainer_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    single = _run_trainer(str(tmp_path / "single"))
    assert load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["step"] == 1437 // 64
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    # every rank wrote the same rows with the same values: the banks are bitwise equal
    assert torch.equal(ranks[0]["bank.rows"], ranks[1]["bank.rows"]) and torch.equal(ranks[0]["z"], ranks[1]["z"])
    # Z: the two-process estimate (mean of the ranks' means) is the single-process one
    assert ranks[0]["z"].item() == pytest.approx(single["z"].item(), rel=1e-6)
    # the bank (rows written and rows never drawn) and the weights are the single-process ones
    for k, v in single.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5, msg=k)

    def losses(p):
        rows = (p / "metrics.csv").read_text().splitlines()
        col = rows[0].split(",").index("loss")
        return [float(r.split(",")[col]) for r in rows[1:]]

    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
