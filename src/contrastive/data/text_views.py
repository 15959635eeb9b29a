"""Discrete views of tokenised sentences: span cropping, word deletion, word swap, word replacement.

Each op works on a whole batch at once, ``input_ids`` and ``attention_mask`` [B, L] (as
``data.text.TextCollate`` makes them), on the batch's device, with every random choice drawn from one
``torch.Generator``: no per-sentence Python loop and no host synchronisation. "Words" are the tokenizer's
tokens (a word piece counts as one). Special tokens ([CLS], [SEP], padding) are never chosen, removed or
written: an op acts on the attended, non-special positions of each row (its content, n tokens) only.

Counts are exact, not Bernoulli draws: an op configured with fraction p acts on ``round(p * n)`` tokens of a
sentence of n content tokens (halves rounded up), chosen uniformly without replacement, so deletion 0.1 of a
200-token sentence removes exactly 20 tokens. Deletion and cropping keep at least one token and move what is
left to the front (special tokens kept in place relative to it); the length L of the batch does not change.

Unsupervised SimCSE needs none of these: its two views are two forward passes with independent dropout masks,
which beat every discrete augmentation in its Table 1 (STS-B dev: dropout alone 82.5; crop 10% 77.8; word
deletion 10% 75.9; synonym replacement 77.4). They are here for the ablation and for encoders without dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from contrastive.errors import ConfigError


@dataclass
class TextViewConfig:
    crop: float = field(default=0.0, metadata={"help": "Fraction of each sentence's tokens cut away, keeping one "
                        "random contiguous span of the rest. 0: unsupervised SimCSE's views are dropout alone; "
                        "its Table 1 gives crop 10% 77.8 STS-B dev against 82.5 for dropout (Gao et al. 2021)."})
    delete: float = field(default=0.0, metadata={"help": "Fraction of tokens deleted at random positions. 0 as "
                          "SimCSE; 0.1 is EDA's alpha (Wei and Zou 2019) and SimCSE's 'word deletion 10%' (75.9)."})
    swap: float = field(default=0.0, metadata={"help": "Fraction of tokens that change place, swapped in random "
                        "pairs (EDA's random swap; CLEAR's reordering, Wu et al. 2020). 0 as SimCSE."})
    replace: float = field(default=0.0, metadata={"help": "Fraction of tokens replaced by a different random "
                           "non-special token of the vocabulary (EDA and CLEAR's substitution, without a "
                           "thesaurus). 0 as SimCSE."})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"text view {f.name}={value} is not a fraction in [0, 1); 0 turns it off")


def content_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the positions an op may touch (attended and not a special token)."""
    return attention_mask.bool() & ~torch.isin(input_ids, special_ids)


def _count(p: float, n: torch.Tensor) -> torch.Tensor:
    """round(p * n), halves up, per row: [B] long."""
    return torch.floor(n.float() * p + 0.5).long()


def _random_ranks(content: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's content positions in a uniform random order: ``order`` [B, L] (order[b, r] is the position
    of rank r; content ranks come first) and ``rank`` [B, L] (its inverse)."""
    scores = torch.rand(content.shape, generator=generator, device=content.device)
    scores = scores.masked_fill(~content, 2.0)  # after every content score, which lie in [0, 1)
    order = torch.sort(scores, dim=1, stable=True).indices
    positions = torch.arange(content.shape[1], device=content.device).expand_as(order)
    return order, torch.empty_like(order).scatter_(1, order, positions)


def _compact(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor,
             pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` positions of each row, in order, moved to the front; the rest becomes padding."""
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # kept positions first, in order
    length = keep.sum(dim=1, keepdim=True)  # [B, 1]
    new_mask = torch.arange(keep.shape[1], device=keep.device) < length  # [B, L]
    ids = torch.where(new_mask, input_ids.gather(1, order), torch.full_like(input_ids, pad_id))
    return ids, new_mask.to(attention_mask.dtype)


