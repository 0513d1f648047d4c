"""modalities.multimodal: image towers, the DualEncoder (shapes, normalisation, logit-scale clamp,
losses against hand-written ones, gradient caching equal to the one-shot step) and its export
(a VisionTextDualEncoderModel read back by transformers alone; the tilecontrast format)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import csrc_triton
from modalities.image.transforms import eval_transform
from modalities.multimodal import (
    IMAGE_TOWERS,
    DualEncoder,
    ImageTower,
    build_image_tower,
    exportable,
    load_dual_encoder,
    save_dual_encoder,
    vit_patch_size,
)
from modalities.text import TextTower, build_text_model, tokenize, train_wordpiece
from recipes.common.grad_cache import Tower, grad_cache_step

from _network import no_network  # noqa: F401 (autouse: no downloads in this module)

CAPTIONS = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square")
            for p in ("left", "right")] * 3
MEAN, STD = (0.48, 0.45, 0.41), (0.27, 0.26, 0.28)
HAS_SIGLIP = callable(getattr(csrc_triton, "siglip", None))


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(CAPTIONS, vocab_size=120, max_length=12)


def _text_tower(tok, pooling: str = "pooler") -> TextTower:
    return TextTower(build_text_model("bert-tiny", vocab_size=len(tok), max_length=12), pooling=pooling)


def _small_vit() -> ImageTower:
    """A ViT smaller than vit-tiny (2 layers, hidden 48, 8 px patches) for the multi-pass tests."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ImageTower(ViTModel(cfg), kind="hf", image_size=32, spec="small-vit")


def _model(tok, image: str = "vit-tiny", loss: str = "clip", pooling: str = "pooler", **kw) -> DualEncoder:
    tower = _small_vit() if image == "small-vit" else build_image_tower(image, image_size=32)
    return DualEncoder(tower, _text_tower(tok, pooling), projection_dim=24, loss=loss, **kw)


def _pairs(tok, n: int):
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    batch = tokenize(tok, [CAPTIONS[i % len(CAPTIONS)] + " and" * (i % 5) for i in range(n)], max_length=12)
    return images, batch


# ---------------------------------------------------------------- image towers
def test_image_towers_build_from_config():
    dims = {"small_cnn": 256, "resnet18": 512, "resnet50": 2048, "vit-tiny": 192, "vit-small": 384}
    assert set(IMAGE_TOWERS) == set(dims)
    x = torch.randn(2, 3, 32, 32)
    for name in IMAGE_TOWERS:
        tower = build_image_tower(name, image_size=32).eval()
        assert tower.feature_dim == dims[name], name
        assert tower.kind == ("hf" if name.startswith("vit") else "torchvision")
        if name != "resnet50":  # its forward alone takes 2 s on 2 cores
            with torch.no_grad():
                assert tower(x).shape == (2, dims[name])
        if tower.kind == "torchvision":
            assert tower.model.cifar_stem
        else:
            cfg = tower.model.config
            assert (cfg.image_size, cfg.patch_size, cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) == (
                32, 4, 0.0, 0.0)
    assert not build_image_tower("resnet18", image_size=96).model.cifar_stem
    assert [vit_patch_size(s) for s in (32, 64, 96, 224, 28, 8)] == [4, 8, 8, 16, 2, 1]
    with pytest.raises(ValueError, match="pixel_values of shape"):
        build_image_tower("small_cnn", image_size=32)(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="--image-model 'vit-huge' is neither"):
        build_image_tower("vit-huge", image_size=32)


