"""Tokenizers for the text tower: a WordPiece vocabulary built from the captions with Hugging Face
`tokenizers`' normaliser and pre-tokeniser (deterministic: see :func:`train_wordpiece`), or the tokenizer saved in a local model directory (``--text-model PATH``).

WordPiece (Wu et al. 2016, "Google's Neural Machine Translation System", Sec. 4.1; the
vocabulary BERT uses, Devlin et al. 2019) with BERT's normaliser and pre-tokeniser:

    special tokens   [PAD]=0  [UNK]=1  [CLS]=2  [SEP]=3  [MASK]=4
    one text         [CLS] w_1 .. w_k [SEP]   then [PAD] up to max_length

:func:`tokenize` pads every batch to ``max_length`` (fixed shapes: the gradient-caching chunks
and the distributed gathers all see the same width) and counts the texts that were cut, so a
recipe can say once how many captions were longer than the tower allows.

Example:
    >>> tok = train_wordpiece(captions, vocab_size=4000, max_length=32)
    >>> batch = tokenize(tok, ["a red circle above a blue square"], max_length=32)
    >>> batch.input_ids.shape, batch.truncated
    (torch.Size([1, 32]), 0)
    >>> tok.save_pretrained(run_dir / "tokenizer")   # AutoTokenizer.from_pretrained reloads it
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:  # transformers is imported lazily (about 3 s)
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "TokenBatch", "has_tokenizer", "load_tokenizer", "tokenize", "train_wordpiece"]

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""The special tokens, in id order: [PAD] is 0 (BERT's convention; ``pad_token_id`` of BertConfig)."""

# files a saved tokenizer may consist of: a fast tokenizer's tokenizer.json, or a slow one's
# vocabulary (BERT's vocab.txt, SentencePiece models, BPE vocab/merges)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json")


