"""End to end: python -m recipes.clip_pairs on a tiny caption folder: every output and the
eval.json keys and ranges, resume equality (weights and metrics), run folders never clobbered,
bad input refused before any work, the sampler's epochs, the SigLIP option, and a 2-process gloo
run whose first-step loss and gradients equal one process's on the same global batch."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from recipes.clip_pairs import PairSampler, main, run
from recipes.common.checkpoint import load_checkpoint

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 30)}

TINY = {
    "image_size": 16, "image_model": "small_cnn", "text_model": "bert-tiny", "max_length": 12,
    "vocab_size": 60, "projection_dim": 16, "batch_size": 16, "steps": 4, "warmup": 1,
    "lr": 1e-3, "train_seconds": 0, "threads": 1, "log_every": 1, "eval_every": 2,
    "checkpoint_every": 2, "eval_batch_size": 64, "diagnostics_samples": 16,
}
TIMING = ("elapsed_s", "pairs_per_s")


def _image(colour: str, left: bool, size: int = 16):
    from PIL import Image

    img = np.full((size, size, 3), 128, np.uint8)
    if left:
        img[:, : size // 2] = COLOURS[colour]
    else:
        img[:, size // 2:] = COLOURS[colour]
    return Image.fromarray(img)


def _make_data(root: Path, counts=(48, 16, 16), zeroshot_per_class: int = 4) -> Path:
    """An imagefolder with train/validation/test (a coloured half on the left or right, two
    captions per image as a list) and a zero-shot class folder per colour."""
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    for split, count in zip(("train", "validation", "test"), counts):
        d = root / split
        d.mkdir(parents=True)
        with open(d / "metadata.jsonl", "w") as f:
            for i in range(count):
                colour, left = names[i % 4], bool(rng.integers(2))
                _image(colour, left).save(d / f"{i}.png")
                side = "left" if left else "right"
                f.write(json.dumps({"file_name": f"{i}.png", "text": [
                    f"a {colour} block on the {side}", f"{side} {colour} thing"]}) + "\n")
    for colour in names:
        d = root / "zeroshot" / colour
        d.mkdir(parents=True)
        for i in range(zeroshot_per_class):
            _image(colour, bool(i % 2)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tiny caption folder, and one tokenizer trained on its captions in data/tokenizer:
    runs that must compute the same thing share it (WordPiece training breaks frequency ties
    in an unspecified order, so two trainings may number the tokens differently)."""
    from modalities.multimodal.data import load_pairs
    from modalities.text.tokenizer import train_wordpiece

    root = _make_data(tmp_path_factory.mktemp("pairs") / "data")
    captions = load_pairs(root, image_size=16, split="train")["train"].captions
    train_wordpiece(captions, vocab_size=TINY["vocab_size"], max_length=TINY["max_length"]
                    ).save_pretrained(str(root / "tokenizer"))
    return root


def _config(tmp_path: Path, **extra) -> str:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, **extra}))
    return str(path)


def _tokenizer_args(data: Path) -> list[str]:
    return ["--tokenizer", str(data / "tokenizer")]


def _args(tmp_path, data, out, *flags, **extra):
    return ["--config", _config(tmp_path, **extra), "--data", str(data), "--zeroshot",
            str(data / "zeroshot"), "--out", str(out), "--quiet", "--device", "cpu", *flags]


def _records(out, kind=None):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--text-model", "--image-model", "--batch-size", "--chunk-size",
                 "--loss", "--steps", "--epochs", "--device", "--resume", "--config", "--out",
                 "--seed", "--preset", "--text-pooling", "--image-size", "--max-length",
                 "--vocab-size", "--projection-dim", "--lr", "--weight-decay", "--warmup",
                 "--zeroshot", "--templates", "--skip-bad-images", "--train-seconds",
                 "--eval-every", "--stop-after", "--overwrite", "--override-config",
                 "--workers"):
        assert flag in text, flag


