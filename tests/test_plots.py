"""Tests of ``recipes.common.plots``: every plot writes a non-empty PNG from small inputs,
including NaN values, a single point and missing entries, and refuses empty inputs where it
has nothing to draw a panel for."""
from __future__ import annotations


import pytest

from recipes.common.evaluation import Curve
from recipes.common.plots import (
    plot_curves,
    plot_downstream,
    plot_probes,
    plot_spectra,
    plot_temperature_sweep,
    plot_training,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


def test_plot_curves(tmp_path):
    records = [{"step": s, "loss": 5.0 / (s + 1), "alignment": 0.5, "uniformity": -2.0 - s / 10,
                "spectrum": [1.0, 0.5]} for s in range(0, 50, 5)]
    records[3]["loss"] = NAN
    records.append({"step": 50, "knn_top1": 0.4})           # a key logged once: a single point
    out = plot_curves(records, ["loss", "alignment", "uniformity", "knn_top1", "missing"],
                      tmp_path / "curves.png", title="SimCLR")
    assert out == tmp_path / "curves.png"
    assert_png(out)
    assert_png(plot_curves([{"loss": 1.0}], ["loss"], tmp_path / "one.png"))   # no "step"
    with pytest.raises(ValueError, match="keys"):
        plot_curves(records, [], tmp_path / "none.png")


def test_plot_spectra(tmp_path):
    spectra = {"backbone": [10.0 / (i + 1) ** 2 for i in range(64)],
               "projection": [3.0, 1.0, NAN, 0.0, 0.0],        # NaN and zeros left out
               "single": [2.0],
               "collapsed": [0.0, 0.0]}                         # nothing drawable
    assert_png(plot_spectra(spectra, tmp_path / "spectra.png"))
    assert_png(plot_spectra(spectra, tmp_path / "normalised.png", normalize=True))
    assert_png(plot_spectra({"nan": [NAN]}, tmp_path / "empty.png"))


def test_plot_downstream(tmp_path):
    curves = {
        "binary/frozen/10%": {"simclr": ([1, 2, 3], [0.7, 0.8, 0.85]),
                              "random_init": Curve([1, 2, 3], [0.5, NAN, 0.6], metric_name="top1")},
        "segmentation/frozen/100%": {"simclr": {"epochs": [1], "metric": [0.3], "metric_name": "miou"}},
        "many-class/fine-tuned/1%": {"simclr": ([], [])},
    }
    assert_png(plot_downstream(curves, tmp_path / "downstream.png"))
    with pytest.raises(ValueError, match="task"):
        plot_downstream({}, tmp_path / "x.png")


def test_plot_temperature_sweep(tmp_path):
    results = {
        0.05: {"uniformity": -3.8, "alignment": 1.2, "spectrum": [5.0, 2.0, 0.1], "knn_top1": 0.41},
        "0.1": {"uniformity": -3.5, "alignment": 0.9, "spectrum": [5.0, 1.0, 0.01], "knn_top1": 0.45},
        0.5: {"uniformity": NAN, "alignment": 0.5, "spectrum": [4.0, NAN, 0.0], "knn_top1": NAN},
        1: {"alignment": 0.3},                                  # missing entries
    }
    assert_png(plot_temperature_sweep(results, tmp_path / "sweep.png"))
    one = {0.2: {"uniformity": -2.0, "alignment": 0.7, "spectrum": [1.0], "knn_top1": 0.3}}
    assert_png(plot_temperature_sweep(one, tmp_path / "one.png"))
    with pytest.raises(ValueError, match="temperature"):
        plot_temperature_sweep({}, tmp_path / "x.png")


def test_cpc_plots_still_work(tmp_path):
    records = [{"step": s, "loss": 3.0 - s / 10, "step_accuracy": [0.5, 0.4, 0.3]} for s in range(3)]
    assert_png(plot_training(records, tmp_path / "training.png"))
    assert_png(plot_probes({"cpc": {"phone": 0.6, "speaker": 0.9}, "mfcc": {"phone": 0.4}},
                           tmp_path / "probes.png"))
