"""Command line of usim (``python -m usim COMMAND --help`` for each command's options).

    demo       a tour for newcomers: a constructed transformer beside torch, then U, with a picture
    show       draw one construction to a PNG file (needs matplotlib: pip install -e '.[plot]')
    describe   what a checkpoint file holds: kind, arguments, layers, heads, activations, sizes
    bench      run benchmarks/compare_mha.py (options are passed on to it)
    export     write the shipped checkpoints
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

import usim
from usim import budget
from usim.progress import progress, set_progress


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# --- demo --------------------------------------------------------------------------------------
INTRO = """\
usim builds transformers whose weights are written by hand (constructed), not learned by training.
Its centrepiece, U (the "universal simulator"), is one such transformer which, given a matrix x and
the matrices a_h and v_h of an attention layer as its input, outputs what that attention layer
computes: the sum over heads h of softmax(x a_h x^T) x v_h."""


MAX_DPI = 1000
"""Highest --dpi (a 10 x 10 inch figure at 1000 dpi is 100 megapixels, 400 MB to render)."""
MAX_PIXELS = 2 * 10 ** 8
"""Most pixels of a picture written by the CLI (800 MB of RGBA)."""


def _options(args, *names) -> str:
    return ", ".join(f"--{n.replace('_', '-')} {getattr(args, n)}" for n in names)


def check_demo(args) -> None:
    """ValueError naming the option for sizes the demo cannot run with, before anything is allocated:
    token counts past int32 positions, the picture's limits, memory and work estimated from the sizes."""
    for option in ("n", "m", "tokens", "embed_dim", "heads", "batch", "dpi"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.embed_dim % args.heads:
        raise ValueError(f"--embed-dim {args.embed_dim} must be divisible by --heads {args.heads} (each of the "
                         f"drop-in's heads gets embed_dim / heads features, as in nn.MultiheadAttention)")
    check_dpi(args.dpi)
    n, d, h, batch = args.tokens, args.embed_dim, args.heads, args.batch
    if 2 * args.n * args.m > budget.MAX_TOKENS:
        raise ValueError(f"{_options(args, 'n', 'm')}: Transpose lays out {2 * args.n * args.m:,} tokens, more "
                         f"than positions can number ({budget.MAX_TOKENS:,}): choose smaller")
    tokens = {"U": budget.u_tokens(n, d, h), "the drop-in's U": budget.u_tokens(n, d, h, head_dim=d // h)}
    for what, count in tokens.items():
        if count > budget.MAX_TOKENS:
            raise ValueError(f"{_options(args, 'tokens', 'embed_dim', 'heads')}: {what} would lay out {count:,} "
                             f"tokens, more than positions can number ({budget.MAX_TOKENS:,}): choose smaller")
    if not args.no_picture:
        from usim.plot import MAX_U

        for option, value, limit in (("tokens", n, MAX_U["n"]), ("embed-dim", d, MAX_U["d"]), ("heads", h, MAX_U["heads"])):
            if value > limit:
                raise ValueError(f"--{option} {value}: the picture draws U up to {option} {limit}; pass "
                                 f"--no-picture to run these sizes without it")
    # memory: inputs and references in float32 and float64 (x, scores, values per head), the weights,
    # and U's run (its structured program holds a few slots per token of an item, for a few items)
    per_item = 12 * (3 * n * d + 2 * h * n * d + 2 * h * n * n)
    fixed = 24 * h * d * d + 64 * max(tokens.values()) * 8
    need, available = fixed + batch * per_item, budget.available_bytes()
    if need > available:
        fits = (available - fixed) // per_item
        hint = f"--batch at most {fits:,}" if fits >= 1 else "smaller --tokens, --embed-dim or --heads"
        raise ValueError(f"{_options(args, 'batch', 'tokens', 'embed_dim', 'heads')}: the demo would need about "
                         f"{budget.gigabytes(need)} of memory, more than the {budget.gigabytes(available)} "
                         f"available: choose {hint}")
    work = 2 * batch * sum(tokens.values())  # two calls each of U and the drop-in, every token of every item
    if work > budget.WORK_LIMIT:
        fits = budget.WORK_LIMIT // (2 * sum(tokens.values()))
        raise ValueError(f"{_options(args, 'batch', 'tokens', 'embed_dim', 'heads')}: the demo would compute "
                         f"{work:.2g} token-items (batch x tokens), more than its limit of {budget.WORK_LIMIT:.0g} "
                         f"(minutes on a CPU): choose " + (f"--batch at most {fits:,}" if fits >= 1 else
                                                          "smaller --tokens, --embed-dim or --heads"))


def check_dpi(dpi: int) -> None:
    if not 1 <= dpi <= MAX_DPI:
        raise ValueError(f"--dpi must be in 1..{MAX_DPI}, got {dpi}")


def save_figure(fig, path: Path, dpi: int) -> None:
    """fig.savefig(path, dpi), refused (naming --dpi) where the picture would exceed MAX_PIXELS."""
    width, height = fig.get_size_inches()
    pixels = width * dpi * height * dpi
    if pixels > MAX_PIXELS:
        fits = int((MAX_PIXELS / (width * height)) ** 0.5)
        raise ValueError(f"--dpi {dpi}: the {width:.3g} x {height:.3g} inch picture would be {width * dpi:,.0f} x "
                         f"{height * dpi:,.0f} pixels (at most {MAX_PIXELS:.0e}): choose --dpi at most {fits}")
    fig.savefig(path, dpi=dpi)


def png_path(out) -> Path:
    """The file matplotlib writes for ``savefig(out)``: a name without an extension gets ".png"
    (``adir`` -> ``adir.png``)."""
    out = Path(out)
    return out if out.suffix else out.with_name(out.name + ".png")


def demo(args) -> None:
    """The tour: Transpose, U, the nn.MultiheadAttention drop-in, then a picture."""
    check_demo(args)
    torch.manual_seed(args.seed)
    print(INTRO)
    transpose_demo(args)
    u, x, a, v = simulator_demo(args)
    mha_demo(args, x)
    picture_demo(args, u, x, a, v)


def _section(number: int, title: str) -> None:
    print(f"\n{number}. {title}\n" + "-" * (len(title) + 3))


def transpose_demo(args) -> None:
    n, m = args.n, args.m
    op = usim.Transpose(n, m)
    x = torch.randn(n, m)
    op(x)  # the first call prepares the execution (see part 2)
    y, elapsed = _timed(op, x)
    reference = x.T
    _section(1, f"A constructed transformer that transposes a {n}x{m} matrix")
    print(f"A transformer reads a sequence of tokens. Here each token is one number: the {n * m} entries of\n"
          f"x, row by row, then {n * m} empty tokens where the answer appears ({op.layout.length} tokens in all).\n"
          f"usim.Transpose({n}, {m}) has {op.depth} layer with {op.width} attention head. Each answer token "
          f"attends to\nexactly one token, the entry of x with row and column swapped, and copies its value.")
    print(f"\ninput x ({n} rows, {m} columns):\n{x}")
    print(f"\nthe transformer's answer:\n{y}")
    print(f"\ntorch's x.T:\n{reference}")
    print(f"\nlargest difference between the two: {(y - reference).abs().max().item():.3g} "
          f"(equal bit for bit: {torch.equal(y, reference)}); one call took {_ms(elapsed)}")


def simulator_demo(args):
    from usim.ops.simulator import UniversalSimulator

    n, d, heads = args.tokens, args.embed_dim, args.heads
    u, build = _timed(UniversalSimulator, n, d, heads=heads)
    x = torch.randn(args.batch, n, d)
    a, v = torch.randn(heads, d, d) / d, torch.randn(heads, d, d)
    _, first = _timed(u, x, a, v)
    y, elapsed = _timed(u, x, a, v)
    x64, a64, v64 = x.double(), a.double(), v.double()
    reference = (torch.softmax(torch.einsum("bid,hde,bje->bhij", x64, a64, x64), -1) @ (x64[:, None] @ v64)).sum(1)
    direct = (torch.softmax(torch.einsum("bid,hde,bje->bhij", x, a, x), -1) @ (x[:, None] @ v)).sum(1)
    largest = max(layer.attn.heads for layer in u.encoder.layers if layer.attn is not None)
    _section(2, f"U simulating an attention layer with {heads} heads on a {n}x{d} matrix x")
    print(f"The simulated attention layer sees x as {n} vectors (its rows) of {d} numbers each. U itself, like\n"
          f"the transformer of part 1, reads one number per token: its input sequence has {u.layout.length} "
          f"tokens,\nholding x, the {heads} matrices a_h and the {heads} matrices v_h ({d}x{d} each), {n} flags "
          f"saying which rows of x\nto ignore, and empty tokens for the intermediate and final results.\n"
          f"U has {u.depth} layers; the busiest layer has {largest} attention heads (each head fetches one number "
          f"for\nevery token). Writing U's weights took {_ms(build)}.")
    print(f"\nOn {args.batch} random inputs at once (float32 numbers):")
    print(f"  one call took {_ms(elapsed)}; the first call took {_ms(first)}, because it first works out,\n"
          f"  once for all later calls, which tokens each head reads.")
    u_error = (y.double() - reference).abs().max().item()
    torch_error = (direct.double() - reference).abs().max().item()
    print(f"  largest error against an exact (float64) computation: U {u_error:.1e}, torch's own float32\n"
          f"  computation {torch_error:.1e}; U's error is {u_error / max(torch_error, 1e-300):.1f} times torch's "
          f"(both come from rounding to float32).")
    return u, x, a, v


def mha_demo(args, x) -> None:
    from usim.mha import SimulatedMultiheadAttention

    n, d, heads = args.tokens, args.embed_dim, args.heads
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    sim, build = _timed(SimulatedMultiheadAttention.from_torch, mha, seq_len=n)
    _, first = _timed(sim, x, x, x)
    (out, weights), elapsed = _timed(sim, x, x, x)
    mha(x, x, x)
    (ref_out, ref_w), torch_time = _timed(mha, x, x, x)
    mha64 = torch.nn.MultiheadAttention(d, heads, batch_first=True, dtype=torch.float64)
    mha64.load_state_dict({k: t.double() for k, t in mha.state_dict().items()})
    x64 = x.double()
    out64, _ = mha64(x64, x64, x64)
    _section(3, "A drop-in replacement for torch.nn.MultiheadAttention")
    print(f"SimulatedMultiheadAttention.from_torch(mha) copies the weights of a torch attention layer (vectors\n"
          f"of {d} numbers, {heads} heads) and computes it with the one universal U ({sim.simulator.depth} "
          f"layers, the same weights for every size),\nin {_ms(build)}. "
          f"Here it runs on the same {args.batch} random inputs x as part 2.")
    print(f"  one call: simulated {_ms(elapsed)} (first call {_ms(first)}), nn.MultiheadAttention {_ms(torch_time)}")
    print(f"  largest output error against float64: simulated {(out.double() - out64).abs().max().item():.1e}, "
          f"nn.MultiheadAttention {(ref_out.double() - out64).abs().max().item():.1e}")
    print(f"  largest difference between their attention weights: {(weights - ref_w).abs().max().item():.1e}")


def picture_demo(args, u, x, a, v) -> None:
    _section(4, "A picture")
    if args.no_picture:
        print("skipped (--no-picture)")
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("Install matplotlib to get a picture of U at work: pip install -e '.[plot]'")
        return
    path = png_path(args.picture).resolve()
    fig = usim.plot(u, x[0], a, v)
    save_figure(fig, path, args.dpi)
    print(f"{path}\nwhat each of U's layers computes, and each head's attention weights computed by U beside "
          f"torch's.\nDraw any construction with: python -m usim show matmul 3 --out matmul.png")


# --- show --------------------------------------------------------------------------------------
# name -> (constructor, size names, what the sizes mean)
OPS = {
    "transpose": ("Transpose", ("n", "m"), "x is n x m"),
    "matmul": ("MatMul", ("n", "m", "p"), "a (n x m) @ b (m x p)"),
    "softmax": ("Softmax", ("n", "m"), "row-wise softmax of an n x m matrix"),
    "relu": ("ReLU", ("n", "m"), "relu of an n x m matrix"),
    "maxmin": ("MaxMin", ("n", "m"), "pairs of columns sorted, n x m (m even)"),
    "groupsort": ("GroupSort", ("n", "m"), "groups of --group-size columns sorted, n x m"),
    "inverse": ("Inverse", ("n",), "inverse of an n x n matrix"),
    "determinant": ("Determinant", ("n",), "determinant of an n x n matrix"),
    "u": ("UniversalSimulator", ("n", "d"), "U for x of n rows, d columns (--heads, --head-dim)"),
}
ALIASES = {"universalsimulator": "u", "simulator": "u", "gs": "groupsort", "det": "determinant", "inv": "inverse"}


def build_op(name: str, sizes: list[int], heads: int = 1, group_size: int | None = None,
             head_dim: int | None = None):
    """The construction ``show`` draws: OP with its sizes; missing sizes repeat the last one given
    (``matmul 4`` is MatMul(4, 4, 4)); no sizes means 3 for each."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in OPS:
        raise ValueError(f"unknown operation {name!r}: choose one of {', '.join(OPS)} or a .safetensors checkpoint")
    kind, names, _ = OPS[key]
    if len(sizes) > len(names):
        raise ValueError(f"{key} takes at most {len(names)} sizes ({', '.join(names)}), got {len(sizes)}: {sizes}")
    sizes = list(sizes) or [3]
    sizes += [sizes[-1]] * (len(names) - len(sizes))
    check_drawable(key, sizes, heads, head_dim)
    cls = getattr(usim, kind)
    if key == "u":
        return cls(*sizes, heads=heads) if head_dim is None else cls(*sizes, heads=heads, head_dim=head_dim)
    if key == "groupsort":
        return cls(*sizes, group_size if group_size is not None else sizes[1])
    return cls(*sizes)


def check_drawable(key: str, sizes: list[int], heads: int = 1, head_dim: int | None = None) -> None:
    """ValueError naming the size or option, before anything is built, for what a figure cannot draw
    (usim.plot's limits: MAX_TOKENS tokens for an op, MAX_U for U)."""
    from usim.plot import MAX_TOKENS, MAX_U

    if any(s < 1 for s in sizes) or heads < 1 or (head_dim is not None and head_dim < 1):
        return  # the constructor names it
    if key == "u":
        for name, value, limit in (("SIZE n", sizes[0], MAX_U["n"]), ("SIZE d", sizes[1], MAX_U["d"]),
                                   ("--heads", heads, MAX_U["heads"]), ("--head-dim", head_dim or 1, MAX_U["d"])):
            if value > limit:
                raise ValueError(f"{name} {value}: a U figure draws at most n = {MAX_U['n']}, d = {MAX_U['d']}, "
                                 f"heads = {MAX_U['heads']}, head_dim = {MAX_U['d']} legibly")
        return
    kind = OPS[key][0]
    tokens = budget.op_tokens(kind, sizes)
    if tokens > MAX_TOKENS:
        largest = max((s for s in range(1, MAX_TOKENS + 1) if budget.op_tokens(kind, [s] * len(sizes)) <= MAX_TOKENS),
                      default=1)
        raise ValueError(f"{key} {' '.join(map(str, sizes))} lays out {tokens:,} tokens; an op figure draws at most "
                         f"{MAX_TOKENS} (a row and a column per token): choose smaller SIZEs (e.g. {key} "
                         f"{' '.join([str(largest)] * len(sizes))})")


def parse_layers(text: str | None, depth: int | None = None, title: str = "the construction"):
    """"1-5", "3" or "1,3,7" (numbered from 1, as in the pictures and ``describe``'s table) -> layer
    indices from 0; with ``depth``, numbers past the last layer are a ValueError in the same numbering
    (checked before any range is expanded)."""
    if text is None:
        return None
    spans = []
    for part in text.split(","):
        try:
            first, last = (int(s) for s in part.split("-", 1)) if "-" in part else (int(part),) * 2
        except ValueError:
            raise ValueError(f"--layers takes numbers from 1 such as 1-5 or 1,3,7; got {text!r}") from None
        spans.append((first, last))
    if any(first < 1 or last < 1 for first, last in spans):
        raise ValueError(f"--layers are numbered from 1, got {text!r}")
    if depth is not None and any(max(span) > depth for span in spans):
        raise ValueError(f"--layers {text}: {title} has layers 1..{depth}")
    if sum(max(0, last - first + 1) for first, last in spans) > 10 ** 6:
        raise ValueError(f"--layers {text}: too many layers")
    return [i - 1 for first, last in spans for i in range(first, last + 1)]


def _drop_in_u(drop_in):
    """The U computing a drop-in, at its sizes (its seq_len, else 4 tokens): the universal U's
    weights at fixed sizes, which a figure can draw."""
    from usim.ops.simulator import UniversalSimulator

    extra = int(drop_in.has_bias)  # the homogeneous coordinate
    n = drop_in.seq_len or 4
    return UniversalSimulator(n, drop_in.embed_dim + extra, drop_in.num_heads, head_dim=drop_in.head_dim,
                              kv_len=n, kdim=drop_in.kdim + extra, vdim=drop_in.vdim + extra)


def show(args) -> None:
    from usim.plot import INSTALL_HINT

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit(f"show needs matplotlib: {INSTALL_HINT}")
    check_dpi(args.dpi)
    with progress(3, "show") as bar:
        if args.op.endswith(".safetensors") or os.path.exists(args.op):
            module = show_checkpoint(args)
        else:
            module = build_op(args.op, args.sizes, heads=1 if args.heads is None else args.heads,
                              group_size=args.group_size, head_dim=args.head_dim)
        bar.update()
        layers = parse_layers(args.layers, module.depth, module.title)
        out = out_path(args.out, module.kind)
        fig = usim.plot(module, layers=layers, seed=args.seed)
        bar.update()
        save_figure(fig, out, args.dpi)
        bar.update()
    print(f"wrote {out} ({module.title})")


def out_path(out: str | None, kind: str) -> Path:
    """The PNG file show writes, as it will be written: --out as given (".png" added to a name without
    an extension, as matplotlib would), inside an existing folder as <kind>.png."""
    if out is None:
        return Path(f"{kind.lower()}.png")
    path = Path(out)
    if path.is_dir():
        return path / f"{kind.lower()}.png"
    if out.endswith(("/", os.sep)):
        raise ValueError(f"--out {out}: no such folder")
    return png_path(path)


def show_checkpoint(args):
    """The construction a checkpoint holds, to draw; options the checkpoint fixes are refused, and a
    drop-in too large to draw says what can be drawn instead."""
    from usim.plot import MAX_U

    fixed = [f"--{name.replace('_', '-')}" for name in ("heads", "head_dim", "group_size") if getattr(args, name) is not None]
    if args.sizes or fixed:
        raise ValueError(f"{args.op} fixes its sizes: drop {' and '.join((['SIZE'] if args.sizes else []) + fixed)}")
    module = usim.load(args.op)
    if isinstance(module, usim.SimulatedMultiheadAttention):  # a drop-in is drawn as the U computing it
        extra = int(module.has_bias)  # the homogeneous coordinate
        n, u = module.seq_len or 4, None
        sizes = {"n": n, "d": module.embed_dim + extra, "heads": module.num_heads}
        if all(sizes[name] <= MAX_U[name] for name in MAX_U):
            u = _drop_in_u(module)
        else:
            u = argparse.Namespace(title=f"U(n={n}, d={sizes['d']}, heads={module.num_heads}, "
                                         f"head_dim={module.head_dim})", head_dim=module.head_dim, **sizes)
            raise ValueError(
                f"{args.op} is a drop-in for nn.MultiheadAttention(embed_dim={module.embed_dim}, "
                f"num_heads={module.num_heads}), computed by {u.title}, too large to draw (a U figure draws at "
                f"most n = {MAX_U['n']}, d = {MAX_U['d']}, heads = {MAX_U['heads']}). Instead: `python -m usim "
                f"describe {args.op}` lists it, and `python -m usim show u {min(u.n, MAX_U['n'])} "
                f"{min(u.d, MAX_U['d'])} --heads {min(u.heads, MAX_U['heads'])} --head-dim "
                f"{min(u.head_dim, MAX_U['d'])}` draws a U of the same form")
        print(f"{args.op} is a drop-in for nn.MultiheadAttention: drawing the U that computes it")
        module = u
    return module


# --- describe ----------------------------------------------------------------------------------
def _size(nbytes: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def describe_checkpoint(path) -> str:
    """A readable table of what a usim checkpoint holds (what ``python -m usim describe`` prints).

    Raises FileNotFoundError, or ValueError for a file that is not a valid usim checkpoint."""
    from safetensors import safe_open

    from usim.ops.base import Construction, layer_specs

    module = usim.load(path)  # validates the file (and every tensor's shape) first
    if isinstance(module, usim.SimulatedMultiheadAttention):
        return _describe_drop_in(path, module)
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    encoder = module.encoder if isinstance(module, Construction) else module
    layout = module.layout
    kind = json.loads(metadata.get("usim.module", "{}")).get("kind", type(module).__name__)
    args = getattr(module, "args", {})
    numbers = sum(math.prod(s) for s in shapes.values())
    specs = layer_specs(encoder)
    name_width = max(len(b.name) for b in layout.blocks)
    blocks = [f"{'':18}{b.name:<{name_width}}  {'×'.join(map(str, b.shape)):<7}  {b.role:<7}  tokens "
              f"{layout.span(b.name).start}–{layout.span(b.name).stop - 1}" for b in layout.blocks]
    lines = [
        f"{os.fspath(path)}",
        f"  kind            {kind}" + (f" (usim.{kind})" if hasattr(usim, kind) else ""),
        f"  arguments       {', '.join(f'{k}={v}' for k, v in args.items()) or '—'}",
        f"  format version  {metadata.get('usim.format', '?')}",
        f"  file            {_size(os.path.getsize(path))}: {len(shapes)} tensors, {numbers:,} numbers "
        f"({', '.join(dtypes)})",
        f"  layers          {encoder.depth}, with at most {encoder.width} attention heads in one layer",
        *([f"  sizes           any: one set of weights for every size of its form (the sizes are read off",
           f"                  the inputs); its smallest size, all sizes 1, has {layout.length} tokens, by block:"]
          if getattr(module, "universal", False) else
          [f"  tokens          {layout.length} in the input sequence, one number each, by block:"]),
        *blocks,
        f"  stream slots    {encoder.stream_width} named numbers carried by every token: "
        f"{_clip(', '.join(encoder.slots), 70)}",
        "",
        f"  {'layer':>5}  {'heads':>5}  {'score tiers':>11}  {'FFN activation':<14}  {'FFN units':>9}  "
        f"{'slots read':>10}  slots written",
    ]
    for i, s in enumerate(specs):
        lines.append(f"  {i + 1:>5}  {s['heads']:>5}  {s['tiers']:>11}  {s['activation'] or '—':<14}  "
                     f"{s['hidden']:>9}  {len(s['reads']):>10}  {_clip(', '.join(s['writes']), 60)}")
    lines += [
        "",
        "  heads: attention heads in the layer. score tiers: the criteria a head ranks keys by, one after",
        "  the other (e.g. first the block and row, then the largest value). FFN: the layer's feed-forward",
        "  part, with its activation and its number of hidden units. slots: the named numbers each token",
        "  carries (its residual stream); a layer reads some and writes (adds to) others.",
    ]
    return "\n".join(lines)


def _describe_drop_in(path, module) -> str:
    """describe's text for a drop-in checkpoint: its MHA sizes and weights, and the U computing it."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    args = json.loads(metadata["usim.module"])["args"]
    u = module.simulator
    return "\n".join([
        f"{os.fspath(path)}",
        "  kind            SimulatedMultiheadAttention (usim.SimulatedMultiheadAttention), a drop-in for "
        "nn.MultiheadAttention",
        f"  arguments       {', '.join(f'{k}={v}' for k, v in args.items())}",
        f"  format version  {metadata.get('usim.format', '?')}",
        f"  file            {_size(os.path.getsize(path))}: {len(shapes)} tensors, "
        f"{sum(math.prod(s) for s in shapes.values()):,} numbers ({module.out_proj.weight.dtype}), "
        "nn.MultiheadAttention's state_dict:",
        *[f"{'':18}{name:<16}  {'×'.join(map(str, shape))}" for name, shape in sorted(shapes.items())],
        f"  computed by     {u.title}: {u.depth} layers, at most {u.width} attention heads in one layer, "
        "any size,",
        f"{'':18}{u.encoder.stream_width} stream slots (the weights are U's inputs; U is the one universal U of "
        "its form, not stored)",
    ])


def describe(args) -> None:
    print(describe_checkpoint(args.checkpoint))


# --- bench -------------------------------------------------------------------------------------
BENCH_SCRIPT = Path("benchmarks") / "compare_mha.py"


def find_bench_script(explicit=None) -> Path:
    """benchmarks/compare_mha.py: the given path, beside the package's source tree, or under the
    current directory; FileNotFoundError saying where it looked otherwise."""
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = [Path(usim.__file__).resolve().parents[1] / BENCH_SCRIPT, Path.cwd() / BENCH_SCRIPT]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"benchmark script not found (looked at {', '.join(map(str, candidates))}). It ships with the "
        f"usim source repository, not with an installed package: run from a checkout, or pass --script PATH")


def bench(args, passed: list[str]) -> int:
    script = find_bench_script(args.script)
    command = [sys.executable, str(script)] + (["--help"] if args.script_help else passed)
    print(f"running {' '.join(command)}", file=sys.stderr, flush=True)
    return subprocess.call(command)


# --- export ------------------------------------------------------------------------------------
def export(args) -> None:
    from usim.export import export as write_all

    if Path(args.directory).exists() and not Path(args.directory).is_dir():
        raise ValueError(f"{args.directory} is a file: export writes its checkpoints into a folder")
    for path in write_all(args.directory):
        print(f"wrote {path}")


# --- the parser --------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m usim", formatter_class=formatter,
        description="Transformers whose weights are constructed, not trained: run, draw, inspect and "
                    "benchmark them.\nEach command explains its options: python -m usim COMMAND --help")
    parser.add_argument("--version", action="version", version=f"usim {usim.__version__}",
                        help="print the version and exit")
    parser.add_argument("--no-progress", action="store_true",
                        help="never show progress bars (they appear on a terminal, for work over 2 s, with tqdm)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; COMMAND --help describes its options")
    # --no-progress after the command too (SUPPRESS: a command's default never hides the global flag)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                        help="never show progress bars")

    p = sub.add_parser("demo", parents=[common],
                       help="a tour for newcomers: constructed transformers beside torch, and a picture",
                       description="Runs usim.Transpose, the universal simulator U and the "
                                   "nn.MultiheadAttention drop-in beside torch, explaining each number, "
                                   "then draws a picture of U (with matplotlib installed).")
    p.add_argument("--n", type=int, default=3, help="rows of the matrix the Transpose part transposes (default 3)")
    p.add_argument("--m", type=int, default=4, help="columns of that matrix (default 4)")
    p.add_argument("--tokens", type=int, default=4, help="tokens (rows of x) for U and the drop-in (default 4)")
    p.add_argument("--embed-dim", type=int, default=4,
                   help="dimension of each token (columns of x) for U and the drop-in (default 4)")
    p.add_argument("--heads", type=int, default=2, help="attention heads of U and the drop-in (default 2)")
    p.add_argument("--batch", type=int, default=8, help="random inputs computed at once (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs and weights (default 0)")
    p.add_argument("--picture", default="usim_demo.png", help="where to write the picture (default usim_demo.png)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the picture (default 100)")
    p.add_argument("--no-picture", action="store_true", help="do not draw the picture")
    p.set_defaults(func=demo)

    ops = "\n".join(f"  {name:<12} {' '.join(OPS[name][1]):<6} {OPS[name][2]}" for name in OPS)
    p = sub.add_parser("show", parents=[common], help="draw one construction to a PNG file (needs matplotlib)",
                       formatter_class=formatter,
                       description=textwrap.fill(
                           "Draws a construction run on random inputs: for an operation, its token sequence "
                           "by blocks, which key each query token selects in every head of every layer, and "
                           "the slots (named numbers every token carries) each layer writes; for U, what each "
                           "layer computes and its softmax weights beside torch's.", 100)
                       + "\n\nOPERATIONS and their SIZES (missing sizes repeat the last one; none means 3):\n"
                       + f"{ops}\n\nExample: python -m usim show matmul 3 --out matmul.png")
    p.add_argument("op", metavar="OP", help="an operation named above, or a .safetensors checkpoint file")
    p.add_argument("sizes", metavar="SIZE", type=int, nargs="*", help="the operation's sizes (see above)")
    p.add_argument("--out", help="the PNG file to write, or a folder to write it in (default: the operation's "
                                 "name, e.g. matmul.png)")
    p.add_argument("--heads", type=int, help="attention heads of U (default 1)")
    p.add_argument("--head-dim", type=int,
                   help="U in the factored form of nn.MultiheadAttention, with heads of this size "
                        "(default: the (A, V) form)")
    p.add_argument("--group-size", type=int, help="columns sorted together by groupsort (default: m, whole rows)")
    p.add_argument("--layers", help="which layers to draw, numbered from 1: 1-5, 3 or 1,3,7 (default all; "
                                    "needed above 24 layers)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs drawn (default 0)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default 100)")
    p.set_defaults(func=show)

    p = sub.add_parser("describe", parents=[common], help="what a checkpoint file holds, as a table",
                       description="Prints a checkpoint's kind, constructor arguments, format version, "
                                   "size, token layout, stream slots, and per layer its heads, score tiers, "
                                   "FFN activation and units, and the slots it reads and writes.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a .safetensors file written by usim.save (e.g. checkpoints/matmul_4x4x4.safetensors)")
    p.set_defaults(func=describe)

    p = sub.add_parser("bench", help="run the benchmark benchmarks/compare_mha.py (other options go to it)",
                       description="Runs benchmarks/compare_mha.py in this Python. Every option not listed "
                                   "here is passed on to it, e.g. --device cpu --quick, --orders 4 8, "
                                   "--minilm, --out DIR; --script-help lists them all.")
    p.add_argument("--script", help="the benchmark script (default: benchmarks/compare_mha.py beside the "
                                    "usim package, or under the current directory)")
    p.add_argument("--script-help", action="store_true", help="print the benchmark script's own options")
    p.set_defaults(func=bench)

    p = sub.add_parser("export", parents=[common], help="write the shipped checkpoints",
                       description="Writes every shipped checkpoint (U for n = d = 3, 4, 8 with 1 and 2 "
                                   "heads, every op at 4x4) as .safetensors files.")
    p.add_argument("directory", nargs="?", default="checkpoints",
                   help="the folder to write to (default checkpoints)")
    p.set_defaults(func=export)
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args, passed = parser.parse_known_args(argv)
    if args.no_progress:
        set_progress(False)
    if passed and args.func is not bench:
        parser.error(f"unrecognized arguments: {' '.join(passed)}")
    try:
        if args.func is bench:
            return bench(args, passed)
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, FileNotFoundError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback: say what failed, in one line
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
