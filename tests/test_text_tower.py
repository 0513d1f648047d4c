"""modalities.text: the WordPiece trainer and tokenize(), text towers from named configs and local
directories (never downloading), and the three poolings against hand computations."""
from __future__ import annotations

import pytest
import torch

from modalities.text import (
    SPECIAL_TOKENS,
    TEXT_SIZES,
    TextTower,
    build_text_model,
    has_tokenizer,
    load_tokenizer,
    tokenize,
    train_wordpiece,
)

from _network import no_network  # noqa: F401 (autouse: no downloads in this module)

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "left", "right", "small", "big", "two", "a", "the"]
CORPUS = [f"a {c} {s} on the {p}" for c in WORDS[:3] for s in WORDS[3:6] for p in WORDS[6:8]] * 4 + \
    ["two small red circles", "the big blue square", "a green triangle on the left"] * 4


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(CORPUS, vocab_size=200, max_length=12)


# ---------------------------------------------------------------- tokenizer
def test_special_tokens_and_framing(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert tok.model_max_length == 12 and len(tok) <= 200
    # words seen many times are whole tokens: "a red circle" is [CLS] a red circle [SEP] [PAD]...
    b = tokenize(tok, ["a red circle", "RED", "two"], max_length=8)
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("a", "red", "circle", "two")}
    assert b.input_ids.dtype == torch.int64 and b.attention_mask.dtype == torch.int64
    assert b.input_ids.tolist() == [[2, ids["a"], ids["red"], ids["circle"], 3, 0, 0, 0],
                                    [2, ids["red"], 3, 0, 0, 0, 0, 0],  # lower-cased
                                    [2, ids["two"], 3, 0, 0, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5, [1] * 3 + [0] * 5]
    assert b.truncated == 0 and len(b) == 3
    # a character never seen is [UNK]
    assert tokenize(tok, ["red \u0436"], max_length=6).input_ids[0, :4].tolist() == [2, ids["red"], 1, 3]


def test_truncation_is_counted_and_keeps_sep(tok):
    red = tok.convert_tokens_to_ids("red")
    texts = [" ".join(["red"] * k) for k in (1, 4, 5, 6, 9, 30)]  # k tokens + [CLS] [SEP]
    b = tokenize(tok, texts, max_length=7)
    assert b.input_ids.shape == (6, 7)
    assert b.truncated == 3  # k = 6, 9, 30 do not fit in 7 (k + 2 > 7); k = 5 fits exactly
    assert b.attention_mask.sum(1).tolist() == [3, 6, 7, 7, 7, 7]
    for row in b.input_ids[3:]:
        assert row.tolist() == [2] + [red] * 5 + [3]
    assert tokenize(tok, texts[:2], max_length=7).truncated == 0


def test_save_and_reload_give_equal_ids(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tok")
    assert has_tokenizer(tmp_path / "tok") and not has_tokenizer(tmp_path)
    texts = ["a small green square on the right", "two big red triangles", "\u00e9t\u00e9 zzz", "red " * 20]
    ref = tokenize(tok, texts, max_length=12)
    for again in (load_tokenizer(tmp_path / "tok"),
                  AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)):
        got = tokenize(again, texts, max_length=12)
        assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.attention_mask, ref.attention_mask)
        assert got.truncated == ref.truncated == 1
        assert again.model_max_length == 12 and again.pad_token_id == 0


def test_vocabulary_is_deterministic_and_ordered():
    # every word exactly as frequent as the others: a trainer breaking ties in hash order gives a
    # different vocabulary each time; ours orders ties by spelling
    words = ["circle", "square", "ring", "star", "cross", "bar", "blue", "red", "green"]
    corpus = [" ".join(words[(i + j) % len(words)] for j in range(4)) for i in range(len(words) * 5)]
    vocabs = [train_wordpiece(corpus, vocab_size=40).get_vocab() for _ in range(4)]
    assert all(v == vocabs[0] for v in vocabs)
    vocab = vocabs[0]
    alphabet = sorted(set("".join(words)))
    # specials, then characters (word start, then continuation), then whole words by (count, spelling)
    order = list(SPECIAL_TOKENS) + alphabet + ["##" + c for c in alphabet]
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:len(order)] == order
    kept = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][len(order):]
    assert kept == sorted(words)[:40 - len(order)] and len(vocab) == 40
    # a word outside the vocabulary is spelt in characters, never [UNK]
    tok = train_wordpiece(corpus, vocab_size=40)
    pieces = tok.convert_ids_to_tokens(tokenize(tok, ["stars"], max_length=8).input_ids[0, 1:6].tolist())
    assert pieces == ["s", "##t", "##a", "##r", "##s"]


