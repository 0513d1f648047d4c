"""Text: tokenizers (a WordPiece vocabulary trained with Hugging Face ``tokenizers``, or a local
model directory's own) and text towers (Hugging Face ``transformers`` encoders with pooling),
built from named sizes or loaded from local folders; nothing is ever downloaded."""
from .tokenizer import SPECIAL_TOKENS, TokenBatch, has_tokenizer, load_tokenizer, tokenize, train_wordpiece
from .tower import POOLINGS, TEXT_SIZES, TextTower, build_text_model, check_model_dir, position_limit

__all__ = [
    "POOLINGS", "SPECIAL_TOKENS", "TEXT_SIZES", "TextTower", "TokenBatch", "build_text_model",
    "check_model_dir", "has_tokenizer", "load_tokenizer", "position_limit", "tokenize", "train_wordpiece",
]
