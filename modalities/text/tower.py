"""Text towers: a Hugging Face ``transformers`` encoder (BERT-style by default) and its pooling.

A tower is built from a named configuration (nothing is downloaded; the model starts at random
init) or loaded from a local directory written by ``save_pretrained`` (``--text-model PATH``):

    name         layers  hidden  heads  intermediate   (Turc et al. 2019, "Well-Read Students
    bert-tiny       2     128      2        512          Learn Better", the compact BERTs)
    bert-mini       4     256      4       1024
    bert-small      4     512      8       2048

with ``max_position_embeddings = max_length`` and dropout 0 by default: CLIP trains its towers
without dropout (Radford et al. 2021), and a deterministic forward makes gradient caching exact.

Pooling, (n, L) ids and mask -> (n, hidden):
    "pooler"  the model's pooler output: BERT's tanh(W h_[CLS] + b), what
              ``transformers.VisionTextDualEncoderModel`` uses (so the tower exports to it)
    "cls"     h_[CLS], the first position's last hidden state
    "mean"    sum_t m_t h_t / sum_t m_t over the attention mask m (padding ignored)

Example:
    >>> model = build_text_model("bert-tiny", vocab_size=len(tok), max_length=32)
    >>> tower = TextTower(model, pooling="pooler")
    >>> tower(batch.input_ids, batch.attention_mask).shape
    torch.Size([8, 128])
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # transformers is imported lazily (about 3 s)
    from transformers import PreTrainedModel

__all__ = ["POOLINGS", "TEXT_SIZES", "TextTower", "build_text_model", "check_model_dir", "position_limit"]

TEXT_SIZES: dict[str, dict[str, int]] = {
    "bert-tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "bert-mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "bert-small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
}
"""Named BERT sizes: the ``BertConfig`` fields each name sets (vocabulary, positions and dropout
come from :func:`build_text_model`'s arguments)."""

POOLINGS: tuple[str, ...] = ("pooler", "cls", "mean")

# weight files a save_pretrained directory may hold (single file or sharded index)
WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                 "pytorch_model.bin.index.json")
# the dropout fields of common encoder configs, set to `dropout` when loading a local model
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


def check_model_dir(path: str | os.PathLike, flag: str) -> Path:
    """A local ``save_pretrained`` directory holding config.json and a weights file, or a
    ValueError naming ``flag`` (e.g. ``--text-model``), the path and the missing piece."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{flag} {str(p)!r}: no such directory (missing); expected a local folder written by "
                         "save_pretrained (config.json and model.safetensors) or a named size")
    if not p.is_dir():
        raise ValueError(f"{flag} {str(p)!r} is a file; expected a directory written by save_pretrained")
    if not (p / "config.json").is_file():
        raise ValueError(f"{flag} {str(p)!r} is incomplete: config.json is missing")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{flag} {str(p)!r} is incomplete: the weights are missing (none of "
                         f"{', '.join(WEIGHT_FILES)})")
    return p


def position_limit(config: object) -> int | None:
    """The longest token sequence the model's positions allow, or None when unbounded/unknown."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            # RoBERTa-style models start positions after the padding index: two slots are never used
            if name == "max_position_embeddings" and getattr(config, "model_type", "") in (
                    "roberta", "xlm-roberta", "camembert"):
                limit -= 2
            return limit
    return None


