"""What the benchmark scripts share (run as ``python benchmarks/NAME.py``, so this folder is on sys.path)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The memory allocator settings every benchmark runs under (set to anything in the environment to
# choose otherwise): huge pages for PyTorch's large CPU allocations, and glibc's malloc keeping large
# freed blocks for the next call instead of returning them to the system (its default returns every
# block over 32 MB, so each call of a large stage, the term floor's too, page-faults its temporaries
# in again). Both are read when the process starts.
ALLOCATOR = {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
             "MALLOC_TRIM_THRESHOLD_": str(1 << 33)}


def use_allocator_settings() -> dict:
    """Re-execute this script once with ``ALLOCATOR`` in its environment (before torch is imported);
    returns the settings in force, for the results file."""
    missing = {k: v for k, v in ALLOCATOR.items() if k not in os.environ}
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})
    return {k: os.environ[k] for k in ALLOCATOR}


def allocator_text(settings: dict | None) -> str:
    """How a results file names the allocator settings it ran under."""
    if not settings:
        return "allocator settings not recorded"
    keeps = settings.get("MALLOC_MMAP_THRESHOLD_") == ALLOCATOR["MALLOC_MMAP_THRESHOLD_"]
    return (f"THP_MEM_ALLOC_ENABLE={settings.get('THP_MEM_ALLOC_ENABLE')}, "
            f"malloc {'keeps large blocks' if keeps else 'MMAP_THRESHOLD=' + str(settings.get('MALLOC_MMAP_THRESHOLD_'))}")


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
