"""Pictures of a construction: ``usim.plot(module, *inputs)`` returns a matplotlib Figure.

matplotlib is optional (``pip install -e '.[plot]'``) and imported only when a figure is drawn.

**An operation** (``usim.Transpose``, ``MatMul``, ``Softmax``, ``ReLU``, ``MaxMin``, ``GroupSort``,
``Inverse``, ``Determinant``, and any other construction) is drawn from one run of its encoder,
observed through the engine's hook modules (``layer.attn.hook_pattern``, ``layer.hook_resid``):

* first row(s): the token sequence, one panel per block of ``module.layout`` (inputs, outputs,
  scratch), each drawn as its matrix with its rows and columns; input blocks show the input values,
  output blocks the encoder's result, and each title gives the block's token positions;
* then, per layer, one panel per attention head: a row per query token, a column per key token,
  a coloured cell where the query selects (reads from) the key; block boundaries are drawn and named.
  A layer with more than ``MAX_HEAD_PANELS`` heads shows several heads per panel, one colour each;
* the last panel of a layer: the stream slots (named scalar entries of the residual stream) that the
  layer writes, their value at every token after the layer; its title names the layer's FFN
  activation.

**The universal simulator U** gets a compact figure instead: a table of what each layer computes
(heads, FFN activation), the input x, U's output beside torch's, and per head the simulated softmax
weights beside torch's ``softmax(x a_h xᵀ)`` (what ``nn.MultiheadAttention`` computes for those
weights) and their difference.

Sizes are refused above what stays legible (a ``ValueError`` says the limit): ``MAX_TOKENS`` tokens
and ``MAX_LAYERS`` layers per op figure (choose fewer with ``layers=``), ``MAX_U`` for U's n, d and
heads. Layers are numbered from 1 in every picture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy
import torch

MAX_TOKENS = 128
"""Most tokens (sequence length L) an op figure draws: one row and one column per token."""
MAX_LAYERS = 24
"""Most layers one op figure draws; pass ``layers=`` to draw a part of a deeper encoder."""
MAX_HEAD_PANELS = 8
"""A layer with more heads than this draws several heads per panel (one colour each)."""
MAX_SLOT_ROWS = 16
"""Most stream slots named in a layer's stream panel (the rest are counted in its title)."""
MAX_U = {"n": 16, "d": 16, "heads": 4}
"""Largest U drawn."""
ANNOTATE_CELLS = 64
"""Matrices with at most this many entries have their values written in the cells."""

INSTALL_HINT = "pip install -e '.[plot]'"

# What a layer of U computes, read from the names of the slots it writes: "<stage tag>.<step>".
# The stage tags name U's steps (digits, e.g. a head number, are ignored); unknown names are listed.
U_STAGES = {
    "xt": "Xᵀ",
    "drop": "masked keys",
    "xa": "X·A_h, X·V_h",
    "xv": "X·V_h",
    "qkv": "Q_h, K_h, V_h = X·W_Q,h, X·W_K,h, X·W_V,h",
    "s": "S_h = (X·A_h)·Xᵀ",
    "p": "P_h = softmax(S_h)",
    "y": "Y = Σ_h P_h·(X·V_h)",
    "pv": "O_h = P_h·V_h",
    "out": "Y = Σ_h O_h·W_O,h + b_O",
    "w1": "H = relu(Y·W1)",
    "w2": "out = H·W2 (+ Y)",
}
U_FACTORED_STAGES = {"s": "S_h = Q_h·K_hᵀ"}
U_STEPS = {
    "a": "fetch operands", "b": "fetch operands", "term": "multiply", "mean": "sum", "out": "sum",
    "x": "fetch entries", "max": "row maximum", "e": "exp(S − max)", "r": "1 / row sum", "p": "e · (1 / sum)",
    "drop": "masked keys", "exp": "exp(S − max)", "full": "fully masked rows",
    "excess": "a masked key's excess over the maximum", "over": "the excess where masked",
    "add": "+ score bias (attn_mask)", "scale": "fetch the weight multiplier",
    "pd": "× weight multiplier (dropout's mask / (1 − p), else 1)", "total": "row sum = count × mean",
    "pre": "count × mean",
}
# Every label is read from the slots a layer of the encoder writes: a stage tag and a step each; a
# step not named here is shown as its slot, never left out.


