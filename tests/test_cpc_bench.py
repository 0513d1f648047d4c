"""recipes.bench_cpc: runs, prints a table, writes JSON (tiny sizes)."""
import json

from recipes.bench_cpc import main


def test_bench_cpc_tiny(tmp_path, capsys):
    assert main(["--device", "cpu", "--models", "cpu-quick", "--batch-size", "2",
                 "--window", "3200", "--repeats", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_cpc.json").read_text())
    assert rows[0]["model"] == "cpu-quick" and rows[0]["windows_per_second"] > 0
    assert "windows/s" in capsys.readouterr().out


def test_bench_cpc_rejects_unknown_model(tmp_path, capsys):
    assert main(["--models", "huge", "--out", str(tmp_path)]) == 2
    assert "--models 'huge'" in capsys.readouterr().err