def test_tokenizer_bad_input(tok, tmp_path):
    with pytest.raises(ValueError, match="texts is empty"):
        train_wordpiece([], vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size=3"):
        train_wordpiece(CORPUS, vocab_size=3)
    with pytest.raises(TypeError, match="texts\\[1\\]"):
        train_wordpiece(["a", 3], vocab_size=100)
    with pytest.raises(ValueError, match="max_length=1"):
        tokenize(tok, ["a"], max_length=1)
    with pytest.raises(ValueError, match="texts is empty"):
        tokenize(tok, [], max_length=8)
    with pytest.raises(TypeError, match="one str|sequence of str"):
        tokenize(tok, "a red circle", max_length=8)
    with pytest.raises(TypeError, match="texts\\[0\\]"):
        tokenize(tok, [None], max_length=8)
    with pytest.raises(ValueError, match="--text-model.*missing"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- towers
@pytest.mark.parametrize("name", sorted(TEXT_SIZES))
def test_named_sizes_build_from_config(name):
    model = build_text_model(name, vocab_size=150, max_length=24)
    cfg = model.config
    for field, value in TEXT_SIZES[name].items():
        assert getattr(cfg, field) == value
    assert cfg.vocab_size == 150 and cfg.max_position_embeddings == 24 and cfg.pad_token_id == 0
    assert cfg.hidden_dropout_prob == 0.0 and cfg.attention_probs_dropout_prob == 0.0
    assert model.pooler is not None
    tower = TextTower(model)
    assert (tower.hidden_size, tower.max_length) == (TEXT_SIZES[name]["hidden_size"], 24)
    out = tower(torch.randint(5, 150, (3, 24)), torch.ones(3, 24, dtype=torch.long))
    assert out.shape == (3, TEXT_SIZES[name]["hidden_size"]) and out.dtype == torch.float32
    assert build_text_model(name, vocab_size=150, max_length=24, dropout=0.1).config.hidden_dropout_prob == 0.1


def _batch(vocab: int = 150, n: int = 5, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, vocab, (n, length))
    lengths = torch.tensor([10, 3, 7, 1, 5])[:n]
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def test_poolings_against_hand_computations():
    model = build_text_model("bert-tiny", vocab_size=150, max_length=10).eval()
    ids, mask = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        h = out.last_hidden_state
        got = {p: TextTower(model, pooling=p)(ids, mask) for p in ("pooler", "cls", "mean")}
    w, b = model.pooler.dense.weight, model.pooler.dense.bias
    torch.testing.assert_close(got["cls"], h[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(got["pooler"], torch.tanh(h[:, 0] @ w.T + b), rtol=1e-6, atol=1e-6)
    mean = torch.stack([h[i, :int(mask[i].sum())].double().mean(0) for i in range(len(ids))])
    torch.testing.assert_close(got["mean"].double(), mean, rtol=1e-6, atol=1e-6)


def test_mean_pooling_ignores_padding():
    tower = TextTower(build_text_model("bert-tiny", vocab_size=150, max_length=10), pooling="mean")
    ids, mask = _batch()
    other = torch.where(mask == 1, ids, torch.randint(5, 150, ids.shape))
    assert not torch.equal(other, ids)
    with torch.no_grad():
        torch.testing.assert_close(tower(other, mask), tower(ids, mask), rtol=1e-6, atol=1e-6)
        # while changing a real token changes the row
        changed = ids.clone()
        changed[0, 1] = 5 if ids[0, 1] != 5 else 6
        assert (tower(changed, mask)[0] - tower(ids, mask)[0]).abs().max() > 1e-4


def test_pooler_pooling_needs_a_pooler():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=8), add_pooling_layer=False)
    with pytest.raises(ValueError, match="pooling='cls' or pooling='mean'"):
        TextTower(model, pooling="pooler")
    assert TextTower(model, pooling="cls").hidden_size == 32
    with pytest.raises(ValueError, match="pooling='max'"):
        TextTower(model, pooling="max")


def test_tower_input_checks():
    tower = TextTower(build_text_model("bert-tiny", vocab_size=150, max_length=10))
    with pytest.raises(ValueError, match="max_length=10"):
        tower(torch.zeros(2, 11, dtype=torch.long), torch.ones(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask of shape"):
        tower(torch.zeros(2, 10, dtype=torch.long), torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids of shape"):
        tower(torch.zeros(2, 10), torch.ones(2, 10, dtype=torch.long))


# ---------------------------------------------------------------- local directories
def test_local_directory_loads_the_saved_weights(tmp_path, tok):
    from transformers import BertConfig, BertForMaskedLM

    # a masked-LM checkpoint, as a pretrained BERT folder would be; AutoModel takes its encoder
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=16, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    saved = BertForMaskedLM(cfg).eval()
    saved.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    model = build_text_model(str(tmp_path / "bert"), vocab_size=len(tok), max_length=12)
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    tower = TextTower(model.eval(), pooling="cls")
    b = tokenize(load_tokenizer(tmp_path / "bert"), ["a red circle on the left"], max_length=12)
    with torch.no_grad():
        ref = saved.bert(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state[:, 0]
        torch.testing.assert_close(tower(b.input_ids, b.attention_mask), ref, rtol=1e-6, atol=1e-6)
    assert tower.max_length == 16
    with pytest.raises(ValueError, match="max_length=17 exceeds the 16 positions"):
        build_text_model(str(tmp_path / "bert"), vocab_size=len(tok), max_length=17)
    with pytest.raises(ValueError, match="vocab_size=9999"):
        build_text_model(str(tmp_path / "bert"), vocab_size=9999, max_length=12)


def test_local_directory_errors(tmp_path):
    from transformers import BertConfig

    with pytest.raises(ValueError, match=r"--text-model .*nothing.*missing"):
        build_text_model(str(tmp_path / "nothing"), vocab_size=100, max_length=8)
    with pytest.raises(ValueError, match=r"--text-model 'bert-huge' is neither a named size"):
        build_text_model("bert-huge", vocab_size=100, max_length=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        build_text_model(str(tmp_path / "empty"), vocab_size=100, max_length=8)
    BertConfig(vocab_size=100).save_pretrained(tmp_path / "noweights")
    with pytest.raises(ValueError, match=r"'.*noweights' is incomplete: the weights are missing"):
        build_text_model(str(tmp_path / "noweights"), vocab_size=100, max_length=8)
    with pytest.raises(ValueError, match="dropout=1.5"):
        build_text_model("bert-tiny", vocab_size=100, max_length=8, dropout=1.5)