def _matplotlib():
    """(the Figure class, matplotlib.colors), or ImportError with the install command."""
    try:
        from matplotlib import colors
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"usim.plot needs matplotlib, which is not installed: {INSTALL_HINT}") from e
    return Figure, colors


# --- observing one run -------------------------------------------------------------------------
@dataclass
class Trace:
    """What one run of an encoder shows its observers (the first item of the batch).

    sequence, output: (L,) the packed input sequence and the encoder's output sequence;
    patterns: layer index -> (heads, L, L) attention weights; streams: layer index -> (L, slots)
    residual stream after the layer."""

    sequence: torch.Tensor | None = None
    output: torch.Tensor | None = None
    patterns: dict = field(default_factory=dict)
    streams: dict = field(default_factory=dict)


def record(module, run) -> Trace:
    """Call ``run()`` with hooks on ``module.encoder`` and its layers; return what they saw.

    Only the first call of each hook is kept (the engine may split a large batch into chunks),
    and only the first item of its batch."""
    encoder = module.encoder
    trace = Trace()
    handles = []

    def first(tensor):
        return tensor[0].detach().to("cpu", torch.float64)

    def on_input(_, args):
        if trace.sequence is None:
            trace.sequence = first(args[0] if args[0].dim() == 2 else args[0][None])

    def on_output(_, args, out):
        if trace.output is None:
            trace.output = first(out if out.dim() == 2 else out[None])

    def on_pattern(i):
        def hook(_, args, out):
            trace.patterns.setdefault(i, first(out))
        return hook

    def on_stream(i):
        def hook(_, args, out):
            trace.streams.setdefault(i, first(out))
        return hook

    handles.append(encoder.register_forward_pre_hook(on_input))
    handles.append(encoder.register_forward_hook(on_output))
    for i, layer in enumerate(encoder.layers):
        if layer.attn is not None:
            handles.append(layer.attn.hook_pattern.register_forward_hook(on_pattern(i)))
        handles.append(layer.hook_resid.register_forward_hook(on_stream(i)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return trace


# --- example inputs ----------------------------------------------------------------------------
def _round(t: torch.Tensor) -> torch.Tensor:
    """One decimal: values that read well in a picture."""
    return torch.round(t * 10) / 10


def example_inputs(module, seed: int = 0) -> tuple[tuple, dict]:
    """Random inputs for a picture (rounded to one decimal): (positional arguments, keyword arguments).

    For an op: one array per input block of ``module.layout`` (the arguments of ``module.run``);
    Inverse and Determinant get a + n·I (far from singular), a block named ``bits`` 0/1 values.
    For U: x (n, d) and its weights, (a, v) each (heads, d, d), or (wq, wk, wv, wo) in the factored
    form (``head_dim``), with w1 and w2 as keywords when it has an FFN sublayer (``ffn_hidden``).
    """
    from usim.ops.simulator import UniversalSimulator

    if hasattr(module, "example_tokens"):  # a compiled RASP program takes a token list
        return (module.example_tokens(seed),), {}
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return _round(torch.randn(*shape, generator=g) * scale)

    if isinstance(module, UniversalSimulator):
        n, d, heads = module.n, module.d, module.heads
        r, hidden = module.args.get("head_dim"), module.args.get("ffn_hidden")
        x = draw(n, d)
        if r is not None:
            return (x, draw(heads, d, r, scale=d ** -0.5), draw(heads, d, r, scale=d ** -0.5),
                    draw(heads, d, r), draw(heads, r, d, scale=r ** -0.5)), {}
        keywords = {} if hidden is None else {"w1": draw(d, hidden, scale=d ** -0.5),
                                              "w2": draw(hidden, d, scale=hidden ** -0.5)}
        return (x, draw(heads, d, d, scale=d ** -0.5), draw(heads, d, d)), keywords
    arrays = []
    for block in module.layout.inputs:
        if block.name == "bits":
            arrays.append(torch.randint(0, 2, block.shape, generator=g).double())
            continue
        t = draw(*block.shape).double()
        if module.kind in ("Inverse", "Determinant") and len(block.shape) == 2:
            t = t + block.shape[0] * torch.eye(block.shape[0], dtype=torch.float64)
        arrays.append(t)
    return tuple(arrays), {}


# --- the figure --------------------------------------------------------------------------------
def plot(module, *inputs, layers=None, title: str | None = None, seed: int = 0, **keywords):
    """A matplotlib Figure of ``module`` run on ``inputs`` (see the module docstring).

    module: a usim construction (``usim.MatMul(3, 3, 3)``, ``usim.UniversalSimulator(3, 3)``, a
    module from ``usim.load``). inputs and keywords: the arguments of ``module(...)`` (for U, of
    ``U.attention``: ``plot(u, x, a, v, key_padding_mask=mask)``); batched inputs are drawn for
    their first item. Without inputs, random ``example_inputs(module, seed)`` are used. layers: the
    layer indices (from 0) an op figure draws (default all, at most ``MAX_LAYERS``). title: replaces
    the figure's heading. Save with ``fig.savefig("out.png")``.
    """
    from usim.ops.base import Construction
    from usim.ops.simulator import UniversalSimulator

    if not isinstance(module, Construction):
        raise TypeError(f"usim.plot draws a usim construction (e.g. usim.MatMul(3, 3, 3)), "
                        f"got {type(module).__name__}")
    _matplotlib()
    if module.universal:  # drawn at the sizes of its inputs (or small example sizes): the same weights
        module = _sized(module, inputs, keywords)
    if isinstance(module, UniversalSimulator):
        if layers is not None:
            raise ValueError("layers= selects layers of an op figure; U's figure shows all of its layers")
        if not inputs:
            inputs, keywords = example_inputs(module, seed)
        return _u_figure(module, inputs, keywords, title)
    if module.layout.length > MAX_TOKENS:  # first: choosing layers would not help
        raise ValueError(f"{module.title} lays out {module.layout.length} tokens; an op figure draws at most "
                         f"{MAX_TOKENS} (one row and one column per token): choose smaller sizes")
    return _op_figure(module, inputs, keywords, _chosen_layers(module, layers), title, seed)


def _sized(module, inputs, keywords):
    """The sized construction of a universal one at the sizes of the inputs (default: small sizes);
    its weights are the universal one's, bitwise."""
    from usim.ops.simulator import UniversalSimulator

    if not isinstance(module, UniversalSimulator):
        raise ValueError(f"usim.plot draws a universal {module.kind} at fixed sizes: build it with sizes "
                         f"(e.g. {module.kind}(n=3, ...)) and plot that")
    form = module.form
    if not inputs:
        sizes = {"factored": dict(head_dim=2)}.get(form, {"av_ffn": dict(ffn_hidden=3)}.get(form, {}))
        return UniversalSimulator(3, 3, **sizes, execution=module.execution)
    x, first = inputs[0], inputs[1] if len(inputs) > 1 else None
    if not isinstance(x, torch.Tensor) or not isinstance(first, torch.Tensor) or x.dim() < 2 or first.dim() < 2:
        raise ValueError("usim.plot(U, x, *weights): x (..., n, d) and the weights must be tensors")
    n, d = x.shape[-2:]
    heads = first.shape[-3] if first.dim() > 2 else 1
    if form == "factored":
        key = keywords.get("key")
        m = key.shape[-2] if isinstance(key, torch.Tensor) else n
        return UniversalSimulator(n, d, heads, head_dim=first.shape[-1], kv_len=m,
                                  kdim=key.shape[-1] if isinstance(key, torch.Tensor) else d,
                                  vdim=keywords["value"].shape[-1] if isinstance(keywords.get("value"), torch.Tensor)
                                  else key.shape[-1] if isinstance(key, torch.Tensor) else d,
                                  execution=module.execution)
    hidden = keywords["w1"].shape[-1] if form == "av_ffn" and isinstance(keywords.get("w1"), torch.Tensor) else None
    if form == "av_ffn" and hidden is None:
        raise ValueError("usim.plot(U, x, a, v, w1=..., w2=...): this U has an FFN sublayer")
    return UniversalSimulator(n, d, heads, hidden, execution=module.execution)


def _chosen_layers(module, layers) -> list[int]:
    depth = module.depth
    if layers is None:
        if depth > MAX_LAYERS:
            raise ValueError(f"{module.title} has {depth} layers; one figure draws at most {MAX_LAYERS} "
                             f"legibly: choose some with layers=, e.g. layers=range(0, {MAX_LAYERS}) "
                             f"(--layers 1-{MAX_LAYERS} on the command line)")
        return list(range(depth))
    chosen = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must hold ints (layer indices from 0), got {type(i).__name__}")
        if not 0 <= i < depth:
            raise ValueError(f"layer index {i} is out of range: {module.title} has layers 0..{depth - 1}")
        if i not in chosen:
            chosen.append(i)
    if not chosen:
        raise ValueError("layers= is empty: choose at least one layer")
    if len(chosen) > MAX_LAYERS:
        raise ValueError(f"{len(chosen)} layers chosen; one figure draws at most {MAX_LAYERS}")
    return sorted(chosen)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _head_groups(heads: int) -> list[list[int]]:
    """Heads split into at most MAX_HEAD_PANELS panels of consecutive heads."""
    per_panel = math.ceil(heads / MAX_HEAD_PANELS)
    return [list(range(s, min(heads, s + per_panel))) for s in range(0, heads, per_panel)]


def _pack(groups: list[list], ncols: int) -> list[list]:
    """Greedy rows of at most ncols panels; the panels of one group stay in one row."""
    rows: list[list] = []
    for group in groups:
        if not rows or len(rows[-1]) + len(group) > ncols:
            rows.append([])
        rows[-1].extend(group)
    return rows


def _op_figure(module, inputs, keywords, layers: list[int], title, seed):
    from usim.ops.base import layer_specs

    Figure, _ = _matplotlib()
    layout, encoder = module.layout, module.encoder
    length = layout.length
    if inputs or keywords:
        trace = record(module, lambda: module(*inputs, **keywords))
    else:
        arrays, _ = example_inputs(module, seed)
        trace = record(module, lambda: module.run(*arrays))
    specs = layer_specs(encoder)

    # Panels: the blocks, then per layer its head groups and its stream panel.
    block_panels = [("block", b) for b in layout.blocks]
    layer_groups = []
    for i in layers:
        attn = encoder.layers[i].attn
        heads = [("heads", i, g) for g in _head_groups(attn.heads)] if attn is not None else []
        layer_groups.append(heads + [("stream", i)])
    widest = max(len(g) for g in layer_groups)
    ncols = max(widest, min(6, sum(len(g) for g in layer_groups)), min(6, len(block_panels)))
    rows = _pack([[p] for p in block_panels], ncols) + _pack(layer_groups, ncols)

    cell = min(6.0, max(2.4, length / 20))
    fig = Figure(figsize=(ncols * cell + 0.5, len(rows) * (cell + 0.7) + 1.3), layout="constrained")
    grid = fig.add_gridspec(len(rows), ncols)
    heading = title or (f"{module.title}: {_count(module.depth, 'layer')}, {length} tokens, "
                        f"at most {_count(module.width, 'attention head')} in a layer")
    fig.suptitle(_wrap(heading + "\nRow = query token, column = key token it reads (coloured). "
                       "Last panel of a layer: the stream slots it writes, per token (red +, blue −, "
                       "scaled per slot).", fig, 10), fontsize=10)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = fig.add_subplot(grid[r, c])
            if panel[0] == "block":
                _draw_block(ax, layout, panel[1], trace)
            elif panel[0] == "heads":
                _draw_heads(ax, layout, panel[1], panel[2], trace, specs[panel[1]])
            else:
                _draw_stream(ax, layout, encoder, panel[1], trace, specs[panel[1]])
    return fig


def _block_ticks(ax, layout, axis: str) -> None:
    """Block boundaries as lines and block names at their centres, on the x or y axis."""
    centres, names = [], []
    for b in layout.blocks:
        span = layout.span(b.name)
        centres.append((span.start + span.stop - 1) / 2)
        names.append(b.name)
        if span.start > 0:
            (ax.axvline if axis == "x" else ax.axhline)(span.start - 0.5, color="0.6", lw=0.6)
    small = max(4, 8 - len(names) // 6)
    if axis == "x":
        ax.set_xticks(centres, names, fontsize=small, rotation=90 if len(names) > 3 else 0)
    else:
        ax.set_yticks(centres, names, fontsize=small)


def _as_matrix(values: torch.Tensor, shape) -> torch.Tensor:
    """A block's values as a matrix: 1-D blocks as one row, more axes folded into the rows."""
    if len(shape) == 1:
        return values.reshape(1, shape[0])
    return values.reshape(-1, shape[-1])


def _annotate(ax, image, matrix, fmt=None) -> None:
    """Write each value in its cell (small matrices only), black or white by the cell's shade."""
    rows, cols = matrix.shape
    if rows * cols > ANNOTATE_CELLS:
        return
    for i in range(rows):
        for j in range(cols):
            v = matrix[i, j]
            text = fmt(v) if fmt else (f"{v:.2f}" if abs(v) < 100 else f"{v:.1e}")
            r, g, b, _ = image.cmap(image.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")


def _draw_block(ax, layout, block, trace) -> None:
    span = layout.span(block.name)
    source = trace.output if block.role == "output" else trace.sequence
    matrix = _as_matrix(source[span.start: span.stop], block.shape).numpy()
    shape = "×".join(map(str, block.shape))
    ax.set_label(f"block:{block.name}")
    if block.role == "scratch":
        # Scratch tokens hold intermediates in stream slots (see the layers' stream panels).
        ax.imshow(numpy.zeros_like(matrix), cmap="Greys", vmin=0, vmax=1)
        ax.set_title(f"{block.name}: scratch {shape}\ntokens {span.start}–{span.stop - 1}", fontsize=9)
    else:
        limit = max(float(numpy.abs(matrix).max()), 1e-12)
        image = ax.imshow(matrix, cmap="coolwarm", vmin=-limit, vmax=limit)
        _annotate(ax, image, matrix)
        what = "input" if block.role == "input" else "output (encoder's result)"
        ax.set_title(f"{block.name}: {what} {shape}\ntokens {span.start}–{span.stop - 1}", fontsize=9)
    rows, cols = matrix.shape
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("column", fontsize=7)
    ax.set_ylabel("row", fontsize=7)


def _draw_heads(ax, layout, layer: int, heads: list[int], trace, spec) -> None:
    _, colors = _matplotlib()
    pattern = trace.patterns[layer]  # (H, L, L)
    length = pattern.shape[-1]
    image = numpy.ones((length, length, 3))
    palette = [colors.to_rgb(f"C{k}") for k in range(10)]
    for k, h in enumerate(heads):
        picked = (pattern[h] > 0).numpy()
        image[picked] = palette[(h if len(heads) == 1 else k) % 10]
    ax.imshow(image, interpolation="nearest")
    ax.set_label(f"layer{layer}:heads{heads[0]}-{heads[-1]}")
    which = f"head {heads[0] + 1}" if len(heads) == 1 else f"heads {heads[0] + 1}–{heads[-1] + 1} (a colour each)"
    ax.set_title(f"layer {layer + 1} · {which}", fontsize=9)
    _block_ticks(ax, layout, "x")
    _block_ticks(ax, layout, "y")
    ax.set_xlabel("key token (read from)", fontsize=7)
    ax.set_ylabel("query token", fontsize=7)


def _draw_stream(ax, layout, encoder, layer: int, trace, spec) -> None:
    written = spec["writes"]
    shown = written[:MAX_SLOT_ROWS]
    ffn = f"FFN: {spec['activation']}" if spec["activation"] else "no FFN"
    attention = "" if spec["heads"] else "no attention · "
    more = f" (+{len(written) - len(shown)} more)" if len(written) > len(shown) else ""
    ax.set_label(f"layer{layer}:stream")
    ax.set_title(f"layer {layer + 1} · {attention}{ffn}\nslots written{more}", fontsize=9)
    stream = trace.streams[layer]
    if shown:
        columns = [encoder.slots.index(s) for s in shown]
        values = stream[:, columns].T.numpy()  # (slots, L)
        finite = numpy.where(numpy.isfinite(values), values, 0.0)
        scale = numpy.abs(finite).max(axis=1, keepdims=True)
        ax.imshow(finite / numpy.where(scale > 0, scale, 1.0), cmap="coolwarm", vmin=-1, vmax=1,
                  aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(shown)), shown, fontsize=max(4, 8 - len(shown) // 4))
    else:
        ax.set_yticks([])
    _block_ticks(ax, layout, "x")
    ax.set_xlabel("token", fontsize=7)


# --- U -----------------------------------------------------------------------------------------
def _first(t, core: int):
    """The first item of a batched tensor with ``core`` axes of its own (None stays None)."""
    if t is None or not isinstance(t, torch.Tensor):
        return t
    return t.reshape(-1, *t.shape[t.dim() - core:])[0] if t.dim() > core else t


def _per_head(t, heads: int):
    """(heads, ., .) for one item: a (., .) weight is the same for every head."""
    t = _first(t, 3) if t.dim() > 2 else t[None]
    return t.expand(heads, *t.shape[-2:])


def _u_reference(u, inputs, keywords):
    """(x, torch's softmax weights (heads, n, n), torch's output (n, d)) for the first item, in the
    input's dtype: what ``nn.MultiheadAttention`` computes with these weights."""
    heads = u.heads
    x = _first(inputs[0], 2)
    mask = keywords.get("key_padding_mask")
    factored = u.args.get("head_dim") is not None
    if mask is None and len(inputs) == (6 if factored else 4):
        mask = inputs[-1]  # a positional key_padding_mask
    if factored:
        wq, wk, wv, wo = (_per_head(t, heads) for t in inputs[1:5])
        scores = (x @ wq) @ (x @ wk).transpose(-1, -2)
    else:
        a, v = (_per_head(t, heads) for t in inputs[1:3])
        scores = x @ a @ x.T
    if mask is not None:
        scores = scores.masked_fill(_first(mask, 1)[None, None], float("-inf"))
    weights = torch.softmax(scores, -1)
    if factored:
        y = (weights @ (x @ wv) @ wo).sum(0)
        if keywords.get("bo") is not None:
            y = y + _first(keywords["bo"], 1)
    else:
        y = (weights @ (x @ v)).sum(0)
        w1, w2 = _first(keywords.get("w1"), 2), _first(keywords.get("w2"), 2)
        if w1 is not None and w2 is not None:
            y = torch.relu(y @ w1) @ w2 + (y if keywords.get("residual") else 0)
    return x, weights, y


def _u_figure(u, inputs, keywords, title):
    from usim.ops.base import layer_specs

    Figure, _ = _matplotlib()
    for name in ("n", "d", "heads"):
        if getattr(u, name) > MAX_U[name]:
            raise ValueError(f"{u.title}: a U figure draws at most n = {MAX_U['n']}, d = {MAX_U['d']}, "
                             f"heads = {MAX_U['heads']} legibly; got {name} = {getattr(u, name)}")
    with torch.no_grad():
        y, weights = u.attention(*inputs, **keywords)
        x, direct, y_direct = _u_reference(u, inputs, keywords)
    y, weights = _first(y, 2), _first(weights, 3)
    heads = weights.shape[0]
    factored = u.args.get("head_dim") is not None
    form = "Σ_h softmax((x W_Q,h)(x W_K,h)ᵀ) x W_V,h W_O,h" if factored else "Σ_h softmax(x a_h xᵀ) x v_h"
    if u.args.get("ffn_hidden"):
        form = f"relu(Y W1) W2 with Y = {form}"

    cell = 3.0 if u.n <= 8 else 4.5
    table_height = 0.25 * (u.depth + 2)  # inches: a line per layer, the header and the title
    fig = Figure(figsize=(3 * cell + 1.5, (heads + 1) * (cell + 0.7) + table_height + 1.0), layout="constrained")
    grid = fig.add_gridspec(heads + 2, 3, height_ratios=[table_height / (cell + 0.7)] + [1] * (heads + 1))
    fig.suptitle(_wrap(title or f"{u.title}: one encoder of {u.depth} layers computes {form}\n"
                       f"(x: n = {u.n} rows of d = {u.d} numbers; {u.layout.length} tokens in U's input sequence)",
                       fig, 10), fontsize=10)

    table_ax = fig.add_subplot(grid[0, :])
    table_ax.set_label("overview")
    table_ax.axis("off")
    specs = layer_specs(u.encoder)
    cells = [[str(i + 1), str(s["heads"]), s["activation"] or "—", _clip(_u_computes(s, factored), 90)]
             for i, s in enumerate(specs)]
    table = table_ax.table(cellText=cells, colLabels=["layer", "attention heads", "FFN activation", "computes"],
                           loc="center", cellLoc="left", colWidths=[0.07, 0.13, 0.14, 0.66])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table_ax.set_title("What each layer computes", fontsize=9)

    def heat(ax, matrix, label, text, cmap="viridis", vmin=None, vmax=None, fmt=None):
        m = matrix.detach().double().numpy()
        ax.set_label(label)
        _annotate(ax, ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax), m, fmt=fmt)
        ax.set_title(text, fontsize=9)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.tick_params(labelsize=7)

    limit = float(max(x.abs().max(), y.abs().max(), y_direct.abs().max(), 1e-12))
    gap = (y.double() - y_direct.double()).abs().max()
    heat(fig.add_subplot(grid[1, 0]), x, "x", "input x (row = token)", "coolwarm", -limit, limit)
    heat(fig.add_subplot(grid[1, 1]), y, "y:U", "output of U", "coolwarm", -limit, limit)
    heat(fig.add_subplot(grid[1, 2]), y_direct, "y:torch", f"output of torch\nmax |U − torch| = {_gap(gap)}",
         "coolwarm", -limit, limit)
    scores = "(x W_Q,{h})(x W_K,{h})ᵀ" if factored else "x a_{h} xᵀ"
    for h in range(heads):
        difference = (weights[h].double() - direct[h].double()).abs()
        heat(fig.add_subplot(grid[h + 2, 0]), weights[h], f"head{h}:U",
             f"head {h + 1}: U's softmax weights\n(row = query token, column = key)", vmin=0, vmax=1)
        heat(fig.add_subplot(grid[h + 2, 1]), direct[h], f"head{h}:torch",
             f"head {h + 1}: torch softmax({scores.format(h=h + 1)})\n(as nn.MultiheadAttention)", vmin=0, vmax=1)
        heat(fig.add_subplot(grid[h + 2, 2]), difference, f"head{h}:difference",
             f"head {h + 1}: |U − torch|, max {_gap(difference.max())}", "Greys", vmin=0,
             fmt=lambda t: "0" if t == 0 else f"{t:.0e}")
    return fig


def _wrap(text: str, fig, fontsize: float) -> str:
    """text with each line wrapped to the figure's width (a character is about 0.6 em wide)."""
    import textwrap

    chars = max(20, int(fig.get_size_inches()[0] * 72 / (0.6 * fontsize)) - 4)
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _gap(value) -> str:
    return "0 (equal)" if value == 0 else f"{float(value):.1e}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _u_computes(spec: dict, factored: bool) -> str:
    """What one layer of U computes, from the slots it writes (``U_STAGES``, ``U_STEPS``)."""
    stages = {**U_STAGES, **(U_FACTORED_STAGES if factored else {})}
    phrases: dict[str, list[str]] = {}
    unknown = []
    for slot in spec["writes"]:
        tag, _, step = slot.partition(".")
        tag = tag if tag in stages else tag.rstrip("0123456789")
        step = step.rstrip("0123456789")
        if tag not in stages:
            unknown.append(slot)
            continue
        steps = phrases.setdefault(stages[tag], [])
        word = U_STEPS.get(step, slot) if step else None
        if word and word not in steps and word != stages[tag]:
            steps.append(word)
    parts = [f"{stage} ({', '.join(steps)})" if steps else stage for stage, steps in phrases.items()]
    if unknown:
        parts.append("writes " + ", ".join(unknown))
    return "; ".join(parts) or "—"
