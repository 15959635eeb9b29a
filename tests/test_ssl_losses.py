"""BYOL / SimSiam, SwAV and DINO losses: analytic values, naive loops, Sinkhorn's marginals, two processes
against one, float32 under autocast."""

import math
import os

import numpy as np
import pytest
import torch
from multiprocess import run_as_torchrun

from contrastive import distributed
from contrastive.losses import byol_loss, center_update, dino_loss, negative_cosine, sinkhorn, swav_loss


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    return dot / math.sqrt(sum(float(x) ** 2 for x in a) * sum(float(y) ** 2 for y in b))


# ------------------------------------------------------------------------------------------------------------
# BYOL and SimSiam


def test_byol_loss_is_0_when_aligned_and_4_when_opposite():
    p = torch.randn(6, 16, generator=_gen())
    assert byol_loss(p, 3.0 * p).item() == pytest.approx(0.0, abs=1e-6)  # norms do not matter
    assert byol_loss(p, -0.5 * p).item() == pytest.approx(4.0, rel=1e-6)


def test_byol_loss_is_2_minus_2_cos_by_a_loop():
    g = _gen(1)
    p, z = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = sum(2 - 2 * _cos(p[i], z[i]) for i in range(7)) / 7
    assert byol_loss(p, z).item() == pytest.approx(expected, rel=1e-6)


def test_negative_cosine_is_minus_cos_by_a_loop():
    g = _gen(2)
    p, z = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    expected = sum(-_cos(p[i], z[i]) for i in range(7)) / 7
    assert negative_cosine(p, z).item() == pytest.approx(expected, rel=1e-6)
    assert negative_cosine(p, 2.0 * p).item() == pytest.approx(-1.0, rel=1e-6)


@pytest.mark.parametrize("loss", [byol_loss, negative_cosine])
def test_no_gradient_reaches_the_target(loss):
    g = _gen(3)
    p = torch.randn(4, 8, generator=g, requires_grad=True)
    z = torch.randn(4, 8, generator=g, requires_grad=True)
    loss(p, z).backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# Sinkhorn


def naive_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """main_swav.py's ``distributed_sinkhorn`` in one process, literally, in float64 numpy (no max shift)."""
    q = np.exp(scores.double().numpy() / epsilon).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return torch.from_numpy(q.T)


def test_sinkhorn_meets_both_marginals_when_iterated_long():
    b, k = 32, 8
    scores = 0.1 * torch.randn(b, k, generator=_gen(4))
    q = sinkhorn(scores, epsilon=0.05, iterations=50)
    assert q.shape == (b, k) and q.dtype == torch.float32 and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b), rtol=0, atol=1e-5)  # each sample's code sums to 1
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), b / k), rtol=1e-4, atol=0)  # equal partition
    # three iterations are not there yet: the long run is a different answer
    assert not torch.allclose(sinkhorn(scores, 0.05, 3), q, atol=1e-4)


@pytest.mark.parametrize("b,k,eps", [(12, 5, 0.05), (6, 10, 0.1)])
def test_sinkhorn_default_equals_the_official_three_iterations(b, k, eps):
    scores = 0.2 * torch.randn(b, k, generator=_gen(b * k))
    torch.testing.assert_close(sinkhorn(scores, eps), naive_sinkhorn(scores, eps, 3).float(), rtol=1e-5, atol=1e-7)


def test_sinkhorn_is_invariant_to_a_constant_that_would_overflow_exp():
    scores = 0.1 * torch.randn(10, 4, generator=_gen(5))
    shifted = scores + 5.0  # scores / eps ~ 100: exp overflows float32 without the max shift
    assert not torch.isfinite(torch.exp(shifted / 0.05)).all()
    torch.testing.assert_close(sinkhorn(shifted), sinkhorn(scores), rtol=1e-5, atol=1e-7)


def test_sinkhorn_stays_finite_at_plus_minus_40():
    eps = 0.05
    signs = torch.where(torch.rand(16, 6, generator=_gen(6)) > 0.5, 1.0, -1.0)
    scores = 40 * eps * signs  # scores / eps = ±40
    q = sinkhorn(scores, eps)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16), rtol=0, atol=1e-5)
    torch.testing.assert_close(q, naive_sinkhorn(scores, eps, 3).float(), rtol=1e-4, atol=1e-7)


def test_sinkhorn_has_no_gradient():
    scores = torch.randn(5, 3, generator=_gen(7), requires_grad=True)
    assert not sinkhorn(scores).requires_grad


# ------------------------------------------------------------------------------------------------------------
# SwAV's swapped prediction and DINO


def _log_softmax_row(x: torch.Tensor, t: float) -> list[float]:
    logits = [float(v) / t for v in x]
    lse = math.log(sum(math.exp(v) for v in logits))
    return [v - lse for v in logits]


def _softmax_row(x: torch.Tensor, t: float) -> list[float]:
    return [math.exp(v) for v in _log_softmax_row(x, t)]


def naive_swav(scores, codes, t):
    """main_swav.py's loop: for each coded crop i, subloss over crops v != i, / (n_crops - 1); / n_coded."""
    n_crops, b = len(scores), scores[0].shape[0]
    loss = 0.0
    for i, q in enumerate(codes):
        subloss = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            for s in range(b):
                log_p = _log_softmax_row(scores[v][s], t)
                subloss -= sum(float(q[s, k]) * log_p[k] for k in range(len(log_p))) / b
        loss += subloss / (n_crops - 1)
    return loss / len(codes)


