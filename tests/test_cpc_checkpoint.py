"""Atomic checkpoints, weights_only loading (a malicious pickle is refused), RNG state, and
the CPC_audio exporter's key names and shapes."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from cpc.export import cpc_audio_config, cpc_audio_weights, export_cpc_audio
from cpc.model import CPCModel, CPCModelConfig
from recipes.common.checkpoint import (UnsafeCheckpointError, load_checkpoint, rng_state,
                                       save_checkpoint, set_rng_state)


def test_save_load_round_trip(tmp_path):
    state = {"step": 3, "w": torch.arange(5.0), "config": {"a": [1, 2], "b": None}}
    path = save_checkpoint(state, tmp_path / "ck.pt")
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and loaded["config"] == {"a": [1, 2], "b": None}
    torch.testing.assert_close(loaded["w"], state["w"])


def test_killed_write_leaves_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"step": 1}, tmp_path / "ck.pt")

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no temporary file left behind


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file when unpickled


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    # a plain pickle (not a torch zip) with a code-running reduce is refused too
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises((UnsafeCheckpointError, RuntimeError)):
        load_checkpoint(raw)
    assert not marker.exists()


def test_missing_checkpoint_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    torch.manual_seed(5); random.seed(5); np.random.seed(5)
    save_checkpoint({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], expected[0])
    assert got[1:] == expected[1:]


# CPC_audio's CPCModel(CPCEncoder(512, "layerNorm"), CPCAR(512, 256, mode="GRU")) state_dict
CPC_AUDIO_SHAPES = {
    "gEncoder.conv0.weight": (512, 1, 10), "gEncoder.conv0.bias": (512,),
    "gEncoder.conv1.weight": (512, 512, 8), "gEncoder.conv1.bias": (512,),
    **{f"gEncoder.conv{i}.weight": (512, 512, 4) for i in (2, 3, 4)},
    **{f"gEncoder.conv{i}.bias": (512,) for i in (2, 3, 4)},
    **{f"gEncoder.batchNorm{i}.{p}": (1, 512, 1) for i in range(5) for p in ("weight", "bias")},
    "gAR.baseNet.weight_ih_l0": (768, 512), "gAR.baseNet.weight_hh_l0": (768, 256),
    "gAR.baseNet.bias_ih_l0": (768,), "gAR.baseNet.bias_hh_l0": (768,),
}


EXPORT_ARGS = dict(window=20480, negatives="speaker", n_negatives=128, lr=2e-4, warmup_steps=0,
                   steps=1000, batch_size=8, similarity="mean", step_reduction="sum")


def test_export_cpc_audio_layout(tmp_path):
    model = CPCModel(CPCModelConfig(encoder_norm="channel"))
    path = export_cpc_audio(model, tmp_path / "cpc_audio.pt", **EXPORT_ARGS)
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"config", "weights"}
    assert {k: tuple(v.shape) for k, v in state["weights"].items()} == CPC_AUDIO_SHAPES
    cfg = state["config"]
    assert (cfg["hiddenEncoder"], cfg["hiddenGar"], cfg["nPredicts"], cfg["arMode"],
            cfg["normMode"], cfg["encoder_type"], cfg["sizeWindow"]) == \
        (512, 256, 12, "GRU", "layerNorm", "cpc", 20480)
    assert tuple(state["criterion"]["wPrediction.predictors.11.weight"].shape) == (512, 256)
    torch.testing.assert_close(state["weights"]["gEncoder.conv3.weight"],
                               model.encoder.convs[3].weight)


def test_export_without_norm_and_with_lstm():
    model = CPCModel(CPCModelConfig(encoder_channels=8, context_dim=4, context="lstm"))
    weights = cpc_audio_weights(model)
    assert not any("batchNorm" in k for k in weights)
    assert tuple(weights["gAR.baseNet.weight_ih_l0"].shape) == (16, 8)
    cfg = cpc_audio_config(model, **EXPORT_ARGS)
    assert cfg["normMode"] == "ID" and cfg["arMode"] == "LSTM"
