"""GPU benchmark: U and the drop-in against torch on one CUDA device, in one run (< 5 minutes).

    python benchmarks/gpu.py                  # needs a CUDA device; results in benchmarks/results/local/gpu.{json,md}
    python benchmarks/gpu.py --write-results  # the same, replacing benchmarks/results/gpu.{json,md}
    python benchmarks/gpu.py --quick          # one size of each case (results in benchmarks/results/local)

Cases (float32, TF32 off everywhere, times are medians of warm calls after torch.cuda.synchronize),
each U and drop-in case with the "fast" and the "fused" execution (see docs/fused.md):

* U (the (A, V) form, one head) at n = d = 16, 32, 64, batch 256, against the direct torch
  computation softmax(X A X^T) X V and nn.MultiheadAttention(d, 1 head) on the same batch;
* the drop-in at E = 384, 12 heads, 128 tokens, batch 32, against nn.MultiheadAttention
  (target: warm <= 100x MHA); construction + first call, peak CUDA memory;
* all-MiniLM-L6-v2 with every attention layer simulated (benchmarks/real_model.py on cuda): worst
  cosine and warm time (needs `pip install -e '.[real]'`; skipped without it).

Errors are max abs against a float64 reference on the same device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from common import add_results_options, results_folder, use_allocator_settings  # benchmarks/ is on sys.path

use_allocator_settings()  # before torch (real_model.py, imported below, asks for the same)

import torch  # noqa: E402

import usim  # noqa: E402


def timed(call, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def u_case(n: int, batch: int, execution: str) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, n, n, device="cuda")
    a, v = torch.randn(n, n, device="cuda") / n, torch.randn(n, n, device="cuda")
    start = time.perf_counter()
    u = usim.UniversalSimulator(n, n, execution=execution).cuda()
    with torch.no_grad():
        out = u(x, a, v)
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        ref = torch.softmax(x.double() @ a.double() @ x.double().mT, -1) @ (x.double() @ v.double())
        direct = lambda: torch.softmax(x @ a @ x.mT, -1) @ (x @ v)  # noqa: E731
        mha = torch.nn.MultiheadAttention(n, 1, batch_first=True).cuda()
        warm, direct_s = timed(lambda: u(x, a, v)), timed(direct)
        mha_s = timed(lambda: mha(x, x, x, need_weights=False))
    return {"case": f"U n=d={n}, batch {batch}, {execution}", "construction + first call s": first, "warm s": warm,
            "torch s": direct_s, "warm / torch": warm / direct_s, "nn.MultiheadAttention s": mha_s,
            "max error": (out.double() - ref).abs().max().item(),
            "torch error": (direct().double() - ref).abs().max().item()}


def dropin_case(embed_dim: int, heads: int, n: int, batch: int, execution: str) -> dict:
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True).cuda()
    x = torch.randn(batch, n, embed_dim, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    sim = usim.SimulatedMultiheadAttention.from_torch(mha, seq_len=n, execution=execution)
    with torch.no_grad():
        out = sim(x, x, x, need_weights=False)[0]
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        warm = timed(lambda: sim(x, x, x, need_weights=False))
        mha_s = timed(lambda: mha(x, x, x, need_weights=False))
        ref_mha = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True, dtype=torch.float64).cuda()
        ref_mha.load_state_dict({k: t.double() for k, t in mha.state_dict().items()})
        ref = ref_mha(x.double(), x.double(), x.double(), need_weights=False)[0]
        theirs = mha(x, x, x, need_weights=False)[0]
    return {"case": f"drop-in E={embed_dim}, {heads} heads, {n} tokens, batch {batch}, {execution}",
            "construction + first call s": first, "warm s": warm, "torch s": mha_s, "warm / torch": warm / mha_s,
            "peak CUDA GB": torch.cuda.max_memory_allocated() / 1e9,
            "max error": (out.double() - ref).abs().max().item(),
            "torch error": (theirs.double() - ref).abs().max().item()}


def minilm_case() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import real_model
    except ImportError as e:
        return {"case": "all-MiniLM-L6-v2, every attention layer simulated", "skipped": str(e)}
    args = argparse.Namespace(seq_len=None, layers=None, execution="fused", tiny=False, device="cuda")
    try:
        r = real_model.run(args)
    except SystemExit as e:
        return {"case": "all-MiniLM-L6-v2, every attention layer simulated", "skipped": str(e)}
    return {"case": "all-MiniLM-L6-v2, every attention layer simulated (5 sentences), fused",
            "construction + first call s": r.get("simulated_total_s"), "warm s": r.get("warm_call_s"),
            "torch s": r.get("original_call_s"), "worst cosine": r.get("worst_cosine"), "status": r.get("status")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 16 and the drop-in at 16 tokens, no MiniLM")
    add_results_options(parser, "not --quick")
    args = parser.parse_args()
    out = results_folder(args, not args.quick)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (none is visible)")
    torch.backends.cuda.matmul.allow_tf32 = False  # exactness is claimed: no TF32 anywhere
    torch.backends.cudnn.allow_tf32 = False
    executions = ("fast", "fused")
    rows = [u_case(n, 256, e) for n in ((16,) if args.quick else (16, 32, 64)) for e in executions]
    rows += [dropin_case(384, 12, 16 if args.quick else 128, 32, e) for e in executions]
    if not args.quick:
        rows.append(minilm_case())
    for row in rows:
        print(json.dumps(row), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "dtype": "float32", "tf32": False}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    columns = ["case", "construction + first call s", "warm s", "torch s", "warm / torch", "max error",
               "torch error", "peak CUDA GB", "worst cosine"]
    lines = [f"{meta['date']}, {meta['device']}, torch {meta['torch']}, float32, TF32 off", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        if "skipped" in row:
            cells[1] = f"skipped: {row['skipped']}"
        lines.append("| " + " | ".join(cells) + " |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
