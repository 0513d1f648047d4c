"""recipes.bench_cpc: runs, prints a table, writes JSON (tiny sizes)."""
import json

from recipes.bench_cpc import main


def test_bench_cpc_train_tiny(tmp_path, capsys):
    assert main(["--device", "cpu", "--models", "cpu-quick", "--modes", "train",
                 "--batch-size", "2", "--window", "3200", "--repeats", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_cpc.json").read_text())
    assert [(r["preset"], r["mode"]) for r in rows] == [("cpu-quick", "train")]
    assert rows[0]["windows_per_second"] > 0 and rows[0]["peak_rss_mb"] > 0
    assert "windows/s" in capsys.readouterr().out


def test_bench_cpc_loader_and_cpc_audio_training_tiny(tmp_path, capsys):
    assert main(["--device", "cpu", "--preset", "cpc_audio", "--batch-size", "2",
                 "--window", "3200", "--repeats", "1", "--warmup", "0", "--utterances", "4",
                 "--speakers", "2", "--batches", "3", "--max-audio-memory-mb", "0",
                 "--out", str(tmp_path)]) == 0
    rows = {r["mode"]: r for r in json.loads((tmp_path / "bench_cpc.json").read_text())}
    assert rows["loader"]["utterances"] == 4 and rows["loader"]["audio_in_memory"] is False
    assert rows["train"]["n_negatives"] == 128 and rows["train"]["windows_per_second"] > 0
    table = (tmp_path / "bench_cpc.md").read_text()
    assert "disk (pread)" in table and "loader / train" in table


def test_bench_cpc_rejects_unknown_preset_and_bad_values(tmp_path, capsys):
    assert main(["--models", "huge", "--out", str(tmp_path)]) == 2
    assert "--preset 'huge'" in capsys.readouterr().err
    assert main(["--modes", "loader,fast", "--out", str(tmp_path)]) == 2
    assert "--modes 'fast'" in capsys.readouterr().err
    assert main(["--batches", "0", "--out", str(tmp_path)]) == 2
    assert "--batches 0: expected a positive integer" in capsys.readouterr().err
