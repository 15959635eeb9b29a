"""SimCSE (unsupervised, supervised) and CLIP losses against naive loops; CLIP's symmetry and clamp; two
gloo processes holding half the batch each against one holding all of it."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from multiprocess import run_as_torchrun

from contrastive import distributed
from contrastive.losses import clip_loss, info_nce_batch, simcse_sup, simcse_unsup


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def cos(a, b):
    return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


def naive_simcse(h, pos, neg, t):
    """Gao et al. 2021, Eq. 1 (neg None) and Eq. 5, one anchor and one candidate at a time, in float64."""
    h, pos = h.double(), pos.double()
    total = 0.0
    for i in range(len(h)):
        den = sum(math.exp(cos(h[i], pos[j]) / t) for j in range(len(h)))
        if neg is not None:
            den += sum(math.exp(cos(h[i], neg.double()[j]) / t) for j in range(len(h)))
        total += -math.log(math.exp(cos(h[i], pos[i]) / t) / den)
    return total / len(h)


def naive_clip(image, text, logit_scale):
    """CLIP's Fig. 3 pseudocode as loops: cross-entropy over texts per image and over images per text."""
    scale = min(math.exp(logit_scale), 100.0)
    n = len(image)
    logits = [[scale * cos(image[i].double(), text[j].double()) for j in range(n)] for i in range(n)]
    per_image = sum(-logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(n))) for i in range(n)) / n
    per_text = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n)) / n
    return (per_image + per_text) / 2


@pytest.mark.parametrize("n,d,t", [(4, 8, 0.05), (9, 16, 0.05), (5, 3, 0.5)])
def test_simcse_equals_naive_loops(n, d, t):
    g = _gen(n * d)
    h, pos, neg = (torch.randn(n, d, generator=g) for _ in range(3))
    assert simcse_unsup(h, pos, t).item() == pytest.approx(naive_simcse(h, pos, None, t), rel=1e-5)
    assert simcse_sup(h, pos, neg, t).item() == pytest.approx(naive_simcse(h, pos, neg, t), rel=1e-5)


def test_simcse_orthonormal_pairs_analytic():
    # positives identical (cos 1), every other candidate orthogonal (cos 0): log(1 + (n - 1) e^{-1/t});
    # with the other half of the basis as hard negatives, log(1 + (2n - 1) e^{-1/t})
    n, t = 6, 0.2  # at 0.05 the loss, 1e-8, is below float32's resolution beside logits of 20
    basis = torch.eye(2 * n) * 2.0
    z, hard = basis[:n], basis[n:]
    assert simcse_unsup(z, z.clone(), t).item() == pytest.approx(math.log1p((n - 1) * math.exp(-1 / t)), rel=1e-6)
    assert simcse_sup(z, z.clone(), hard, t).item() == pytest.approx(math.log1p((2 * n - 1) * math.exp(-1 / t)),
                                                                     rel=1e-6)


