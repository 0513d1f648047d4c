"""recipes.bench_clip: a tiny sweep and a tiny --scale run in child processes and the files they
write, the dense search's decisions (with the children replaced by a memory model), the step it
times (gradient caching equal to the one-shot step, the dense baseline equal to the fused loss),
and every bad flag refused before any work."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import recipes.bench_clip as bench
from recipes.bench_clip import (ROW_FIELDS, build_bench_model, clip_train_step, config_from_args,
                                largest_fitting, main, openclip_dense_loss, synthetic_pairs)

TINY = ["--towers", "small_cnn+bert-tiny", "--batch-sizes", "8", "--image-size", "16",
        "--text-length", "8", "--vocab-size", "64", "--projection-dim", "16", "--repeats", "1",
        "--warmup", "0", "--threads", "1", "--losses", "clip"]


def _md_rows(text: str) -> list[list[str]]:
    """The cells of the markdown table's body."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[1:]
            if not ln.startswith("| ---")]


def test_tiny_sweep_end_to_end(tmp_path, capsys):
    # one child (each pays about 5 s of imports: torch, torchvision, transformers); the one-shot
    # step is the same code path with chunk_size=None (test_cached_step_equals_the_one_shot_step)
    argv = TINY + ["--chunk-size", "4", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for column in ("towers", "pairs/s", "loss share", "peak RSS"):
        assert column in out
    result = json.loads((tmp_path / "clip_cpu_t1.json").read_text())
    assert result["command"] == "python -m recipes.bench_clip " + " ".join(argv)
    (r,) = result["rows"]
    assert list(r) == ROW_FIELDS
    assert r["status"] == "ok", r["message"]
    assert (r["towers"], r["loss"], r["batch"], r["chunk"], r["image_size"], r["text_length"]) == (
        "small_cnn+bert-tiny", "clip", 8, 4, 16, 8)
    assert r["pairs_per_second"] == pytest.approx(8 / r["seconds_per_step_median"])
    assert 0 < r["loss_share"] < 1
    assert r["loss_share"] == pytest.approx(r["loss_seconds_median"] / r["seconds_per_step_median"])
    # the child's peak RSS: above its RSS with the model and inputs built (torch and transformers
    # imported: over 100 MB); the kernel's ru_maxrss of the child is at least it
    assert r["peak_mem_kind"] == "rss" and r["rss_ready_bytes"] > 100e6
    assert r["peak_mem_bytes"] >= r["rss_ready_bytes"]
    assert r["child_maxrss_bytes"] >= r["peak_mem_bytes"]
    assert r["parameters"] > 0 and r["device"] == "cpu" and r["threads"] == 1
    assert result["environment"]["load_average_at_end"] is not None
    # the markdown file holds the same numbers as the JSON and the printed table
    md = (tmp_path / "clip_cpu_t1.md").read_text()
    assert result["command"] in md
    (cells,) = _md_rows(md)
    assert cells[:4] == ["small_cnn+bert-tiny", "clip", "8", "4"]
    assert cells[6] == f"{r['pairs_per_second']:.1f}"
    assert cells[7] == f"{100 * r['loss_share']:.2f}%"
    assert cells[8] == bench.fmt_bytes(r["peak_mem_bytes"]) and cells[-1] == "ok"
    assert f"{r['pairs_per_second']:.1f}" in out and cells[8] in out


def test_tiny_scale_run_reports_no_dense_batch_when_none_fits(tmp_path, capsys, monkeypatch):
    # a 0.05 GB cap: every dense child passes it while importing torch and is killed (real
    # children); the cached step's child is the sweep's (tested above) and is answered here
    real = bench.run_measurement
    cached = {"status": "ok", "seconds_per_step_median": 2.0, "seconds_per_step_min": 2.0,
              "loss_seconds_median": 0.1, "peak_mem_bytes": 4e8, "peak_mem_kind": "rss",
              "max_polled_rss_bytes": 3.9e8, "wall_s": 3.0}
    monkeypatch.setattr(bench, "run_measurement", lambda spec, *a, **k: (
        dict(cached) if spec["chunk"] else real(spec, *a, **k)))
    args = TINY + ["--scale", "--chunk-size", "4", "--target-gb", "0.05", "--search-start", "4",
                   "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gradient caching + fused loss" in out and "no batch fits" in out
    result = json.loads((tmp_path / "clip_scale_cpu_t1.json").read_text())
    assert (result["cached"]["batch"], result["cached"]["chunk"]) == (8, 4)
    assert result["cached"]["loss_share"] == pytest.approx(0.05)
    assert result["cached_within_target"] is False  # 0.4 GB > 0.05 GB
    assert result["dense_largest"] is None and result["dense_smallest_not_fitting"] == 2
    assert [(r["batch"], r["chunk"], r["loss"], r["status"]) for r in result["dense_search"]] == [
        (4, 0, "openclip", "over-mem-budget"), (2, 0, "openclip", "over-mem-budget")]
    assert all(r["peak_mem_bytes"] is None and r["max_polled_rss_bytes"] > 0.05e9
               for r in result["dense_search"])
    md = (tmp_path / "clip_scale_cpu_t1.md").read_text()
    assert "**missed**" in md and "none" in md
    assert len(_md_rows(md)) == 4  # cached, largest dense (none), the two tries


def test_scale_search_judges_each_try_by_its_peak(tmp_path, monkeypatch, capsys):
    # the children replaced by a memory model: peak = 1 GB + 1 MB per pair; a cap of 3 GB fits
    # up to 2000 pairs. Tries the polls let through but whose VmHWM ends above the cap do not fit.
    calls = []

    def fake(spec, kill, budget, report_every_s=None):
        calls.append((spec["batch"], spec["chunk"], spec["loss"], spec["time_loss"], kill))
        if spec["chunk"]:  # the cached step
            return {"status": "ok", "seconds_per_step_median": 100.0, "seconds_per_step_min": 100.0,
                    "loss_seconds_median": 5.0, "peak_mem_bytes": 2.5e9, "peak_mem_kind": "rss",
                    "max_polled_rss_bytes": 2.4e9, "wall_s": 101.0}
        peak = 1e9 + 1e6 * spec["batch"]
        if peak > 3.6e9:  # far above: the parent's poll kills it
            return {"status": "over-mem-budget", "message": "killed", "wall_s": 1.0,
                    "max_polled_rss_bytes": 3.1e9}
        return {"status": "ok", "seconds_per_step_median": spec["batch"] / 100,
                "seconds_per_step_min": spec["batch"] / 100, "loss_seconds_median": None,
                "peak_mem_bytes": peak, "peak_mem_kind": "rss",
                "max_polled_rss_bytes": min(peak, 2.9e9), "wall_s": 2.0}

    monkeypatch.setattr(bench, "run_measurement", fake)
    cfg = config_from_args(TINY + ["--scale", "--batch-sizes", "32768", "--chunk-size", "1024",
                                   "--target-gb", "3", "--search-start", "512", "--out",
                                   str(tmp_path)])
    result = bench.run_scale(cfg)
    assert calls[0] == (32768, 1024, "clip", True, cfg.mem_budget_gb * 1e9)
    # doubling 512, 1024, 2048 (VmHWM 3.05 GB: above), 4096 never tried; bisection 1536, 1792, 1920
    tried = [c[0] for c in calls[1:]]
    assert tried == [512, 1024, 2048, 1536, 1792, 1920]
    assert all(c[1:] == (0, "openclip", False, 3e9) for c in calls[1:])
    assert result["dense_largest"]["batch"] == 1920
    assert result["dense_smallest_not_fitting"] == 2048
    assert result["cached_within_target"] is True
    row_2048 = result["dense_search"][2]
    assert row_2048["status"] == "ok" and "above the cap" in row_2048["message"]
    header, body = bench.scale_table(result)
    assert body[0][:3] == ["gradient caching + fused loss", "32768", "1024"]
    assert body[0][-2] == "yes" and body[1][1] == "1920" and body[1][-2] == "yes"
    assert [b[-2] for b in body[2:]] == ["yes", "yes", "NO", "yes", "yes", "yes"]
    md = bench.markdown_report({**result, "command": "x"}, header, body)
    assert "**met**" in md and "**1920** pairs (2048 pairs did not fit)" in md


@pytest.mark.parametrize("limit_fit, start, limit, expected, tried", [
    (5000, 512, 32768, (4608, 5120), [512, 1024, 2048, 4096, 8192, 6144, 5120, 4608]),
    (40000, 512, 32768, (32768, None), [512, 1024, 2048, 4096, 8192, 16384, 32768]),
    (300, 512, 32768, (288, 320), [512, 256, 384, 320, 288]),
    (1, 4, 100, (None, 2), [4, 2]),
    (700, 512, 600, (600, None), [512, 600]),
])
def test_largest_fitting_doubles_then_bisects(limit_fit, start, limit, expected, tried):
    seen = []

    def fits(b):
        seen.append(b)
        return b <= limit_fit

    assert largest_fitting(fits, start, limit, 3) == expected
    assert seen == tried


def test_largest_fitting_stops_at_a_try_that_broke():
    assert largest_fitting(lambda b: None if b > 1024 else True, 512, 32768, 3) == (1024, None)
    assert largest_fitting(lambda b: None, 512, 32768, 3) == (None, None)


def test_synthetic_pairs():
    images, ids, mask = synthetic_pairs(5, image_size=16, text_length=8, vocab_size=64, seed=3)
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    assert ids.shape == mask.shape == (5, 8) and ids.dtype == mask.dtype == torch.int64
    assert (ids[:, 0] == 2).all() and (ids[:, -1] == 3).all()
    assert ids[:, 1:-1].min() >= 5 and ids[:, 1:-1].max() < 64 and (mask == 1).all()
    again = synthetic_pairs(5, image_size=16, text_length=8, vocab_size=64, seed=3)
    assert torch.equal(images, again[0]) and torch.equal(ids, again[1])


def test_openclip_dense_loss_is_the_clip_loss():
    # written from the formula in float64: (CE over rows + CE over columns) / 2 of t * x y^T
    torch.manual_seed(0)
    img = F.normalize(torch.randn(11, 7, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(11, 7, dtype=torch.float64), dim=1)
    t = torch.tensor(9.0, dtype=torch.float64)
    s = t * img @ txt.T
    rows = (torch.logsumexp(s, 1) - s.diagonal()).mean()
    cols = (torch.logsumexp(s, 0) - s.diagonal()).mean()
    torch.testing.assert_close(openclip_dense_loss(img, txt, t), (rows + cols) / 2)
    import csrc_triton

    torch.testing.assert_close(openclip_dense_loss(img, txt, t),
                               csrc_triton.clip_loss(img, txt, t, backend="blockwise"))


def test_cached_step_equals_the_one_shot_step():
    # BatchNorm in eval mode (running statistics) and BERT without dropout: every row's
    # embedding is independent of its chunk, so the cached step must give the one-shot step's
    # update. SGD(lr=1): the parameter change is the gradient itself. In float64, so that the
    # sums' order (chunked or not) stays far below the tolerance.
    from modalities.image.transforms import eval_transform

    normalize = eval_transform(16)

    images, ids, mask = synthetic_pairs(10, image_size=16, text_length=8, vocab_size=64)
    after, embeddings = [], []
    for chunk in (None, 4):
        model = build_bench_model("small_cnn+bert-tiny", image_size=16, text_length=8,
                                  vocab_size=64, projection_dim=16, seed=0).double().eval()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        loss, img, txt = clip_train_step(model, images, ids, mask, opt, chunk_size=chunk,
                                         normalize=lambda x: normalize(x).double())
        assert math.isfinite(float(loss)) and img.shape == txt.shape == (10, 16)
        assert all(p.grad is None for p in model.parameters())  # cleared after the step
        after.append([b - p.detach() for b, p in zip(before, model.parameters())])
        embeddings.append((loss, img, txt))
    assert all(g.abs().max() > 0 for g in after[0])  # both towers, projections, scale
    for one_shot, cached in zip(*after):
        torch.testing.assert_close(cached, one_shot, rtol=1e-9, atol=1e-12)
    for a, b in zip(*embeddings):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("flags, named", [
    (["--towers", "vgg16+bert-tiny"], "--towers 'vgg16+bert-tiny'"),
    (["--towers", "small_cnn+gpt2"], "--towers 'small_cnn+gpt2'"),
    (["--towers", "small_cnn"], "--towers 'small_cnn'"),
    (["--towers", "small_cnn+bert-tiny,small_cnn+bert-tiny"], "--towers"),
    (["--batch-sizes", "0"], "--batch-sizes '0'"),
    (["--batch-sizes", "64,abc"], "--batch-sizes '64,abc'"),
    (["--batch-sizes", "64,"], "--batch-sizes '64,'"),
    (["--chunk-size", "-4"], "--chunk-size '-4'"),
    (["--batch-sizes", "64", "--chunk-size", "0,128"], "--chunk-size 128"),
    (["--batch-sizes", "64", "--chunk-size", "1"], "--chunk-size 1"),
    (["--batch-sizes", "64,256", "--chunk-size", "63"], "--chunk-size 63"),
    (["--losses", "infonce"], "--losses 'infonce'"),
    (["--losses", "clip,clip"], "--losses 'clip,clip'"),
    (["--image-size", "8"], "--image-size 8"),
    (["--image-size", "x"], "--image-size"),
    (["--text-length", "2"], "--text-length 2"),
    (["--vocab-size", "10"], "--vocab-size 10"),
    (["--projection-dim", "0"], "--projection-dim 0"),
    (["--repeats", "0"], "--repeats 0"),
    (["--warmup", "-1"], "--warmup -1"),
    (["--threads", "-2"], "--threads -2"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--mem-budget-gb", "0"], "--mem-budget-gb 0"),
    (["--time-budget-s", "-5"], "--time-budget-s -5"),
    (["--target-gb", "nan"], "--target-gb nan"),
    (["--search-start", "1"], "--search-start 1"),
    (["--search-steps", "-1"], "--search-steps -1"),
    (["--scale", "--towers", "small_cnn+bert-tiny,resnet18+bert-mini"], "--scale"),
    (["--scale", "--chunk-size", "0"], "--scale"),
    (["--scale", "--losses", "openclip"], "--scale"),
    (["--scale", "--losses", "clip,siglip"], "--scale"),
    (["--quick", "--scale"], "--quick and --scale"),
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


def test_presets():
    scale = config_from_args(["--scale"])
    assert (scale.towers, scale.batch_sizes, scale.chunk_sizes, scale.losses) == (
        ("small_cnn+bert-tiny",), (32768,), (1024,), ("clip",))
    assert (scale.image_size, scale.text_length, scale.target_gb, scale.repeats) == (32, 32, 6.0, 1)
    default = config_from_args([])
    assert default.towers == ("small_cnn+bert-tiny", "vit-tiny+bert-tiny", "resnet18+bert-mini")
    assert default.losses == ("clip", "siglip") and default.batch_sizes == (32, 128)
    assert default.chunk_sizes == (0, 32)
    # a default chunk that splits none of the batches given is dropped, not refused
    assert config_from_args(["--batch-sizes", "16"]).chunk_sizes == (0,)
