"""Scale benchmark: the drop-in at the widths of real models, and U at long sequences.

Every case runs in a fresh process (so "peak" is that case's whole-process maximum resident set)
and reports: construction time, first call (planning + compiling + running), the median of warm
calls, the peak memory, and the error against a float64 reference next to nn.MultiheadAttention's
own float32 error (or, for U, the direct float32 torch computation's).

Each case runs the "fast" execution (bitwise-ordered: every product term formed) and the "fused" one
(the drop-ins' default: each product's terms and their average one contraction), one row each.
Every warm time is also given as a ratio to the *term floor* measured in the same process: the same
attention in plain torch with every product term formed (a broadcast multiply of the two operands,
the term axis last, then a sum over it), the work the fast execution does. It is the cheapest such
floor: each head's projection terms (B, n, r, E) are formed and summed one head at a time, never
all heads at once.

    python benchmarks/scale.py                          # every case below
    python benchmarks/scale.py --cases dropin-64x8-n16  # some of them
    python benchmarks/scale.py --write-results          # every case, replacing benchmarks/results/scale.*

Results: <out>/scale.{json,md}; <out> is benchmarks/results/local (not committed) unless --out DIR,
or benchmarks/results with --write-results (a run of every case only), so no run replaces the
committed results unless asked to. The largest case needs about 4 GB and half a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from common import ALLOCATOR, add_results_options, allocator_text, results_folder  # benchmarks/ is on sys.path

# name -> (kind, sizes): "dropin" (embed_dim, heads, seq_len, batch) or "u" (n, d, heads, batch)
CASES = {
    "dropin-384x12-n16": ("dropin", (384, 12, 16, 1)),
    "dropin-384x12-n16-b8": ("dropin", (384, 12, 16, 8)),
    "dropin-64x8-n16": ("dropin", (64, 8, 16, 1)),
    "u-n128-d8": ("u", (128, 8, 1, 1)),
    "u-n32-d8": ("u", (32, 8, 1, 1)),
    "u-n16-d16-b64": ("u", (16, 16, 1, 64)),
    "dropin-384x12-n128": ("dropin", (384, 12, 128, 1)),
    "dropin-384x12-n512": ("dropin", (384, 12, 512, 1)),
}


def term_floor_mha(x, mha):
    """nn.MultiheadAttention's forward with every product term formed: (B, n, E) -> (B, n, E)."""
    e, h = mha.embed_dim, mha.num_heads
    r = e // h
    w = mha.in_proj_weight.detach().reshape(3, h, r, e)  # (3, H, r, E): row (head, j) of W_Q, W_K, W_V
    b = mha.in_proj_bias.detach().reshape(3, h, 1, r)
    # each head's terms (B, n, r, E) one head at a time: the cheapest floor (no (B, H, n, r, E) tensor)
    q, k, v = (torch.stack([(x[:, :, None, :] * w[i, j]).sum(-1) for j in range(h)], 1) + b[i]
               for i in range(3))  # (B, H, n, r)
    q = q * r ** -0.5
    s = (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1)  # (B, H, n, n)
    p = torch.softmax(s, -1)
    o = (p[:, :, :, None, :] * v.transpose(-1, -2)[:, :, None, :, :]).sum(-1)  # (B, H, n, r)
    wo = mha.out_proj.weight.detach().reshape(e, h, r)  # (E, H, r)
    terms = o.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], 1, h * r) * wo.reshape(1, 1, e, h * r)
    return terms.sum(-1) + mha.out_proj.bias.detach()


def term_floor_u(x, a, v):
    """softmax(X A X^T) X V with every product term formed: x (B, n, d), a and v (d, d)."""
    xa = (x[:, :, None, :] * a.T[None, None]).sum(-1)
    s = (xa[:, :, None, :] * x[:, None, :, :]).sum(-1)
    xv = (x[:, :, None, :] * v.T[None, None]).sum(-1)
    p = torch.softmax(s, -1)
    return (p[:, :, None, :] * xv.transpose(-1, -2)[:, None, :, :]).sum(-1)