def test_end_to_end_outputs(tmp_path, data, capsys):
    out = tmp_path / "run"
    result = run(_args(tmp_path, data, out, "--templates", "a photo of a {}.;a {} thing"))
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "eval.json", "summary.json",
                 "train.log", "results.txt", "training.png", "diagnostics.png", "spectra.png",
                 "eval.png", "tokenizer/tokenizer.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert any((out / "model").iterdir())
    ev = json.loads((out / "eval.json").read_text())
    keys = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "zeroshot_top1",
            "linear_probe_top1"}
    for name in ("trained", "random_init", "chance"):
        assert set(ev[name]) >= keys, name
        for key in keys:
            assert 0.0 <= ev[name][key] <= 1.0, (name, key)
    for d in ("i2t", "t2i"):
        assert ev["trained"][f"{d}_r1"] <= ev["trained"][f"{d}_r5"] <= ev["trained"][f"{d}_r10"]
    # 16 test images: t2i chance is K / 16; 4 zero-shot classes
    assert ev["chance"]["t2i_r1"] == pytest.approx(1 / 16)
    assert ev["chance"]["t2i_r10"] == pytest.approx(10 / 16)
    assert ev["chance"]["zeroshot_top1"] == 0.25
    assert ev["meta"]["test_images"] == 16 and ev["meta"]["test_captions"] == 32
    assert ev["meta"]["templates"] == ["a photo of a {}.", "a {} thing"]
    assert ev["meta"]["model_format"] in ("transformers", "tilecontrast")
    train = _records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(0 < r["logit_scale"] <= 100 for r in train)
    mon = _records(out, "monitor")
    assert [r["step"] for r in mon] == [0, 2, 4]
    for key in ("val_i2t_r1", "val_t2i_r1", "logit_scale", "alignment", "image_uniformity",
                "text_uniformity", "image_effective_rank", "text_effective_rank"):
        assert key in mon[-1], key
    assert mon[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 4 and ck["config"]["projection_dim"] == 16
    text = capsys.readouterr().out
    assert "random init" in text and "i2t_r1" in text and "chance" in text and "\r" not in text
    assert result["summary"]["steps_done"] == 4
    assert "i2t_r1" in (out / "results.txt").read_text()
    # the random-init row is the model of step 0: its logit scale is the initial one
    assert ev["random_init"]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_resume_equals_an_uninterrupted_run(tmp_path, data):
    extra = {"steps": 6, "linear_probe": False, "eval_every": 2}
    tok = _tokenizer_args(data)
    run(_args(tmp_path, data, tmp_path / "full", *tok, **extra))
    run(_args(tmp_path, data, tmp_path / "part", *tok, "--stop-after", "3", **extra))
    assert [r["step"] for r in _records(tmp_path / "part")] == [1, 2, 3]
    assert not (tmp_path / "part" / "eval.json").exists()      # interrupted: no final evaluation
    run(_args(tmp_path, data, tmp_path / "part", *tok, "--resume", **extra))
    for kind in (None, "monitor"):
        full, part = _records(tmp_path / "full", kind), _records(tmp_path / "part", kind)
        assert len(full) == (6 if kind is None else 4)
        assert _untimed(part) == _untimed(full), kind
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ea = json.loads((tmp_path / "full" / "eval.json").read_text())
    eb = json.loads((tmp_path / "part" / "eval.json").read_text())
    assert ea["trained"] == eb["trained"] and ea["random_init"] == eb["random_init"]


def test_existing_run_is_refused_and_kept(tmp_path, data, capsys):
    out = tmp_path / "run"
    run(_args(tmp_path, data, out, steps=1, linear_probe=False))
    before = (out / "metrics.jsonl").read_text()
    assert main(_args(tmp_path, data, out, steps=1)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(out) in err
    assert (out / "metrics.jsonl").read_text() == before
    assert main(_args(tmp_path, data, out, "--resume", "--lr", "0.5", steps=2,
                      linear_probe=False)) == 2
    err = capsys.readouterr().err
    assert "lr: 0.001 in the checkpoint, 0.5 now" in err and "--override-config" in err


@pytest.mark.parametrize("flags, named", [
    (["--loss", "triplet"], "--loss"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--image-size", "8"], "--image-size=8"),
    (["--chunk-size", "-1"], "--chunk-size=-1"),
    (["--lr", "-1"], "--lr=-1.0"),
    (["--warmup", "-5"], "--warmup=-5"),
    (["--max-length", "2"], "--max-length=2"),
    (["--vocab-size", "3"], "--vocab-size=3"),
    (["--eval-every", "0"], "--eval-every=0"),
    (["--image-model", "vgg"], "--image-model='vgg'"),
    (["--text-model", "/nonexistent/bert"], "--text-model '/nonexistent/bert': no such directory"),
    (["--data", "/nonexistent/folder"], "--data='/nonexistent/folder'"),
    (["--zeroshot", "/nonexistent/zs"], "--zeroshot='/nonexistent/zs'"),
    (["--templates", "a photo of"], "--templates='a photo of'"),
    (["--templates", "{} and {};a {}"], "has 2 '{}'"),
    (["--device", "tpu"], "--device='tpu'"),
    (["--stop-after", "9"], "--stop-after=9"),
])
def test_bad_flags_are_named_before_any_work(tmp_path, data, capsys, flags, named):
    start = time.perf_counter()
    assert main(_args(tmp_path, data, tmp_path / "x", *flags)) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert time.perf_counter() - start < 5


def test_incomplete_text_model_directory(tmp_path, data, capsys):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert main(_args(tmp_path, data, tmp_path / "x", "--text-model", str(model_dir))) == 2
    err = capsys.readouterr().err
    assert "--text-model" in err and str(model_dir) in err and "weights are missing" in err
    assert not (tmp_path / "x").exists()


def test_empty_split_and_batch_too_large_are_refused(tmp_path, data, capsys):
    bad = _make_data(tmp_path / "bad", counts=(8, 4, 4), zeroshot_per_class=1)
    (bad / "test" / "metadata.jsonl").write_text("")
    for f in (bad / "test").glob("*.png"):
        f.unlink()
    assert main(_args(tmp_path, bad, tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "test" in err and str(bad) in err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
    # 48 training images cannot fill a batch of 64
    assert main(_args(tmp_path, data, tmp_path / "y", "--batch-size", "64")) == 2
    assert "--batch-size=64" in capsys.readouterr().err
    assert not (tmp_path / "y" / "checkpoint.pt").exists()


def test_sampler_epochs_captions_and_crops():
    caption_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    s = PairSampler(caption_image, 8, 4, seed=3, crop_min_scale=0.5)
    assert s.steps_per_epoch == 2
    for epoch in range(3):
        imgs, caps = zip(*(s.batch(epoch * 2 + p) for p in range(2)))
        imgs, caps = torch.cat(imgs), torch.cat(caps)
        assert sorted(imgs.tolist()) == list(range(8))        # every image once per epoch
        assert torch.equal(caption_image[caps], imgs)          # each with one of its captions
    seen = {int(s.batch(e * 2 + p)[1][(s.batch(e * 2 + p)[0] == 5).nonzero()[0]])
            for e in range(12) for p in range(2) if (s.batch(e * 2 + p)[0] == 5).any()}
    assert seen == {8, 9}                                       # both captions of image 5 drawn
    fresh = PairSampler(caption_image, 8, 4, seed=3, crop_min_scale=0.5)
    for step in (5, 0, 3):                                      # a pure function of the step
        assert all(torch.equal(a, b) for a, b in zip(fresh.batch(step), s.batch(step)))
        assert torch.equal(fresh.crops(step), s.crops(step))
    theta = s.crops(1)
    w, h = theta[:, 0, 0], theta[:, 1, 1]
    assert bool(((w * h >= 0.5 - 1e-6) | (w == 1) | (h == 1)).all()) and bool((w <= 1).all())
    assert bool((theta[:, 0, 2].abs() <= 1 - w + 1e-6).all())  # the box stays in the image
    assert PairSampler(caption_image, 8, 4, seed=3, crop_min_scale=1.0).crops(0) is None


def test_siglip_loss_option(tmp_path, data):
    out = tmp_path / "siglip"
    run(_args(tmp_path, data, out, "--loss", "siglip", steps=2, linear_probe=False))
    train = _records(out)
    assert all("logit_bias" in r for r in train) and train[0]["logit_scale"] != 0
    ev = json.loads((out / "eval.json").read_text())
    assert 0 <= ev["trained"]["i2t_r1"] <= 1 and ev["meta"]["model_format"] == "tilecontrast"
    mon = _records(out, "monitor")
    assert mon[0]["logit_scale"] == pytest.approx(10.0, rel=1e-5)      # SigLIP's init t = 10


# ---- two processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_inputs(config, data_dir):
    """The global batch of step 0 (pixels, ids, mask) and the model at its initial weights."""
    from modalities.multimodal.data import load_pairs
    from modalities.text.tokenizer import load_tokenizer, tokenize
    from recipes.clip_pairs import build_model, pixels

    train = load_pairs(data_dir, image_size=config.image_size, split="train")["train"]
    tok = load_tokenizer(data_dir / "tokenizer")
    sampler = PairSampler(train.caption_image, len(train.images), config.batch_size, config.seed,
                          1.0)
    img, cap = sampler.batch(0)
    batch = tokenize(tok, [train.captions[i] for i in cap.tolist()], config.max_length)
    x = pixels(train.images[img], config.image_size)
    return build_model(config, len(tok)), x, batch.input_ids, batch.attention_mask


def _ddp_worker(rank: int, world: int, port: int, cfg: str, data_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from recipes.clip_pairs import train_step
    from recipes.clip_setup import build_config
    from recipes.common import distributed as D

    info = D.setup("cpu")
    config = build_config(json.loads(Path(cfg).read_text()), {})
    model, x, ids, mask = _step_inputs(config, Path(data_dir))
    local = config.batch_size // world
    mine = slice(rank * local, (rank + 1) * local)
    # this rank's half, in chunks of 4 pairs (gradient caching) with features gathered
    loss, _, _ = train_step(model, x[mine], ids[mine], mask[mine], 4,
                            process_group=torch.distributed.group.WORLD)
    D.all_reduce_gradients(model, info)
    loss = D.all_reduce_mean(loss, info)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss, "grads": grads}, Path(out) / f"step_rank{rank}.pt")
    # and the whole recipe under two processes (it finds the process group initialised)
    result = run(["--config", cfg, "--data", data_dir, *_tokenizer_args(Path(data_dir)),
                  "--zeroshot",
                  str(Path(data_dir) / "zeroshot"), "--out", str(Path(out) / "run"), "--quiet",
                  "--device", "cpu"])
    params = {k: v.detach() for k, v in result["model"].named_parameters()}
    torch.save(params, Path(out) / f"rank{rank}.pt")


def test_two_process_gloo_equals_one_process(tmp_path, data):
    """Each rank embeds 8 of the 16 pairs; the loss gathers the features through the process
    group and the gradients are averaged: the first step's loss and every gradient equal one
    process's on the 16 pairs. Both embed in chunks of 4 pairs (gradient caching), so the
    small CNN's BatchNorm sees the same rows in both."""
    from recipes.clip_pairs import train_step
    from recipes.clip_setup import build_config

    cfg = _config(tmp_path, steps=2, linear_probe=False)
    out = tmp_path / "ddp"
    out.mkdir()
    ctx = mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(data), str(out)), nprocs=2,
                   join=False)
    config = build_config(json.loads(Path(cfg).read_text()), {})
    model, x, ids, mask = _step_inputs(config, data)
    loss, _, _ = train_step(model, x, ids, mask, 4)
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two-process run hung")
    for rank in (0, 1):
        got = torch.load(out / f"step_rank{rank}.pt")
        torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6)
        want = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        assert set(got["grads"]) == set(want) and len(want) > 10
        for k in want:
            # summation order differs (two half-batch sums averaged against one sum): fp32
            # rounding relative to the tensor's scale
            err = (got["grads"][k] - want[k]).abs().max().item()
            scale = want[k].abs().max().item()
            assert err <= 2e-5 * scale + 1e-9, (k, err, scale)
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ev = json.loads((out / "run" / "eval.json").read_text())
    assert 0.0 <= ev["trained"]["i2t_r1"] <= 1.0
    assert [r["step"] for r in _records(out / "run")] == [1, 2]
