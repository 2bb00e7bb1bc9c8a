"""Compiled RASP programs: Tracr's lib at max_seq_len 5, 10 and 64, with Tracr's own sizes beside ours.

Per program and max_seq_len: compile time, depth (layers), width (most heads in a layer), stream
slots, a warm call on one input of max_seq_len tokens (median and best of --repeats), a batch of 200
inputs,
and Tracr's compiled layers, heads and residual width. Tracr's sizes come from running Tracr's own
compiler passes (rasp_to_graph, basis_inference, expr_to_craft_graph, craft_graph_to_model: numpy and
networkx, no JAX) up to its craft model; a layer is an attention block and an MLP block, as ours.

    python benchmarks/rasp.py                 # prints the table, writes benchmarks/results/local/rasp.{md,json}
    python benchmarks/rasp.py --write-results # writes benchmarks/results/rasp.{md,json} (a full run only)
    python benchmarks/rasp.py --quick         # 5 and 10 tokens, fewer repeats

Needs the [tracr] extra (and networkx for Tracr's sizes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import contextlib
import random
import signal
import statistics
import sys
import time
import types

import torch

from common import add_results_options, results_folder

import usim.rasp as ur


def tracr_modules():
    import tracr
    from tracr.rasp import rasp
    folder = os.path.join(os.path.dirname(tracr.__file__), "compiler")
    spec = importlib.util.spec_from_file_location("tracr_compiler_lib", os.path.join(folder, "lib.py"))
    lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lib)
    return rasp, lib, folder


@contextlib.contextmanager
def time_limit(seconds: int):
    """TimeoutError after ``seconds`` (SIGALRM: the main thread of a Unix process)."""
    def fire(signum, frame):
        raise TimeoutError(f"over {seconds} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tracr_sizes(program, vocab, max_seq_len, folder):
    """(layers, most heads in a layer, residual width) of Tracr's craft model, or None."""
    try:
        if "tracr.compiler" not in sys.modules:  # the passes, without the package __init__ (JAX)
            pkg = types.ModuleType("tracr.compiler")
            pkg.__path__ = [folder]
            sys.modules["tracr.compiler"] = pkg
        from tracr.compiler import basis_inference, craft_graph_to_model, expr_to_craft_graph, rasp_to_graph
        from tracr.craft import bases
        from tracr.rasp import rasp
    except ImportError:
        return None
    graph = rasp_to_graph.extract_rasp_graph(program)
    basis_inference.infer_bases(graph.graph, graph.sink, set(vocab), max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(
        graph.graph, bos_dir=bases.BasisDirection(rasp.tokens.label, "compiler_bos"), mlp_exactness=100)
    model = craft_graph_to_model.craft_graph_to_model(graph.graph, graph.sources)
    stage, layers, heads = 0, 0, 0  # stage 0: the next attention slot, 1: the next MLP slot
    for block in model.blocks:
        attention = type(block).__name__ == "MultiAttentionHead"
        if attention:
            heads = max(heads, len(list(block.heads())))
        if attention or stage == 0:
            layers += 1 if stage == 0 else 0
        stage = (1 if attention else 0) if (attention or stage == 1) else 0
        if not attention and stage == 0 and layers == 0:
            layers = 1
    return layers, heads, len(model.residual_space.basis)


def cases(rasp, lib, n):
    return {
        "length": (lib.make_length(), list("abcd")),
        "reverse": (lib.make_reverse(rasp.tokens), list("abcd")),
        "hist": (lib.make_hist(), list("abcd")),
        "sort_unique": (lib.make_sort_unique(rasp.tokens, rasp.tokens), list(range(1, n + 1))),
        "sort": (lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=n, min_key=1), [1, 2, 3, 4]),
        "sort_freq": (lib.make_sort_freq(max_seq_len=n), [1, 2, 3, 4]),
        "frac_prevs": (lib.make_frac_prevs(rasp.tokens == "("), list("abc()")),
        "pair_balance": (lib.make_pair_balance(rasp.tokens, "(", ")"), list("abc()")),
        "shuffle_dyck2": (lib.make_shuffle_dyck(["()", "{}"]), list("(){}")),
        "shift_by": (lib.shift_by(2, rasp.tokens), list("abcd")),
        "detect_pattern": (lib.detect_pattern(rasp.tokens, "abc"), list("abc")),
        "count_less_freq": (lib.make_count_less_freq(2), list("abcd")),
        "count": (lib.make_count(rasp.tokens, "a"), list("abc")),
        "nary_sequencemap": (lib.make_nary_sequencemap(lambda x, y, z: x + y - z, rasp.tokens, rasp.tokens,
                                                       rasp.indices), [1, 2, 3]),
    }