def build_text_model(spec: str, *, vocab_size: int, max_length: int, dropout: float = 0.0) -> "PreTrainedModel":
    """A text encoder from a named size (random init, no download) or a local directory.

    Args:
        spec: a name of :data:`TEXT_SIZES` (a ``BertModel`` with its pooler built from a
            ``BertConfig``) or a local directory (``AutoModel.from_pretrained(path,
            local_files_only=True)``: any encoder ``transformers`` knows).
        vocab_size: the tokenizer's vocabulary (``len(tokenizer)``); a local model's embedding
            table must hold at least that many ids.
        max_length: tokens per text; a named size gets exactly that many positions, a local model
            must have at least that many.
        dropout: the encoder's dropout probabilities (hidden and attention); 0 by default.

    Raises:
        ValueError: an unknown name that is no directory, a missing or incomplete directory
            (naming ``--text-model``, the path and the missing file), a model whose vocabulary or
            positions are too small for ``vocab_size`` / ``max_length``.

    Example:
        >>> model = build_text_model("bert-mini", vocab_size=4000, max_length=32)
        >>> model.config.hidden_size, model.pooler is not None
        (256, True)
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"--text-model must be a str (a name of {tuple(TEXT_SIZES)} or a directory), "
                        f"got {type(spec).__name__}")
    for name, value in (("vocab_size", vocab_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name}={value!r}; expected an integer >= 2")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r}; expected a probability in [0, 1)")
    spec = os.fspath(spec)
    if spec in TEXT_SIZES:
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=vocab_size, max_position_embeddings=max_length,
                            hidden_dropout_prob=float(dropout), attention_probs_dropout_prob=float(dropout),
                            pad_token_id=0, **TEXT_SIZES[spec])
        return BertModel(config, add_pooling_layer=True)
    if not os.path.exists(spec) and os.sep not in spec and not spec.startswith("."):
        raise ValueError(f"--text-model {spec!r} is neither a named size {tuple(TEXT_SIZES)} nor an existing "
                         "directory (models are never downloaded: give a local save_pretrained folder)")
    path = check_model_dir(spec, "--text-model")
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        for field in _DROPOUT_FIELDS:
            if isinstance(getattr(config, field, None), (int, float)):
                setattr(config, field, float(dropout))
        model = AutoModel.from_pretrained(str(path), config=config, local_files_only=True)
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"--text-model {str(path)!r}: transformers could not load it: {err}") from err
    model_vocab = getattr(model.config, "vocab_size", None)
    if isinstance(model_vocab, int) and vocab_size > model_vocab:
        raise ValueError(f"--text-model {str(path)!r} has {model_vocab} token embeddings but the tokenizer has "
                         f"vocab_size={vocab_size}; expected a tokenizer of at most that many ids (the model's own)")
    limit = position_limit(model.config)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the {limit} positions of --text-model {str(path)!r}")
    return model


class TextTower(nn.Module):
    """A ``transformers`` encoder and a pooling: (n, L) token ids and mask -> (n, hidden_size).

    Args:
        model: the encoder (e.g. from :func:`build_text_model`); its output must carry
            ``last_hidden_state`` (and ``pooler_output`` for "pooler").
        pooling: "pooler" (the model's pooler: BERT's dense + tanh on [CLS]; what
            ``VisionTextDualEncoderModel`` uses), "cls" ([CLS]'s last hidden state) or "mean"
            (the average of the last hidden states over the attention mask).

    Attributes:
        hidden_size: the output width (the model's hidden size).
        max_length: the longest token sequence its positions allow.

    Example:
        >>> tower = TextTower(build_text_model("bert-tiny", vocab_size=100, max_length=16), pooling="mean")
        >>> tower(torch.randint(5, 100, (4, 16)), torch.ones(4, 16, dtype=torch.long)).shape
        torch.Size([4, 128])
    """

    def __init__(self, model: nn.Module, pooling: str = "pooler") -> None:
        super().__init__()
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; expected one of {POOLINGS}")
        if pooling == "pooler" and getattr(model, "pooler", None) is None:
            raise ValueError(f"pooling='pooler' needs a model with a pooler layer, and this "
                             f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) has none; "
                             "use pooling='cls' or pooling='mean'")
        hidden = getattr(model.config, "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError(f"model {type(model).__name__} has no integer config.hidden_size; expected an encoder")
        self.model, self.pooling, self.hidden_size = model, pooling, hidden
        limit = position_limit(model.config)
        self.max_length = limit if limit is not None else 2**31 - 1  # no position table: no limit

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(n, L) int ids, (n, L) 0/1 mask (L <= max_length) -> (n, hidden_size) float."""
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool and name == "input_ids":
                raise ValueError(f"{name} of shape {tuple(t.shape)} and dtype {t.dtype}; expected integer (n, L)")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}; expected the shape of "
                             f"input_ids {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"input_ids of length {input_ids.shape[1]} exceed the text tower's "
                             f"max_length={self.max_length} positions; tokenize with a smaller max_length")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        # mean over real tokens: sum_t m_t h_t / sum_t m_t (a row without tokens gives 0, not NaN)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, hidden_size={self.hidden_size}, max_length={self.max_length}"
