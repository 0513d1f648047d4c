"""Export to the checkpoint layout of the public CPC_audio implementation
(facebookresearch/CPC_audio), so its downstream tools can load our models: its ``hubconf``
and s3prl's ``cpc_local`` upstream read ``{"config": <argparse namespace as a dict>,
"weights": <CPCModel state_dict>}``; libri-light's ABX builds the model from the same config.

Parameter names (CPC_audio's ``CPCModel(gEncoder=CPCEncoder, gAR=CPCAR)``):

    ours                               CPC_audio
    encoder.convs.{i}.weight/bias      gEncoder.conv{i}.weight/bias         i = 0..4
    encoder.norms.{i}.weight/bias      gEncoder.batchNorm{i}.weight/bias    (normMode layerNorm)
    context.{weight,bias}_{ih,hh}_l0   gAR.baseNet.{weight,bias}_{ih,hh}_l0 (arMode GRU / LSTM)

The linear step predictors go under ``"criterion"`` with CPC_audio's criterion names
(``wPrediction.predictors.{k}.weight``); the hub loader ignores that key. Our encoder uses the
same kernel sizes, strides and paddings, and our channel norm computes what CPC_audio's
``ChannelNorm`` computes (unbiased variance over channels, eps 1e-5, weights (1, C, 1)), so the
exported model gives the same features. ``encoder_norm="none"`` exports as ``normMode="ID"``.
A transformer predictor has no CPC_audio counterpart of the same shape and is not exported.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .model import CPCModel


def cpc_audio_config(model: CPCModel, *, window: int = 20480, negatives: str = "speaker",
                     lr: float = 2e-4) -> dict[str, Any]:
    """CPC_audio's argparse defaults (``cpc_default_config``) with our model's values."""
    cfg = model.config
    sampling = {"batch": "uniform", "sequence": "samesequence", "speaker": "samespeaker"}
    return {
        "hiddenEncoder": cfg.encoder_channels,
        "hiddenGar": cfg.context_dim,
        "nPredicts": cfg.prediction_steps,
        "negativeSamplingExt": 128,
        "learningRate": lr,
        "schedulerStep": -1,
        "schedulerRamp": None,
        "beta1": 0.9,
        "beta2": 0.999,
        "epsilon": 1e-08,
        "sizeWindow": window,
        "nEpoch": 200,
        "samplingType": sampling[negatives],
        "nLevelsPhone": 1,
        "cpc_mode": None,
        "encoder_type": "cpc",
        "normMode": "layerNorm" if cfg.encoder_norm == "channel" else "ID",
        "onEncoder": False,
        "random_seed": None,
        "adversarial": False,
        "speakerEmbedding": 0,
        "arMode": cfg.context.upper(),
        "nLevelsGRU": 1,
        "rnnMode": "linear",
        "dropout": False,
        "abspos": False,
        "clustering": None,
        "n_clusters": 200,
        "cluster_delay": 0,
        "cluster_iter": 100,
        "clustering_update": "kmean",
    }


def cpc_audio_weights(model: CPCModel) -> dict[str, torch.Tensor]:
    """Our encoder and context weights under CPC_audio's ``CPCModel`` names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "encoder" and parts[1] == "convs":
            new = f"gEncoder.conv{parts[2]}.{parts[3]}"
        elif parts[0] == "encoder" and parts[1] == "norms":
            new = f"gEncoder.batchNorm{parts[2]}.{parts[3]}"
        elif parts[0] == "context":
            new = f"gAR.baseNet.{parts[1]}"
        elif parts[0] == "predictors":
            continue
        else:
            raise ValueError(f"parameter {name!r}: no CPC_audio counterpart")
        out[new] = tensor.detach().cpu().clone()
    return out


def cpc_audio_criterion_weights(model: CPCModel) -> dict[str, torch.Tensor]:
    if model.config.predictor != "linear":
        return {}
    return {f"wPrediction.predictors.{k}.weight": p.weight.detach().cpu().clone()
            for k, p in enumerate(model.predictors)}


def export_cpc_audio(model: CPCModel, path: str | os.PathLike, **config_kwargs: Any) -> Path:
    """Write ``{"config", "weights", "criterion"}`` to ``path`` (atomically: a temporary file
    in the same folder, then ``os.replace``)."""
    state = {
        "config": cpc_audio_config(model, **config_kwargs),
        "weights": cpc_audio_weights(model),
        "criterion": cpc_audio_criterion_weights(model),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
