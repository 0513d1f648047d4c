"""Export to the checkpoint layout of the public CPC_audio implementation
(facebookresearch/CPC_audio), so its downstream tools can load our models, and back.

Its ``hubconf`` and s3prl's ``cpc_local`` upstream read ``{"config": <argparse namespace as a
dict>, "weights": <CPCModel state_dict>}``; libri-light's ABX builds the model from the same
config; CPC_audio's own ``loadCriterion`` reads the criterion's state under ``"cpcCriterion"``.

Parameter names (CPC_audio's ``CPCModel(gEncoder=CPCEncoder, gAR=CPCAR)``):

    ours                               CPC_audio
    encoder.convs.{i}.weight/bias      gEncoder.conv{i}.weight/bias         i = 0..4
    encoder.norms.{i}.weight/bias      gEncoder.batchNorm{i}.weight/bias    (normMode layerNorm)
    context.{weight,bias}_{ih,hh}_l0   gAR.baseNet.{weight,bias}_{ih,hh}_l0 (arMode GRU / LSTM)

The step predictors go under ``"criterion"`` (and the same tensors under ``"cpcCriterion"``)
with the names of CPC_audio's ``CPCUnsupersivedCriterion``; the hub loader ignores both keys:

    ours                                           CPC_audio (``wPrediction.`` + ours), k = 0..K-1
    predictors.{k}.weight                          rnnMode linear: (C, H), no bias
    predictors.{k}.0.multihead.W{q,k,v,o}.weight   rnnMode transformer: (C, C) each, no bias
    predictors.{k}.0.multihead.Att.Krelpos         (C / 8, W) relative positions
    (buffers, written by the exporter)             ...Att.mask (1, W, W): 0 on and below the
                                                   diagonal, -inf above; ...Att.z (1, W, 1): 0
    predictors.{k}.0.ln_multihead.weight/bias      (C,)
    predictors.{k}.0.ffnetwork.lin{1,2}.weight/bias (2048, C), (2048,), (C, 2048), (C,)
    predictors.{k}.0.ln_ffnetwork.weight/bias      (C,)

with W = sizeWindow // 160 - nPredicts. Our encoder uses the same kernel sizes, strides and
paddings, and our channel norm computes what CPC_audio's ``ChannelNorm`` computes (unbiased
variance over channels, eps 1e-5, weights (1, C, 1)), so the exported model gives the same
features; ``encoder_norm="none"`` exports as ``normMode="ID"``. CPC_audio builds its
transformer predictor with 8 heads and a 2048-unit feed-forward block: a model with other
``predictor_heads`` / ``predictor_ff`` exports, but only :func:`load_cpc_audio` reads it back
as trained. The file also holds our model config under ``"tilecontrast_model"`` (for
:func:`load_cpc_audio`).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .criterion import NEGATIVE_MODES, SIMILARITIES, STEP_REDUCTIONS
from .model import DOWNSAMPLING, CPCModel, CPCModelConfig

#: our negatives mode -> CPC_audio's samplingType ("global" has no counterpart: None)
SAMPLING_TYPES = {"batch": "uniform", "sequence": "samesequence", "speaker": "samespeaker",
                  "global": None}


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")


def cpc_audio_config(model: CPCModel, *, window: int, negatives: str, n_negatives: int,
                     lr: float, warmup_steps: int, steps: int, batch_size: int,
                     similarity: str, step_reduction: str,
                     training_config: dict | None = None, seed: int | None = None,
                     world_size: int | None = None) -> dict[str, Any]:
    """CPC_audio's argparse namespace (``cpc_default_config`` plus ``batchSizeGPU`` / ``nGPU``
    from its ``train.py``) describing what our training used.

    Every field is our value, or None where CPC_audio's field has no counterpart in our run:

    - from the model: ``hiddenEncoder``, ``hiddenGar``, ``nPredicts``, ``normMode``
      (layerNorm / ID), ``arMode`` (GRU / LSTM), ``nLevelsGRU`` 1, ``rnnMode``
      (transformer / linear), ``dropout`` (``prediction_dropout > 0``; CPC_audio's flag means
      p = 0.5, ours is in ``"tilecontrast_model"``), ``abspos`` (False for the transformer,
      whose positions are relative; None for the linear predictor), ``encoder_type`` "cpc",
      ``speakerEmbedding`` 0, ``adversarial`` False, ``cpc_mode`` None (forward CPC),
      ``clustering`` None (none used);
    - from the arguments: ``sizeWindow`` = window, ``negativeSamplingExt`` = n_negatives (None
      when every frame of the group's pool was a negative), ``samplingType`` from negatives
      (batch: uniform, speaker: samespeaker, sequence: samesequence, global: None),
      ``learningRate`` = lr, ``batchSizeGPU`` = batch_size (per process), ``nGPU`` =
      world_size (None if not given), ``random_seed`` = seed;
    - the optimiser and schedule of the recipe: ``beta1`` 0.9, ``beta2`` 0.999, ``epsilon``
      1e-8 (torch's Adam defaults, which the recipe uses), ``schedulerStep`` -1 (no decay:
      the recipe's rate is constant after warm-up); ``schedulerRamp`` None: CPC_audio's ramp
      counts epochs, our ``warmup_steps`` counts steps, so a warm-up has no counterpart;
    - None (no counterpart): ``nEpoch`` (we count steps), ``nLevelsPhone`` and ``onEncoder``
      (supervised mode), ``n_clusters``, ``cluster_delay``, ``cluster_iter``,
      ``clustering_update`` (clustering only).

    Two keys CPC_audio does not read: ``"tilecontrast"`` holds ``training_config`` verbatim
    (None if not given), and ``"tilecontrast_objective"`` the facts its namespace cannot
    state (negatives, n_negatives, similarity, step_reduction, warmup_steps, steps). The
    objective is CPC_audio's when similarity is "mean", step_reduction "sum" and n_negatives
    128 with speaker negatives.

    Example:
        >>> cfg = cpc_audio_config(model, window=20480, negatives="speaker", n_negatives=128,
        ...                        lr=2e-4, warmup_steps=0, steps=100_000, batch_size=8,
        ...                        similarity="mean", step_reduction="sum")
    """
    if not isinstance(model, CPCModel):
        raise TypeError(f"model={type(model).__name__}: expected a cpc.model.CPCModel")
    _positive_int("window", window, DOWNSAMPLING)
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives={negatives!r}: expected one of {NEGATIVE_MODES}")
    _positive_int("n_negatives", n_negatives, 0)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr={lr!r}: expected a positive number")
    _positive_int("warmup_steps", warmup_steps, 0)
    _positive_int("steps", steps, 0)
    _positive_int("batch_size", batch_size)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r}: expected one of {SIMILARITIES}")
    if step_reduction not in STEP_REDUCTIONS:
        raise ValueError(f"step_reduction={step_reduction!r}: expected one of {STEP_REDUCTIONS}")
    if training_config is not None and not isinstance(training_config, dict):
        raise TypeError(f"training_config={type(training_config).__name__}: expected a dict or "
                        "None")
    if seed is not None:
        _positive_int("seed", seed, 0)
    if world_size is not None:
        _positive_int("world_size", world_size)
    cfg = model.config
    transformer = cfg.predictor == "transformer"
    if transformer and window // DOWNSAMPLING != cfg.sequence_frames:
        raise ValueError(
            f"window={window}: the transformer predictor was built for sequence_frames="
            f"{cfg.sequence_frames} (window // {DOWNSAMPLING}); expected a window of "
            f"{cfg.sequence_frames * DOWNSAMPLING} samples")
    return {
        "hiddenEncoder": cfg.encoder_channels,
        "hiddenGar": cfg.context_dim,
        "nPredicts": cfg.prediction_steps,
        "negativeSamplingExt": n_negatives or None,
        "learningRate": float(lr),
        "schedulerStep": -1,
        "schedulerRamp": None,
        "beta1": 0.9,
        "beta2": 0.999,
        "epsilon": 1e-08,
        "sizeWindow": window,
        "nEpoch": None,
        "samplingType": SAMPLING_TYPES[negatives],
        "nLevelsPhone": None,
        "cpc_mode": None,
        "encoder_type": "cpc",
        "normMode": "layerNorm" if cfg.encoder_norm == "channel" else "ID",
        "onEncoder": None,
        "random_seed": seed,
        "adversarial": False,
        "speakerEmbedding": 0,
        "arMode": cfg.context.upper(),
        "nLevelsGRU": 1,
        "rnnMode": "transformer" if transformer else "linear",
        "dropout": cfg.prediction_dropout > 0,
        "abspos": False if transformer else None,
        "clustering": None,
        "n_clusters": None,
        "cluster_delay": None,
        "cluster_iter": None,
        "clustering_update": None,
        "batchSizeGPU": batch_size,
        "nGPU": world_size,
        "tilecontrast": training_config,
        "tilecontrast_objective": {
            "negatives": negatives, "n_negatives": n_negatives, "similarity": similarity,
            "step_reduction": step_reduction, "warmup_steps": warmup_steps, "steps": steps,
        },
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
    """The step predictors under CPC_audio's criterion names (``wPrediction.predictors...``),
    with the transformer's ``mask`` and ``z`` buffers as CPC_audio registers them."""
    out = {f"wPrediction.{name}": tensor.detach().cpu().clone()
           for name, tensor in model.state_dict().items() if name.startswith("predictors.")}
    if model.config.predictor == "transformer":
        w = model.config.prediction_frames
        mask = torch.zeros(w, w).masked_fill(torch.ones(w, w, dtype=torch.bool).triu(1),
                                             float("-inf"))
        for k in range(model.config.prediction_steps):
            prefix = f"wPrediction.predictors.{k}.0.multihead.Att."
            out[prefix + "z"] = torch.zeros(1, w, 1)
            out[prefix + "mask"] = mask[None].clone()
    return out


def export_cpc_audio(model: CPCModel, path: str | os.PathLike, **config_kwargs: Any) -> Path:
    """Write ``{"config", "weights", "criterion", "cpcCriterion", "tilecontrast_model"}`` to
    ``path`` (atomically: a temporary file in the same folder, then ``os.replace``).
    ``config_kwargs`` go to :func:`cpc_audio_config`; ``"criterion"`` and ``"cpcCriterion"``
    are the same tensors (stored once)."""
    criterion = cpc_audio_criterion_weights(model)
    state = {
        "config": cpc_audio_config(model, **config_kwargs),
        "weights": cpc_audio_weights(model),
        "criterion": criterion,
        "cpcCriterion": criterion,
        "tilecontrast_model": dataclasses.asdict(model.config),
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


def _config_from_cpc_audio(config: dict[str, Any],
                           criterion: dict[str, torch.Tensor]) -> CPCModelConfig:
    """Our model config from CPC_audio's namespace (for files without ``tilecontrast_model``):
    8 heads and the feed-forward width of the saved weights, dropout 0.1 (CPC_audio's)."""
    rnn_mode = config.get("rnnMode")
    if rnn_mode not in ("linear", "transformer"):
        raise ValueError(f"config['rnnMode']={rnn_mode!r}: only 'linear' and 'transformer' "
                         "predictors have a counterpart here")
    values: dict[str, Any] = dict(
        encoder_channels=config["hiddenEncoder"], context_dim=config["hiddenGar"],
        prediction_steps=config["nPredicts"], context=str(config["arMode"]).lower(),
        encoder_norm={"layerNorm": "channel", "ID": "none"}.get(config["normMode"], "?"),
        predictor=rnn_mode, prediction_dropout=0.5 if config.get("dropout") else 0.0)
    if rnn_mode == "transformer":
        values["sequence_frames"] = config["sizeWindow"] // DOWNSAMPLING
        lin1 = criterion["wPrediction.predictors.0.0.ffnetwork.lin1.weight"]
        values["predictor_ff"] = lin1.shape[0]
    return CPCModelConfig(**values)


def load_cpc_audio(path: str | os.PathLike) -> CPCModel:
    """Rebuild our :class:`~cpc.model.CPCModel` from a file written by :func:`export_cpc_audio`
    (or a CPC_audio checkpoint of the same layout with a linear or transformer predictor):
    the inverse rename, loaded with ``weights_only=True``. Returns the model in eval mode.

    Example:
        >>> model = load_cpc_audio("run/cpc_audio.pt")
        >>> z, c = model(wave)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "config" not in state or "weights" not in state:
        raise ValueError(f"path={str(path)!r}: expected a dict with 'config' and 'weights' "
                         "(CPC_audio's checkpoint layout)")
    criterion = state.get("criterion") or state.get("cpcCriterion") or {}
    if "tilecontrast_model" in state:
        config = CPCModelConfig(**state["tilecontrast_model"])
    else:
        config = _config_from_cpc_audio(state["config"], criterion)
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in state["weights"].items():
        if name.startswith("gEncoder.conv"):
            layer, param = name[len("gEncoder.conv"):].split(".")
            ours[f"encoder.convs.{layer}.{param}"] = tensor
        elif name.startswith("gEncoder.batchNorm"):
            layer, param = name[len("gEncoder.batchNorm"):].split(".")
            ours[f"encoder.norms.{layer}.{param}"] = tensor
        elif name.startswith("gAR.baseNet."):
            ours["context." + name[len("gAR.baseNet."):]] = tensor
        else:
            raise ValueError(f"weights[{name!r}]: no counterpart in cpc.model.CPCModel")
    for name, tensor in criterion.items():
        if name.endswith((".Att.mask", ".Att.z")):  # CPC_audio's constant buffers
            continue
        if not name.startswith("wPrediction.predictors."):
            raise ValueError(f"criterion[{name!r}]: no counterpart in cpc.model.CPCModel")
        ours[name[len("wPrediction."):]] = tensor
    model = CPCModel(config)
    model.load_state_dict(ours, strict=True)
    return model.eval()
