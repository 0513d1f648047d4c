"""CPC_audio export of every predictor kind: the transformer's criterion names and shapes
(CPC_audio's ``TransformerLayer`` in ``wPrediction.predictors.{k}.0``, its ``mask`` and ``z``
buffers), a re-computation of CPC_audio's attention (its concatenate-and-reshape trick for
relative positions, written here from its description) on the exported tensors, the config
stating what training used, and the round trip through ``load_cpc_audio``."""
import math

import pytest
import torch

from cpc.export import (cpc_audio_config, cpc_audio_criterion_weights, export_cpc_audio,
                        load_cpc_audio)
from cpc.model import CPCModel, CPCModelConfig

ARGS = dict(window=3200, negatives="speaker", n_negatives=128, lr=2e-4, warmup_steps=0,
            steps=500, batch_size=8, similarity="mean", step_reduction="sum")


def _transformer(**kw) -> CPCModel:
    torch.manual_seed(0)
    cfg = dict(encoder_channels=16, context_dim=16, context="lstm", encoder_norm="channel",
               prediction_steps=3, predictor="transformer", sequence_frames=20, predictor_ff=24)
    cfg.update(kw)
    return CPCModel(CPCModelConfig(**cfg)).eval()


def test_transformer_criterion_names_and_shapes():
    model = _transformer()
    crit = cpc_audio_criterion_weights(model)
    w, c, dk = 17, 16, 2  # W = 20 - 3, 8 heads of 16 / 8
    expected = {}
    for k in range(3):
        p = f"wPrediction.predictors.{k}.0."
        expected.update({p + f"multihead.W{x}.weight": (c, c) for x in "qkvo"})
        expected.update({p + "multihead.Att.Krelpos": (dk, w), p + "multihead.Att.mask": (1, w, w),
                         p + "multihead.Att.z": (1, w, 1)})
        for ln in ("ln_multihead", "ln_ffnetwork"):
            expected.update({p + f"{ln}.weight": (c,), p + f"{ln}.bias": (c,)})
        expected.update({p + "ffnetwork.lin1.weight": (24, c), p + "ffnetwork.lin1.bias": (24,),
                         p + "ffnetwork.lin2.weight": (c, 24), p + "ffnetwork.lin2.bias": (c,)})
    assert {k: tuple(v.shape) for k, v in crit.items()} == expected
    mask = crit["wPrediction.predictors.1.0.multihead.Att.mask"][0]
    for i in range(w):
        for j in range(w):
            assert mask[i, j] == (0.0 if j <= i else -math.inf)
    assert not crit["wPrediction.predictors.2.0.multihead.Att.z"].any()
    torch.testing.assert_close(crit["wPrediction.predictors.2.0.multihead.Wv.weight"],
                               model.predictors[2][0].multihead.Wv.weight, rtol=0, atol=0)


def _cpc_audio_layer(x, sd, prefix, heads=8):
    """CPC_audio's TransformerLayer computed from the exported state dict: per head, scores
    Q K^T plus the relative term built by prepending the ``z`` column to Q Krelpos, viewing
    the (W, W + 1) result as (W + 1, W) and dropping the first row; then / sqrt(dk) + mask,
    softmax, A V, Wo; post-LN residual blocks, ReLU feed-forward."""
    g = lambda n: sd[prefix + n]  # noqa: E731
    b, w, c = x.shape
    dk = c // heads

    def split(y):
        return y.view(b, w, heads, dk).transpose(1, 2).reshape(b * heads, w, dk)

    q, k, v = (split(x @ g(f"multihead.W{n}.weight").T) for n in "qkv")
    qk = q @ k.transpose(1, 2)
    qp = q @ g("multihead.Att.Krelpos")
    qp = torch.cat([g("multihead.Att.z").expand(b * heads, -1, -1), qp], dim=2)
    qk = qk + qp.reshape(b * heads, w + 1, w)[:, 1:, :]
    att = torch.softmax(qk / math.sqrt(dk) + g("multihead.Att.mask"), dim=2)
    y = (att @ v).view(b, heads, w, dk).transpose(1, 2).reshape(b, w, c)
    y = y @ g("multihead.Wo.weight").T

    def ln(t, n):
        return torch.nn.functional.layer_norm(t, (c,), g(f"{n}.weight"), g(f"{n}.bias"))

    y = ln(x + y, "ln_multihead")
    h = torch.relu(y @ g("ffnetwork.lin1.weight").T + g("ffnetwork.lin1.bias"))
    return ln(y + h @ g("ffnetwork.lin2.weight").T + g("ffnetwork.lin2.bias"), "ln_ffnetwork")


