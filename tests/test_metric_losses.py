"""Losses on labels and pairs: Hadsell's margin loss by hand, triplet mining on a hand-made batch, each
triplet strategy against a loop over every triplet, SupCon against a loop and against NT-Xent."""

import itertools
import math

import pytest
import torch

from contrastive.losses import contrastive_margin_loss, nt_xent, pairwise_margin_loss, supcon_loss, triplet_loss
from contrastive.losses.metric import hardest, pairwise_distances, semi_hard


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("similar, margin, expected", [(True, 1.0, 12.5), (False, 1.0, 0.0), (False, 6.0, 0.5)])
def test_margin_loss_by_hand(similar, margin, expected):
    x1, x2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])  # distance 5
    got = contrastive_margin_loss(x1, x2, torch.tensor([similar]), margin=margin)
    assert got.item() == pytest.approx(expected, abs=1e-6)


# points on a line, labels 0 0 0 1 1: the distances are read off by eye
LINE = torch.tensor([[0.0], [1.0], [3.5], [2.0], [10.0]])
LINE_LABELS = torch.tensor([0, 0, 0, 1, 1])


def test_batch_hard_picks_the_farthest_positive_and_nearest_negative():
    far_pos, near_neg, valid = hardest(pairwise_distances(LINE), LINE_LABELS)
    assert far_pos.tolist() == [2, 2, 0, 4, 3]
    assert near_neg.tolist() == [3, 3, 3, 1, 2]
    assert valid.all()


def test_semi_hard_picks_the_nearest_negative_beyond_the_positive_else_the_farthest():
    chosen, valid = semi_hard(pairwise_distances(LINE), LINE_LABELS)
    expected = {(0, 1): 3, (0, 2): 4, (1, 0): 4, (1, 2): 4, (2, 0): 4, (2, 1): 4,
                (3, 4): 0,  # no negative of 3 is farther than 8: the farthest, 0 at 2
                (4, 3): 1}  # 0 at 10 and 1 at 9 are farther than 8: the nearer, 1
    assert sorted(map(tuple, valid.nonzero().tolist())) == sorted(expected)
    for (a, p), n in expected.items():
        assert chosen[a, p].item() == n, (a, p)


def _naive_triplets(x, labels, margin, mining):
    n = len(labels)
    d = [[math.dist(x[i].tolist(), x[j].tolist()) for j in range(n)] for i in range(n)]
    lab = labels.tolist()
    pos = {a: [p for p in range(n) if p != a and lab[p] == lab[a]] for a in range(n)}
    neg = {a: [q for q in range(n) if lab[q] != lab[a]] for a in range(n)}
    if mining == "batch-all":
        losses = [max(0.0, d[a][p] - d[a][q] + margin) for a in range(n) for p in pos[a] for q in neg[a]]
        active = [v for v in losses if v > 0]
        return sum(active) / max(len(active), 1)
    if mining == "batch-hard":
        losses = [max(0.0, max(d[a][p] for p in pos[a]) - min(d[a][q] for q in neg[a]) + margin)
                  for a in range(n) if pos[a] and neg[a]]
        return sum(losses) / max(len(losses), 1)
    losses = []
    for a in range(n):
        for p in pos[a]:
            if not neg[a]:
                continue
            farther = [d[a][q] for q in neg[a] if d[a][q] > d[a][p]]
            dn = min(farther) if farther else max(d[a][q] for q in neg[a])
            losses.append(max(0.0, d[a][p] - dn + margin))
    return sum(losses) / max(len(losses), 1)


@pytest.mark.parametrize("mining", ["batch-all", "batch-hard", "semi-hard"])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_loss_equals_a_loop_over_every_triplet(mining, seed):
    x = torch.randn(12, 5, generator=_gen(seed))
    labels = torch.randint(0, 3, (12,), generator=_gen(seed + 10))
    got = triplet_loss(x, labels, margin=1.0, mining=mining)
    assert got.item() == pytest.approx(_naive_triplets(x, labels, 1.0, mining), rel=1e-5)
    assert got.item() > 0  # a loss of 0 would agree with a broken loop as well


def test_triplet_strategies_differ_and_a_batch_of_one_label_gives_zero():
    x = torch.randn(12, 5, generator=_gen(3))
    labels = torch.randint(0, 3, (12,), generator=_gen(4))
    values = {m: triplet_loss(x, labels, margin=1.0, mining=m).item() for m in ("batch-all", "batch-hard", "semi-hard")}
    assert len({round(v, 6) for v in values.values()}) == 3
    assert triplet_loss(x, torch.zeros(12, dtype=torch.long), mining="batch-hard").item() == 0.0
    with pytest.raises(ValueError, match="mining='hard'"):
        triplet_loss(x, labels, mining="hard")


def test_gradients_are_finite_for_equal_embeddings():
    x = torch.randn(4, 3, generator=_gen(5)).repeat(2, 1).requires_grad_()
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    for mining in ("batch-all", "batch-hard", "semi-hard"):
        x.grad = None
        triplet_loss(x, labels, mining=mining).backward()
        assert torch.isfinite(x.grad).all(), mining
    x.grad = None
    contrastive_margin_loss(x[:4], x[4:], torch.ones(4, dtype=torch.bool)).backward()
    assert torch.isfinite(x.grad).all()