def measure(name, program, vocab, n, repeats, folder, limit):
    rng = random.Random(n)
    start = time.perf_counter()
    module = ur.compile(ur.from_tracr(program), vocab, n)
    compile_s = time.perf_counter() - start
    one = rng.sample(vocab, n) if name == "sort_unique" else [rng.choice(vocab) for _ in range(n)]
    batch = [rng.sample(vocab, n) if name == "sort_unique" else [rng.choice(vocab) for _ in range(n)]
             for _ in range(200)]
    module(one)  # the first call plans and compiles the program
    calls = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(one)
        calls.append(time.perf_counter() - start)
    batches = []
    for _ in range(max(1, repeats // 5)):
        start = time.perf_counter()
        module(batch)
        batches.append(time.perf_counter() - start)
    try:
        with time_limit(limit):
            tracr = tracr_sizes(program, vocab, n, folder)
    except TimeoutError:
        tracr = None  # Tracr's own passes took longer than the limit
    return {"program": name, "max_seq_len": n, "compile_s": compile_s, "depth": module.depth, "width": module.width,
            "slots": module.encoder.stream_width, "call_ms": 1e3 * statistics.median(calls), "best_ms": 1e3 * min(calls),
            "batch200_s": statistics.median(batches), "structured": module.encoder.structured(torch.float32, None, module.frame(n)) is not None,
            "tracr_layers": tracr and tracr[0], "tracr_heads": tracr and tracr[1], "tracr_residual": tracr and tracr[2]}


def _or_dash(value) -> str:
    return "—" if value is None else str(value)


def table(rows) -> str:
    out = ["| program | max_seq_len | compile (s) | depth | width | slots | warm call (ms) | best call (ms) | batch of 200 (s) | "
           "Tracr layers | Tracr heads | Tracr residual |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            out.append(f"| {r['program']} | {r['max_seq_len']} | {r['failed']} | | | | | | | | | |")
            continue
        out.append(f"| {r['program']} | {r['max_seq_len']} | {r['compile_s']:.2f} | {r['depth']} | {r['width']} | "
                   f"{r['slots']} | {r['call_ms']:.1f} | {r['best_ms']:.1f} | {r['batch200_s']:.3f} | {_or_dash(r['tracr_layers'])} | "
                   f"{_or_dash(r['tracr_heads'])} | {_or_dash(r['tracr_residual'])} |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[5, 10, 64])
    parser.add_argument("--programs", nargs="*", default=None, help="lib programs to run (default: all)")
    parser.add_argument("--repeats", type=int, default=20, help="warm calls per program (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--quick", action="store_true", help="5 and 10 tokens, 5 repeats")
    parser.add_argument("--limit", type=int, default=300, help="seconds per program (ours, then Tracr's passes)")
    add_results_options(parser, "every program at 5, 10 and 64 tokens, not --quick")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths, repeats = ([5, 10], 5) if args.quick else (args.lengths, args.repeats)
    folder_out = results_folder(args, not args.quick and not args.programs and sorted(lengths) == [5, 10, 64])
    rasp, lib, folder = tracr_modules()
    rows = []
    for n in lengths:
        for name, (program, vocab) in cases(rasp, lib, n).items():
            if args.programs and name not in args.programs:
                continue
            try:
                with time_limit(args.limit):
                    rows.append(measure(name, program, vocab, n, repeats, folder, args.limit))
            except (TimeoutError, ValueError, MemoryError) as e:
                print(f"{name} at {n}: {type(e).__name__}: {e}", flush=True)
                rows.append({"program": name, "max_seq_len": n, "failed": f"{type(e).__name__}: {e}"})
                continue
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    folder_out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "repeats": repeats}
    (folder_out / "rasp.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (folder_out / "rasp.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
