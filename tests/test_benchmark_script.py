"""The benchmark script runs (smallest order) and writes its table, CSV and JSON."""

import csv
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_mha.py"


def test_quick_run_writes_results(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--orders", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "cpu.json").read_text())
    methods = {r["method"]: r for r in data["rows"]}
    assert {"direct", "term floor", "nn.MultiheadAttention", "U fast", "U dense", "drop-in"} <= set(methods)
    assert methods["U fast"]["ratio_floor"] > 0
    assert methods["U fast"]["max_err"] < 1e-5 and methods["drop-in"]["max_err"] < 1e-5
    assert methods["U fast"]["time_s"] > 0 and methods["U fast"]["L"] > 0
    with open(tmp_path / "cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert "| 2 | U fast |" in (tmp_path / "cpu.md").read_text()
    assert data["meta"]["torch"]
