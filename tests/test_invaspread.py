"""InvaSpread: the loss against a naive double loop and the official formula, the method's wiring, two
processes against one, and loading a checkpoint as the encoder."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from contrastive import api, distributed
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.losses import invariance_spread
from contrastive.methods.base import Batch, StepInfo
from contrastive.methods.invaspread import InvaSpread, InvaSpreadConfig
from contrastive.modalities import modality_of

N, D, T = 6, 5, 0.1


def _features(n=N, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1))


def _naive(f1: torch.Tensor, f2: torch.Tensor, tau: float) -> torch.Tensor:
    """Loop over anchors and candidates; the candidates are constants (``.detach()``), as in BatchCriterion."""
    n = f1.shape[0]
    feats = list(f1) + list(f2)
    consts = [x.detach() for x in feats]
    total = 0
    for a in range(2 * n):
        partner = (a + n) % (2 * n)
        scores = {c: torch.exp(feats[a] @ consts[c] / tau) for c in range(2 * n) if c != a}
        denominator = sum(scores.values())
        total = total + torch.log(scores[partner] / denominator)
        for c in scores:
            if c != partner:  # 1 - P(c) as the other candidates' share, exact even when P(c) is near 1
                total = total + torch.log(sum(v for k, v in scores.items() if k != c) / denominator)
    return -total / (2 * n)


def _official(x: torch.Tensor, tau: float) -> torch.Tensor:
    """The official BatchCriterion's arithmetic (negM = 1) on x = cat(view 1, view 2): exp, divide, log."""
    b2 = x.shape[0]
    reordered = torch.cat([x[b2 // 2:], x[:b2 // 2]])
    pos = torch.exp((x * reordered.detach()).sum(1) / tau)
    all_prob = torch.exp(x @ x.t().detach() / tau) * (1 - torch.eye(b2, dtype=x.dtype))
    all_div = all_prob.sum(1)
    ln_pmt = pos / all_div
    ln_pon = torch.log(1 - all_prob / all_div.unsqueeze(1)).sum(1) - torch.log(1 - ln_pmt)
    return -(torch.log(ln_pmt).sum() + ln_pon.sum()) / b2


def test_loss_by_hand_for_two_images():
    # two images, τ = 1: image 0's views are both e1, image 1's are e2 and e3 (orthogonal).
    # image 0's anchors (either view): positive at s = 1, two negatives at s = 0; denominator e + 2.
    # image 1's anchors: positive and both negatives at s = 0; denominator 3.
    e = math.e
    a0 = math.log(e / (e + 2)) + 2 * math.log(1 - 1 / (e + 2))
    a1 = math.log(1 / 3) + 2 * math.log(1 - 1 / 3)
    f1 = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    f2 = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    assert invariance_spread(f1, f2, 1.0).item() == pytest.approx(-(2 * a0 + 2 * a1) / 4, rel=1e-6)


def test_loss_and_gradient_equal_a_double_loop_and_the_official_formula():
    f1, f2 = _features()
    a1, a2 = f1.clone().requires_grad_(), f2.clone().requires_grad_()
    loss = invariance_spread(a1, a2, T)
    loss.backward()
    b1, b2 = f1.clone().requires_grad_(), f2.clone().requires_grad_()
    naive = _naive(b1, b2, T)
    naive.backward()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-6)
    # gradients through the anchor side only, as the reference's; float32 against float64 (gradients ~1)
    torch.testing.assert_close(a1.grad, b1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a2.grad, b2.grad, rtol=1e-4, atol=1e-5)
    assert _official(torch.cat([f1, f2]), T).item() == pytest.approx(naive.item(), rel=1e-9)


def test_loss_is_finite_where_the_official_formula_is_not():
    # τ = 0.005: exp(1/τ) = e^200 overflows float32, and 1 - P rounds to 0 for the near-certain positive
    f1, f2 = _features(seed=1)
    f1, f2 = f1.float(), f2.float()
    assert not torch.isfinite(_official(torch.cat([f1, f2]), 0.005))
    assert torch.isfinite(invariance_spread(f1, f2, 0.005))
    assert invariance_spread(f1, f2, 0.005).item() == pytest.approx(_naive(f1.double(), f2.double(), 0.005).item(),
                                                                    rel=1e-4)


def _method() -> InvaSpread:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(8))
    backbone(torch.zeros(2, 3, 4, 4))
    return InvaSpread(backbone, 8, InvaSpreadConfig(temperature=T, embedding_dim=D))


def test_forward_loss_is_the_loss_of_the_two_views_of_each_image():
    method = _method()
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(N, 3, 4, 4, generator=g), torch.randn(N, 3, 4, 4, generator=g)
    out = method(Batch(views=[v1, v2], index=torch.arange(N), label=torch.full((N,), -1)),
                 step=StepInfo(step=0, epoch=0, total_steps=1))
    f = method.embed(torch.cat([v1, v2]))  # one pass: batch norm over both views
    assert torch.equal(out.loss, invariance_spread(f[:N], f[N:], T))
    assert f.shape == (2 * N, D) and torch.allclose(f.norm(dim=1), torch.ones(2 * N))
    # a wrong pairing would give another value: the loss sees which view belongs to which image
    assert not torch.allclose(out.loss, invariance_spread(f[:N], f[N:].roll(1, 0), T))
    with pytest.raises(ConfigError, match="views.n_views=2"):
        method(Batch(views=[v1], index=torch.arange(N), label=torch.arange(N)),
               step=StepInfo(step=0, epoch=0, total_steps=1))


def test_loss_is_float32_under_bf16_autocast():
    f1, f2 = (f.to(torch.bfloat16) for f in _features())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = invariance_spread(f1, f2, T)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_naive(f1.double(), f2.double(), T).item(), rel=1e-5)


def test_a_checkpoint_loads_as_the_trained_encoder(tmp_path):
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    cfg = resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "invaspread"}},
                         overrides=["data.image_size=16", "train.batch_size=64", "train.epochs=1",
                                    "train.max_steps=2", "train.progress=false", "train.tensorboard=false",
                                    f"train.output={tmp_path}"])
    data = load_splits(cfg.data).pretrain
    method = api.build_method(cfg, modality_of(data).context(cfg, data))
    Trainer(cfg, method, data, tmp_path).fit()
    encoder, info = api.load_encoder(tmp_path / "checkpoint.pt")
    assert info["feature_dim"] == method.feature_dim
    x = torch.randn(5, 1, 16, 16)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), method.encoder()(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ two processes

def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = N // world
        f1, f2 = (f.float() for f in _features())
        sl = slice(rank * n, (rank + 1) * n)
        a1, a2 = f1[sl].clone().requires_grad_(), f2[sl].clone().requires_grad_()
        loss = invariance_spread(a1, a2, T)
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": a1.grad, "g2": a2.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    f1, f2 = (f.float() for f in _features())
    a1, a2 = f1.clone().requires_grad_(), f2.clone().requires_grad_()
    single = invariance_spread(a1, a2, T)
    single.backward()
    # equal local batches: the whole-batch loss is the mean of the ranks' losses
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(single.item(), rel=1e-6)
    # a rank's anchors are its own rows; its mean runs over 2n of the 2N anchors, so its gradient is
    # world_size x the single-process one, and DDP's average over ranks gives the single-process gradient
    n = N // world
    for r, res in enumerate(ranks):
        sl = slice(r * n, (r + 1) * n)
        torch.testing.assert_close(res["g1"] / world, a1.grad[sl], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["g2"] / world, a2.grad[sl], rtol=1e-5, atol=1e-6)