def test_local_vit_directory(tmp_path, tok):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=64, patch_size=8, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=96)
    saved = ViTModel(cfg).eval()
    saved.save_pretrained(tmp_path / "vit")
    x = torch.randn(2, 3, 64, 64)
    same = build_image_tower(str(tmp_path / "vit"), image_size=64).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(x), saved(pixel_values=x).pooler_output, rtol=1e-6, atol=1e-6)
        # at 32 px the 8 x 8 position grid becomes 4 x 4 once: what ViT's interpolation gives
        small = build_image_tower(str(tmp_path / "vit"), image_size=32).eval()
        x32 = torch.randn(2, 3, 32, 32)
        ref = saved(pixel_values=x32, interpolate_pos_encoding=True).pooler_output
        torch.testing.assert_close(small(x32), ref, rtol=1e-5, atol=1e-6)
    assert small.model.config.image_size == 32 and small.model.embeddings.position_embeddings.shape[1] == 17
    with pytest.raises(ValueError, match="--image-model .*missing"):
        build_image_tower(str(tmp_path / "none"), image_size=32)
    (tmp_path / "noweights").mkdir()
    cfg.save_pretrained(tmp_path / "noweights")
    with pytest.raises(ValueError, match="the weights are missing"):
        build_image_tower(str(tmp_path / "noweights"), image_size=32)
    build_text_model("bert-tiny", vocab_size=50, max_length=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="holds a 'bert' model; expected a ViT"):
        build_image_tower(str(tmp_path / "bert"), image_size=32)


# ---------------------------------------------------------------- the dual encoder
def test_shapes_normalisation_and_init(tok):
    model = _model(tok, image="small-vit")
    images, b = _pairs(tok, 5)
    x = eval_transform(32)(images)
    img, txt = model(x, b.input_ids, b.attention_mask)
    assert img.shape == txt.shape == (5, 24)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(5), rtol=0, atol=1e-6)
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(5), rtol=0, atol=1e-6)
    assert model.image_features(x).shape == (5, 48)
    assert model.text_features(b.input_ids, b.attention_mask).shape == (5, 128)
    assert model.visual_projection.bias is None and model.text_projection.bias is None
    assert model.visual_projection.weight.shape == (24, 48) and model.text_projection.weight.shape == (24, 128)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and model.logit_bias is None
    sig = _model(tok, image="small_cnn", loss="siglip")
    assert sig.logit_scale.item() == pytest.approx(math.log(10)) and sig.logit_bias.item() == -10.0
    with pytest.raises(ValueError, match="loss='softmax'"):
        _model(tok, image="small_cnn", loss="softmax")
    with pytest.raises(ValueError, match="logit_scale_init=5.0 exceeds"):
        _model(tok, image="small_cnn", logit_scale_init=5.0)


def test_scale_clamp(tok):
    model = _model(tok, image="small_cnn", max_logit_scale=50.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    s = model.scale()
    s.backward()
    assert s.item() == pytest.approx(20.0) and model.logit_scale.grad.item() == pytest.approx(20.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(20.0))  # below the cap: untouched
    model.logit_scale.grad = None
    with torch.no_grad():
        model.logit_scale.fill_(math.log(80.0))
    s = model.scale()
    s.backward()
    assert s.item() == 50.0 and model.logit_scale.grad.item() == 0.0
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(50.0)) and model.scale().item() == pytest.approx(50.0)


