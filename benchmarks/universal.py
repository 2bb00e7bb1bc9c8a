"""Benchmark: what a new size costs the one universal U (planning a new call shape).

    python benchmarks/universal.py                    # E = 384, 12 heads: plan 8 new lengths
    python benchmarks/universal.py --quick            # E = 32, 2 heads, 3 lengths (seconds)
    python benchmarks/universal.py --write-results    # also write benchmarks/results/universal.{json,md}

The drop-in (``SimulatedMultiheadAttention``) holds the one universal factored U; every new
sequence length gets its layout, frame and structured program once (``drop_in.plan(length)``),
with no new encoder. Reported per length: the wall and CPU seconds of planning it, then of its
first and a warm call (batch 1, float32); and the number of encoders alive (always one per form).
Results are written only with --write-results (never by a quick run).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

from common import allocator_text, use_allocator_settings

ALLOCATOR = use_allocator_settings()

import torch  # noqa: E402  (after the allocator settings)

import usim  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(embed_dim: int, heads: int, lengths: list[int]) -> dict:
    sim = usim.SimulatedMultiheadAttention(embed_dim, heads, batch_first=True).eval()
    rows = []
    with torch.inference_mode():
        for length in lengths:
            x = torch.randn(1, length, embed_dim)
            plan_wall, plan_cpu = timed(lambda: sim.plan(length))
            first, _ = timed(lambda: sim(x, x, x, need_weights=False))
            warm = statistics.median(timed(lambda: sim(x, x, x, need_weights=False))[0] for _ in range(3))
            rows.append({"length": length, "plan_s": plan_wall, "plan_cpu_s": plan_cpu, "first_call_s": first,
                         "warm_call_s": warm})
    gc.collect()
    encoders = sum(isinstance(o, usim.Encoder) for o in gc.get_objects())
    return {"embed_dim": embed_dim, "heads": heads, "rows": rows, "encoders_alive": encoders,
            "frames": len(sim.simulator.frames)}


def markdown(r: dict) -> str:
    lines = [f"{r['date']}, {r['machine']}, load average {r['load_avg_1min']:.1f}, {allocator_text(r['allocator'])}, "
             f"torch {r['torch']}, {r['threads']} threads, float32, batch 1", "",
             f"SimulatedMultiheadAttention(embed_dim={r['embed_dim']}, num_heads={r['heads']}): each new length planned "
             f"on the one universal U ({r['encoders_alive']} encoder alive, {r['frames']} call shapes planned)", "",
             "| tokens | plan (s) | plan, CPU (s) | first call after planning (s) | warm call (s) |", "|---|---|---|---|---|"]
    lines += [f"| {row['length']} | {row['plan_s']:.3f} | {row['plan_cpu_s']:.3f} | {row['first_call_s']:.3f} | "
              f"{row['warm_call_s']:.3f} |" for row in r["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python benchmarks/universal.py --quick")
    parser.add_argument("--quick", action="store_true", help="E = 32, 2 heads, 3 lengths")
    parser.add_argument("--write-results", action="store_true",
                        help="write benchmarks/results/universal.{json,md} (a full run only)")
    args = parser.parse_args()
    if args.quick and args.write_results:
        parser.error("a quick run never writes results: drop --quick or --write-results")
    embed_dim, heads, lengths = (32, 2, [5, 6, 9]) if args.quick else (384, 12, [64, 65, 100, 127, 128, 129, 200, 256])
    torch.manual_seed(0)
    result = run(embed_dim, heads, lengths)
    result.update(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} ({os.cpu_count()} cores)",
                  load_avg_1min=os.getloadavg()[0], allocator=ALLOCATOR, torch=torch.__version__,
                  threads=torch.get_num_threads())
    text = markdown(result)
    print(text)
    if args.write_results:
        folder = Path(__file__).resolve().parent / "results"
        (folder / "universal.json").write_text(json.dumps(result, indent=1) + "\n")
        (folder / "universal.md").write_text(text)
        print(f"wrote {folder / 'universal.md'}")


if __name__ == "__main__":
    main()
