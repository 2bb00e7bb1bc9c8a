"""Benchmark: whole decoder layers in constructed encoders (usim.decoder), beside eager.

    python benchmarks/decoder.py                  # the five tiny families + a GPT-2-sized model
    python benchmarks/decoder.py --quick          # the tiny families only, fewer tokens (seconds)
    python benchmarks/decoder.py --write-results  # also write benchmarks/results/decoder.{json,md}

Each case runs in a fresh process (its peak memory is its own), batch 1, float32:

* the tiny random models of the tests (tests/helpers.py: Llama, Mistral, Qwen2, GPT-2, GPT-NeoX; 32
  wide, 4 heads, 2 layers) with a 16-token prompt;
* a GPT-2-sized random model (12 layers, 768 wide, 12 heads, GPT-2's vocabulary) with a 128-token prompt.

Reported: the first forward (simulate_decoder_layers + the first call on the prompt: encoders built
and planned), the time per generated token in ``generate()`` with the KV cache (warm: (time of
1 + k new tokens - time of 1) / k), peak memory of the process, the logits' max error against the
model in float64 (sdpa) beside eager float32's, and whether the greedy tokens equal eager's.
Results go to benchmarks/results/local (not committed) unless --out DIR, or to benchmarks/results
with --write-results (a full run only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import add_results_options, allocator_text, results_folder, use_allocator_settings  # noqa: E402 (benchmarks/ on sys.path)

ALLOCATOR_SETTINGS = use_allocator_settings()  # before torch: see benchmarks/common.py
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

TINY = ["llama", "mistral", "qwen2", "gpt2", "neox"]
LARGE = "gpt2-768x12"


def model_for(case: str, attn: str):
    if case == LARGE:
        import transformers

        torch.manual_seed(0)
        config = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, attn_implementation=attn)
        return transformers.GPT2LMHeadModel(config).eval()
    from helpers import tiny_decoder

    return tiny_decoder(case, attn)


def run_case(case: str, prompt: int, new: int) -> dict:
    from usim.decoder import simulate_decoder_layers

    model = model_for(case, "sdpa")
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt), generator=torch.Generator().manual_seed(1))
    options = {"do_sample": False, "pad_token_id": 0}
    out = {"case": case, "prompt": prompt, "new_tokens": new, "layers": model.config.num_hidden_layers,
           "width": model.config.hidden_size}
    with torch.no_grad():
        ref = model_for(case, "sdpa").double()(ids).logits
        eager = model_for(case, "eager")
        eager_logits = eager(ids).logits
        start = time.perf_counter()
        sim = simulate_decoder_layers(model, inplace=True)
        logits = sim(ids).logits
        out["first_forward_s"] = time.perf_counter() - start
        out["max_error"] = (logits.double() - ref).abs().max().item()
        out["eager_error"] = (eager_logits.double() - ref).abs().max().item()
        out["error_ratio"] = out["max_error"] / max(out["eager_error"], 1e-30)
        ours = sim.generate(ids, max_new_tokens=1 + new, **options)  # builds the step encoders
        times = {}
        for k in (1, 1 + new):
            start = time.perf_counter()
            sim.generate(ids, max_new_tokens=k, **options)
            times[k] = time.perf_counter() - start
        out["per_token_s"] = (times[1 + new] - times[1]) / new
        eager.generate(ids, max_new_tokens=1, **options)  # warm
        start = time.perf_counter()
        want = eager.generate(ids, max_new_tokens=1 + new, **options)
        out["eager_per_token_s"] = (time.perf_counter() - start) / (1 + new)
        out["same_tokens"] = bool(torch.equal(ours, want))
    out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def table(rows: list) -> str:
    head = ("case", "layers × width", "prompt", "first forward s", "s / generated token (eager)", "peak GB",
            "max error", "eager error", "error / eager", "greedy tokens = eager")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['case']} | {r['layers']} × {r['width']} | {r['prompt']} | {r['first_forward_s']:.3g} | "
                     f"{r['per_token_s']:.3g} ({r['eager_per_token_s']:.2g}) | {r['peak_gb']:.2f} | "
                     f"{r['max_error']:.3g} | {r['eager_error']:.3g} | {r['error_ratio']:.2f} | {r['same_tokens']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny families only, 8-token prompts, 2 new tokens")
    add_results_options(parser, "not --quick")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--prompt", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--new", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.prompt, args.new)))
        return
    folder = results_folder(args, not args.quick)
    cases = [(c, 8, 2) if args.quick else (c, 16, 8) for c in TINY] + ([] if args.quick else [(LARGE, 128, 4)])
    rows = []
    for case, prompt, new in cases:
        result = subprocess.run([sys.executable, __file__, "--case", case, "--prompt", str(prompt), "--new", str(new)],
                                capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    stamp = (f"{datetime.date.today()}, {platform.machine()} ({torch.get_num_threads()} threads), torch "
             f"{torch.__version__}, float32, batch 1, {allocator_text(ALLOCATOR_SETTINGS)}")
    text = f"# The entire decoder: usim.decoder beside eager\n\n{stamp}\n\n{table(rows)}\n"
    print(text)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "decoder.json").write_text(json.dumps({"stamp": stamp, "rows": rows}, indent=1) + "\n")
    (folder / "decoder.md").write_text(text)


if __name__ == "__main__":
    main()