def _naive_supcon(z, labels, t):
    z = torch.nn.functional.normalize(z.double(), dim=1).tolist()
    lab = labels.tolist()
    total, anchors = 0.0, 0
    for i in range(len(z)):
        sims = {a: sum(u * v for u, v in zip(z[i], z[a])) / t for a in range(len(z)) if a != i}
        denom = math.log(sum(math.exp(s) for s in sims.values()))
        pos = [p for p in sims if lab[p] == lab[i]]
        if pos:
            total += -sum(sims[p] - denom for p in pos) / len(pos)
            anchors += 1
    return total / anchors


def test_supcon_equals_a_loop_with_several_positives_and_an_anchor_without():
    z = torch.randn(10, 6, generator=_gen(6))
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # label 3 has a single sample: no positive
    got = supcon_loss(z, labels, temperature=0.1)
    assert got.item() == pytest.approx(_naive_supcon(z, labels, 0.1), rel=1e-5)


def test_supcon_with_one_positive_per_anchor_is_nt_xent():
    z1, z2 = torch.randn(8, 6, generator=_gen(7)), torch.randn(8, 6, generator=_gen(8))
    image = torch.arange(8)
    got = supcon_loss(torch.cat([z1, z2]), torch.cat([image, image]), temperature=0.5)
    torch.testing.assert_close(got, nt_xent(z1, z2, 0.5))
    # labels of classes instead of images make other positives, and another value
    assert abs(supcon_loss(torch.cat([z1, z2]), torch.cat([image // 2, image // 2]), 0.5).item() - got.item()) > 1e-3


def test_float32_under_bf16_autocast():
    x = torch.randn(8, 4, generator=_gen(9))
    labels = torch.tensor([0, 1] * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [triplet_loss(x, labels), supcon_loss(x, labels), contrastive_margin_loss(x[:4], x[4:], labels[:4] == 0)]
    assert all(v.dtype == torch.float32 for v in values)
    assert values[1].item() == pytest.approx(supcon_loss(x, labels).item(), rel=1e-6)


def test_every_triplet_index_is_in_range():
    # itertools over all labelings of 4 samples into 2 classes: mining never returns an index out of range
    for lab in itertools.product([0, 1], repeat=4):
        labels = torch.tensor(lab)
        chosen, valid = semi_hard(pairwise_distances(torch.randn(4, 2, generator=_gen(1))), labels)
        assert ((chosen >= 0) & (chosen < 4)).all()
        assert valid.sum().item() == sum(c * (c - 1) for c in (lab.count(0), lab.count(1))) * (0 < sum(lab) < 4)


def test_batch_all_and_batch_hard_by_hand():
    # points on a line 0, 1 (label 0) and 1.5, 5 (label 1), margin 1; the active triplets (a, p, n):
    # (0, 1, 1.5): 1 - 1.5 + 1 = 0.5; (1, 0, 1.5): 1 - 0.5 + 1 = 1.5; (1.5, 5, 0): 3.5 - 1.5 + 1 = 3;
    # (1.5, 5, 1): 3.5 - 0.5 + 1 = 4; (5, 1.5, 1): 3.5 - 4 + 1 = 0.5; the other three are inactive
    x, labels = torch.tensor([[0.0], [1.0], [1.5], [5.0]]), torch.tensor([0, 0, 1, 1])
    assert triplet_loss(x, labels, margin=1.0, mining="batch-all").item() == pytest.approx(9.5 / 5, rel=1e-6)
    # batch-hard: one triplet per anchor, its farthest positive and nearest negative: 0.5, 1.5, 4, 0.5
    assert triplet_loss(x, labels, margin=1.0, mining="batch-hard").item() == pytest.approx(6.5 / 4, rel=1e-6)


def test_mining_some_anchors_against_every_candidate_picks_what_the_whole_batch_picks():
    # a process's anchors (rows 3 and 4 of LINE) mined among every process's rows give the rows of the square case
    dist = pairwise_distances(LINE[3:], LINE)  # [2, 5]
    position = torch.tensor([3, 4])
    far_pos, near_neg, valid = hardest(dist, LINE_LABELS[3:], LINE_LABELS, position)
    assert far_pos.tolist() == [4, 3] and near_neg.tolist() == [1, 2] and valid.all()
    chosen, valid = semi_hard(dist, LINE_LABELS[3:], LINE_LABELS, position)
    assert valid.nonzero().tolist() == [[0, 4], [1, 3]]
    assert chosen[0, 4].item() == 0 and chosen[1, 3].item() == 1


def test_pairwise_margin_loss_is_the_margin_loss_over_every_ordered_pair():
    x = torch.randn(7, 3, generator=_gen(12))
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    i, j = zip(*[(i, j) for i in range(7) for j in range(7) if i != j])
    i, j = torch.tensor(i), torch.tensor(j)
    expected = contrastive_margin_loss(x[i], x[j], labels[i] == labels[j], margin=2.5)
    got = pairwise_margin_loss(x, labels, margin=2.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5) and got.item() > 0
