"""End to end: python -m recipes.cpc_speech on a tiny generated corpus; every output file,
resume equality, bad-file skip vs --strict, --help, and 2-process gloo DDP runs (speaker and
global negatives) that end with the same parameters on both ranks."""
import json
import math
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp

from recipes.common.checkpoint import load_checkpoint
from recipes.cpc_speech import main, run

TINY = {
    "corpus_speakers": 3, "corpus_utterances": 5, "corpus_seconds": [0.6, 1.0],
    "window": 3200, "batch_size": 4, "speakers_per_batch": 2, "lr": 1e-3, "warmup_steps": 2,
    "log_every": 1, "checkpoint_every": 2, "threads": 1,
    "model": {"encoder_channels": 16, "context_dim": 16, "prediction_steps": 3},
    "probe": {"iterations": 20},
}


def _config(tmp_path, **extra):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, **extra}))
    return str(path)


def _losses(out):
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]  # training lines (not validation ones)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--manifest", "--out", "--steps", "--batch-size", "--window",
                 "--device", "--resume", "--config", "--probe", "--strict", "--seed",
                 "--alignments", "--negatives"):
        assert flag in text
    assert "Without torchrun (one process) 'global' is 'batch'" in " ".join(text.split())


def test_end_to_end_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    result = run(["--config", _config(tmp_path), "--out", str(out), "--steps", "3", "--quiet",
                  "--probe", "gender", "--device", "cpu"])
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "probes.json",
                 "training.png", "probes.png", "summary.json", "corpus/manifest.csv",
                 "validation.png", "audio_store/store.json", "audio_store/audio.i16"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["window"] == 3200 and config["preset"] == "cpu-quick"
    probes = json.loads((out / "probes.json").read_text())
    assert set(probes) == {"cpc", "mfcc", "random_init", "skipped"} and probes["skipped"] == {}
    for kind in ("cpc", "mfcc", "random_init"):
        assert set(probes[kind]) == {"phone", "speaker", "gender"}
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in probes[kind].values())
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert len(records[-1]["step_accuracy"]) == 3
    # held-out windows scored at every checkpoint after the start: loss and accuracy per k
    val = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 3]
    assert all(len(r["val_step_loss"]) == len(r["val_step_accuracy"]) == 3 for r in val)
    assert val[-1]["val_loss"] == pytest.approx(sum(val[-1]["val_step_loss"]) / 3, abs=1e-5)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 3 and ck["config"]["model"]["encoder_channels"] == 16
    text = capsys.readouterr().out
    assert "linear probe accuracy" in text and "random_init" in text
    assert result["summary"]["skipped_files"] == 0


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    cfg = _config(tmp_path)
    corpus_out = tmp_path / "full"
    run(["--config", cfg, "--out", str(corpus_out), "--steps", "4", "--quiet", "--no-probes"])
    full = _losses(corpus_out)
    part = tmp_path / "part"
    run(["--config", cfg, "--out", str(part), "--steps", "2", "--quiet", "--no-probes"])
    run(["--config", cfg, "--out", str(part), "--steps", "4", "--quiet", "--no-probes",
         "--resume"])
    assert _losses(part) == full  # exactly equal on CPU


def _bad_manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["path,speaker,split"]
    for i in range(6):
        sf.write(tmp_path / f"ok{i}.wav", (0.1 * rng.standard_normal(4800)).astype("float32"),
                 16000)
        rows.append(f"ok{i}.wav,s{i % 2},{'test' if i >= 4 else 'train'}")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype="float32"), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF garbage")
    rows += ["empty.wav,s0,train", "broken.wav,s1,train"]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "manifest.csv")


def test_bad_files_skipped_and_counted_or_strict_error(tmp_path, capsys):
    manifest = _bad_manifest(tmp_path)
    args = ["--config", _config(tmp_path), "--manifest", manifest, "--steps", "1", "--quiet"]
    with pytest.warns(UserWarning, match="skipping"):
        result = run(args + ["--out", str(tmp_path / "a")])
    assert result["summary"]["skipped_files"] == 2
    assert "skipped 2 unreadable or empty audio files" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "b"), "--strict"]) == 2
    assert "--strict" in capsys.readouterr().err


def test_bad_flag_value_is_named(tmp_path, capsys):
    assert main(["--config", _config(tmp_path), "--window", "1000", "--out",
                 str(tmp_path / "x")]) == 2
    assert "window=1000" in capsys.readouterr().err