def _clip_by_hand(img: torch.Tensor, txt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(CE(t X Y^T, diag) + CE(t Y X^T, diag)) / 2 written from the formula."""
    s = t * img @ txt.T
    rows = torch.logsumexp(s, dim=1) - s.diagonal()
    cols = torch.logsumexp(s, dim=0) - s.diagonal()
    return (rows.mean() + cols.mean()) / 2


def _siglip_by_hand(img, txt, t, b) -> torch.Tensor:
    """(1/n) sum_ij log(1 + exp(-z_ij (t x_i.y_j + b))), z = +1 on the diagonal, -1 elsewhere."""
    s = t * img @ txt.T + b
    z = 2 * torch.eye(len(img), dtype=s.dtype) - 1
    return torch.log1p(torch.exp(-z * s)).sum() / len(img)


def test_clip_loss_equals_the_formula(tok):
    model = _model(tok, image="small_cnn")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
    img = F.normalize(torch.randn(9, 24, dtype=torch.float64), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(9, 24, dtype=torch.float64), dim=1).requires_grad_()
    loss = model.loss(img, txt)
    loss.backward()
    ours = (loss.detach(), img.grad.clone(), txt.grad.clone(), model.logit_scale.grad.clone())
    img.grad = txt.grad = None
    log_t = torch.tensor(math.log(7.0), dtype=torch.float64, requires_grad=True)
    ref = _clip_by_hand(img, txt, log_t.exp())
    ref.backward()
    for a, b in zip(ours, (ref.detach(), img.grad, txt.grad, log_t.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not HAS_SIGLIP, reason="csrc_triton.siglip is not in this tree yet (written by another helper)")
def test_siglip_loss_equals_the_formula(tok):
    model = _model(tok, image="small_cnn", loss="siglip")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
        model.logit_bias.fill_(-3.0)
    img = F.normalize(torch.randn(9, 24, dtype=torch.float64), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(9, 24, dtype=torch.float64), dim=1).requires_grad_()
    loss = model.loss(img, txt)
    loss.backward()
    ours = (loss.detach(), img.grad.clone(), txt.grad.clone(), model.logit_scale.grad.clone(),
            model.logit_bias.grad.clone())
    img.grad = txt.grad = None
    log_t = torch.tensor(math.log(7.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ref = _siglip_by_hand(img, txt, log_t.exp(), bias)
    ref.backward()
    for a, b in zip(ours, (ref.detach(), img.grad, txt.grad, log_t.grad, bias.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-7)


def _grads_of_step(model: DualEncoder, x, ids, mask, chunk: int | None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    towers = [Tower(forward=lambda px: {"embedding": model.encode_image(px)}, inputs=x, module=model.image_tower),
              Tower(forward=lambda i, m: {"embedding": model.encode_text(i, m)}, inputs=(ids, mask),
                    module=model.text_tower)]

    def loss_fn(outs):
        return model.loss(outs[0]["embedding"], outs[1]["embedding"]), None

    grad_cache_step(towers, loss_fn, chunk)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["clip", pytest.param("siglip", marks=pytest.mark.skipif(
    not HAS_SIGLIP, reason="csrc_triton.siglip is not in this tree yet (written by another helper)"))])
def test_gradient_caching_equals_the_one_shot_step(tok, loss):
    """ViT + BERT towers (dropout 0), batch 10 in chunks of 3 (3 + 3 + 3 + 1): every parameter's
    gradient, logit_scale (and logit_bias) included, equals the unchunked step's."""
    model = _model(tok, image="small-vit", loss=loss)
    images, b = _pairs(tok, 10)
    x = eval_transform(32, mean=MEAN, std=STD)(images)
    full = _grads_of_step(model, x, b.input_ids, b.attention_mask, None)
    cached = _grads_of_step(model, x, b.input_ids, b.attention_mask, 3)
    # every parameter gets a gradient, the poolers' and the logit scale's (and bias's) included
    assert set(full) == set(cached) == {n for n, _ in model.named_parameters()}
    for n in full:
        scale = full[n].abs().max().item()
        if n.endswith(("k_proj.bias", "key.bias")):
            # the key bias adds q.b to every logit of a query's softmax row: its gradient is 0
            # (float noise here, ~1e-9)
            assert scale < 1e-7 and cached[n].abs().max().item() < 1e-7, n
            continue
        assert scale > 1e-5, n
        torch.testing.assert_close(cached[n], full[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


# ---------------------------------------------------------------- export
def test_export_opens_with_transformers_alone(tok, tmp_path):
    from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

    model = _model(tok, image="small-vit").eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    assert exportable(model) == (True, "")
    rng = torch.get_rng_state()
    assert save_dual_encoder(model, tok, tmp_path / "out", image_size=32, mean=MEAN, std=STD) == "transformers"
    assert torch.equal(torch.get_rng_state(), rng)  # saving does not move a run's generator
    hf = VisionTextDualEncoderModel.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    processor = VisionTextDualEncoderProcessor.from_pretrained(tmp_path / "out", local_files_only=True)
    images, b = _pairs(tok, 6)
    captions = [CAPTIONS[i] for i in range(6)]
    b = tokenize(tok, captions, max_length=12)
    inputs = processor(text=captions, images=[im for im in images], return_tensors="pt", padding="max_length",
                       max_length=12, truncation=True)
    ours_x = eval_transform(32, mean=MEAN, std=STD)(images)
    torch.testing.assert_close(inputs["pixel_values"], ours_x, rtol=1e-6, atol=1e-6)
    assert torch.equal(inputs["input_ids"], b.input_ids) and torch.equal(inputs["attention_mask"], b.attention_mask)
    with torch.no_grad():
        img, txt = model(ours_x, b.input_ids, b.attention_mask)
        hf_img = F.normalize(hf.get_image_features(pixel_values=ours_x).pooler_output, dim=-1)
        hf_txt = F.normalize(hf.get_text_features(input_ids=b.input_ids, attention_mask=b.attention_mask)
                             .pooler_output, dim=-1)
        out = hf(**inputs)
    torch.testing.assert_close(hf_img, img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hf_txt, txt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits_per_image, 30.0 * img @ txt.T, rtol=1e-5, atol=1e-4)
    # and our loader reads it back
    again, tok2, info = load_dual_encoder(tmp_path / "out")
    assert info["format"] == "transformers" and info["image_size"] == 32 and info["mean"] == list(MEAN)
    with torch.no_grad():
        img2, txt2 = again(ours_x, b.input_ids, b.attention_mask)
    torch.testing.assert_close(img2, img, rtol=0, atol=0)
    torch.testing.assert_close(txt2, txt, rtol=0, atol=0)
    assert again.scale().item() == pytest.approx(30.0, rel=1e-6)
    assert torch.equal(tokenize(tok2, captions, 12).input_ids, b.input_ids)


def test_tilecontrast_format_round_trip(tok, tmp_path):
    model = _model(tok, image="small_cnn", loss="siglip", pooling="mean")
    images, b = _pairs(tok, 6)
    x = eval_transform(32)(images)
    model.train()
    with torch.no_grad():
        model(x, b.input_ids, b.attention_mask)  # BatchNorm running statistics away from their init
        model.logit_bias.fill_(-4.5)
    model.eval()
    ok, reason = exportable(model)
    assert not ok and "torchvision" in reason
    assert save_dual_encoder(model, tok, tmp_path / "tc", image_size=32, mean=MEAN, std=STD) == "tilecontrast"
    assert {"tilecontrast.json", "model.safetensors", "text_config", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "tc").iterdir()}
    again, tok2, info = load_dual_encoder(tmp_path / "tc")
    assert (info["format"], info["loss"], info["text_tower"]["pooling"]) == ("tilecontrast", "siglip", "mean")
    assert again.logit_bias.item() == -4.5 and again.image_tower.spec == "small_cnn"
    with torch.no_grad():
        for a, c in zip(model(x, b.input_ids, b.attention_mask), again(x, b.input_ids, b.attention_mask)):
            torch.testing.assert_close(c, a, rtol=0, atol=0)
    assert torch.equal(tokenize(tok2, CAPTIONS[:6], 12).input_ids, tokenize(tok, CAPTIONS[:6], 12).input_ids)


def test_exportable_reasons_and_load_errors(tok, tmp_path):
    assert "pooler" in exportable(_model(tok, image="small-vit", pooling="cls"))[1]
    assert "SigLIP" in exportable(_model(tok, image="small-vit", loss="siglip"))[1]
    with pytest.raises(ValueError, match="not a directory"):
        load_dual_encoder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither tilecontrast.json"):
        load_dual_encoder(tmp_path / "empty")
    model = _model(tok, image="small_cnn")
    save_dual_encoder(model, tok, tmp_path / "tc", image_size=32, mean=MEAN, std=STD)
    (tmp_path / "tc" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_dual_encoder(tmp_path / "tc")
    with pytest.raises(ValueError, match="image_size=64"):
        save_dual_encoder(model, tok, tmp_path / "x", image_size=64, mean=MEAN, std=STD)
