"""End to end: python -m recipes.simclr_images and recipes.image_downstream on tiny generated
data: every output, resume equality, gradient caching in the recipe, a temperature sweep, run
folders never clobbered, bad input refused before any training, --help, and a 2-process gloo
run whose ranks end with equal parameters."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from recipes.common.checkpoint import load_checkpoint
from recipes.image_downstream import main as downstream_main
from recipes.image_downstream import run as downstream_run
from recipes.simclr_images import main, run

TINY = {
    "synthetic_train": 64, "synthetic_test": 32, "image_size": 16, "backbone": "small_cnn",
    "width": 8, "batch_size": 16, "steps": 4, "knn_k": 10, "diagnostics_samples": 16,
    "segmentation_epochs": 1, "eval_batch_size": 64, "train_seconds": 0, "threads": 1,
    "log_every": 1, "checkpoint_every": 2, "warmup_epochs": 0.0, "optimizer": "adamw",
    "lr": 1e-3, "settings": {"projection_hidden": 32, "projection_dim": 16, "queue_size": 64},
}


def _config(tmp_path, **extra) -> str:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, **extra}))
    return str(path)


def _records(out, kind=None):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--seg-data", "--method", "--backbone", "--image-size",
                 "--batch-size", "--epochs", "--steps", "--temperature", "--device", "--resume",
                 "--config", "--out", "--seed", "--strict", "--chunk-size", "--overwrite",
                 "--ignore-index"):
        assert flag in text, flag


def test_end_to_end_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    result = run(["--config", _config(tmp_path), "--out", str(out), "--quiet", "--device", "cpu"])
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "eval.json", "summary.json",
                 "train.log", "training.png", "diagnostics.png", "spectra.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    ev = json.loads((out / "eval.json").read_text())
    for name in ("trained", "random_init"):
        assert set(ev[name]) >= {"knn_top1", "linear_top1", "miou"}
        for key in ("knn_top1", "linear_top1", "miou"):
            assert 0.0 <= ev[name][key] <= 1.0
    assert 0.0 <= ev["raw_pixels"]["knn_top1"] <= 1.0
    train = _records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    diag = _records(out, "diagnostics")
    assert diag[0]["step"] == 0 and diag[-1]["step"] == 4 and "knn_top1" in diag[-1]
    for key in ("positive_cosine", "negative_cosine", "alignment", "uniformity",
                "feature_effective_rank", "projection_effective_rank"):
        assert key in diag[-1], key
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 4 and ck["config"]["width"] == 8
    text = capsys.readouterr().out
    assert "random_init" in text and "knn_top1" in text and "\r" not in text
    assert result["summary"]["steps_done"] == 4


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    cfg = _config(tmp_path, steps=6, segmentation_epochs=0)
    run(["--config", cfg, "--out", str(tmp_path / "full"), "--quiet"])
    run(["--config", cfg, "--out", str(tmp_path / "part"), "--quiet", "--stop-after", "3"])
    assert [r["step"] for r in _records(tmp_path / "part")] == [1, 2, 3]
    run(["--config", cfg, "--out", str(tmp_path / "part"), "--quiet", "--resume"])
    full = [r["loss"] for r in _records(tmp_path / "full")]
    resumed = [r["loss"] for r in _records(tmp_path / "part")]
    assert len(full) == 6 and resumed == full
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["method"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["method"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["moco", "byol", "triplet"])
def test_methods_with_state_or_labelled_batches_resume_exactly(tmp_path, method):
    cfg = _config(tmp_path, steps=4, segmentation_epochs=0, linear_probe=False)
    run(["--config", cfg, "--out", str(tmp_path / "full"), "--quiet", "--method", method])
    run(["--config", cfg, "--out", str(tmp_path / "part"), "--quiet", "--method", method,
         "--stop-after", "2"])
    run(["--config", cfg, "--out", str(tmp_path / "part"), "--quiet", "--method", method,
         "--resume"])
    assert [r["loss"] for r in _records(tmp_path / "part")] == \
        [r["loss"] for r in _records(tmp_path / "full")]


@pytest.mark.parametrize("method", ["simclr", "moco", "vicreg"])
def test_recipe_step_with_gradient_caching_equals_autograd_on_the_same_chunks(tmp_path, method):
    """The recipe's cached step (chunks of 16 views) against autograd through the same
    chunks: BatchNorm sees the same rows in both, so the gradients must agree to fp32
    rounding; the running statistics end as after one pass."""
    import copy

    from recipes.image_setup import build_config
    from recipes.simclr_images import _build, train_step

    values = {k: v for k, v in TINY.items() if k != "settings"}
    config = build_config({**values, "settings": TINY["settings"]}, {"method": method})
    torch.manual_seed(0)
    model = _build(config, num_classes=10)
    reference = copy.deepcopy(model)
    x = torch.randn(16, 2, 3, 16, 16)
    labels = torch.arange(16) % 4
    train_step(model, model, x, labels, 16)

    rows = x.transpose(0, 1).reshape(32, 3, 16, 16)
    target = None
    if reference.uses_target:
        parts = [reference.forward_target(rows[i:i + 16]) for i in (0, 16)]
        target = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    parts = [reference(rows[i:i + 16]) for i in (0, 16)]
    outputs = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    reference.loss(outputs, target, labels, 2)[0].backward()
    got = dict(model.named_parameters())
    checked = 0
    for name, p in reference.named_parameters():
        if p.grad is None:
            assert got[name].grad is None, name
            continue
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked > 4
    for (name, b), (_, b_ref) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, b_ref, msg=name)


def test_existing_run_is_refused_and_kept(tmp_path, capsys):
    cfg = _config(tmp_path, steps=1, segmentation_epochs=0, linear_probe=False)
    out = tmp_path / "run"
    run(["--config", cfg, "--out", str(out), "--quiet"])
    before = (out / "metrics.jsonl").read_text()
    assert main(["--config", cfg, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(out) in err
    assert (out / "metrics.jsonl").read_text() == before
    run(["--config", cfg, "--out", str(out), "--quiet", "--overwrite", "--seed", "3"])
    assert json.loads((out / "config.json").read_text())["seed"] == 3


def test_resume_with_a_changed_config_names_the_fields(tmp_path, capsys):
    cfg = _config(tmp_path, steps=2, segmentation_epochs=0, linear_probe=False)
    out = tmp_path / "run"
    run(["--config", cfg, "--out", str(out), "--quiet", "--stop-after", "1"])
    assert main(["--config", cfg, "--out", str(out), "--quiet", "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.001 in the checkpoint, 0.5 now" in err and "--override-config" in err


@pytest.mark.parametrize("flags, named", [
    (["--method", "simclrr"], "method='simclrr'"),
    (["--backbone", "vgg"], "backbone='vgg'"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--image-size", "8"], "image_size=8"),
    (["--temperature", "0.1,-1"], "--temperature='0.1,-1'"),
    (["--chunk-size", "-1"], "chunk_size=-1"),
    (["--data", "/nonexistent/folder"], "data='/nonexistent/folder'"),
    (["--method", "byol", "--temperature", "0.1,0.5"], "--method byol has no temperature"),
])
def test_bad_flags_are_named_before_any_work(tmp_path, capsys, flags, named):
    start = time.perf_counter()
    assert main(["--config", _config(tmp_path), "--out", str(tmp_path / "x"), "--quiet"]
                + flags) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert time.perf_counter() - start < 5


def test_bad_folder_data_refused_before_training(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(root / split / "cat" / "a.png")
        (root / split / "dog").mkdir(parents=True)  # a class folder with no images
    assert main(["--config", _config(tmp_path), "--out", str(tmp_path / "x"), "--quiet",
                 "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert "dog" in err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_temperature_sweep(tmp_path, capsys):
    cfg = _config(tmp_path, steps=2, segmentation_epochs=0, linear_probe=False)
    result = run(["--config", cfg, "--out", str(tmp_path / "sweep"), "--quiet",
                  "--temperature", "0.1,0.5"])
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(sweep) == {"0.1", "0.5"}
    for t, row in sweep.items():
        assert row["uniformity"] is not None and row["spectrum"]
        cfg_t = json.loads((tmp_path / "sweep" / f"temperature_{t}" / "config.json").read_text())
        assert cfg_t["settings"]["temperature"] == float(t)
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    assert "temperature sweep" in capsys.readouterr().out
    assert result["out"] == str(tmp_path / "sweep")


def test_downstream_study(tmp_path, capsys):
    cfg = _config(tmp_path, steps=2, segmentation_epochs=0, linear_probe=False)
    run(["--config", cfg, "--out", str(tmp_path / "pre"), "--quiet"])
    out = tmp_path / "down"
    res = downstream_run(["--checkpoints", str(tmp_path / "pre"), "--out", str(out),
                          "--epochs", "2", "--fractions", "0.25,1", "--batch-size", "16",
                          "--quiet"])["results"]
    assert set(res["tasks"]) == {"binary", "multiclass", "segmentation"}
    for task, t in res["tasks"].items():
        assert len(t["panels"]) == 4  # 2 modes x 2 fractions
        for panel in t["panels"].values():
            assert set(panel["curves"]) == {"simclr", "random_init"}
            for c in panel["curves"].values():
                assert c["epochs"] == [1, 2] and all(0.0 <= m <= 1.0 for m in c["metric"])
        assert (out / f"downstream_{task}.png").stat().st_size > 0
    # the 25 % subset: stratified, at least one image per class, same for every pre-training
    small = [p for p in res["tasks"]["multiclass"]["panels"].values() if p["fraction"] == 0.25]
    assert all(p["n_train"] == small[0]["n_train"] for p in small)
    assert 10 <= small[0]["n_train"] <= 24
    assert "downstream metric after 2 epochs" in capsys.readouterr().out


@pytest.mark.parametrize("flags, named", [
    (["--fractions", "0,1"], "--fractions: '0'"),
    (["--fractions", "1.5"], "--fractions: '1.5'"),
    (["--tasks", "detection"], "--tasks='detection'"),
    (["--modes", "frozen,linear"], "--modes='frozen,linear'"),
    ([], "--checkpoints"),
])
def test_downstream_bad_flags(tmp_path, capsys, flags, named):
    if flags:
        (tmp_path / "pre").mkdir()
        torch.save({}, tmp_path / "pre" / "checkpoint.pt")
        flags = ["--checkpoints", str(tmp_path / "pre")] + flags
    assert downstream_main(flags + ["--out", str(tmp_path / "d")]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ---- two processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: str, out: str, method: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = run(["--config", cfg, "--out", out, "--quiet", "--method", method])
    params = {k: v.detach() for k, v in result["method"].named_parameters()}
    torch.save(params, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("method", ["simclr", "barlow"])
def test_two_process_gloo_ddp(tmp_path, method):
    cfg = _config(tmp_path, steps=2, segmentation_epochs=0, linear_probe=False, batch_size=8)
    out = str(tmp_path / "ddp")
    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, out, method), nprocs=2, join=False)
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two-process run hung")
    a = torch.load(Path(out) / "rank0.pt")
    b = torch.load(Path(out) / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ev = json.loads((Path(out) / "eval.json").read_text())
    assert 0.0 <= ev["trained"]["knn_top1"] <= 1.0
    assert [r["step"] for r in _records(out)] == [1, 2]
