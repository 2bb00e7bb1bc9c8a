"""Benchmark: the universal simulator U and the drop-in against torch, in time, memory and error.

    python benchmarks/compare_mha.py --device cpu            # orders 4..64, batch 64, float32
    python benchmarks/compare_mha.py --device cuda           # orders 4..64, batch 256 (+ float64)
    python benchmarks/compare_mha.py --device cpu --quick    # a smoke run (orders 2, 4)
    python benchmarks/compare_mha.py --replot benchmarks/results/cpu.json  # redraw cpu.png from its data

For each order n = d, in a fresh subprocess (so that its peak memory is its own):

* U = usim.UniversalSimulator(n, d) with execution "fast", "fused" (and "dense" up to --dense-max):
  build time, first-call time (planning and compiling the program), then the median of --repeats
  timed calls after a warm-up; its max error against a float64 reference;
* the direct computation softmax(x a xᵀ)(x v) and nn.MultiheadAttention(d, 1), timed the same way,
  with their own float32 error against float64;
* the drop-in usim.SimulatedMultiheadAttention.from_torch(mha) (up to --drop-in-max), against mha:
  "drop-in" with its default execution (fused), "drop-in fast" with the bitwise-ordered one;
* the *term floor*: the same attention in plain torch with every product term formed (a broadcast
  multiply of the two operands, the term axis last, then a sum over it; the work U's construction
  does), timed in the same process; every row's "× floor" is its time over it.

Writes <out>/<device>.json, .csv, .md (the table quoted in README) and .png (when matplotlib is
installed); <out> is benchmarks/results/local (not committed) unless --out DIR, or benchmarks/results
with --write-results (a full run only: no --quick, no --orders). Exits 1 when an order failed. Peak memory: CUDA, torch.cuda.max_memory_allocated; CPU, the subprocess's maximum
resident set (ru_maxrss, including the ~0.3 GB of the Python + torch process itself).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import textwrap
import sys
import time
from pathlib import Path

from common import add_results_options, allocator_text, results_folder, use_allocator_settings  # noqa: E402 (benchmarks/ is on sys.path)

ALLOCATOR_SETTINGS = use_allocator_settings()  # before torch: see benchmarks/common.py

import torch  # noqa: E402

import usim  # noqa: E402


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def direct(x, a, v):
    return torch.softmax(x @ a @ x.transpose(-1, -2), -1) @ (x @ v)


def term_floor(x, a, v):
    """softmax(x a x^T)(x v) with every product term formed, the term axis last."""
    xa = (x[..., :, None, :] * a.T).sum(-1)
    xv = (x[..., :, None, :] * v.T).sum(-1)
    s = (xa[..., :, None, :] * x[..., None, :, :]).sum(-1)
    p = torch.softmax(s, -1)
    return (p[..., :, None, :] * xv.transpose(-1, -2)[..., None, :, :]).sum(-1)


def one(order: int, args) -> list[dict]:
    """All rows of one order (run inside a subprocess)."""
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(order)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    n = d = order
    x = torch.randn(args.batch, n, d, dtype=dtype, device=device)
    a = torch.randn(d, d, dtype=dtype, device=device) / d
    v = torch.randn(d, d, dtype=dtype, device=device)
    reference = direct(x.double(), a.double(), v.double())
    rows = []
    base = {"order": order, "batch": args.batch, "dtype": args.dtype, "device": device}

    def error(y):
        return (y.double() - reference).abs().max().item()

    direct_time = timed(lambda: direct(x, a, v), device, args.repeats)
    rows.append({**base, "method": "direct", "time_s": direct_time, "max_err": error(direct(x, a, v))})
    floor_time = timed(lambda: term_floor(x, a, v), device, args.repeats)
    rows.append({**base, "method": "term floor", "time_s": floor_time, "max_err": error(term_floor(x, a, v))})

    mha = torch.nn.MultiheadAttention(d, 1, batch_first=True).to(device=device, dtype=dtype).eval()
    mha64 = torch.nn.MultiheadAttention(d, 1, batch_first=True).to(device=device, dtype=torch.float64).eval()
    mha64.load_state_dict({k: t.double() for k, t in mha.state_dict().items()})
    with torch.no_grad():
        mha_reference = mha64(x.double(), x.double(), x.double(), need_weights=False)[0]
        mha_time = timed(lambda: mha(x, x, x, need_weights=False), device, args.repeats)
        mha_err = (mha(x, x, x, need_weights=False)[0].double() - mha_reference).abs().max().item()
    rows.append({**base, "method": "nn.MultiheadAttention", "time_s": mha_time, "max_err": mha_err})

    modes = ["fast", "fused"] + (["dense"] if order <= args.dense_max else [])
    for mode in modes:
        start = time.perf_counter()
        u = usim.UniversalSimulator(n, d, execution=mode).to(device)
        build = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            y = u(x, a, v)
        if device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        with torch.no_grad():
            t = timed(lambda: u(x, a, v), device, args.repeats if mode != "dense" else 1)
            again = u(x, a, v)
        rows.append({**base, "method": f"U {mode}", "time_s": t, "max_err": error(y), "build_s": build,
                     "first_call_s": first, "L": u.encoder.length, "depth": u.depth, "width": u.width,
                     "repeatable": bool(torch.equal(y, again))})
        del u

    for mode in ("fused", "fast") if order <= args.drop_in_max else ():
        start = time.perf_counter()
        sim = usim.SimulatedMultiheadAttention.from_torch(mha, seq_len=n, execution=mode)
        build = time.perf_counter() - start
        with torch.no_grad():
            start = time.perf_counter()
            out = sim(x, x, x, need_weights=False)[0]
            first = time.perf_counter() - start
            t = timed(lambda: sim(x, x, x, need_weights=False), device, args.repeats)
        rows.append({**base, "method": "drop-in" if mode == "fused" else f"drop-in {mode}", "time_s": t,
                     "build_s": build, "first_call_s": first,
                     "max_err": (out.double() - mha_reference).abs().max().item(),
                     "L": sim.simulator.encoder.length})
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    for row in rows:
        row["peak_mem_mb"] = round(peak / 2 ** 20, 1)
        for key in ("time_s", "build_s", "first_call_s"):
            if key in row:
                row[key] = float(f"{row[key]:.6g}")
    for row in rows:
        row["ratio_direct"] = round(row["time_s"] / direct_time, 2)
        row["ratio_mha"] = round(row["time_s"] / mha_time, 2)
        row["ratio_floor"] = round(row["time_s"] / floor_time, 2)
    return rows


def minilm(args) -> list[dict]:
    """The MiniLM-sized layer (embed_dim 384, 12 heads, 16 tokens) through the drop-in, within the
    goal's 8 GB of address space (an allocation beyond it fails instead of swapping)."""
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    mha = torch.nn.MultiheadAttention(384, 12, batch_first=True).eval()
    x = torch.randn(1, 16, 384)
    start = time.perf_counter()
    sim = usim.SimulatedMultiheadAttention.from_torch(mha, seq_len=16)
    with torch.no_grad():
        out = sim(x, x, x)[0]
    elapsed = time.perf_counter() - start
    err = (out - mha(x, x, x)[0]).abs().max().item()
    return [{"order": 384, "method": "drop-in 384x12", "time_s": elapsed, "max_err": err, "device": "cpu",
             "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}]


def run_child(flag: list[str], args, timeout: float) -> tuple[list[dict], str]:
    command = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--dtype", args.dtype, "--dense-max", str(args.dense_max),
               "--drop-in-max", str(args.drop_in_max)] + flag
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"timeout after {timeout:.0f} s"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return [], "failed: " + (lines[-1] if lines else f"exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1]), "ok"


def markdown_table(rows: list[dict], meta: dict) -> str:
    head = (f"{meta['date']}, {meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads, "
            f"batch {meta['batch']}, {meta['dtype']}, {allocator_text(meta.get('allocator'))}; "
            f"time = median of {meta['repeats']} calls")
    lines = [head, "",
             "| n = d | method | time (ms) | × direct | × nn.MHA | × floor | max error | build (s) | first call (s) "
             "| peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['order']} | {r['method']} | {r['status']} | | | | | | | |")
            continue
        seconds = {k: f"{r[k]:.3g}" if k in r else "" for k in ("build_s", "first_call_s")}
        lines.append(f"| {r['order']} | {r['method']} | {1e3 * r['time_s']:.3g} | {r.get('ratio_direct', '')} | "
                     f"{r.get('ratio_mha', '')} | {r.get('ratio_floor', '')} | {r['max_err']:.2e} | {seconds['build_s']} | "
                     f"{seconds['first_call_s']} | {r['peak_mem_mb']} |")
    return "\n".join(lines)


MIN_FIT_POINTS = 3  # a slope through two points is no measurement of an exponent


def growth(rows: list[dict], method: str) -> float | None:
    """Least-squares slope of log(time) against log(order): the measured exponent; None with fewer
    than MIN_FIT_POINTS orders."""
    points = [(math.log(r["order"]), math.log(r["time_s"])) for r in rows
              if r["method"] == method and r.get("status", "ok") == "ok"]
    if len(points) < MIN_FIT_POINTS:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sum((p[0] - mx) ** 2 for p in points)


TORCH_METHODS = ("direct", "term floor", "nn.MultiheadAttention")


def implausible(rows: list[dict]) -> list[str]:
    """A torch baseline's time that falls as the order grows (its work grows like d^3): the point is
    noise (a busy machine, a kernel changing path), not a measurement to divide by."""
    notes = []
    for method in TORCH_METHODS:
        points = sorted((r["order"], r["time_s"]) for r in rows if r["method"] == method and r.get("status", "ok") == "ok")
        for (prev, t0), (order, t1) in zip(points, points[1:]):
            if t1 < 0.8 * t0:
                notes.append(f"{method} at order {order} took {1e3 * t1:.3g} ms, less than at order {prev} "
                             f"({1e3 * t0:.3g} ms): implausible (a busy machine or a kernel changing path); "
                             f"ratios to it are unreliable, rerun on a quiet machine")
    return notes


def growth_text(meta: dict, rows: list[dict]) -> str:
    orders = sorted({r["order"] for r in rows if r["method"] == "U fast" and r.get("status", "ok") == "ok"})
    if meta["growth_exponent_U_fast"] is None:
        return (f"Growth of U (fast) time with the order: not fitted ({len(orders)} orders measured; a fit "
                f"needs at least {MIN_FIT_POINTS})")
    return f"Measured growth of U (fast) time with the order: d^{meta['growth_exponent_U_fast']:.2f} (orders {orders})"


FLOOR_NOTE = ("The term floor (every product term formed, then summed) is one broadcast multiply and one sum "
              "per product: at small orders its time is per-call overhead and kernel choice, not arithmetic, "
              "so it need not grow monotonically there.")


def plot_title(meta: dict) -> str:
    return (f"U and the drop-in against torch on {meta['device_name']}, batch {meta['batch']}, {meta['dtype']} "
            f"({meta['date']})")


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in sorted({r["method"] for r in rows}):
        points = sorted((r["order"], r["time_s"], r["max_err"]) for r in rows
                        if r["method"] == method and r.get("status", "ok") == "ok" and r["order"] <= 256)
        if points:
            orders, times, errors = zip(*points)
            left.plot(orders, [1e3 * t for t in times], "o-", label=method)
            right.plot(orders, [max(e, 1e-18) for e in errors], "o-", label=method)
    for ax, label in ((left, "time (ms)"), (right, "max abs error vs float64")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("order n = d")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title or "U and the drop-in against torch: time and error by order", fontsize=10)
    fig.text(0.5, 0.01, "\n".join(textwrap.wrap(FLOOR_NOTE, 160)), ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")



def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--orders", type=positive, nargs="+")
    parser.add_argument("--batch", type=positive)
    parser.add_argument("--repeats", type=positive, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--dense-max", type=int, default=4, help="largest order run with execution='dense'")
    parser.add_argument("--drop-in-max", type=int, default=16, help="largest order run through the drop-in")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per order (subprocess)")
    parser.add_argument("--quick", action="store_true", help="orders 2 and 4, 3 repeats")
    parser.add_argument("--minilm", action="store_true", help="also try the 384-wide, 12-head drop-in")
    add_results_options(parser, "no --quick, no --orders")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the picture of a results file "
                                                          "(<device>.json -> <device>.png beside it)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-minilm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        plot(data["rows"], Path(args.replot).with_suffix(".png"), plot_title(data["meta"]))
        return
    if args.batch is None:
        args.batch = 256 if args.device == "cuda" else 64
    if args.one is not None:
        print(json.dumps(one(args.one, args)))
        return
    if args.one_minilm:
        print(json.dumps(minilm(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    out = results_folder(args, not args.quick and args.orders is None)
    if args.quick:
        args.orders, args.repeats = args.orders or [2, 4], 3
    orders = args.orders or ([4, 8, 16, 32, 64] if args.device == "cpu" else [4, 8, 16, 32, 64])
    rows = []
    for order in orders:
        found, status = run_child(["--one", str(order)], args, args.timeout)
        rows += found or [{"order": order, "method": "all", "status": status}]
        print(f"order {order}: {status}", flush=True)
    if args.minilm:
        found, status = run_child(["--one-minilm"], args, args.timeout)
        rows += found or [{"order": 384, "method": "drop-in 384x12", "status": status}]
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else
            (platform.processor() or platform.machine()) + f" ({os.cpu_count()} cores)",
            "threads": torch.get_num_threads(), "batch": args.batch, "dtype": args.dtype, "repeats": args.repeats,
            "allocator": ALLOCATOR_SETTINGS,
            "growth_exponent_U_fast": growth(rows, "U fast"), "growth_exponent_direct": growth(rows, "direct")}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.device}{'' if args.dtype == 'float32' else '_' + args.dtype}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("order", "method"), k))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    meta["implausible"] = implausible(rows)
    table = markdown_table(rows, meta) + "\n\n" + growth_text(meta, rows)
    table += "".join(f"\n\nWarning: {note}" for note in meta["implausible"])
    table += f"\n\n{FLOOR_NOTE}"
    stem.with_suffix(".md").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table)
    plot(rows, stem.with_suffix(".png"), plot_title(meta))
    failed = [f"{r['order']} ({r['method']}): {r['status']}" for r in rows if r.get("status", "ok") != "ok"]
    if failed:
        sys.exit(f"failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
