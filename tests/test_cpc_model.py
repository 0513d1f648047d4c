"""CPC model: shapes, receptive field, causality of the context network, the options, and the
transformer predictor against a float64 re-derivation of CPC_audio's TransformerLayer."""
import math

import pytest
import torch

from cpc.model import (CPCModel, CPCModelConfig, Encoder, TransformerPredictorLayer,
                       count_parameters, encoder_flops, receptive_field)


def test_paper_defaults():
    cfg = CPCModelConfig()
    assert (cfg.encoder_channels, cfg.context, cfg.context_dim, cfg.prediction_steps,
            cfg.predictor, cfg.encoder_norm) == (512, "gru", 256, 12, "linear", "none")
    enc = Encoder()
    assert [c.kernel_size[0] for c in enc.convs] == [10, 8, 4, 4, 4]
    assert [c.stride[0] for c in enc.convs] == [5, 4, 2, 2, 2]
    assert all(c.out_channels == 512 for c in enc.convs)


def test_receptive_field_and_hop():
    assert receptive_field() == (465, 160)
    assert encoder_flops(20480) == pytest.approx(6.2e9, rel=0.01)


@pytest.mark.parametrize("samples", [1600, 3200, 4000, 4960])
def test_one_frame_per_10ms(samples):
    model = CPCModel(CPCModelConfig(encoder_channels=8, context_dim=6, prediction_steps=3))
    z, c = model(torch.randn(2, samples))
    assert z.shape == (2, samples // 160, 8)
    assert c.shape == (2, samples // 160, 6)
    assert model.predict(c).shape == (3, 2, samples // 160, 8)


@pytest.mark.parametrize("options", [
    dict(encoder_norm="channel"), dict(context="lstm"),
    dict(predictor="transformer", sequence_frames=10), dict(prediction_dropout=0.5),
])
def test_options_shapes_and_gradients(options):
    model = CPCModel(CPCModelConfig(encoder_channels=8, context_dim=8, prediction_steps=2,
                                    predictor_heads=2, predictor_ff=16, **options))
    z, c, pred = model(torch.randn(3, 1600), predict=True)
    # the transformer predicts from the first W = S - K frames only
    assert pred.shape == (2, 3, 8 if options.get("predictor") else 10, 8)
    (pred.sum() + z.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("predictor", ["linear", "transformer"])
def test_context_and_predictions_are_causal(predictor):
    torch.manual_seed(0)
    model = CPCModel(CPCModelConfig(encoder_channels=8, context_dim=8, prediction_steps=2,
                                    predictor=predictor, predictor_heads=2, predictor_ff=16,
                                    sequence_frames=20)).eval()
    wave = torch.randn(1, 3200)
    changed = wave.clone()
    cut = 160 * 12
    changed[:, cut:] = torch.randn(1, 3200 - cut)
    _, c1, p1 = model(wave, predict=True)
    _, c2, p2 = model(changed, predict=True)
    # frame t sees samples up to about 160 t + 305 (receptive field 465, padding 3+...)
    safe = (cut - 320) // 160
    torch.testing.assert_close(c1[:, :safe], c2[:, :safe])
    torch.testing.assert_close(p1[:, :, :safe], p2[:, :, :safe])
    assert not torch.allclose(c1[:, -1], c2[:, -1])
    assert not torch.allclose(p1[:, :, -1], p2[:, :, -1])


def test_bad_config_names_argument():
    with pytest.raises(ValueError, match="context='transformer'"):
        CPCModelConfig(context="transformer")
    with pytest.raises(ValueError, match="encoder_channels"):
        CPCModelConfig(encoder_channels=0)
    with pytest.raises(ValueError, match=r"wave.shape"):
        Encoder(4)(torch.randn(2, 1, 1600))


def test_parameter_count_of_paper_model():
    # encoder 5 convs + GRU(512->256) + 12 x Linear(256->512)
    n = count_parameters(CPCModel())
    enc = (1 * 10 + 1) * 512 + (512 * 8 + 1) * 512 + 3 * (512 * 4 + 1) * 512
    gru = 3 * (512 * 256 + 256 * 256 + 2 * 256)
    assert n == enc + gru + 12 * 256 * 512


# --------------------------------------------------------------------------------------------
# the transformer predictor: CPC_audio's TransformerLayer, re-derived here in float64
# --------------------------------------------------------------------------------------------
def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as nn.LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference_transformer_layer(x, layer, heads):
    """Post-LN transformer layer with causal multi-head attention and a relative position
    term: for head h, score(i, j) = (q_i . k_j + q_i . P[:, W - 1 - (i - j)]) / sqrt(d) for
    j <= i (CPC_audio's ScaledDotProductAttention(relpos=True)), written with explicit loops
    over (i, j)."""
    mha, w = layer.multihead, x.shape[1]
    dim = x.shape[2]
    d = dim // heads
    P = mha.Att.Krelpos
    q, k, v = x @ mha.Wq.weight.T, x @ mha.Wk.weight.T, x @ mha.Wv.weight.T
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
        rows = []
        for i in range(w):
            scores = torch.stack([(qh[:, i] * kh[:, j]).sum(-1)
                                  + (qh[:, i] * P[:, w - 1 - (i - j)]).sum(-1)
                                  for j in range(i + 1)], dim=1) / math.sqrt(d)  # (B, i + 1)
            att = torch.softmax(scores, dim=1)
            rows.append((att[:, :, None] * vh[:, :i + 1]).sum(1))
        outs.append(torch.stack(rows, dim=1))
    y = torch.cat(outs, dim=-1) @ mha.Wo.weight.T
    y = _layer_norm(x + y, layer.ln_multihead.weight, layer.ln_multihead.bias)
    ff = layer.ffnetwork
    hidden = torch.relu(y @ ff.lin1.weight.T + ff.lin1.bias) @ ff.lin2.weight.T + ff.lin2.bias
    return _layer_norm(y + hidden, layer.ln_ffnetwork.weight, layer.ln_ffnetwork.bias)


def test_transformer_layer_matches_reference_outputs_and_gradients():
    torch.manual_seed(3)
    frames, dim, heads = 7, 12, 3
    layer = TransformerPredictorLayer(frames, dim, heads, ff_dim=20, dropout=0.1).double().eval()
    with torch.no_grad():  # non-trivial norms and biases
        for ln in (layer.ln_multihead, layer.ln_ffnetwork):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_()
    x = torch.randn(2, frames, dim, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, frames, dim, dtype=torch.float64)
    params = [x] + list(layer.parameters())
    ours = layer(x)
    ref = reference_transformer_layer(x, layer, heads)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad((ours * upstream).sum(), params)
    g_ref = torch.autograd.grad((ref * upstream).sum(), params)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, g_ours, g_ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # the relative position term matters (else the test would not see a wrong index); a
    # constant shift of Krelpos would not (it adds the same q_i . 1 to a whole softmax row)
    with torch.no_grad():
        layer.multihead.Att.Krelpos.add_(torch.randn_like(layer.multihead.Att.Krelpos))
    assert not torch.allclose(layer(x), ours)


def test_transformer_predictor_is_causal_in_c_and_uses_first_w_frames():
    torch.manual_seed(4)
    cfg = CPCModelConfig(encoder_channels=8, context_dim=8, prediction_steps=3,
                         predictor="transformer", predictor_heads=2, predictor_ff=16,
                         sequence_frames=12)
    model = CPCModel(cfg).eval()
    c = torch.randn(2, 12, 8)
    p = model.predict(c)
    assert p.shape == (3, 2, 9, 8)
    for t in (0, 4, 8):
        changed = c.clone()
        changed[:, t + 1:] = torch.randn(2, 11 - t, 8)
        q = model.predict(changed)
        torch.testing.assert_close(q[:, :, :t + 1], p[:, :, :t + 1], rtol=0, atol=0)
        if t < 8:
            assert not torch.allclose(q[:, :, t + 1], p[:, :, t + 1])


def test_transformer_config_and_input_validation():
    base = dict(encoder_channels=8, context_dim=8, prediction_steps=3, predictor="transformer",
                predictor_heads=2)
    with pytest.raises(ValueError, match="sequence_frames=0"):
        CPCModelConfig(**base)
    with pytest.raises(ValueError, match="sequence_frames=3"):
        CPCModelConfig(**base, sequence_frames=3)
    with pytest.raises(ValueError, match="context_dim=6, encoder_channels=8"):
        CPCModelConfig(**{**base, "context_dim": 6}, sequence_frames=10)
    with pytest.raises(ValueError, match="predictor_heads=3"):
        CPCModelConfig(**{**base, "predictor_heads": 3}, sequence_frames=10)
    with pytest.raises(ValueError, match="prediction_dropout=1.0"):
        CPCModelConfig(prediction_dropout=1.0)
    model = CPCModel(CPCModelConfig(**base, sequence_frames=10, predictor_ff=8))
    with pytest.raises(ValueError, match=r"c.shape=\(2, 9, 8\).*sequence_frames=10"):
        model.predict(torch.randn(2, 9, 8))
    # CPC_audio's values by default
    cfg = CPCModelConfig(predictor="transformer", context_dim=512, sequence_frames=128)
    assert (cfg.predictor_heads, cfg.predictor_ff, cfg.predictor_dropout) == (8, 2048, 0.1)


def test_prediction_dropout_only_in_training():
    torch.manual_seed(5)
    model = CPCModel(CPCModelConfig(encoder_channels=8, context_dim=8, prediction_steps=2,
                                    prediction_dropout=0.5))
    c = torch.randn(3, 40, 8)
    p = model.predict(c)
    zeros = float((p == 0).float().mean())
    assert 0.4 < zeros < 0.6  # each output coordinate dropped with p = 0.5
    kept = p != 0
    ref = torch.stack([pr(c) for pr in model.predictors])
    torch.testing.assert_close(p[kept], 2 * ref[kept])  # survivors scaled by 1 / (1 - p)
    model.eval()
    torch.testing.assert_close(model.predict(c), ref)