def test_bad_negatives_in_config_named_before_any_work(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["--config", _config(tmp_path, negatives="everywhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "negatives='everywhere'" in err and "'global'" in err
    assert not out.exists()


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open while picking)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _spawn(fn, args, nprocs: int, seconds: float) -> None:
    """mp.spawn, but a hung process group fails the test after ``seconds`` instead of waiting
    for the collectives' 30-minute timeout."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the {nprocs} gloo processes did not finish within {seconds:.0f} s (a hang)")


def _ddp_worker(rank, world, runs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    # one process start for every run; each run() sets its process group up and tears it down,
    # on a port of its own (a new group on the previous run's port can hang in gloo's
    # rendezvous)
    for port, argv in runs:
        os.environ["MASTER_PORT"] = str(port)
        result = run(argv)
        torch.save({"world_size": result["summary"]["world_size"],
                    "model": result["model"].state_dict()},
                   Path(argv[argv.index("--out") + 1]) / f"rank{rank}.pt")


def test_two_process_gloo_ddp(tmp_path):
    """Two gloo processes train 2 steps with each process's own (speaker) negatives, then with
    --negatives global; both ranks end every run with exactly the same parameters."""
    runs = {negatives: ["--config", _config(tmp_path), "--out", str(tmp_path / negatives),
                        "--steps", "2", "--quiet", "--no-probes", "--device", "cpu",
                        "--negatives", negatives]
            for negatives in ("speaker", "global")}
    _spawn(_ddp_worker, (2, list(zip(_free_ports(len(runs)), runs.values()))), nprocs=2, seconds=240)
    for negatives in runs:
        out = tmp_path / negatives
        ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        assert ranks[0]["model"].keys() == ranks[1]["model"].keys()
        for name, value in ranks[0]["model"].items():
            assert torch.equal(value, ranks[1]["model"][name]), f"{negatives}: {name} differs between ranks"
        ck = load_checkpoint(out / "checkpoint.pt")
        assert ck["step"] == 2 and ck["config"]["negatives"] == negatives
        for name, value in ck["model"].items():  # and the checkpoint holds them
            assert torch.equal(value, ranks[0]["model"][name]), name
        losses = _losses(out)
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


# ---- runs that cannot be lost (issue 9)

def test_existing_out_refused_without_resume_or_overwrite(tmp_path, capsys):
    cfg, out = _config(tmp_path), tmp_path / "run"
    base = ["--config", cfg, "--out", str(out), "--steps", "2", "--quiet", "--no-probes"]
    run(base)
    before = (out / "metrics.jsonl").read_text()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(out) in err
    assert (out / "metrics.jsonl").read_text() == before  # the earlier run is untouched
    run(base[:-3] + ["3", "--quiet", "--no-probes", "--overwrite"])
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3]


def test_resume_with_a_changed_config_names_the_fields(tmp_path, capsys):
    cfg, out = _config(tmp_path), tmp_path / "run"
    base = ["--config", cfg, "--out", str(out), "--quiet", "--no-probes"]
    run(base + ["--steps", "2"])
    assert main(base + ["--steps", "3", "--resume", "--lr", "0.0005", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.001 in the checkpoint, 0.0005 now" in err and "seed: 0" in err
    assert "--override-config" in err and "steps" not in err  # steps may change on resume
    assert len(_losses(out)) == 2
    run(base + ["--steps", "3", "--resume", "--lr", "0.0005", "--override-config"])
    assert len(_losses(out)) == 3


def test_progress_is_plain_lines_off_a_terminal(tmp_path, capsys):
    out = tmp_path / "run"
    run(["--config", _config(tmp_path, log_every=2), "--out", str(out), "--steps", "4",
         "--device", "cpu"])
    text = capsys.readouterr()
    assert "\r" not in text.out and "\r" not in text.err and "it/s" not in text.err
    lines = text.out.splitlines()
    training = [l for l in lines if re.match(r"training: \d+/\d+", l)]
    assert [l.split()[1] for l in training] == ["2/4", "4/4"]  # one per logging interval
    assert "loss=" in training[0]
    assert any(l.startswith("probe features (train): ") for l in lines)
    assert any(l.startswith("probe features (held out): ") for l in lines)
    log = (out / "train.log").read_text()
    assert "training: 4/4" in log and "\r" not in log


def test_quiet_shows_no_progress(tmp_path, capsys):
    run(["--config", _config(tmp_path), "--out", str(tmp_path / "run"), "--steps", "2",
         "--quiet", "--device", "cpu"])
    out = capsys.readouterr().out
    assert not re.search(r"^training: \d+/", out, re.M) and "probe features" not in out
    assert "linear probe accuracy" in out


def _digit_manifest(tmp_path):
    rng = np.random.default_rng(1)
    rows = ["path,speaker,digit,split"]
    for i in range(12):
        name = f"u{i}.wav"
        sf.write(tmp_path / name, (0.1 * rng.standard_normal(8000)).astype("float32"), 16000)
        rows.append(f"{name},s{i % 3},{['one', 'two'][i % 2]},{'test' if i >= 8 else 'train'}")
    (tmp_path / "digits.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "digits.csv")


def test_probe_speaker_and_a_manifest_label(tmp_path):
    out = tmp_path / "run"
    run(["--config", _config(tmp_path), "--manifest", _digit_manifest(tmp_path), "--out",
         str(out), "--steps", "2", "--quiet", "--device", "cpu", "--probe", "speaker,digit"])
    probes = json.loads((out / "probes.json").read_text())
    for kind in ("cpc", "mfcc", "random_init"):
        assert set(probes[kind]) == {"speaker", "digit"}


def test_unknown_probe_label_refused_before_any_audio_is_decoded(tmp_path, capsys, monkeypatch):
    import recipes.cpc_speech as recipe

    def no_decoding(*args, **kwargs):
        raise AssertionError("audio decoded before the --probe labels were checked")

    monkeypatch.setattr(recipe, "prepare_store", no_decoding)
    out = tmp_path / "run"
    assert main(["--config", _config(tmp_path), "--manifest", _digit_manifest(tmp_path),
                 "--out", str(out), "--steps", "2", "--quiet",
                 "--probe", "speaker,colour,phone"]) == 2
    err = capsys.readouterr().err
    # phone needs an alignment file, which this manifest run has not
    assert "['colour', 'phone']" in err and "['digit', 'speaker', 'split']" not in err
    assert "'digit'" in err and "'speaker'" in err
    assert not (out / "metrics.jsonl").exists()


def test_split_files_decide_the_split_and_a_speaker_disjoint_probe_is_skipped(tmp_path, capsys):
    # the paper's protocol: train on the ids of one file, hold out those of the other; here the
    # held-out speaker s2 never occurs in training, so the speaker probe cannot be fitted
    manifest = _digit_manifest(tmp_path)  # u0..u11, speaker s{i % 3}
    (tmp_path / "train.txt").write_text("".join(f"u{i}\n" for i in range(12) if i % 3 != 2))
    (tmp_path / "test.txt").write_text("u2\nu5\nu8\nu404\n")  # u11 in neither; u404 unknown
    out = tmp_path / "run"
    result = run(["--config", _config(tmp_path), "--manifest", manifest, "--out", str(out),
                  "--steps", "2", "--quiet", "--device", "cpu", "--probe", "digit",
                  "--train-split", str(tmp_path / "train.txt"),
                  "--test-split", str(tmp_path / "test.txt")])
    summary = result["summary"]
    assert (summary["train_utterances"], summary["held_out_utterances"]) == (8, 3)
    assert "1 listed ids not in the data" in summary["split"]
    assert "1 utterances in neither list left out" in summary["split"]
    probes = json.loads((out / "probes.json").read_text())
    assert "speaker-disjoint" in probes["skipped"]["speaker"]
    for kind in ("cpc", "mfcc", "random_init"):
        assert set(probes[kind]) == {"digit"}  # no 0.0 % speaker row
    assert "probe 'speaker' skipped" in capsys.readouterr().out


def test_split_file_errors_are_named_before_any_work(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("u1\n")
    base = ["--config", _config(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]
    assert main(base + ["--train-split", str(tmp_path / "train.txt")]) == 2
    assert "expected both split files or neither" in capsys.readouterr().err
    assert main(base + ["--train-split", str(tmp_path / "train.txt"),
                        "--test-split", str(tmp_path / "nope.txt")]) == 2
    assert "test_split=" in capsys.readouterr().err and not (tmp_path / "run").exists()
    (tmp_path / "test.txt").write_text("u1\n")
    assert main(base + ["--manifest", _digit_manifest(tmp_path),
                        "--train-split", str(tmp_path / "train.txt"),
                        "--test-split", str(tmp_path / "test.txt")]) == 2
    assert "ids are in both" in capsys.readouterr().err


def test_sampled_negatives_resume_exactly_and_export_cpc_audio(tmp_path):
    from cpc.export import load_cpc_audio

    cfg = _config(tmp_path, n_negatives=5, similarity="mean", step_reduction="sum",
                  negatives="speaker")
    full = tmp_path / "full"
    run(["--config", cfg, "--out", str(full), "--steps", "4", "--quiet", "--no-probes",
         "--export", "cpc_audio"])
    part = tmp_path / "part"
    run(["--config", cfg, "--out", str(part), "--steps", "2", "--quiet", "--no-probes"])
    run(["--config", cfg, "--out", str(part), "--steps", "4", "--quiet", "--no-probes",
         "--resume"])
    assert _losses(part) == _losses(full)  # the negatives of step s depend on (seed, s, rank)
    state = torch.load(full / "cpc_audio.pt", weights_only=False)
    assert state["config"]["negativeSamplingExt"] == 5
    assert state["config"]["samplingType"] == "samespeaker"
    assert state["config"]["tilecontrast"]["step_reduction"] == "sum"
    assert state["config"]["batchSizeGPU"] == 4 and state["config"]["nGPU"] == 1
    model = load_cpc_audio(full / "cpc_audio.pt")
    trained = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


def test_store_reused_by_a_second_run_and_refused_for_other_files(tmp_path, capsys):
    cfg = _config(tmp_path)
    store = tmp_path / "store"
    manifest = _digit_manifest(tmp_path)
    first = run(["--config", cfg, "--manifest", manifest, "--store", str(store),
                 "--out", str(tmp_path / "a"), "--steps", "1", "--quiet", "--no-probes"])
    second = run(["--config", cfg, "--manifest", manifest, "--store", str(store),
                  "--out", str(tmp_path / "b"), "--steps", "1", "--quiet", "--no-probes",
                  "--max-audio-memory-mb", "0"])
    assert first["summary"]["store"]["audio_in_memory"] is True
    assert second["summary"]["store"]["audio_in_memory"] is False  # every window by pread
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # RAM or pread: same batches
    assert main(["--config", cfg, "--store", str(store), "--out", str(tmp_path / "c"),
                 "--steps", "1", "--quiet", "--no-probes"]) == 2  # the generated corpus
    assert str(store) in capsys.readouterr().err


def test_probe_frames_caps_the_phone_probe(tmp_path, capsys):
    out = tmp_path / "run"
    result = run(["--config", _config(tmp_path), "--out", str(out), "--steps", "1", "--quiet",
                  "--probe-frames", "3"])
    phone = json.loads((out / "probes.json").read_text())["cpc"]["phone"]
    n_train, n_test = result["summary"]["train_utterances"], result["summary"]["held_out_utterances"]
    assert (phone["n_train"], phone["n_test"]) == (3 * n_train, 3 * n_test)
    # the same run with every probe feature on disk, read back in chunks: the same probes
    disk = tmp_path / "disk"
    run(["--config", _config(tmp_path), "--out", str(disk), "--steps", "1", "--quiet",
         "--probe-frames", "3", "--max-probe-memory-mb", "0"])
    assert json.loads((disk / "probes.json").read_text()) == \
        json.loads((out / "probes.json").read_text())
    assert "read back a chunk at a time" in (disk / "train.log").read_text()
    assert "read back a chunk at a time" not in (out / "train.log").read_text()
    assert not (disk / "probe_features").exists()
    assert main(["--config", _config(tmp_path), "--out", str(tmp_path / "bad"), "--steps", "1",
                 "--quiet", "--max-probe-memory-mb", "-1"]) == 2
    assert "max_probe_memory_mb=-1: expected a non-negative integer" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_probe_alignments_int16_for_the_probe_utterances_only(tmp_path):
    from recipes.cpc_speech import _probe_alignments

    path = tmp_path / "phones.txt"
    path.write_text("u1 0 0 3\nu2 4 4\nu3 1\n")
    ali = _probe_alignments(path, ["u1", "u3"])
    assert list(ali) == ["u1", "u3"] and ali["u1"].dtype == torch.int16
    assert ali["u1"].tolist() == [0, 0, 3]
    path.write_text("u1 0 0 3\nu2 4 4\nu3 70000\n")  # a label past int16: read as int64
    ali = _probe_alignments(path, ["u1", "u3"])
    assert ali["u3"].dtype == torch.int64 and ali["u3"].tolist() == [70000]
    assert _probe_alignments(None, ["u1"]) is None
    assert _probe_alignments(tmp_path / "absent.txt", ["u1"]) is None
