"""What the benchmark scripts share (run as ``python benchmarks/NAME.py``, so this folder is on sys.path)."""

from __future__ import annotations

from pathlib import Path


def results_folder(out, full: bool) -> Path:
    """Where the results go: --out if given; else benchmarks/results for a full run, and
    benchmarks/results/partial (not committed) for a quick, tiny or partial one, which must not
    replace the committed results."""
    if out is not None:
        return Path(out)
    folder = Path(__file__).resolve().parent / "results"
    if not full:
        folder = folder / "partial"
        print(f"a partial run: results go to {folder} (only a full run replaces benchmarks/results; "
              "--out DIR to choose)", flush=True)
    return folder
