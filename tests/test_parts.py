"""Shared parts of the stateful methods: queue, memory bank, momentum encoder, split / shuffled batch norm."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive.nn.ema import ema_update, momentum_at, momentum_copy
from contrastive.nn.memory import MemoryBank, Queue
from contrastive.nn.shuffle_bn import SplitBatchNorm, shuffled_forward, split_batchnorm


def test_queue_wraps_around_and_keeps_every_key_in_order():
    q = Queue(size=10, dim=3)
    keys = torch.arange(14 * 3, dtype=torch.float).view(14, 3)
    q.push(keys[:4])
    q.push(keys[4:8])
    assert int(q.ptr) == 8
    q.push(keys[8:14])  # 6 keys from slot 8: slots 8, 9, then 0..3
    assert int(q.ptr) == 4
    # the 10 newest keys, 4..13, each once: 10..13 in slots 0..3, 4..9 in slots 4..9
    torch.testing.assert_close(q.keys, torch.cat([keys[10:14], keys[4:10]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot enqueue 11 keys"):
        q.push(torch.zeros(11, 3))


def test_queue_starts_normalised_and_is_a_persistent_buffer():
    q = Queue(size=16, dim=8)
    torch.testing.assert_close(q.keys.norm(dim=1), torch.ones(16))
    assert set(q.state_dict()) == {"keys", "ptr"}


def test_memory_bank_update_is_the_proximal_rule_then_renormalised():
    bank = MemoryBank(size=5, dim=2, momentum=0.5)
    bank.rows.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    before = bank.rows.clone()
    bank.update(torch.tensor([0, 4]), torch.tensor([[0.0, 1.0], [0.6, 0.8]]))
    s = 1 / math.sqrt(2)  # row 0: 0.5 (1, 0) + 0.5 (0, 1) = (0.5, 0.5), normalised
    torch.testing.assert_close(bank.rows[0], torch.tensor([s, s]))
    torch.testing.assert_close(bank.rows[4], torch.tensor([0.6, 0.8]))  # already there: unchanged
    torch.testing.assert_close(bank.rows[1:4], before[1:4], rtol=0, atol=0)  # other rows untouched


def test_memory_bank_samples_uniformly():
    bank = MemoryBank(size=10, dim=4, momentum=0.5)
    idx = bank.sample(1000, 50, torch.Generator().manual_seed(0))
    assert idx.shape == (1000, 50) and idx.min() == 0 and idx.max() == 9
    freq = torch.bincount(idx.flatten(), minlength=10).float() / idx.numel()
    assert (freq - 0.1).abs().max() < 0.005  # 50,000 draws: sd of a frequency ~0.0013


def test_ema_step_moves_parameters_and_buffers_by_exactly_m():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    online(torch.randn(8, 4))  # moves the online running statistics and batch count
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    t_before = {k: v.clone() for k, v in target.state_dict().items()}
    o = online.state_dict()
    m = 0.75  # 1 - m = 0.25 scales exactly, so the expected values are exact whatever the kernel's rounding
    ema_update(target, online, m)
    for k, v in target.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, t_before[k] * m + o[k] * (1 - m)), k
        else:  # num_batches_tracked is copied
            assert torch.equal(v, o[k]), k
    assert int(target[1].num_batches_tracked) == 1


def test_momentum_schedules():
    assert momentum_at("constant", 0.999, 500, 1000) == 0.999
    assert momentum_at("cosine", 0.99, 0, 1000) == pytest.approx(0.99)
    assert momentum_at("cosine", 0.99, 500, 1000) == pytest.approx(0.995)
    assert momentum_at("cosine", 0.99, 1000, 1000) == pytest.approx(1.0)


def test_split_batchnorm_normalises_each_chunk_by_its_own_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    split = split_batchnorm(nn.Sequential(bn), 4)[0]
    assert isinstance(split, SplitBatchNorm) and split.num_splits == 4
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    out = split(x)
    refs = []
    for chunk in x.chunk(4):  # a fresh BatchNorm2d per chunk, as four GPUs would each hold
        ref = nn.BatchNorm2d(3)
        ref.load_state_dict(bn.state_dict())
        refs.append(ref)
    expected = torch.cat([r(c) for r, c in zip(refs, x.chunk(4))])
    torch.testing.assert_close(out, expected)
    # running statistics: the mean over chunks of what each chunk's BN would hold
    torch.testing.assert_close(split.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    # channels-last input (the trainer's default) takes another code path: same numbers, same layout
    again = split_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), 4)[0]
    again.load_state_dict(bn.state_dict())
    cl = again(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, expected)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(again.running_var, split.running_var)
    # gradients flow to the input and to the affine parameters as through four separate batch norms
    xg = x.clone().requires_grad_()
    split.train()(xg).pow(2).sum().backward()
    xr = x.clone().requires_grad_()
    torch.cat([r(c) for r, c in zip(refs, xr.chunk(4))]).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    torch.testing.assert_close(split.weight.grad, sum(r.weight.grad for r in refs))
    split.eval()
    torch.testing.assert_close(split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight,
                                                      split.bias, False, 0.0, split.eps))


def test_shuffled_forward_in_one_process_encodes_a_permuted_batch_and_unpermutes():
    torch.manual_seed(0)
    enc = split_batchnorm(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), 2)
    x = torch.randn(8, 6)
    keys = shuffled_forward(enc, x, torch.Generator().manual_seed(3))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    expected = torch.empty(8, 4)
    expected[perm] = enc(x[perm])
    torch.testing.assert_close(keys, expected)
    # the batch-norm groups are those of the shuffled order, so the keys differ from an unshuffled pass
    assert not torch.allclose(keys, enc(x), atol=1e-3)