def delete_words(input_ids: torch.Tensor, attention_mask: torch.Tensor, p: float, *, special_ids: torch.Tensor,
                 pad_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletes round(p * n) random content tokens of each row (at most n - 1)."""
    content = content_mask(input_ids, attention_mask, special_ids)
    n = content.sum(dim=1)
    k = torch.minimum(_count(p, n), (n - 1).clamp(min=0))
    _, rank = _random_ranks(content, generator)
    deleted = content & (rank < k[:, None])
    return _compact(input_ids, attention_mask, attention_mask.bool() & ~deleted, pad_id)


def crop_span(input_ids: torch.Tensor, attention_mask: torch.Tensor, fraction: float, *, special_ids: torch.Tensor,
              pad_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps one contiguous span of n - round(fraction * n) content tokens (at least one) of each row, its
    start uniform over the possible starts; the special tokens stay."""
    content = content_mask(input_ids, attention_mask, special_ids)
    n = content.sum(dim=1)
    kept = torch.maximum(n - _count(fraction, n), n.clamp(max=1))  # [B]
    u = torch.rand(n.shape, generator=generator, device=n.device)
    start = torch.minimum((u * (n - kept + 1)).long(), n - kept)[:, None]  # [B, 1]
    index = torch.cumsum(content, dim=1) - 1  # each content token's place among the row's content
    in_span = (index >= start) & (index < start + kept[:, None])
    return _compact(input_ids, attention_mask, attention_mask.bool() & (~content | in_span), pad_id)


def swap_words(input_ids: torch.Tensor, attention_mask: torch.Tensor, p: float, *, special_ids: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """Swaps round(p * n / 2) random disjoint pairs of content tokens in each row (2 x that many tokens move);
    the attention mask is unchanged."""
    content = content_mask(input_ids, attention_mask, special_ids)
    pairs = torch.minimum(_count(p / 2, content.sum(dim=1)), content.sum(dim=1) // 2)
    order, _ = _random_ranks(content, generator)
    ranks = torch.arange(order.shape[1], device=order.device)
    partner = order[:, (ranks ^ 1).clamp(max=order.shape[1] - 1)]  # rank 2i <-> rank 2i + 1
    moved = ranks < 2 * pairs[:, None]  # [B, L] by rank
    values = torch.where(moved, input_ids.gather(1, partner), input_ids.gather(1, order))
    return torch.empty_like(input_ids).scatter_(1, order, values)


def replace_words(input_ids: torch.Tensor, attention_mask: torch.Tensor, p: float, *, special_ids: torch.Tensor,
                  candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Replaces round(p * n) random content tokens of each row by other tokens drawn uniformly from
    ``candidates`` [V'] (the vocabulary without special tokens); a draw equal to the token it replaces is
    moved to the next candidate, so every chosen token changes."""
    content = content_mask(input_ids, attention_mask, special_ids)
    k = _count(p, content.sum(dim=1))
    _, rank = _random_ranks(content, generator)
    chosen = content & (rank < k[:, None])
    j = torch.randint(len(candidates), input_ids.shape, generator=generator, device=input_ids.device)
    draw = candidates[j]
    draw = torch.where(draw == input_ids, candidates[(j + 1) % len(candidates)], draw)
    return torch.where(chosen, draw, input_ids)


class TextViews:
    """A view of a tokenised batch: crop, delete, swap, replace in that order, each where its fraction is
    above 0, all drawn from one generator (the same seed gives the same view on one device)."""

    def __init__(self, cfg: TextViewConfig, *, special_ids: Sequence[int], pad_id: int, vocab_size: int):
        self.cfg = cfg
        self.pad_id = pad_id
        self.special_ids = torch.tensor(sorted(set(special_ids) | {pad_id}), dtype=torch.long)
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[self.special_ids] = False
        self.candidates = allowed.nonzero().squeeze(1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_tokenizer(cls, cfg: TextViewConfig, tokenizer: Any) -> "TextViews":
        """Special ids, padding id and vocabulary size of a Hugging Face tokenizer."""
        return cls(cfg, special_ids=tokenizer.all_special_ids, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:  # copied once per device: a copy from the host blocks
            self._on[device] = (self.special_ids.to(device), self.candidates.to(device))
        return self._on[device]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        special, candidates = self._constants(input_ids.device)
        cfg = self.cfg
        if cfg.crop:
            input_ids, attention_mask = crop_span(input_ids, attention_mask, cfg.crop, special_ids=special,
                                                  pad_id=self.pad_id, generator=generator)
        if cfg.delete:
            input_ids, attention_mask = delete_words(input_ids, attention_mask, cfg.delete, special_ids=special,
                                                     pad_id=self.pad_id, generator=generator)
        if cfg.swap:
            input_ids = swap_words(input_ids, attention_mask, cfg.swap, special_ids=special, generator=generator)
        if cfg.replace:
            input_ids = replace_words(input_ids, attention_mask, cfg.replace, special_ids=special,
                                      candidates=candidates, generator=generator)
        return input_ids, attention_mask
