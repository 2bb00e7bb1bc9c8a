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


RESULTS = Path(__file__).resolve().parent / "results"  # the committed results
LOCAL = RESULTS / "local"  # a run's results unless asked otherwise (not committed: .gitignore)


def add_results_options(parser, full_run: str) -> None:
    """--out and --write-results, the same in every benchmark; full_run says what a full run is."""
    parser.add_argument("--out", help=f"results folder (default: {LOCAL.relative_to(RESULTS.parents[1])}, "
                                      "not committed)")
    parser.add_argument("--write-results", action="store_true",
                        help=f"write to benchmarks/results, replacing the committed results (a full run only: "
                             f"{full_run})")


def results_folder(args, full: bool) -> Path:
    """Where the results go: --out if given; benchmarks/results only with --write-results and a full
    run (SystemExit otherwise, before anything runs); else benchmarks/results/local, so no run
    replaces the committed results unless asked to."""
    if args.write_results:
        if args.out is not None:
            raise SystemExit("--write-results writes benchmarks/results: give it or --out, not both")
        if not full:
            raise SystemExit("--write-results replaces the committed results, so only a full run may "
                             "(this one is quick, tiny or partial): drop it, or --out DIR")
        return RESULTS
    if args.out is not None:
        return Path(args.out)
    print(f"results go to {LOCAL} (--write-results to replace the committed benchmarks/results, "
          "--out DIR to choose)", flush=True)
    return LOCAL
