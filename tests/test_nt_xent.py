import math

import pytest
import torch
import torch.nn.functional as F

from contrastive.losses import nt_xent


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR Eq. 1 written as the paper's loop: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return torch.tensor(total / n2, dtype=torch.float64)


@pytest.mark.parametrize("n,d,t", [(4, 8, 0.5), (16, 32, 0.1), (7, 3, 1.0)])
def test_equals_naive_loop(n, d, t):
    g = torch.Generator().manual_seed(n * d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert nt_xent(z1, z2, t).item() == pytest.approx(naive_nt_xent(z1, z2, t).item(), rel=1e-5)


def test_perfectly_aligned_orthogonal_pairs_analytic():
    # positives identical (sim 1), every other image orthogonal (sim 0), self masked:
    # loss = -log(e^{1/t} / (e^{1/t} + (2n - 2))) = log(1 + (2n - 2) e^{-1/t})
    n, t = 8, 0.5
    z = torch.eye(n) * 3.0  # norms are irrelevant: the loss normalises
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_collapsed_embeddings_give_log_2n_minus_1():
    n = 5
    z = torch.ones(n, 4)
    assert nt_xent(z, z, 0.2).item() == pytest.approx(math.log(2 * n - 1), rel=1e-6)


def naive_logsumexp_loss(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """Differentiable per-anchor loop with an explicit candidate list k != i (a reference, not fast)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / t
    n2 = z.shape[0]
    losses = []
    for i in range(n2):
        j = (i + n2 // 2) % n2
        others = torch.stack([sim[i, k] for k in range(n2) if k != i])
        losses.append(torch.logsumexp(others, 0) - sim[i, j])
    return torch.stack(losses).mean()


def test_gradient_matches_naive_autograd():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    nt_xent(z1, z2, 0.3).backward()
    g1, g2 = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    naive_logsumexp_loss(z1, z2, 0.3).backward()
    torch.testing.assert_close(g1.float(), z1.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2.float(), z2.grad.float(), rtol=1e-4, atol=1e-6)


def test_stable_at_tiny_temperature():
    # exp(1 / 1e-3) overflows float64, so an exp-then-log implementation returns inf or nan here
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    loss = nt_xent(z1, z2, 1e-3)
    expected = naive_logsumexp_loss(z1.double(), z2.double(), 1e-3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="two \\[n, d\\] tensors"):
        nt_xent(torch.zeros(3, 4), torch.zeros(4, 4), 0.5)
