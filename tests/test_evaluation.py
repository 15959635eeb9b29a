"""Evaluation: kNN against a naive reference and a hand-worked vote, the linear probe on separable and
random data, feature extraction against a manual forward pass, embeddings round-tripped through numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from contrastive.errors import DataError
from contrastive.evaluation import extract_features, knn_predict, knn_top1, linear_probe, save_embeddings
from contrastive.modalities.image import raw_pixel_features


class TinyImages(Dataset):
    """Items ``(uint8 [C, H, W], label, index)`` as the library's datasets yield them."""

    def __init__(self, n: int = 10, channels: int = 1, size: int = 4, labelled: bool = True):
        g = torch.Generator().manual_seed(1)
        self.images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
        self.labels = torch.arange(n) % 3 if labelled else torch.full((n,), -1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), i


def naive_knn(train, train_labels, test, num_classes, k, temperature):
    """InstDisc's weighted vote written out: full similarity matrix, argsort, a loop over neighbours."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = test @ train.T
    preds = []
    for row in sim:
        votes = np.zeros(num_classes)
        for j in np.argsort(-row)[:k]:
            votes[train_labels[j]] += math.exp(row[j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


# T=0.07 is the protocol; at T=1 the weights are close, so each neighbour counts and a wrong k shows.
@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 1.0)])
def test_knn_matches_naive_reference_and_is_chunk_invariant(k, temperature):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (300,), generator=g)
    test = torch.randn(50, 16, generator=g, dtype=torch.float64)
    expected = naive_knn(train.numpy(), labels.numpy(), test.numpy(), 5, k, temperature)
    small = knn_predict(train, labels, test, num_classes=5, k=k, temperature=temperature, chunk_size=7)
    large = knn_predict(train, labels, test, num_classes=5, k=k, temperature=temperature, chunk_size=1000)
    assert small.dtype == torch.int64 and small.shape == (50,)
    assert small.tolist() == expected.tolist()
    assert torch.equal(small, large)
    # the reference is not trivially constant: the random labels give several predicted classes
    assert len(set(expected.tolist())) > 1


def test_knn_weighted_vote_beats_majority_by_hand():
    # Query (1, 0). Neighbour A = (1, 0), class 0, cos 1. Neighbours B, C = (0, 1), (0, -1), class 1, cos 0.
    # Majority of the 3 votes class 1; the weights are exp(1/0.07) = e^14.3 for A against 2 * e^0 for B, C.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])  # length does not matter: cosine similarity
    assert knn_predict(train, labels, query, num_classes=3, k=3).tolist() == [0]
    # at a high temperature the weights are nearly equal and the majority wins: e^(1/10) < 2 e^0
    assert knn_predict(train, labels, query, num_classes=3, k=3, temperature=10.0).tolist() == [1]


def test_knn_k_larger_than_bank_and_top1():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    # k=200 is clipped to the 3 bank rows; the near neighbour's weight dominates each vote
    assert knn_predict(train, labels, test, num_classes=2).tolist() == [0, 1]
    assert knn_top1(train, labels, test, torch.tensor([0, 0]), num_classes=2) == 0.5


def test_knn_rejects_unlabeled_and_mismatched_input():
    train = torch.randn(4, 3)
    with pytest.raises(DataError, match="unlabeled"):
        knn_predict(train, torch.tensor([0, -1, 1, 0]), train, num_classes=2)
    with pytest.raises(DataError, match="one label per row"):
        knn_predict(train, torch.tensor([0, 1, 1]), train, num_classes=2)
    with pytest.raises(DataError, match="do not match"):
        knn_predict(train, torch.tensor([0, 1, 1, 0]), torch.randn(2, 5), num_classes=2)
    with pytest.raises(DataError, match="unlabeled"):
        knn_top1(train, torch.tensor([0, 1, 1, 0]), train, torch.tensor([0, 1, -1, 0]), num_classes=2)


def _blobs(centres: torch.Tensor, n_per_class: int, seed: int):
    """``n_per_class`` points around each centre, unit Gaussian noise; labels are the centre index."""
    labels = torch.arange(len(centres)).repeat_interleave(n_per_class)
    noise = torch.randn(len(labels), centres.shape[1], generator=torch.Generator().manual_seed(seed))
    return centres[labels] + noise, labels


def test_linear_probe_separable_blobs_reach_full_accuracy_deterministically():
    centres = 10.0 * torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    train_x, train_y = _blobs(centres, 40, seed=1)
    test_x, test_y = _blobs(centres, 20, seed=2)
    a = linear_probe(train_x, train_y, test_x, test_y, num_classes=5, epochs=20, batch_size=32, seed=3)
    b = linear_probe(train_x, train_y, test_x, test_y, num_classes=5, epochs=20, batch_size=32, seed=3)
    assert a == {"top1": 1.0, "train_top1": 1.0}
    assert a == b


def test_linear_probe_is_near_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    train_y, test_y = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (200,), generator=g)
    a = linear_probe(train_x, train_y, test_x, test_y, num_classes=5, epochs=20, batch_size=64, seed=1)
    b = linear_probe(train_x, train_y, test_x, test_y, num_classes=5, epochs=20, batch_size=64, seed=2)
    assert a["top1"] < 0.4
    assert a["train_top1"] > a["top1"]  # it fits the training noise, which does not carry over
    assert a != b  # the seed drives the batch order


def test_linear_probe_rejects_unlabeled_test_set():
    x = torch.randn(6, 3)
    with pytest.raises(DataError, match="test examples are unlabeled"):
        linear_probe(x, torch.tensor([0, 1] * 3), x, torch.full((6,), -1), num_classes=2, epochs=1)


def test_extract_features_matches_manual_forward_and_restores_mode():
    data = TinyImages(n=10, channels=2, size=3)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(18, 5), nn.Dropout(0.9))
    encoder.train()
    encoder[2].eval()  # a sub-module frozen on purpose keeps its own mode

    def preprocess(images):
        return images.float() / 255.0 - 0.5

    feats, labels = extract_features(encoder, data, preprocess=preprocess, batch_size=4)
    with torch.no_grad():
        expected = encoder[1](preprocess(data.images).flatten(1))  # dropout is the identity in eval mode
    assert feats.dtype == torch.float32 and feats.shape == (10, 5)
    torch.testing.assert_close(feats, expected)
    assert torch.equal(labels, data.labels)
    assert encoder.training and encoder[1].training and not encoder[2].training
    assert not feats.requires_grad


def test_raw_pixel_features_are_the_preprocessed_pixels_in_order():
    data = TinyImages(n=7, channels=3, size=2, labelled=False)
    feats, labels = raw_pixel_features(data, preprocess=lambda x: (x.float() - 100.0) / 50.0, batch_size=3)
    torch.testing.assert_close(feats, (data.images.flatten(1).float() - 100.0) / 50.0)
    assert labels.tolist() == [-1] * 7


def test_save_embeddings_round_trip(tmp_path):
    feats = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2, -1, 1, 0, -1])
    written = save_embeddings(feats, labels, tmp_path / "out" / "emb.npy")
    assert written == [tmp_path / "out" / "emb.npy", tmp_path / "out" / "emb.labels.npy"]
    got = np.load(written[0])
    assert got.dtype == np.float32 and np.array_equal(got, feats.float().numpy())
    assert np.load(written[1]).tolist() == labels.tolist()
    # no temporary file left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["emb.labels.npy", "emb.npy"]

    # unlabeled data: no labels file, and the stale one from the run above is gone
    assert save_embeddings(feats, torch.full((6,), -1), written[0]) == [written[0]]
    assert not written[1].exists()


def test_save_embeddings_rejects_other_suffix(tmp_path):
    with pytest.raises(DataError, match=r"must end in \.npy"):
        save_embeddings(torch.zeros(2, 2), None, tmp_path / "emb.pt")


def test_extract_features_leaves_out_skipped_unreadable_images(caplog):
    data = TinyImages(n=6, channels=1, size=2, labelled=True)

    class WithHoles(torch.utils.data.Dataset):  # a streaming folder under data.skip_corrupt gives None
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return None if i in (1, 4) else data[i]

    with caplog.at_level("WARNING", logger="contrastive.eval"):
        feats, labels = extract_features(torch.nn.Flatten(), WithHoles(), preprocess=lambda x: x.float(),
                                         batch_size=4)
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(feats, data.images[keep].flatten(1).float())
    assert labels.tolist() == data.labels[keep].tolist()
    assert "skipped 2 unreadable images" in caplog.text


# ---------------------------------------------------------------------------------------------------
# the linear probe against a reference solution; evaluate_encoder against its parts


def _overlapping(counts, seed):
    """Three overlapping Gaussian classes in 6-d, on features of very different scales and offsets, so
    standardisation matters. ``counts`` per class: an unbalanced test side has its own mean and std."""
    g = torch.Generator().manual_seed(0)
    centres, scales, shift = torch.randn(3, 6, generator=g), torch.rand(6, generator=g) * 3 + 0.5, torch.randn(6, generator=g) * 2
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    noise = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(seed))
    return (centres[labels] + noise) * scales + shift, labels


def _reference_probe(train_x, train_y, test_x, weight_decay):
    """The regularised problem the probe solves, solved to convergence in float64 by L-BFGS: multinomial
    logistic regression on features standardised with the training side's statistics, with an L2 penalty
    (weight_decay / 2) ||W||^2 on the weight. AdamW decays the weight apart from the gradient instead, so
    its end point differs slightly. Returns the predictions on the test and training sides."""
    mean, std = train_x.double().mean(0), train_x.double().std(0, unbiased=False)
    a, t = (train_x.double() - mean) / std, (test_x.double() - mean) / std
    w = torch.zeros(3, a.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w.T + b, train_y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (t @ w.T + b).argmax(1), (a @ w.T + b).argmax(1)


@pytest.mark.parametrize("seed", [1, 2])
def test_linear_probe_reaches_the_reference_solution_on_overlapping_classes(seed):
    train_x, train_y = _overlapping([200, 200, 200], seed)
    test_x, test_y = _overlapping([400, 60, 60], seed + 10)
    test_pred, train_pred = _reference_probe(train_x, train_y, test_x, weight_decay=1e-4)
    reference = {"top1": (test_pred == test_y).double().mean().item(),
                 "train_top1": (train_pred == train_y).double().mean().item()}
    assert 0.6 < reference["train_top1"] < 0.95  # overlapping: neither trivial nor hopeless
    got = linear_probe(train_x, train_y, test_x, test_y, num_classes=3, epochs=200, lr=0.1, batch_size=600, seed=0)
    # within two examples of the optimum's accuracy on each side (0.4% and 0.3%)
    assert abs(got["top1"] - reference["top1"]) <= 2 / len(test_y) + 1e-9
    assert abs(got["train_top1"] - reference["train_top1"]) <= 2 / len(train_y) + 1e-9


def test_linear_probe_standardises_with_the_training_sides_statistics():
    """1-d: classes at -1 and +1 on the training side, the boundary at 0. Every test point lies at +0.3..+0.7,
    on the positive side: standardised with the training statistics all are class 1; standardised with
    their own (centred on 0.5), half would fall on the negative side."""
    g = torch.Generator().manual_seed(0)
    train_y = torch.arange(200) % 2
    train_x = (train_y.float() * 2 - 1 + 0.3 * torch.randn(200, generator=g)).unsqueeze(1)
    test_x = torch.linspace(0.3, 0.7, 41).unsqueeze(1)
    res = linear_probe(train_x, train_y, test_x, torch.ones(41, dtype=torch.long), num_classes=2, epochs=50,
                       batch_size=32)
    assert res["top1"] == 1.0


def test_linear_probe_is_identical_on_two_runs_and_thread_counts():
    train_x, train_y = _overlapping([200, 200, 200], 1)
    test_x, test_y = _overlapping([100, 100, 100], 3)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(linear_probe(train_x, train_y, test_x, test_y, num_classes=3, epochs=30, batch_size=64,
                                     seed=5))
    finally:
        torch.set_num_threads(threads)
    assert runs[0] == runs[1] == runs[2]


def test_evaluate_encoder_scores_the_test_side_against_the_training_side():
    """evaluate_encoder's numbers equal kNN, linear probe and raw-pixel kNN recomputed from the features of
    the two sides extracted separately, so scoring the wrong pair of sides cannot pass."""
    from contrastive import api
    from contrastive.config import Config, DataConfig
    from contrastive.configure import apply_overrides
    from contrastive.modalities import load_splits
    from contrastive.modalities.image.preprocess import Preprocess

    splits = load_splits(DataConfig(name="digits", image_size=8))
    train, test = splits.eval_train, splits.eval_test
    cfg = apply_overrides(Config(), ["eval.linear_epochs=5", "eval.knn_k=20", "train.device=cpu"])
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    pre = Preprocess.for_dataset(train, None)
    res = api.evaluate_encoder(encoder, pre, train, test, cfg, note="test")
    (xtr, ytr), (xte, yte) = (extract_features(encoder, ds, preprocess=pre) for ds in (train, test))
    assert (len(xtr), len(xte)) == (1437, 360)
    assert res["knn_top1"] == knn_top1(xtr, ytr, xte, yte, num_classes=10, k=20)
    assert res["linear_top1"] == linear_probe(xtr, ytr, xte, yte, num_classes=10, epochs=5)["top1"]
    (ptr, _), (pte, _) = (raw_pixel_features(ds, preprocess=pre) for ds in (train, test))
    assert res["raw_pixel_knn_top1"] == knn_top1(ptr, ytr, pte, yte, num_classes=10, k=20)
    # and these are test-side scores: the training side scored against itself gives other numbers
    assert res["knn_top1"] != knn_top1(xtr, ytr, xtr, ytr, num_classes=10, k=20)
    assert res["evaluation"]["train_images"] == 1437 and res["evaluation"]["test_images"] == 360
