"""recipes.common: run folders are never clobbered silently; config files and differences;
progress is plain lines off a terminal; the --resume loader, the divergence stop, the learning
rate schedule, the setting checks and the command line's exit status."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.common.config import config_differences, read_config_file
from recipes.common.logging import RunLog
from recipes.common.rundir import prepare_run_dir


def test_new_and_empty_folders_are_used(tmp_path):
    assert prepare_run_dir(tmp_path / "a" / "b", resume=False, overwrite=False).is_dir()
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty", resume=False, overwrite=False).is_dir()


def test_existing_run_refused_without_flags_and_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(ValueError, match=r"--out=.*run.*--resume.*--overwrite"):
        prepare_run_dir(run, resume=False, overwrite=False)
    assert (run / "metrics.jsonl").read_text() == "precious\n"


def test_overwrite_replaces_a_run_but_not_a_foreign_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "old.txt").write_text("x")
    prepare_run_dir(run, resume=False, overwrite=True)
    assert run.is_dir() and list(run.iterdir()) == []
    foreign = tmp_path / "src"
    foreign.mkdir()
    (foreign / "code.py").write_text("x")
    with pytest.raises(ValueError, match="does not look like a run folder"):
        prepare_run_dir(foreign, resume=False, overwrite=True)
    assert (foreign / "code.py").exists()


def test_resume_needs_a_checkpoint_and_excludes_overwrite(tmp_path):
    with pytest.raises(ValueError, match="--resume.*no checkpoint.pt"):
        prepare_run_dir(tmp_path, resume=True, overwrite=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert prepare_run_dir(tmp_path, resume=True, overwrite=False) == tmp_path
    with pytest.raises(ValueError, match="at most one"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        prepare_run_dir(f, resume=False, overwrite=False)


def test_config_file_and_differences(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"a": 1, "m": {"x": [1, 2]}}))
    assert read_config_file(p) == {"a": 1, "m": {"x": [1, 2]}}
    (tmp_path / "c.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        read_config_file(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="no such file"):
        read_config_file(tmp_path / "missing.yaml")
    saved = {"a": 1, "steps": 10, "m": {"x": [1, 2], "y": "s"}}
    now = {"a": 2, "steps": 20, "m": {"x": (1, 2), "y": "t"}}
    assert config_differences(saved, now, ignore=["steps"]) == [("a", 1, 2), ("m.y", "s", "t")]


def test_progress_off_a_terminal_writes_plain_lines(tmp_path, capsys):
    log = RunLog(tmp_path / "train.log")
    bar = log.progress(10, "training", every=5)
    for i in range(10):
        bar.update(1, loss=1.0 / (i + 1))
    bar.close()
    out = capsys.readouterr().out
    assert "\r" not in out
    assert out.splitlines() == ["training: 5/10 loss=0.2", "training: 10/10 loss=0.1"]
    assert (tmp_path / "train.log").read_text().splitlines() == out.splitlines()
    quiet = RunLog(tmp_path / "q.log", quiet=True)
    quiet.progress(4, "x", every=1).update(4)
    assert capsys.readouterr().out == ""


def test_load_resume_names_every_changed_setting(tmp_path):
    from recipes.common.checkpoint import load_resume, save_checkpoint

    save_checkpoint({"step": 3, "config": {"lr": 0.001, "seed": 1, "threads": 2}},
                    tmp_path / "checkpoint.pt")
    path, state = load_resume(tmp_path, "auto", "checkpoint.pt")     # no config: no check
    assert path == tmp_path / "checkpoint.pt" and state["step"] == 3
    now = {"lr": 0.5, "seed": 1, "threads": 1}
    with pytest.raises(ValueError, match=r"lr: 0\.001 in the checkpoint, 0\.5 now\)") as err:
        load_resume(tmp_path, "auto", "checkpoint.pt", config=now, ignore=("threads",))
    assert "threads" not in str(err.value) and "--override-config" in str(err.value)
    _, state = load_resume(tmp_path, str(tmp_path / "checkpoint.pt"), "other.pt", config=now,
                           ignore=("threads",), override=True)
    assert state["step"] == 3
    with pytest.raises(FileNotFoundError, match="other.pt"):
        load_resume(tmp_path, "auto", "other.pt")


def test_stop_if_diverged_saves_the_step_before(tmp_path):
    from recipes.common.checkpoint import stop_if_diverged

    saved: list[int] = []
    stop_if_diverged(0.5, 7, saved.append)
    assert saved == []
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match="at step 7: training diverged"):
            stop_if_diverged(bad, 7, saved.append)
    assert saved == [6, 6]


def test_warmup_cosine_schedule():
    import math

    from recipes.common.schedule import lr_at

    assert lr_at(0, 100, 10, 2.0) == pytest.approx(0.2)          # (s + 1) / warmup
    assert lr_at(9, 100, 10, 2.0) == pytest.approx(2.0)
    assert lr_at(10, 100, 10, 2.0) == pytest.approx(2.0)         # cosine starts at the peak
    assert lr_at(55, 100, 10, 2.0) == pytest.approx(1.0)         # half way: cos(pi/2) = 0
    assert lr_at(100, 100, 10, 2.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(500, 100, 10, 2.0) == pytest.approx(0.0, abs=1e-12)  # past the end: stays 0
    assert lr_at(25, 100, 0, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


@pytest.mark.parametrize("check, value, zero, expected", [
    ("int", 0, False, "x=0: expected a positive integer"),
    ("int", -1, True, "x=-1: expected a non-negative integer"),
    ("int", True, False, "x=True: expected a positive integer"),
    ("int", 1.0, False, "x=1.0: expected a positive integer"),
    ("number", 0.0, False, "x=0.0: expected a positive finite number"),
    ("number", float("nan"), True, "x=nan: expected a non-negative finite number"),
    ("number", "1", False, "x='1': expected a positive finite number"),
])
def test_setting_checks_name_the_value(check, value, zero, expected):
    from recipes.common.config import check_int, check_number

    fn = check_int if check == "int" else check_number
    with pytest.raises(ValueError) as err:
        fn("x", value, zero=zero)
    assert str(err.value) == expected
    fn("x", 0 if zero else 1, zero=zero)            # the boundary passes


def test_cli_main_turns_usage_errors_into_status_2(capsys):
    from recipes.common.cli import cli_main

    def run(argv):
        if argv == ["bad"]:
            raise ValueError("--x=1: expected 2")
        if argv == ["bug"]:
            raise KeyError("k")

    assert cli_main(run, ["ok"]) == 0
    assert cli_main(run, ["bad"]) == 2
    assert capsys.readouterr().err == "error: --x=1: expected 2\n"
    with pytest.raises(KeyError):
        cli_main(run, ["bug"])


# ---- resume when the ranks do not share a filesystem (two gloo processes)


def _open_run_worker(rank: int, port: int, folders: list[str], result: str, changed: bool) -> None:
    import os

    import torch.distributed as dist

    from recipes.common import distributed as D
    from recipes.common.rundir import open_run

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = D.setup("cpu")
    try:
        # the same path on both ranks, different disks: each rank gets its own folder here
        config = {"lr": 0.2 if changed else 0.1, "steps": 9}
        try:
            _, _, state = open_run(folders[rank], info, resume="auto", overwrite=False, quiet=True,
                                   config=config, resumable=("steps",), override_config=False)
            outcome = {"step": state["step"], "weights": state["weights"]}
        except ValueError as err:
            outcome = {"error": str(err)}
        Path(result.format(rank=rank)).write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("changed", [False, True], ids=["same-config", "changed-config"])
def test_resume_broadcasts_rank0_checkpoint_to_ranks_without_it(tmp_path, changed):
    import socket

    import torch.multiprocessing as mp

    from recipes.common.checkpoint import save_checkpoint

    rank0, rank1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    rank0.mkdir(parents=True)
    (rank0 / "config.json").write_text("{}")
    save_checkpoint({"step": 7, "config": {"lr": 0.1, "steps": 5}, "weights": [1.5, -2.0],
                     "rng": None}, rank0 / "checkpoint.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = str(tmp_path / "rank{rank}.json")
    mp.spawn(_open_run_worker, args=(port, [str(rank0), str(rank1)], result, changed), nprocs=2)
    outcomes = [json.loads(Path(result.format(rank=r)).read_text()) for r in range(2)]
    if changed:  # rank 0 refuses the changed lr; rank 1 raises the same error instead of hanging
        assert "lr" in outcomes[0]["error"] and outcomes[0] == outcomes[1]
    else:  # rank 1 never saw the checkpoint file, yet resumes from rank 0's state
        assert not (rank1 / "checkpoint.pt").exists() and rank1.is_dir()
        assert outcomes == [{"step": 7, "weights": [1.5, -2.0]}] * 2