def test_simcse_gradients_match_autograd_of_a_reference():
    g = _gen(1)
    h, pos, neg = (torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    simcse_sup(h, pos, neg, 0.05).backward()
    got = [x.grad.clone() for x in (h, pos, neg)]
    for x in (h, pos, neg):
        x.grad = None
    a, p, q = (F.normalize(x, dim=1) for x in (h, pos, neg))
    logits = torch.cat([a @ p.T, a @ q.T], dim=1) / 0.05  # [n, 2n]
    torch.stack([torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(5)]).mean().backward()
    for mine, ref in zip(got, (h.grad, pos.grad, neg.grad)):
        torch.testing.assert_close(mine.double(), ref, rtol=1e-4, atol=1e-6)


def test_moco_v3_info_nce_is_not_simcse():
    # same value up to MoCo v3's 2 tau, but no gradient reaches the keys: SimCSE needs its own loss
    g = _gen(2)
    z1 = torch.randn(6, 8, generator=g, requires_grad=True)
    z2 = torch.randn(6, 8, generator=g, requires_grad=True)
    t = 0.05
    simcse = simcse_unsup(z1, z2, t)
    assert info_nce_batch(z1, z2, t).item() == pytest.approx(simcse.item() * 2 * t, rel=1e-6)
    simcse.backward()
    assert z2.grad.abs().sum() > 0
    z2.grad = None
    info_nce_batch(z1, z2, t).backward()
    assert z2.grad is None


@pytest.mark.parametrize("n,d,scale", [(4, 8, math.log(1 / 0.07)), (7, 5, 1.0), (6, 16, math.log(250.0))])
def test_clip_equals_naive_loops(n, d, scale):
    g = _gen(n + d)
    image, text = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    loss = clip_loss(image, text, torch.tensor(scale))
    assert loss.item() == pytest.approx(naive_clip(image, text, scale), rel=1e-5)


def test_clip_is_symmetric_in_image_and_text():
    g = _gen(3)
    image = torch.randn(6, 8, generator=g, requires_grad=True)
    text = torch.randn(6, 8, generator=g, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    loss = clip_loss(image, text, s)
    loss.backward()
    grads = image.grad.clone(), text.grad.clone(), s.grad.clone()
    image.grad = text.grad = s.grad = None
    swapped = clip_loss(text, image, s)
    swapped.backward()
    assert torch.equal(loss, swapped)  # (a + b) / 2 == (b + a) / 2 exactly
    torch.testing.assert_close(text.grad, grads[1], rtol=0, atol=1e-7)
    torch.testing.assert_close(image.grad, grads[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(s.grad, grads[2], rtol=0, atol=1e-7)


def test_clip_temperature_is_learnt_and_clamped_at_100():
    g = _gen(4)
    image, text = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    s = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    clip_loss(image, text, s).backward()
    # d loss / d s = scale * d loss / d scale, by autograd of the naive formula on the same numbers
    s_ref = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    logits = s_ref.exp() * F.normalize(image.double(), dim=1) @ F.normalize(text.double(), dim=1).T
    labels = torch.arange(8)
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    assert s.grad.item() == pytest.approx(s_ref.grad.item(), rel=1e-4) and s.grad.item() != 0
    above = torch.tensor(math.log(200.0), requires_grad=True)
    loss = clip_loss(image, text, above)
    loss.backward()
    assert loss.item() == pytest.approx(naive_clip(image, text, math.log(100.0)), rel=1e-5)
    assert above.grad.item() == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(torch.zeros(3, 4), torch.zeros(4, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="one shape"):
        simcse_sup(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------------------------
# two processes, each holding half of the batch, against one holding all of it

N, D = 8, 6


def _data():
    g = _gen(10)
    return [torch.randn(N, D, generator=g) for _ in range(3)]


def _losses(a, b, c, s):
    return {"unsup": simcse_unsup(a, b), "sup": simcse_sup(a, b, c), "clip": clip_loss(a, b, s)}


def _halves_worker(out_dir: str) -> None:
    distributed.init_from_env(torch.device("cpu"))
    rank, world = distributed.rank(), distributed.world_size()
    rows = slice(rank * N // world, (rank + 1) * N // world)
    out = {"world": world}
    for name in ("unsup", "sup", "clip"):
        a, b, c = (x[rows].clone().requires_grad_() for x in _data())
        s = torch.tensor(2.5, requires_grad=True)
        loss = _losses(a, b, c, s)[name]
        loss.backward()
        out[name] = {"loss": loss.detach(), "grads": [a.grad, b.grad, c.grad], "scale_grad": s.grad}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    run_as_torchrun(_halves_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for name in ("unsup", "sup", "clip"):
        a, b, c = (x.clone().requires_grad_() for x in _data())
        s = torch.tensor(2.5, requires_grad=True)
        loss = _losses(a, b, c, s)[name]
        loss.backward()
        # the whole batch's loss is the mean of the ranks' losses (equal shares); DDP averages gradients, so
        # each rank's gradient for its own rows, divided by the world size, is the single process's
        assert torch.stack([r[name]["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
        for r, res in enumerate(ranks):
            rows = slice(r * N // 2, (r + 1) * N // 2)
            for mine, single in zip(res[name]["grads"], (a.grad, b.grad, c.grad)):
                if single is None:  # the unused third input
                    assert mine is None, name
                else:
                    torch.testing.assert_close(mine / 2, single[rows], rtol=1e-5, atol=1e-7, msg=name)
        if name == "clip":
            mean_scale_grad = (ranks[0][name]["scale_grad"] + ranks[1][name]["scale_grad"]) / 2
            torch.testing.assert_close(mean_scale_grad, s.grad, rtol=1e-5, atol=1e-7)
