"""Tests of recipes.bench_kernels: tiny end-to-end run, outputs, the --check refusal, budgets."""
from __future__ import annotations

import csv
import json
import sys
import types

import pytest
import torch

import csrc_triton
from recipes import bench_kernels as bk

TINY = ["--sizes", "64,128", "--dim", "16", "--backends", "blockwise,dense", "--repeats", "1",
        "--warmup", "0", "--device", "cpu"]


def test_help_mentions_every_flag():
    text = bk.build_parser().format_help()
    for flag in ["--backends", "--sizes", "--dim", "--dtype", "--loss", "--device", "--repeats",
                 "--max-n-search", "--mem-budget-gb", "--time-budget-s", "--out", "--static",
                 "--check", "--no-check", "--warmup", "--seed", "--scale"]:
        assert flag in text, flag
    assert "8*N*M*D" in text


def test_tiny_run_writes_sane_table_json_csv_png(tmp_path, capsys):
    out = tmp_path / "res"
    summary = bk.main(TINY + ["--max-n-search", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "8*N*M*D" in printed and "Largest N that fits" in printed
    assert "check blockwise" in printed and "passed" in printed

    records = summary["records"]
    measured = {(r["backend"], r["n"]) for r in records}
    assert {("blockwise", 64), ("blockwise", 128), ("dense", 64), ("dense", 128)} == measured
    for r in records:
        assert r["status"] == "ok", r
        assert r["flops"] == 8 * r["n"] * r["m"] * r["d"] and r["m"] == r["n"] and r["d"] == 16
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["median_s"])
        assert r["peak_mem_bytes"] > 50e6  # a process with torch loaded
        assert r["peak_mem_bytes"] >= r["rss_inputs_bytes"] > 0
        assert r["mem_beyond_inputs_bytes"] >= 0
        assert r["child_maxrss_bytes"] > 0
    assert summary["largest_n"]["blockwise"]["n"] == 128
    assert summary["largest_n"]["dense"]["at_least"] is True

    paths = summary["paths"]
    payload = json.loads(paths["json"].read_text())
    assert payload["flop_convention"] == "8*N*M*D" and payload["checked"] is True
    assert payload["environment"]["torch"] == torch.__version__
    assert len(payload["records"]) == 4
    with paths["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    for row in rows:
        assert row["device_name"] and row["torch"] and row["triton"] and row["date"]
        assert row["git_commit"]
        assert int(row["flops"]) == 8 * int(row["n"]) * int(row["m"]) * int(row["d"])
        assert float(row["median_s"]) > 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "blockwise" in paths["table"].read_text()


def test_largest_n_search_doubles_until_a_budget_stops_it(monkeypatch):
    """The search logic with a fake child: dense memory grows as 16 N^2 bytes."""
    started = []

    def fake_child(spec, mem_budget_bytes, time_budget_s):
        n = spec["n"]
        started.append((spec["backend"], n))
        beyond = 16 * n * n if spec["backend"] == "dense" else 64 * n
        if spec["backend"] == "blockwise" and n >= 4096:
            return {"status": "oom", "message": "child killed by SIGKILL (out of memory)"}
        return {"status": "ok", "median_s": 1e-9 * n * n, "p20_s": 1e-9 * n * n,
                "p80_s": 1e-9 * n * n, "rss_start_bytes": 1e6, "rss_inputs_bytes": 2e6,
                "peak_mem_bytes": 2e6 + beyond, "mem_beyond_inputs_bytes": beyond}

    monkeypatch.setattr(bk, "run_child", fake_child)
    monkeypatch.setattr(bk, "_mem_available_bytes", lambda: None)
    cfg = bk.BenchConfig(backends=("blockwise", "dense"), sizes=(256, 512), dim=16,
                         max_n_search=1 << 20, mem_budget_gb=0.02)
    result = bk.run_benchmark(cfg)
    largest = result["largest_n"]
    # blockwise: 1024, 2048 fit, 4096 is killed (OOM)
    assert largest["blockwise"]["n"] == 2048 and "oom" in largest["blockwise"]["stopped_by"]
    # dense: 16 N^2 bytes is 17 MB at N = 1024, 67 MB > 20 MB at 2048: predicted, never started
    assert largest["dense"]["n"] == 1024 and "skipped-predicted-mem" in largest["dense"]["stopped_by"]
    assert ("dense", 2048) not in started and ("blockwise", 4096) in started
    assert all(r["flops"] == 8 * r["n"] * r["n"] * 16 for r in result["records"])

    # a requested size that fails bounds the largest N exactly: no search above it
    started.clear()
    cfg = bk.BenchConfig(backends=("blockwise",), sizes=(1024, 8192), dim=16,
                         max_n_search=1 << 20, mem_budget_gb=0.02)
    largest = bk.run_benchmark(cfg)["largest_n"]["blockwise"]
    assert largest["n"] == 1024 and largest["at_least"] is False
    assert "N=8192: oom" in largest["stopped_by"] and max(n for _, n in started) == 8192


def _wrong_loss_value(original):
    def clip_loss(image, text, scale, *, backend="auto"):
        value = original(image, text, scale, backend=backend)
        return value * 1.01 if backend == "blockwise" else value

    return clip_loss


def _wrong_gradient(original):
    def clip_loss(image, text, scale, *, backend="auto"):
        if backend == "blockwise":
            # same value, gradient to image scaled by 1.02
            image = image + 0.02 * (image - image.detach())
        return original(image, text, scale, backend=backend)

    return clip_loss


@pytest.mark.parametrize("breaker", [_wrong_loss_value, _wrong_gradient])
def test_check_refuses_to_benchmark_a_wrong_backend(tmp_path, monkeypatch, capsys, breaker):
    monkeypatch.setattr(csrc_triton, "clip_loss", breaker(csrc_triton.clip_loss))
    out = tmp_path / "res"
    with pytest.raises(bk.CheckFailed) as info:
        bk.main(TINY + ["--out", str(out)])
    message = str(info.value)
    assert "refusing to benchmark" in message and "backend='blockwise'" in message
    assert "dense" in capsys.readouterr().out
    assert not out.exists() or not list(out.glob("*.json"))


def test_check_passes_for_every_loss():
    for loss in bk.LOSSES:
        cfg = bk.BenchConfig(backends=("blockwise", "dense"), sizes=(64,), dim=8, loss=loss)
        reports = bk.correctness_check(cfg)
        assert all(r["passed"] for r in reports), reports


@pytest.mark.parametrize("argv, argument", [
    (["--sizes", "0"], "--sizes"),
    (["--sizes", "12,abc"], "--sizes"),
    (["--backends", "cuBLAS"], "--backends"),
    (["--dim", "-3"], "--dim"),
    (["--repeats", "0"], "--repeats"),
    (["--mem-budget-gb", "-1"], "--mem-budget-gb"),
    (["--scale", "0"], "--scale"),
    (["--loss", "nt_xent", "--sizes", "63"], "--sizes"),
])
def test_bad_arguments_name_the_argument(argv, argument):
    with pytest.raises(SystemExit) as info:
        bk.config_from_args(argv + ["--device", "cpu"])
    assert argument in str(info.value) and "expected" in str(info.value)


def test_memory_budget_kills_the_child_and_prediction_skips(tmp_path):
    spec = {"loss": "clip", "backend": "dense", "n": 64, "d": 8, "dtype": "fp32",
            "device": "cpu", "repeats": 1, "warmup": 0, "seed": 0}
    # 50 MB: the child passes it while importing torch and is killed; this process survives.
    result = bk.run_child(spec, mem_budget_bytes=50e6, time_budget_s=120)
    assert result["status"] == "over-mem-budget", result

    # Dense at N=65536 needs ~70 GB: predicted over a 20 GB budget, so it never starts.
    summary = bk.main(["--sizes", "65536", "--backends", "dense", "--dim", "16", "--no-check",
                       "--device", "cpu", "--out", str(tmp_path)])
    (rec,) = summary["records"]
    assert rec["status"] == "skipped-predicted-mem" and rec["predicted_mem_bytes"] > 20e9
    assert summary["largest_n"]["dense"]["n"] is None
    assert "skipped-predicted-mem" in summary["largest_n"]["dense"]["stopped_by"]
    assert "UNCHECKED" in summary["table"]


def _rec(backend, n, median, peak, beyond):
    return {"backend": backend, "n": n, "status": "ok", "median_s": median,
            "peak_mem_bytes": peak, "mem_beyond_inputs_bytes": beyond}


def test_targets_are_judged_with_numbers():
    cfg = bk.BenchConfig(backends=("blockwise", "dense"), sizes=(32768, 65536), dim=128)
    records = [_rec("blockwise", 32768, 20.0, 0.8e9, 0.2e9), _rec("dense", 32768, 50.0, 17e9, 16e9),
               _rec("blockwise", 65536, 95.0, 1.2e9, 0.4e9)]
    targets = bk.evaluate_targets(cfg, records, None)
    verdicts = {t["target"]: t["met"] for t in targets}
    assert verdicts["CPU N=M=32768: blockwise time <= 0.5 x dense"] is True
    assert verdicts["CPU N=M=32768: blockwise peak memory <= 5% of dense"] is True
    assert verdicts["CPU N=M=65536: blockwise <= 90 s"] is False
    assert verdicts["CPU N=M=65536: blockwise peak RSS <= 1.5 GB"] is True
    assert "95.0 s" in bk.format_targets(targets)


def test_static_prints_and_writes_the_report(tmp_path, monkeypatch, capsys):
    rows = [{"kernel": "forward", "dtype": "bf16", "registers": 168, "spill_stores": 0,
             "spill_loads": 0, "shared_bytes": 98304, "wgmma": True},
            {"kernel": "backward", "dtype": "bf16", "registers": 255, "spill_stores": 0,
             "spill_loads": 0, "shared_bytes": 131072, "wgmma": False},
            # fp32 runs IEEE products on FMA units by design: no wgmma expected
            {"kernel": "forward", "dtype": "fp32", "registers": 255, "spill_stores": 12,
             "spill_loads": 12, "shared_bytes": 65536, "wgmma": False}]
    fake = types.ModuleType("csrc_triton.static_check")
    fake.static_report = lambda arch=90, dtypes=("bf16", "fp16", "fp32"): rows
    fake.format_table = lambda rs: "FAKE TABLE " + str(len(rs))
    monkeypatch.setitem(sys.modules, "csrc_triton.static_check", fake)
    summary = bk.main(["--static", "--out", str(tmp_path), "--device", "cpu"])
    assert "FAKE TABLE 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "static_sm90.json").read_text()) == rows
    spills, wgmma = summary["targets"]
    assert spills["met"] is False and "1 of 3 configs spill (forward/fp32)" in spills["numbers"]
    assert wgmma["met"] is False and "1 of 2 configs without wgmma" in wgmma["numbers"]
    assert "fp32" in wgmma["numbers"]


def test_targets_bound_a_dense_run_killed_at_the_time_budget():
    cfg = bk.BenchConfig(backends=("blockwise", "dense"), sizes=(32768,), dim=128,
                         time_budget_s=300.0)
    killed = {"backend": "dense", "n": 32768, "status": "over-time-budget",
              "child_maxrss_bytes": 17.9e9, "message": "killed at the budget (300 s)"}
    targets = bk.evaluate_targets(cfg, [_rec("blockwise", 32768, 80.0, 1.07e9, 0.37e9), killed],
                                  None)
    verdicts = {t["target"]: t for t in targets}
    time_target = verdicts["CPU N=M=32768: blockwise time <= 0.5 x dense"]
    assert time_target["met"] is True and "> 300.00 s" in time_target["numbers"]
    assert verdicts["CPU N=M=32768: blockwise peak memory <= 5% of dense"]["met"] is False
