"""Every benchmark runs in its quick mode and leaves the checkout as it was: results go to
benchmarks/results/local (not committed) or --out, and benchmarks/results only with --write-results
on a full run. The runs go side by side (one process each); a benchmark whose extra is not
installed is skipped."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def git_status() -> str:
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip("not a git checkout")
    return done.stdout


def quick_runs(tmp_path) -> dict:
    runs = {"compare_mha": ["--device", "cpu", "--quick", "--orders", "2", "--out", str(tmp_path)],
            "scale": ["--cases", "dropin-64x8-n16", "--repeats", "1", "--threads", "1"],
            "universal": ["--quick"]}
    if importlib.util.find_spec("transformers") is not None:
        runs.update({"real_model": ["--tiny"], "hf_minilm": ["--tiny"], "decoder": ["--quick"]})
    if importlib.util.find_spec("tracr") is not None:
        runs["rasp"] = ["--quick", "--programs", "length", "--repeats", "1"]
    if not torch.cuda.is_available():  # without CUDA, gpu.py says so and writes nothing
        runs["gpu"] = []
    return runs


def test_quick_runs_leave_the_checkout_unchanged(tmp_path):
    before = git_status()
    runs = quick_runs(tmp_path)
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common"}
    needs_hf = {"real_model", "hf_minilm", "decoder"} if importlib.util.find_spec("transformers") is None else set()
    needs_hf |= {"rasp"} if importlib.util.find_spec("tracr") is None else set()  # the [tracr] extra
    assert scripts - needs_hf - {"gpu"} <= set(runs), f"a benchmark without a quick run here: {scripts - set(runs)}"
    procs = {name: subprocess.Popen([sys.executable, str(BENCH / f"{name}.py"), *args], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for name, args in runs.items()}
    outputs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    codes = {name: p.returncode for name, p in procs.items()}
    assert git_status() == before, outputs
    for name in runs:
        if name == "gpu":
            assert codes[name] == 1 and "needs a CUDA device" in outputs[name], outputs[name]
        else:
            assert codes[name] == 0, outputs[name][-3000:]
    for name in set(runs) - {"compare_mha", "gpu", "universal", "rasp"}:
        assert "results go to" in outputs[name] and "benchmarks/results/local" in outputs[name], outputs[name]
    # compare_mha's files in --out
    data = json.loads((tmp_path / "cpu.json").read_text())
    methods = {r["method"]: r for r in data["rows"]}
    assert {"direct", "term floor", "nn.MultiheadAttention", "U fast", "U dense", "drop-in"} <= set(methods)
    assert methods["U fast"]["ratio_floor"] > 0
    assert methods["U fast"]["max_err"] < 1e-5 and methods["drop-in"]["max_err"] < 1e-5
    assert methods["U fast"]["time_s"] > 0 and methods["U fast"]["L"] > 0
    with open(tmp_path / "cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert "| 2 | U fast |" in (tmp_path / "cpu.md").read_text()
    assert "not fitted (1 orders measured" in (tmp_path / "cpu.md").read_text()  # no exponent from one point
    assert data["meta"]["torch"]


@pytest.mark.parametrize("script,args", [("compare_mha", ["--quick"]), ("scale", ["--cases", "u-n32-d8"]),
                                         ("real_model", ["--tiny"]), ("hf_minilm", ["--tiny"]),
                                         ("decoder", ["--quick"])])
def test_write_results_only_for_a_full_run(script, args):
    """--write-results on a quick, tiny or partial run is refused before anything runs."""
    done = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args, "--write-results"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "only a full run" in done.stderr, done.stderr


def test_compare_mha_fits_no_exponent_to_two_points_and_flags_a_falling_torch_time(monkeypatch):
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        common = importlib.import_module("common")
        for key, value in common.ALLOCATOR.items():  # as set: importing compare_mha does not restart the process
            monkeypatch.setenv(key, value)
        compare = importlib.import_module("compare_mha")
    finally:
        sys.path.remove(str(BENCH))
    rows = [{"order": o, "method": m, "time_s": t} for o, m, t in
            [(4, "U fast", 1.0), (8, "U fast", 2.0), (4, "direct", 0.09), (8, "direct", 0.05), (16, "direct", 0.2)]]
    two = [r for r in rows if r["method"] == "U fast"]
    meta = {"growth_exponent_U_fast": compare.growth(two, "U fast")}
    assert meta["growth_exponent_U_fast"] is None
    assert "not fitted (2 orders measured" in compare.growth_text(meta, two)
    three = two + [{"order": 16, "method": "U fast", "time_s": 4.0}]
    assert compare.growth(three, "U fast") == pytest.approx(1.0)
    notes = compare.implausible(rows)
    assert len(notes) == 1 and notes[0].startswith("direct at order 8") and "implausible" in notes[0]
