"""CPC model: shapes, receptive field, causality of the context network, the options."""
import pytest
import torch

from cpc.model import (CPCModel, CPCModelConfig, Encoder, count_parameters, encoder_flops,
                       receptive_field)


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
    dict(encoder_norm="channel"), dict(context="lstm"), dict(predictor="transformer"),
])
def test_options_shapes_and_gradients(options):
    model = CPCModel(CPCModelConfig(encoder_channels=8, context_dim=8, prediction_steps=2,
                                    predictor_heads=2, **options))
    z, c, pred = model(torch.randn(3, 1600), predict=True)
    assert pred.shape == (2, 3, 10, 8)
    (pred.sum() + z.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("predictor", ["linear", "transformer"])
def test_context_and_predictions_are_causal(predictor):
    torch.manual_seed(0)
    model = CPCModel(CPCModelConfig(encoder_channels=8, context_dim=8, prediction_steps=2,
                                    predictor=predictor, predictor_heads=2)).eval()
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