@dataclass
class TokenBatch:
    """A tokenised batch, padded to ``max_length``.

    Attributes:
        input_ids: int64 (n, max_length), [PAD] after the text.
        attention_mask: int64 (n, max_length), 1 on the text's tokens (incl. [CLS], [SEP]), 0 on padding.
        truncated: how many of the n texts were longer than ``max_length`` tokens and were cut.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _check_length(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value}; expected an integer >= {minimum}")
    return value


def train_wordpiece(texts: Iterable[str], *, vocab_size: int = 4000, max_length: int = 32,
                    lowercase: bool = True) -> "PreTrainedTokenizerFast":
    """Build a WordPiece tokenizer from ``texts`` (seconds for 10^5 captions), deterministically.

    BERT's normaliser (unicode clean-up, optional lower-casing and accent stripping) and
    pre-tokeniser (split on whitespace and punctuation) from Hugging Face ``tokenizers``, a
    WordPiece model whose vocabulary is, in id order:

        [PAD]=0 [UNK] [CLS] [SEP] [MASK]
        every character seen, as a word start ``c`` and as a continuation ``##c`` (sorted)
        whole words, most frequent first (ties by spelling), until ``vocab_size``

    and the post-processor ``[CLS] $A [SEP]``. A word in the vocabulary is one token; any other
    word is spelt in characters by WordPiece's greedy longest match, so nothing maps to [UNK]
    unless the vocabulary cannot hold every character.

    Why not ``tokenizers``' ``WordPieceTrainer``: it breaks ties between equally frequent merges
    in hash-map order, which changes from one trainer to the next, so two runs with one seed got
    different vocabularies (measured: three trainings on the same captions, three vocabularies).
    This vocabulary is a function of the captions alone; it has no learnt sub-word merges, so
    a word outside it costs one token per character.

    Args:
        texts: the training captions (any iterable of str; consumed once).
        vocab_size: the largest vocabulary (>= the 5 special tokens + 1); if the characters do
            not all fit, the most frequent ones are kept and the rest become [UNK].
        max_length: ``model_max_length`` of the returned tokenizer (the text tower's positions).
        lowercase: lower-case and strip accents first (bert-base-uncased's behaviour).

    Returns:
        A ``transformers.PreTrainedTokenizerFast``; ``save_pretrained(dir)`` writes it and
        ``AutoTokenizer.from_pretrained(dir, local_files_only=True)`` (or :func:`load_tokenizer`)
        reads it back with the same ids.

    Example:
        >>> tok = train_wordpiece(["a red circle", "two blue squares"], vocab_size=100)
        >>> tok("a red circle")["input_ids"][0] == tok.cls_token_id
        True
    """
    _check_length("vocab_size", vocab_size, len(SPECIAL_TOKENS) + 1)
    _check_length("max_length", max_length, 2)
    if not isinstance(lowercase, bool):
        raise TypeError(f"lowercase must be a bool, got {type(lowercase).__name__} {lowercase!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of captions, got one str")
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    count = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__} ({text!r}); expected str")
        count += 1
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    if count == 0:
        raise ValueError("texts is empty: a tokenizer needs captions to learn its vocabulary from")
    chars: Counter[str] = Counter()
    for w, n in words.items():
        chars.update({c: n for c in w})
    room = vocab_size - len(SPECIAL_TOKENS)
    # most frequent characters first if they do not all fit (each takes two entries)
    alphabet = sorted(c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:room // 2])
    vocab: dict[str, int] = {}
    for token in list(SPECIAL_TOKENS) + alphabet + ["##" + c for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))

    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length,
        padding_side="right", truncation_side="right")


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether the directory holds a saved tokenizer (tokenizer.json or a slow tokenizer's
    vocabulary file); a model directory without one needs :func:`train_wordpiece`."""
    p = Path(path)
    return p.is_dir() and any((p / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike) -> "PreTrainedTokenizerBase":
    """The tokenizer saved in a local directory (``AutoTokenizer.from_pretrained(path,
    local_files_only=True)``; never downloads).

    Raises:
        ValueError: naming ``--text-model``, the path and what is missing (the directory, or any
            tokenizer file: one of tokenizer.json, vocab.txt, spiece.model, ...).

    Example:
        >>> tok = load_tokenizer("runs/clip/tokenizer")
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"--text-model / tokenizer path {str(p)!r} is not a directory (missing); expected a "
                         "local folder written by save_pretrained")
    if not has_tokenizer(p):
        raise ValueError(f"--text-model / tokenizer path {str(p)!r} holds no tokenizer: none of "
                         f"{', '.join(_TOKENIZER_FILES)} is there")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def tokenize(tokenizer: "PreTrainedTokenizerBase", texts: Sequence[str], max_length: int) -> TokenBatch:
    """Tokenise ``texts`` to a fixed width: (n, max_length) ids and attention mask.

    Texts longer than ``max_length`` tokens (special tokens included) are cut on the right, the
    post-processor keeping the final [SEP]; ``TokenBatch.truncated`` counts them. Every row is
    padded with the tokenizer's pad token to ``max_length`` (fixed shapes for chunking and
    gathering).

    Args:
        tokenizer: a Hugging Face tokenizer (e.g. from :func:`train_wordpiece` / :func:`load_tokenizer`).
        texts: n >= 1 strings.
        max_length: tokens per row (>= 2), at most the text tower's positions.

    Example:
        >>> b = tokenize(tok, ["two green triangles"], max_length=16)
        >>> b.input_ids.shape, b.attention_mask.sum().item()
        (torch.Size([1, 16]), 5)
    """
    _check_length("max_length", max_length, 2)
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of str (a list of captions), got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts is empty; expected at least one caption")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__} ({text!r}); expected str")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; expected one (e.g. [PAD])")
    # one call: with return_overflowing_tokens a fast tokenizer emits extra rows for the cut
    # tails, overflow_to_sample_mapping[r] naming each row's text; the first row of each text
    # is the truncated text itself
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_overflowing_tokens=True, return_attention_mask=True,
                    return_token_type_ids=False, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    mapping = enc.get("overflow_to_sample_mapping")
    if mapping is None:  # a slow tokenizer: returns "overflowing_tokens" per text instead
        overflow = enc.get("overflowing_tokens")
        truncated = sum(1 for o in overflow if len(o)) if overflow is not None else 0
    else:
        first = torch.ones(mapping.shape[0], dtype=torch.bool)
        first[1:] = mapping[1:] != mapping[:-1]
        truncated = int(mapping.shape[0] - int(first.sum()))
        truncated = int(torch.unique(mapping[~first]).numel()) if truncated else 0
        ids, mask = ids[first], mask[first]
    if ids.shape != (len(texts), max_length):
        raise RuntimeError(f"tokenize: got ids of shape {tuple(ids.shape)} for {len(texts)} texts at "
                           f"max_length={max_length}")
    return TokenBatch(ids.long().contiguous(), mask.long().contiguous(), truncated)
