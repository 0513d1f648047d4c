"""recipes.common: run folders are never clobbered silently; config files and differences;
progress is plain lines off a terminal."""
from __future__ import annotations

import json

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
