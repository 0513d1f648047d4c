"""Tests of the kernel benchmark (recipes.bench, entry point recipes.bench_kernels).

Child processes cost about 3 s each (a fresh Python importing torch): the end-to-end runs are
kept to two children each; the search, the report and the gates are tested in-process.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import types

import pytest
import torch

import csrc_triton
from recipes.bench import cases, cli, compare, gate, harness, report, search
from recipes.bench.config import REPO_ROOT, BenchConfig

TINY = ["--sizes", "64", "--dim", "16", "--backends", "blockwise", "--repeats", "1",
        "--warmup", "0", "--device", "cpu", "--max-n-search", "0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _has_pml() -> bool:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


needs_pml = pytest.mark.skipif(not _has_pml(), reason="pytorch-metric-learning is not installed "
                               "(python -m pip install pytorch-metric-learning)")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_help_runs_and_explains_every_flag():
    proc = subprocess.run([sys.executable, "-m", "recipes.bench_kernels", "--help"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    parser = cli.build_parser()
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert len(flags) >= 18
    for action in parser._actions:
        assert action.help, action.option_strings  # every flag says what it does
        for flag in action.option_strings:
            assert flag in text, flag
    for word in ["8*N*M*D", "pytorch-metric-learning", "--no-check"]:
        assert word in text


@pytest.mark.parametrize("argv, argument", [
    (["--sizes", "0"], "--sizes"),
    (["--sizes", "12,abc"], "--sizes"),
    (["--backends", "cuBLAS"], "--backends"),
    (["--backends", "dense,dense"], "--backends"),
    (["--dim", "-3"], "--dim"),
    (["--repeats", "0"], "--repeats"),
    (["--warmup", "-1"], "--warmup"),
    (["--max-n-search", "-2"], "--max-n-search"),
    (["--mem-budget-gb", "-1"], "--mem-budget-gb"),
    (["--mem-budget-gb", "nan"], "--mem-budget-gb"),
    (["--time-budget-s", "0"], "--time-budget-s"),
    (["--scale", "0"], "--scale"),
    (["--scale", "inf"], "--scale"),
    (["--loss", "triplet_margin", "--scale", "2"], "--scale"),
    (["--loss", "nt_xent", "--sizes", "63"], "--sizes"),
    (["--loss", "softmax"], "--loss"),
    (["--loss", "clip,clip"], "--loss"),
    (["--per-class", "1"], "--per-class"),
    (["--device", "tpu"], "--device"),
    (["--compare", "pml", "--loss", "clip"], "--loss"),
])
def test_bad_arguments_name_the_flag_value_and_expectation(argv, argument):
    with pytest.raises(SystemExit) as info:
        cli.config_from_args(argv + ([] if "--device" in argv else ["--device", "cpu"]))
    message = str(info.value)
    assert argument in message and "expected" in message, message
    value = argv[argv.index(argument) + 1] if argument in argv else None
    if value is not None and argument not in ("--sizes", "--loss", "--backends"):
        assert value in message or str(float(value)) in message, message


def test_argparse_choice_errors_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        cli.config_from_args(["--dtype", "fp8", "--device", "cpu"])
    assert "--dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.config_from_args(["--compare", "lightly", "--device", "cpu"])
    assert "--compare" in capsys.readouterr().err


def test_compare_without_pml_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)  # import raises
    with pytest.raises(SystemExit) as info:
        cli.config_from_args(["--compare", "pml", "--device", "cpu"])
    assert "--compare='pml'" in str(info.value) and "pip install" in str(info.value)


def test_defaults_and_loss_lists():
    cfg, measure = cli.config_from_args(["--device", "cpu"])
    assert measure and cfg.losses == ("clip",) and cfg.backends == ("blockwise", "dense")
    cfg, _ = cli.config_from_args(["--device", "cpu", "--loss", "all", "--sizes", "64"])
    assert cfg.losses == cases.LOSSES
    cfg, measure = cli.config_from_args(["--static", "--device", "cpu"])
    assert not measure


@needs_pml
def test_compare_defaults_to_every_loss_with_a_counterpart():
    cfg, _ = cli.config_from_args(["--compare", "pml", "--device", "cpu", "--sizes", "64"])
    assert cfg.backends == ("blockwise",) and cfg.max_n_search == 0
    assert set(cfg.losses) == {"nt_xent", "supcon", "nca", "triplet_margin",
                               "triplet_margin_batch_all", "drlim", "n_pair"}


def test_list_losses_names_every_case_and_its_availability(capsys):
    with pytest.raises(SystemExit) as info:
        cli.config_from_args(["--list-losses"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name, case in cases.CASES.items():
        assert name in text
        ok, reason = case.available()
        assert ok or reason in text


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def test_every_tiled_loss_has_a_case():
    functions = {case.function for case in cases.CASES.values()}
    assert {"clip_loss", "info_nce", "nt_xent", "supcon", "nca", "triplet_margin", "drlim",
            "n_pair", "uniformity"} <= functions
    for case in cases.CASES.values():
        assert case.flops(64, 16) in (2 * 64 * 64 * 16, 8 * 64 * 64 * 16)
        assert case.flop_formula in ("2*N*M*D", "8*N*M*D")


def test_balanced_labels_are_p_by_k_without_singletons():
    for n, k in [(64, 4), (66, 4), (65, 4), (7, 2), (3, 4)]:
        labels = cases.balanced_labels(torch.Generator().manual_seed(0), n, k)
        counts = torch.bincount(labels)
        assert labels.shape == (n,) and counts.min() >= min(2, n)
        assert counts.numel() == max(n // k, 1)
        assert (counts[:-1] == k).all() and counts[-1] == (k + n % k if n >= k else n)


def test_a_missing_loss_is_not_available_and_never_measured(monkeypatch, tmp_path, capsys):
    monkeypatch.delattr(csrc_triton, "uniformity", raising=False)
    case = cases.get("uniformity")
    ok, reason = case.available()
    assert not ok and "not available in this checkout" in reason
    with pytest.raises(cases.NotAvailable):
        case.problem(8, 4, torch.float32, "cpu", 0)
    spawned = []
    monkeypatch.setattr(harness, "run_child", lambda *a, **k: spawned.append(a) or {})
    summary = cli.main(TINY + ["--loss", "uniformity", "--out", str(tmp_path)])
    assert "not available in this checkout" in capsys.readouterr().out
    assert summary["not_available"] == {"uniformity": reason}
    assert summary["records"] == [] and not spawned
    reports = gate.backend_gate(BenchConfig(backends=("blockwise",), sizes=(8,)), "uniformity")
    assert reports[0]["passed"] is None and reports[0]["errors"] == {}


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def test_backend_gate_passes_for_every_available_loss():
    cfg = BenchConfig(backends=("blockwise", "dense"), sizes=(64,), dim=8)
    checked = 0
    for loss, case in cases.CASES.items():
        if not case.available()[0]:
            continue
        reports = gate.backend_gate(cfg, loss)
        assert all(r["passed"] for r in reports), reports
        assert all(r["errors"]["loss"]["rel_rms"] <= r["errors"]["loss"]["allowed"]
                   for r in reports)
        checked += 1
    assert checked >= 4  # clip, info_nce, nt_xent, supcon at least


def _toy_loss(broken: str):
    """A pure-PyTorch stand-in loss whose 'blockwise' backend is broken as asked."""

    def toy_loss(x, *, backend):
        value = torch.logsumexp(x @ x.T, dim=1).mean()
        if backend == "blockwise" and broken == "value":
            return value * 1.01
        if backend == "blockwise" and broken == "gradient":
            return value + 0.02 * (value - value.detach())  # same value, gradient x 1.02
        return value

    return toy_loss


TOY = cases.Case(name="toy", function="toy_loss", summary="toy",
                 tensors=lambda g, n, d, k: {"x": cases.unit_rows(g, n, d)}, leaves=("x",),
                 call=lambda f, t, s, b: f(t["x"], backend=b), flops=lambda n, d: n,
                 flop_formula="N")


@pytest.mark.parametrize("broken", ["value", "gradient"])
def test_backend_gate_refuses_a_broken_backend(monkeypatch, broken):
    monkeypatch.setitem(cases.CASES, "toy", TOY)
    # looked up on csrc_triton like a real loss
    monkeypatch.setattr(csrc_triton, "toy_loss", _toy_loss(broken), raising=False)
    cfg = BenchConfig(backends=("blockwise", "dense"), sizes=(64,), dim=8)
    reports = gate.backend_gate(cfg, "toy")
    by_backend = {r["backend"]: r for r in reports}
    assert by_backend["dense"]["passed"] is True
    assert by_backend["blockwise"]["passed"] is False
    assert ("loss" if broken == "value" else "grad[0]") in by_backend["blockwise"]["message"]
    with pytest.raises(gate.CheckFailed) as info:
        cli.run_gates(cfg, ("toy",))
    assert "refusing to benchmark" in str(info.value) and "backend='blockwise'" in str(info.value)


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
def test_main_refuses_to_time_a_wrong_backend(tmp_path, monkeypatch, capsys, breaker):
    monkeypatch.setattr(csrc_triton, "clip_loss", breaker(csrc_triton.clip_loss))
    spawned = []
    monkeypatch.setattr(harness, "run_child", lambda *a, **k: spawned.append(a) or {})
    out = tmp_path / "res"
    with pytest.raises(gate.CheckFailed) as info:
        cli.main(TINY + ["--out", str(out)])
    message = str(info.value)
    assert "refusing to benchmark" in message and "backend='blockwise'" in message
    assert "FAILED" in capsys.readouterr().out
    assert not spawned and (not out.exists() or not list(out.glob("*.json")))


# --------------------------------------------------------------------------------------------
# Harness: child processes and budgets
# --------------------------------------------------------------------------------------------


def _spec(**changes):
    spec = {"loss": "clip", "side": "ours", "backend": "dense", "n": 64, "d": 8, "dtype": "fp32",
            "device": "cpu", "repeats": 1, "warmup": 0, "seed": 0, "scale": None,
            "per_class": 4}
    spec.update(changes)
    return spec


def test_harness_kills_a_child_over_the_memory_budget():
    # 50 MB: the child passes it while importing torch and is killed; this process survives.
    result = harness.run_child(_spec(), mem_budget_bytes=50e6, time_budget_s=120)
    assert result["status"] == "over-mem-budget", result
    assert "killed at the budget (0.1 GB)" in result["message"]
    assert result["max_polled_rss_bytes"] > 50e6


def test_harness_kills_a_child_over_the_time_budget():
    result = harness.run_child(_spec(), mem_budget_bytes=20e9, time_budget_s=0.3)
    assert result["status"] == "over-time-budget", result
    assert result["wall_s"] < 10 and "(0 s)" in result["message"]


def test_quantiles():
    q = harness.quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert q == {"median_s": 3.0, "p20_s": 1.8, "p80_s": 4.2, "min_s": 1.0, "max_s": 5.0}
    assert harness.quantiles([2.0])["p80_s"] == 2.0


# --------------------------------------------------------------------------------------------
# Search: predictions and the largest N
# --------------------------------------------------------------------------------------------


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

    monkeypatch.setattr(harness, "run_child", fake_child)
    monkeypatch.setattr(harness, "mem_available_bytes", lambda: None)
    cfg = BenchConfig(backends=("blockwise", "dense"), sizes=(256, 512), dim=16,
                      max_n_search=1 << 20, mem_budget_gb=0.02)
    result = search.run_benchmark(cfg)
    largest = result["largest_n"]["clip"]
    # blockwise: 1024, 2048 fit, 4096 is killed (OOM)
    assert largest["blockwise"]["n"] == 2048 and "oom" in largest["blockwise"]["stopped_by"]
    # dense: 16 N^2 bytes is 17 MB at N = 1024, 67 MB > 20 MB at 2048: predicted, never started
    assert largest["dense"]["n"] == 1024
    assert "skipped-predicted-mem" in largest["dense"]["stopped_by"]
    assert ("dense", 2048) not in started and ("blockwise", 4096) in started
    assert all(r["flops"] == 8 * r["n"] * r["n"] * 16 for r in result["records"])

    # a requested size that fails bounds the largest N exactly: no search above it
    started.clear()
    cfg = BenchConfig(backends=("blockwise",), sizes=(1024, 8192), dim=16,
                      max_n_search=1 << 20, mem_budget_gb=0.02)
    largest = search.run_benchmark(cfg)["largest_n"]["clip"]["blockwise"]
    assert largest["n"] == 1024 and largest["at_least"] is False
    assert "N=8192: oom" in largest["stopped_by"] and max(n for _, n in started) == 8192


def test_fit_power_clamps_the_exponent():
    assert search.fit_power([(1, 1.0), (2, 4.0)], 4, 0.0, 2.0, 1.0) == pytest.approx(16.0)
    assert search.fit_power([(1, 1.0), (2, 64.0)], 4, 0.0, 2.0, 1.0) == pytest.approx(256.0)
    assert search.fit_power([(2, 3.0)], 8, 0.0, 2.0, 1.0) == pytest.approx(12.0)
    assert search.fit_power([], 8, 0.0, 2.0, 1.0) is None


def test_predictions_skip_what_cannot_fit(tmp_path):
    # Dense at N=65536 needs ~70 GB: predicted over a 20 GB budget, so it never starts.
    summary = cli.main(["--sizes", "65536", "--backends", "dense", "--dim", "16", "--no-check",
                        "--device", "cpu", "--out", str(tmp_path)])
    (rec,) = summary["records"]
    assert rec["status"] == "skipped-predicted-mem" and rec["predicted_mem_bytes"] > 20e9
    assert summary["largest_n"]["clip"]["dense"]["n"] is None
    assert "skipped-predicted-mem" in summary["largest_n"]["clip"]["dense"]["stopped_by"]
    assert "UNCHECKED" in summary["table"]
    # a peer whose memory is cubic in N (PML's NTXentLoss) is predicted from its own model
    cfg = BenchConfig(backends=("blockwise",), sizes=(4096,), losses=("nt_xent",),
                      compare="pml")
    guess = search.predict(cfg, "nt_xent", "pml", 4096, [], side="pml")
    assert guess["mem_bytes"] > 1e12


# --------------------------------------------------------------------------------------------
# End to end and report
# --------------------------------------------------------------------------------------------


def test_tiny_run_writes_sane_table_json_csv_png(tmp_path, capsys):
    out = tmp_path / "res"
    summary = cli.main(TINY + ["--out", str(out)])
    printed = capsys.readouterr().out
    assert "8*N*M*D" in printed and "Largest N that fits" in printed
    assert "check clip blockwise" in printed and "passed" in printed

    records = summary["records"]
    assert {(r["backend"], r["n"]) for r in records} == {("blockwise", 64)}
    for r in records:
        assert r["status"] == "ok", r
        assert r["flops"] == 8 * r["n"] * r["m"] * r["d"] and r["m"] == r["n"] and r["d"] == 16
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["median_s"])
        assert r["peak_mem_bytes"] > 50e6  # a process with torch loaded
        assert r["peak_mem_bytes"] >= r["rss_inputs_bytes"] > 0
        assert r["mem_beyond_inputs_bytes"] >= 0 and r["child_maxrss_bytes"] > 0
    assert summary["largest_n"]["clip"]["blockwise"]["n"] == 64

    paths = summary["paths"]
    payload = json.loads(paths["json"].read_text())
    assert payload["flop_formulas"] == {"clip": "8*N*M*D"} and payload["checked"] is True
    assert payload["environment"]["torch"] == torch.__version__
    assert len(payload["records"]) == 1 and all(c["passed"] for c in payload["check"])
    with paths["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and list(rows[0]) == report.CSV_FIELDS
    for row in rows:
        assert row["device_name"] and row["torch"] and row["triton"] and row["date"]
        assert row["git_commit"] and row["loss"] == "clip" and row["checked"] == "True"
        assert int(row["flops"]) == 8 * int(row["n"]) * int(row["m"]) * int(row["d"])
        assert float(row["median_s"]) > 0
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    assert "blockwise" in paths["table"].read_text()


def _rec(backend, n, median, peak, beyond, loss="clip", side="ours", **extra):
    return {"loss": loss, "side": side, "backend": backend, "n": n, "m": n, "d": 128,
            "dtype": "fp32", "search": False, "status": "ok", "median_s": median,
            "p20_s": median, "p80_s": median, "flops": 8 * n * n * 128,
            "flops_per_s": 8 * n * n * 128 / median, "peak_mem_bytes": peak,
            "mem_beyond_inputs_bytes": beyond, **extra}


def test_report_bounds_the_ratios_by_a_dense_run_killed_at_the_time_budget(tmp_path):
    cfg = BenchConfig(backends=("blockwise", "dense"), sizes=(32768,), dim=128,
                      time_budget_s=300.0, out=str(tmp_path))
    killed = {"loss": "clip", "side": "ours", "backend": "dense", "n": 32768, "m": 32768,
              "d": 128, "dtype": "fp32", "search": False, "status": "over-time-budget",
              "child_maxrss_bytes": 17.9e9, "message": "killed at the budget (300 s)"}
    records = [_rec("blockwise", 32768, 80.0, 1.07e9, 0.37e9, rss_runtime_bytes=0.6e9,
                    rss_inputs_bytes=0.7e9), killed]
    env = {"device_name": "test cpu", "torch": "t", "triton": "x", "git_commit": "abc",
           "threads": 2, "date": "now", "device": "cpu", "python": "3"}
    result = {"records": records, "largest_n": {}}
    text = report.format_results(cfg, env, result, checked=True)
    line = next(ln for ln in text.splitlines() if ln.startswith("blockwise"))
    assert "<0.27" in line  # 80 s / 300 s: dense took longer than the budget
    assert f"<{1.07 / 17.9:.3f}" in line  # dense reached 17.9 GB before it was killed
    assert "runtime 0.600 + inputs 0.100 + beyond inputs 0.370 GB" in text
    assert "over-time-budget" in text and "MET" not in text
    paths = report.write_outputs(cfg, env, result, None, text, checked=True)
    assert json.loads(paths["json"].read_text())["records"][1]["status"] == "over-time-budget"
    with paths["csv"].open() as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["ok", "over-time-budget"]
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC


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
    summary = cli.main(["--static", "--out", str(tmp_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "FAKE TABLE 3" in printed and "compile report only" in printed
    assert json.loads((tmp_path / "static_sm90.json").read_text()) == rows
    spills, wgmma = summary["static_summary"]
    assert spills == "spills: 1 of 3 configs spill (forward/fp32)"
    assert wgmma.startswith("wgmma: 1 of 2 bf16/fp16 configs without wgmma")
    assert "fp32" in wgmma and "records" not in summary


# --------------------------------------------------------------------------------------------
# Comparison with pytorch-metric-learning
# --------------------------------------------------------------------------------------------


@needs_pml
def test_peer_gate_agrees_for_every_available_pair_and_names_differences():
    cfg = BenchConfig(backends=("blockwise",), sizes=(64,), dim=16, compare="pml")
    gated = 0
    for loss in cases.with_peer("pml"):
        case = cases.get(loss)
        r = gate.peer_gate(cfg, loss)
        if not case.available()[0]:
            assert r["passed"] is None and "not available" in r["message"]
            continue
        gated += 1
        assert r["passed"] is True, r
        if case.peer.same_loss:
            assert r["agree"] and max(r["errors"].values()) <= gate.PEER_TOL
        else:
            assert case.peer.difference in r["message"]
    assert gated >= 3  # nt_xent, supcon and the ones landed since


@needs_pml
def test_peer_gate_refuses_a_peer_that_computes_another_loss(monkeypatch):
    """NTXentLoss at another temperature is a different function: the gate must see it."""
    from pytorch_metric_learning import distances, losses

    def wrong(t, scale):
        loss = losses.NTXentLoss(temperature=1.1 / scale,
                                 distance=distances.DotProductSimilarity(
                                     normalize_embeddings=False))
        labels = torch.arange(t["z1"].shape[0]).repeat(2)
        return lambda: loss(torch.cat([t["z1"], t["z2"]]), labels)

    case = cases.get("nt_xent")
    broken = cases.dataclasses.replace(case, peer=cases.dataclasses.replace(case.peer,
                                                                          build=wrong))
    monkeypatch.setitem(cases.CASES, "nt_xent", broken)
    cfg = BenchConfig(backends=("blockwise",), sizes=(64,), dim=16, compare="pml",
                      losses=("nt_xent",))
    r = gate.peer_gate(cfg, "nt_xent")
    assert r["passed"] is False and "declared the same loss but they differ" in r["message"]
    with pytest.raises(gate.CheckFailed, match="vs NTXentLoss"):
        cli.run_gates(cfg, ("nt_xent",))


@needs_pml
def test_pml_triplet_and_contrastive_settings_compute_the_stated_formulas():
    """Our PML configurations, against float64 references written from the formulas (this does
    not need our triplet_margin / drlim, which the peer gate compares once they exist)."""
    gen = torch.Generator().manual_seed(3)
    x = cases.unit_rows(gen, 30, 8).double().requires_grad_(True)
    labels = cases.balanced_labels(gen, 30, 4)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(30, dtype=torch.bool)
    with torch.no_grad():
        d = torch.cdist(x, x)

    # batch-hard triplet (Hermans et al. 2017): mean_i relu(max_{p in P(i)} |x_i - x_p|
    #                                                  - min_{n: other class} |x_i - x_n| + margin)
    hardest_pos = d.masked_fill(~same | eye, -math.inf).argmax(1)
    hardest_neg = d.masked_fill(same, math.inf).argmin(1)
    d_ap = (x - x[hardest_pos]).norm(dim=1)
    d_an = (x - x[hardest_neg]).norm(dim=1)
    want = torch.relu(d_ap - d_an + cases.TRIPLET_MARGIN).mean()
    got = cases._pml_triplet_batch_hard({"embeddings": x, "labels": labels}, None)()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    (g_want,) = torch.autograd.grad(want, x)
    (g_got,) = torch.autograd.grad(got, x)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-12)

    # batch-all: relu(d_ap - d_an + margin) over every valid triplet, averaged over the positive
    a, p, n = torch.nonzero((same & ~eye)[:, :, None] & ~same[:, None, :], as_tuple=True)
    terms = torch.relu((x[a] - x[p]).norm(dim=1) - (x[a] - x[n]).norm(dim=1)
                       + cases.TRIPLET_MARGIN)
    want = terms[terms > 0].mean()
    got = cases._pml_triplet_all({"embeddings": x, "labels": labels}, None)()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    (g_want,) = torch.autograd.grad(want, x)
    (g_got,) = torch.autograd.grad(got, x)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-12)

    # PML's ContrastiveLoss as configured: mean over positive pairs of d (all non-zero) +
    # mean over the negative pairs with d < margin of (margin - d): the difference we state
    i, j = torch.nonzero(~eye, as_tuple=True)
    pair_d = (x[i] - x[j]).norm(dim=1)
    positive = same[i, j]
    pos = pair_d[positive]
    hinge = torch.relu(cases.DRLIM_MARGIN - pair_d[~positive])
    want = pos.mean() + hinge[hinge > 0].mean()
    got = cases._pml_contrastive({"embeddings": x, "labels": labels}, None)()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    (g_want,) = torch.autograd.grad(want, x, retain_graph=True)
    (g_got,) = torch.autograd.grad(got, x)
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-12)
    drlim = ((pos ** 2 / 2).sum() + (hinge ** 2 / 2).sum()) / (30 * 29)
    assert abs(got.item() - drlim.item()) > 0.1  # not DrLIM's value: why same_loss is False


@needs_pml
def test_compare_pml_tiny_run_side_by_side(tmp_path, capsys):
    out = tmp_path / "cmp"
    summary = cli.main(["--compare", "pml", "--loss", "supcon", "--sizes", "64", "--dim", "16",
                        "--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "check supcon vs SupConLoss" in printed and "same loss: agree" in printed
    sides = {(r["side"], r["backend"]) for r in summary["records"]}
    assert sides == {("ours", "blockwise"), ("pml", "pml")}
    assert all(r["status"] == "ok" for r in summary["records"]), summary["records"]
    (pair,) = summary["pairs"]
    assert pair["loss"] == "supcon" and pair["peer"] == "SupConLoss" and pair["same_loss"]
    assert pair["time_ratio"] == pytest.approx(pair["ours_s"] / pair["peer_s"])
    assert pair["peak_ratio"] == pytest.approx(pair["ours_peak_bytes"] / pair["peer_peak_bytes"])
    paths = summary["paths"]
    payload = json.loads(paths["json"].read_text())
    assert payload["environment"]["pml"] and payload["pairs"][0]["loss"] == "supcon"
    assert any(g["kind"] == "peer" and g["passed"] for g in payload["gates"])
    with paths["csv"].open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["peer"] == "SupConLoss" and float(row["time_ratio"]) > 0 and row["pml"]
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC


def test_pair_rows_bound_a_peer_that_could_not_run():
    cfg = BenchConfig(backends=("blockwise",), sizes=(4096,), losses=("nt_xent", "supcon"),
                      compare="pml", time_budget_s=100.0, mem_budget_gb=10.0)
    records = [
        _rec("blockwise", 4096, 2.0, 1e9, 0.1e9, loss="nt_xent"),
        {"loss": "nt_xent", "side": "pml", "backend": "pml", "n": 4096,
         "status": "skipped-predicted-mem", "message": "predicted 1.2e+03 GB > budget 10.0 GB"},
        _rec("blockwise", 4096, 2.0, 1e9, 0.1e9, loss="supcon"),
        {"loss": "supcon", "side": "pml", "backend": "pml", "n": 4096,
         "status": "over-time-budget", "child_maxrss_bytes": 4e9, "message": "killed"},
    ]
    rows = {r["loss"]: r for r in compare.pair_rows(cfg, records)}
    assert rows["nt_xent"].get("time_ratio") is None and rows["nt_xent"]["ratio_is_bound"]
    assert "skipped-predicted-mem" in rows["nt_xent"]["bound"]
    assert rows["supcon"]["time_ratio"] == pytest.approx(0.02)  # 2 s / 100 s budget
    assert rows["supcon"]["peak_ratio"] == pytest.approx(0.25)  # 1 GB / 4 GB reached
    env = {"device_name": "cpu", "torch": "t", "git_commit": "c", "pml": "2.9.0"}
    text = report.format_comparison(cfg, env, list(rows.values()), [], {}, True)
    assert "<0.02" in text and "<0.25" in text and "skipped-predicted-mem" in text
