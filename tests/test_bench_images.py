"""recipes.bench_images: a tiny sweep and a tiny --single run in child processes, the files they
write, the step they time, the memory kill, and every bad flag refused before any work."""
from __future__ import annotations

import csv
import datetime
import json

import pytest
import torch

from modalities.image.methods import METHODS
from recipes.bench_images import (ROW_FIELDS, _measure_step, _row, _step_spec, build_bench_method,
                                  config_from_args, main, pretrain_step, run_measurement)

TINY = ["--backbones", "small_cnn", "--batch-sizes", "8", "--image-size", "16", "--repeats", "1",
        "--warmup", "0", "--threads", "1"]


def test_tiny_sweep_with_and_without_chunking(tmp_path, capsys):
    assert main(TINY + ["--chunk-size", "0,4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for column in ("backbone", "images/s", "loss share", "loader img/s", "peak mem"):
        assert column in out
    result = json.loads((tmp_path / "images_cpu_t1.json").read_text())  # tag: --threads 1
    rows = result["rows"]
    assert [r["chunk"] for r in rows] == [0, 4]
    for r in rows:
        assert list(r) == ROW_FIELDS
        assert r["status"] == "ok", r["message"]
        assert (r["backbone"], r["batch"], r["views"], r["image_size"]) == ("small_cnn", 8, 16, 16)
        assert r["images_per_second"] == pytest.approx(8 / r["seconds_per_step_median"])
        assert r["seconds_per_step_min"] <= r["seconds_per_step_median"]
        assert 0 < r["loss_share"] < 1
        assert r["loss_share"] == pytest.approx(r["loss_seconds_median"]
                                                / r["seconds_per_step_median"])
        assert r["loader_images_per_second"] > 0 and r["loader_workers"] == 0
        # peak RSS of a child that imported torch and ran a step: above its RSS before the
        # step, and the kernel's ru_maxrss of the whole child is at least it
        assert r["peak_mem_kind"] == "rss"
        assert r["rss_ready_bytes"] > 50e6
        assert r["peak_mem_bytes"] >= r["rss_ready_bytes"]
        assert r["child_maxrss_bytes"] >= r["peak_mem_bytes"]
        # tags
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["threads"] == 1
        datetime.datetime.fromisoformat(r["date"])
    assert (tmp_path / "images_cpu_t1.png").stat().st_size > 0
    with (tmp_path / "images_cpu.csv").open() as fh:
        table = list(csv.reader(fh))
    assert table[0] == ROW_FIELDS and len(table) == 3


def test_tiny_single_reports_no_uncached_batch_when_none_fits(tmp_path, capsys):
    # a 0.05 GB target: the cached step runs (only the safety budget kills it) and misses the
    # target; every uncached child passes 0.05 GB while importing torch and is killed
    args = TINY + ["--single", "--chunk-size", "4", "--target-gb", "0.05",
                        "--search-start", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gradient caching" in out and "no batch fits" in out
    result = json.loads((tmp_path / "images_single_cpu_t1.json").read_text())
    cached = result["cached"]
    assert cached["status"] == "ok", cached["message"]
    assert (cached["batch"], cached["views"], cached["chunk"]) == (8, 16, 4)
    assert 0 < cached["loss_share"] < 1
    assert result["cached_within_target"] is False  # a step cannot fit 50 MB of RSS
    assert result["uncached_largest"] is None
    assert [(r["batch"], r["status"]) for r in result["uncached_search"]] == [
        (4, "over-mem-budget"), (2, "over-mem-budget")]
    assert all(r["peak_mem_bytes"] is None for r in result["uncached_search"])


def test_child_past_the_memory_budget_is_killed(tmp_path):
    cfg = config_from_args(TINY + ["--out", str(tmp_path)])
    spec = _step_spec(cfg, "small_cnn", 8, 0)
    res = run_measurement(spec, kill_rss_bytes=30e6, time_budget_s=120)
    assert res["status"] == "over-mem-budget"
    assert res["max_polled_rss_bytes"] > 30e6
    row = _row(cfg, {"device": "cpu", "device_name": "x", "torch": "t", "threads": 1,
                     "date": "d", "git_commit": "c"}, spec, res, "sweep", None)
    assert row["images_per_second"] is None and row["peak_mem_bytes"] is None


def test_pretrain_step_updates_the_encoder_and_returns_view_major_outputs():
    method = build_bench_method("small_cnn", cifar_stem=True)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    before = [p.detach().clone() for p in method.encoder.parameters()]
    views = torch.randn(4, 2, 3, 16, 16)
    loss, stats, online, target = pretrain_step(method, views, torch.arange(4), 3, opt)
    assert torch.isfinite(loss) and target is None
    assert online["projection"].shape == (8, 128) and not online["projection"].requires_grad
    assert any(not torch.equal(a, p) for a, p in zip(before, method.encoder.parameters()))
    assert all(p.grad is None for p in method.parameters())  # zeroed after the step
    # rows are view-major: row v*B + i is view v of image i (eval mode: BatchNorm row-wise)
    method.eval()
    with torch.no_grad():
        direct = method(views[:, 1])["projection"]
        rows = method(views.transpose(0, 1).reshape(8, 3, 16, 16))["projection"]
    torch.testing.assert_close(rows[4:], direct)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_step_is_measured(method):
    # in this process (the child's function): labels, targets (moco, byol), one view (supervised)
    views = 1 if method == "supervised" else 2
    spec = {"kind": "step", "backbone": "small_cnn", "method": method, "cifar_stem": True,
            "image_size": 16, "batch": 24, "chunk": 10 if views == 2 else 0, "repeats": 1,
            "warmup": 0, "device": "cpu", "threads": 0, "optimizer": "adamw", "seed": 0}
    res = _measure_step(spec)
    assert res["seconds_per_step_median"] > 0 and res["loss_seconds_median"] > 0
    assert res["loss_seconds_median"] < res["seconds_per_step_median"]
    assert res["peak_mem_bytes"] > 0 and res["peak_mem_kind"] == "rss"


@pytest.mark.parametrize("flags, named", [
    (["--backbones", "vgg16"], "--backbones 'vgg16'"),
    (["--backbones", "small_cnn,small_cnn"], "--backbones 'small_cnn,small_cnn'"),
    (["--batch-sizes", "0"], "--batch-sizes '0'"),
    (["--batch-sizes", "64,abc"], "--batch-sizes '64,abc'"),
    (["--batch-sizes", "64,"], "--batch-sizes '64,'"),
    (["--image-size", "8"], "--image-size 8"),
    (["--image-size", "x"], "--image-size"),
    (["--chunk-size", "-4"], "--chunk-size '-4'"),
    (["--batch-sizes", "64", "--chunk-size", "0,128"], "--chunk-size 128"),
    (["--batch-sizes", "64", "--chunk-size", "1"], "--chunk-size 1"),
    (["--batch-sizes", "64,256", "--chunk-size", "127"], "--chunk-size 127"),
    (["--method", "dino"], "--method 'dino'"),
    (["--optimizer", "lamb"], "--optimizer 'lamb'"),
    (["--repeats", "0"], "--repeats 0"),
    (["--warmup", "-1"], "--warmup -1"),
    (["--threads", "-2"], "--threads -2"),
    (["--workers", "-1"], "--workers -1"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--mem-budget-gb", "0"], "--mem-budget-gb 0"),
    (["--time-budget-s", "-5"], "--time-budget-s -5"),
    (["--target-gb", "nan"], "--target-gb nan"),
    (["--search-start", "1"], "--search-start 1"),
    (["--single", "--backbones", "resnet18,resnet50"], "--single"),
    (["--single", "--chunk-size", "0"], "--single"),
    (["--quick", "--single"], "--quick and --single"),
    (["--bogus", "3"], "--bogus"),
])
def test_bad_flags_are_refused_naming_the_flag(tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    assert main(flags + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err
    assert not out.exists()  # refused before any work


def test_out_must_be_a_folder(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["--out", str(path)]) == 2
    assert f"--out {str(path)!r}" in capsys.readouterr().err


def test_cuda_refused_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--device", "cuda"]) == 2
    assert "--device 'cuda'" in capsys.readouterr().err
