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
from contrastive.evaluation import (
    extract_features,
    knn_predict,
    knn_top1,
    linear_probe,
    raw_pixel_features,
    save_embeddings,
)


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