def test_exported_transformer_computes_what_cpc_audio_computes():
    model = _transformer()
    crit = cpc_audio_criterion_weights(model)
    c = torch.randn(2, 20, 16)
    ours = model.predict(c)
    for k in range(3):
        theirs = _cpc_audio_layer(c[:, :17], crit, f"wPrediction.predictors.{k}.0.")
        torch.testing.assert_close(ours[k], theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "transformer"])
@pytest.mark.parametrize("with_our_config", [True, False])
def test_round_trip_same_features_and_predictions(tmp_path, kind, with_our_config):
    if kind == "linear":
        torch.manual_seed(1)
        model = CPCModel(CPCModelConfig(encoder_channels=12, context_dim=8,
                                        prediction_steps=3)).eval()
    else:
        model = _transformer()
    path = export_cpc_audio(model, tmp_path / "m.pt", **ARGS)
    if not with_our_config:  # a file with only CPC_audio's keys: the config is derived
        state = torch.load(path, weights_only=True)
        del state["tilecontrast_model"], state["criterion"]
        torch.save(state, path)
    loaded = load_cpc_audio(path)
    assert loaded.config == model.config
    wave = torch.randn(2, 3200)
    z1, c1, p1 = model(wave, predict=True)
    z2, c2, p2 = loaded(wave, predict=True)
    for a, b in ((z1, z2), (c1, c2), (p1, p2)):
        assert torch.equal(a, b)


def test_config_states_what_training_used():
    model = _transformer(prediction_dropout=0.5)
    ours = {"preset": "cpc_audio", "steps": 500}
    cfg = cpc_audio_config(model, **ARGS, training_config=ours, seed=3, world_size=2)
    assert cfg["tilecontrast"] is ours
    assert (cfg["rnnMode"], cfg["abspos"], cfg["dropout"], cfg["sizeWindow"]) == \
        ("transformer", False, True, 3200)
    assert (cfg["negativeSamplingExt"], cfg["samplingType"], cfg["learningRate"]) == \
        (128, "samespeaker", 2e-4)
    assert (cfg["batchSizeGPU"], cfg["nGPU"], cfg["random_seed"]) == (8, 2, 3)
    assert (cfg["hiddenEncoder"], cfg["hiddenGar"], cfg["nPredicts"], cfg["arMode"],
            cfg["normMode"]) == (16, 16, 3, "LSTM", "layerNorm")
    for name in ("nEpoch", "schedulerRamp", "nLevelsPhone", "onEncoder", "n_clusters"):
        assert cfg[name] is None, name
    assert cfg["tilecontrast_objective"] == dict(
        negatives="speaker", n_negatives=128, similarity="mean", step_reduction="sum",
        warmup_steps=0, steps=500)
    linear = CPCModel(CPCModelConfig(encoder_channels=8, context_dim=4))
    cfg = cpc_audio_config(linear, **{**ARGS, "negatives": "global", "n_negatives": 0})
    assert (cfg["rnnMode"], cfg["abspos"], cfg["dropout"], cfg["negativeSamplingExt"],
            cfg["samplingType"], cfg["tilecontrast"], cfg["random_seed"], cfg["nGPU"]) == \
        ("linear", None, False, None, None, None, None, None)
    assert cpc_audio_config(linear, **{**ARGS, "negatives": "batch"})["samplingType"] == "uniform"


def test_config_arguments_validated():
    model = _transformer()
    with pytest.raises(TypeError, match="missing"):
        cpc_audio_config(model, window=3200)
    with pytest.raises(ValueError, match="window=20480: the transformer predictor was built for "
                                         "sequence_frames=20"):
        cpc_audio_config(model, **{**ARGS, "window": 20480})
    for name, bad in (("negatives", "all"), ("n_negatives", -1), ("lr", 0.0), ("steps", -1),
                      ("batch_size", 0), ("similarity", "l2"), ("step_reduction", "max"),
                      ("warmup_steps", 1.5)):
        with pytest.raises(ValueError, match=f"{name}={bad!r}"):
            cpc_audio_config(model, **{**ARGS, name: bad})
    with pytest.raises(TypeError, match="training_config=list"):
        cpc_audio_config(model, **ARGS, training_config=[1])


def test_load_refuses_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_cpc_audio(tmp_path / "nope.pt")
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="'config' and 'weights'"):
        load_cpc_audio(tmp_path / "bad.pt")