def median_time(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def run_case(name: str, repeats: int, execution: str) -> dict:
    import usim

    kind, sizes = CASES[name]
    torch.manual_seed(0)
    start = time.perf_counter()
    if kind == "dropin":
        embed_dim, heads, n, batch = sizes
        mha = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        with torch.no_grad():  # biases as in a trained model, not zero
            mha.in_proj_bias.normal_(0, 0.1)
            mha.out_proj.bias.normal_(0, 0.1)
        module = usim.SimulatedMultiheadAttention.from_torch(mha, seq_len=n, execution=execution)
        x = torch.randn(batch, n, embed_dim)
        call = lambda: module(x, x, x, need_weights=False)[0]  # noqa: E731
        floor = lambda: term_floor_mha(x, mha)  # noqa: E731
        direct = lambda: mha(x, x, x, need_weights=False)[0]  # noqa: E731
        ref_mha = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True, dtype=torch.float64)
        ref_mha.load_state_dict({k: v.double() for k, v in mha.state_dict().items()})
        ref = ref_mha(x.double(), x.double(), x.double(), need_weights=False)[0]
        baseline = mha(x, x, x, need_weights=False)[0]
        baseline_name = "nn.MultiheadAttention float32"
    else:
        n, d, heads, batch = sizes
        module = usim.UniversalSimulator(n, d, heads=heads, execution=execution)
        x, a, v = torch.randn(batch, n, d), torch.randn(d, d) / d, torch.randn(d, d)
        call = lambda: module(x, a, v)  # noqa: E731
        floor = lambda: term_floor_u(x, a, v)  # noqa: E731
        direct = lambda: torch.softmax(x @ a @ x.mT, -1) @ (x @ v)  # noqa: E731
        scores = x.double() @ a.double() @ x.double().mT
        ref = torch.softmax(scores, -1) @ (x.double() @ v.double())
        baseline = torch.softmax(x @ a @ x.mT, -1) @ (x @ v)
        baseline_name = "direct torch float32"
    built = time.perf_counter() - start
    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    with torch.no_grad():
        warm = median_time(call, repeats)
        again = call()
        floor_s = median_time(floor, max(repeats, 5))
        direct_s = median_time(direct, max(repeats, 5))
        if not torch.allclose(floor().double(), ref, rtol=1e-4, atol=1e-4):
            raise RuntimeError("the term floor does not compute the attention")
    error = (out.double() - ref).abs().max().item()
    baseline_error = (baseline.double() - ref).abs().max().item()
    encoder = module.simulator.encoder if kind == "dropin" else module.encoder
    return {
        "case": name, "execution": execution, "kind": kind, "sizes": sizes, "tokens": encoder.length, "stream slots": encoder.stream_width,
        "depth": encoder.depth, "construction s": round(built, 3), "first call s": round(first, 3),
        "construction + first call s": round(built + first, 3), "warm call s (median)": round(warm, 4),
        "term floor s": round(floor_s, 5), "warm / floor": round(warm / floor_s, 1),
        "direct torch s": round(direct_s, 5), "warm / direct": round(warm / direct_s, 1),
        "peak GB": round(peak_gb(), 3), "max error": error, "baseline": baseline_name,
        "baseline error": baseline_error, "error / baseline": round(error / max(baseline_error, 1e-30), 2),
        "repeatable": bool(torch.equal(out, again)),
    }



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES), help="cases to run")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per case (median reported)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per case before it is reported as failed")
    add_results_options(parser, "every case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per case")
    parser.add_argument("--default-allocator", action="store_true",
                        help="run the cases without benchmarks/common.py's ALLOCATOR settings (huge pages, malloc "
                             "keeping large blocks) unless the environment sets them")
    parser.add_argument("--executions", nargs="+", default=["fast", "fused"], choices=["fast", "fused"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    parser.add_argument("--execution", default="fast", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args.one, args.repeats, args.execution)))
        return
    out = results_folder(args, sorted(args.cases) == sorted(CASES))
    env = dict(os.environ)
    if not args.default_allocator:  # see benchmarks/common.py (the environment's own settings win)
        env = {**ALLOCATOR, **env}
    rows = []
    for name in args.cases:
        for execution in args.executions:
            print(f"{name} ({execution}) ...", flush=True)
            try:
                proc = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats),
                                       "--threads", str(args.threads), "--execution", execution],
                                      capture_output=True, text=True, timeout=args.timeout, env=env)
                if proc.returncode:
                    lines = proc.stderr.strip().splitlines()
                    why = lines[-1][:300] if lines else f"killed (exit status {proc.returncode}; out of memory?)"
                    rows.append({"case": name, "execution": execution, "failed": why})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                rows.append({"case": name, "execution": execution, "failed": f"timeout after {args.timeout} s"})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} ({os.cpu_count()} cores)",
            "torch": torch.__version__, "threads": args.threads, "dtype": "float32",
            "allocator": {k: env.get(k) for k in ALLOCATOR}, "load average": os.getloadavg()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    columns = ["case", "execution", "tokens", "construction s", "first call s", "warm call s (median)", "term floor s",
               "warm / floor", "warm / direct", "peak GB", "max error", "baseline error", "error / baseline"]
    lines = [f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, float32 (batch in the case name, else 1), "
             f"{allocator_text(meta['allocator'])}, load average {meta['load average'][0]:.1f} "
             "(1-minute, at the end of the run)", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['case']} | {row['execution']} | failed: {row['failed']} |" + " |" * (len(columns) - 3))
        else:
            lines.append("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c])
                                           for c in columns) + " |")
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