@pytest.mark.parametrize("n_crops,n_coded", [(2, 2), (5, 2), (4, 1), (3, 3)])
def test_swav_loss_equals_a_naive_double_loop(n_crops, n_coded):
    g = _gen(n_crops * 10 + n_coded)
    scores = [torch.randn(6, 7, generator=g) * 0.5 for _ in range(n_crops)]
    codes = [torch.softmax(torch.randn(6, 7, generator=g), dim=1) for _ in range(n_coded)]
    expected = naive_swav(scores, codes, 0.1)
    assert swav_loss(scores, codes, temperature=0.1).item() == pytest.approx(expected, rel=1e-5)


def naive_dino(student, teacher, center, ts, tt):
    """main_dino.py's DINOLoss.forward loop: teacher crops iq x student crops v, skipping v == iq."""
    b = student[0].shape[0]
    total, n_terms = 0.0, 0
    for iq, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue
            for i in range(b):
                q = _softmax_row(t[i] - center[0], tt)
                log_p = _log_softmax_row(s[i], ts)
                total -= sum(qk * lk for qk, lk in zip(q, log_p)) / b
            n_terms += 1
    return total / n_terms


@pytest.mark.parametrize("n_teacher,n_student", [(2, 4), (2, 2), (1, 3)])
def test_dino_loss_equals_a_naive_double_loop(n_teacher, n_student):
    g = _gen(n_teacher * 10 + n_student)
    student = [torch.randn(5, 6, generator=g) for _ in range(n_student)]
    teacher = [torch.randn(5, 6, generator=g) for _ in range(n_teacher)]
    center = 0.3 * torch.randn(1, 6, generator=g)
    expected = naive_dino(student, teacher, center, 0.1, 0.04)
    assert dino_loss(student, teacher, center, 0.1, 0.04).item() == pytest.approx(expected, rel=1e-5)


def test_codes_teacher_and_centre_get_no_gradient():
    g = _gen(8)
    scores = [torch.randn(4, 5, generator=g, requires_grad=True) for _ in range(3)]
    codes = [torch.rand(4, 5, generator=g, requires_grad=True) for _ in range(2)]
    swav_loss(scores, codes).backward()
    assert all(s.grad is not None for s in scores) and all(c.grad is None for c in codes)
    student = [torch.randn(4, 5, generator=g, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(4, 5, generator=g, requires_grad=True) for _ in range(2)]
    center = torch.zeros(1, 5, requires_grad=True)
    dino_loss(student, teacher, center, 0.1, 0.04).backward()
    assert all(s.grad is not None for s in student)
    assert all(t.grad is None for t in teacher) and center.grad is None


def test_center_update_by_hand():
    center = torch.tensor([[1.0, 2.0, 3.0]])
    teacher = [torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, 0.0]]), torch.tensor([[0.0, 2.0, 2.0], [4.0, 6.0, 0.0]])]
    # mean over the 4 teacher rows of both crops: [8, 12, 4] / 4 = [2, 3, 1]
    new = center_update(center, teacher, momentum=0.9)
    torch.testing.assert_close(new, torch.tensor([[0.9 * 1 + 0.1 * 2, 0.9 * 2 + 0.1 * 3, 0.9 * 3 + 0.1 * 1]]))
    torch.testing.assert_close(center, torch.tensor([[1.0, 2.0, 3.0]]), rtol=0, atol=0)  # nothing written


# ------------------------------------------------------------------------------------------------------------
# float32 under autocast


def test_losses_are_float32_under_bf16_autocast():
    g = _gen(9)
    x = [torch.randn(6, 8, generator=g) for _ in range(4)]
    codes = [torch.softmax(torch.randn(6, 8, generator=g), dim=1).bfloat16() for _ in range(2)]  # bf16 numbers
    center = torch.zeros(1, 8)
    calls = {
        "byol_loss": lambda a: byol_loss(a[0], a[1]),
        "negative_cosine": lambda a: negative_cosine(a[0], a[1]),
        "sinkhorn": lambda a: sinkhorn(a[0]),
        "swav_loss": lambda a: swav_loss(a, [c.to(a[0].dtype) for c in codes]),
        "dino_loss": lambda a: dino_loss(a, a[:2], center.to(a[0].dtype), 0.1, 0.04),
        "center_update": lambda a: center_update(center.to(a[0].dtype), a[:2], 0.9),
    }
    bf16 = [t.bfloat16() for t in x]
    for name, call in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(bf16)
        assert out.dtype == torch.float32, name
        # the same bf16 numbers computed in float32: a computation in bf16 would not agree to 1e-6
        torch.testing.assert_close(out, call([t.float() for t in bf16]), rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------------------------
# two processes, each holding half of the batch, against one holding all of it


def _halves_data():
    g = _gen(10)
    scores = 0.1 * torch.randn(8, 5, generator=g)
    scores[4:] += 0.5  # the halves' maxima differ: a per-process max shift would change the codes
    teacher = [torch.randn(8, 5, generator=g) for _ in range(2)]
    center = torch.randn(1, 5, generator=g)
    return scores, teacher, center


def _halves_worker(out_dir: str) -> None:
    distributed.init_from_env(torch.device("cpu"))
    rank, world = distributed.rank(), distributed.world_size()
    scores, teacher, center = _halves_data()
    n = scores.shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    torch.save({"world": world, "codes": sinkhorn(scores[rows]), "codes_50": sinkhorn(scores[rows], iterations=50),
                "center": center_update(center, [t[rows] for t in teacher], 0.9)},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    run_as_torchrun(_halves_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    scores, teacher, center = _halves_data()
    codes, codes_50 = sinkhorn(scores), sinkhorn(scores, iterations=50)
    expected_center = center_update(center, teacher, 0.9)
    for r, res in enumerate(ranks):
        rows = slice(r * 4, (r + 1) * 4)
        torch.testing.assert_close(res["codes"], codes[rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(res["codes_50"], codes_50[rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(res["center"], expected_center, rtol=1e-6, atol=1e-6)
