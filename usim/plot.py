"""Pictures of a construction: ``usim.plot(module, *inputs)`` returns a matplotlib Figure.

matplotlib is optional (``pip install 'usim[plot]'``) and imported only when a figure is drawn.

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

INSTALL_HINT = "pip install 'usim[plot]'"

# What each layer of U computes (README's table), for the layer counts U has today.
U_LAYERS = [
    "Xᵀ, X·A_h, X·V_h (transpose, matrix products)",
    "S_h = (X·A_h)·Xᵀ: the attention scores",
    "softmax(S_h), 1 of 4: which keys are masked (padding)",
    "softmax(S_h), 2 of 4: row maximum M (by attention), e = exp(S_h − M)",
    "softmax(S_h), 3 of 4: r = 1 / (sum of e over the row)",
    "softmax(S_h), 4 of 4: P_h = e · r",
    "Y = Σ_h P_h·(X·V_h): the attention output",
]
U_FFN_LAYERS = ["H = Y·W1", "Z = relu(H)", "out = Z·W2", "out += Y when residual"]


def _matplotlib():
    """(Figure class, colors module, numpy), or ImportError with the install command."""
    try:
        import matplotlib
        from matplotlib import colors
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"usim.plot needs matplotlib, which is not installed: {INSTALL_HINT}") from e
    import numpy

    del matplotlib
    return Figure, colors, numpy


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


def example_inputs(module, seed: int = 0) -> tuple:
    """Random inputs for a picture, one per input block of ``module.layout`` (rounded to one decimal).

    For U: (x (n, d), a (heads, d, d), v (heads, d, d)), the arguments of ``U.attention``.
    Inverse and Determinant get a + n·I (far from singular); a block named ``bits`` gets 0/1 values.
    """
    from usim.ops.simulator import UniversalSimulator

    g = torch.Generator().manual_seed(seed)
    if isinstance(module, UniversalSimulator):
        n, d, heads = module.n, module.d, module.heads
        x = _round(torch.randn(n, d, generator=g))
        a = _round(torch.randn(heads, d, d, generator=g) / math.sqrt(d))
        v = _round(torch.randn(heads, d, d, generator=g))
        return x, a, v
    arrays = []
    for block in module.layout.inputs:
        if block.name == "bits":
            arrays.append(torch.randint(0, 2, block.shape, generator=g).double())
            continue
        t = _round(torch.randn(block.shape, generator=g, dtype=torch.float64))
        if module.kind in ("Inverse", "Determinant") and len(block.shape) == 2:
            t = t + block.shape[0] * torch.eye(block.shape[0], dtype=torch.float64)
        arrays.append(t)
    return tuple(arrays)


# --- the figure --------------------------------------------------------------------------------
def plot(module, *inputs, layers=None, title: str | None = None, seed: int = 0):
    """A matplotlib Figure of ``module`` run on ``inputs`` (see the module docstring).

    module: a usim construction (``usim.MatMul(3, 3, 3)``, ``usim.UniversalSimulator(3, 3)``, a
    module from ``usim.load``). inputs: the arguments of ``module(...)`` (for U, of
    ``U.attention``); batched inputs are drawn for their first item. Without inputs, random
    ``example_inputs(module, seed)`` are used. layers: the layer indices (from 0) an op figure draws
    (default all, at most ``MAX_LAYERS``). Save with ``fig.savefig("out.png")``.
    """
    from usim.ops.base import Construction
    from usim.ops.simulator import UniversalSimulator

    if not isinstance(module, Construction):
        raise TypeError(f"usim.plot draws a usim construction (e.g. usim.MatMul(3, 3, 3)), "
                        f"got {type(module).__name__}")
    _matplotlib()
    if isinstance(module, UniversalSimulator):
        if layers is not None:
            raise ValueError("layers= selects layers of an op figure; U's figure shows all of its layers")
        return _u_figure(module, inputs or example_inputs(module, seed), title)
    return _op_figure(module, inputs, _chosen_layers(module, layers), title, seed)


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


def _op_figure(module, inputs, layers: list[int], title, seed):
    from usim.ops.base import layer_specs

    Figure, _, _ = _matplotlib()
    layout, encoder = module.layout, module.encoder
    length = layout.length
    if length > MAX_TOKENS:
        raise ValueError(f"{module.title} lays out {length} tokens; an op figure draws at most {MAX_TOKENS} "
                         f"(one row and one column per token): choose smaller sizes")
    if inputs:
        trace = record(module, lambda: module(*inputs))
    else:
        arrays = example_inputs(module, seed)
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
    heading = title or (f"{module.title}: {module.depth} layer(s), {length} tokens, "
                        f"at most {module.width} attention head(s) in a layer")
    fig.suptitle(heading + "\nRow = query token, column = key token it reads (coloured). "
                 "Last panel of a layer: the stream slots it writes, per token (red +, blue −, "
                 "scaled per slot).", fontsize=10)
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


def _annotate(ax, matrix, numpy, fmt=None) -> None:
    rows, cols = matrix.shape
    if rows * cols > ANNOTATE_CELLS:
        return
    scale = numpy.nanmax(numpy.abs(matrix)) if numpy.isfinite(matrix).any() else 1.0
    for i in range(rows):
        for j in range(cols):
            v = matrix[i, j]
            text = fmt(v) if fmt else (f"{v:.2f}" if abs(v) < 100 else f"{v:.1e}")
            dark = scale > 0 and abs(v) > 0.6 * scale
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")


def _draw_block(ax, layout, block, trace) -> None:
    _, _, numpy = _matplotlib()
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
        ax.imshow(matrix, cmap="coolwarm", vmin=-limit, vmax=limit)
        _annotate(ax, matrix, numpy)
        what = "input" if block.role == "input" else "output (encoder's result)"
        ax.set_title(f"{block.name}: {what} {shape}\ntokens {span.start}–{span.stop - 1}", fontsize=9)
    rows, cols = matrix.shape
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("column", fontsize=7)
    ax.set_ylabel("row", fontsize=7)


def _draw_heads(ax, layout, layer: int, heads: list[int], trace, spec) -> None:
    _, colors, numpy = _matplotlib()
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
    _, _, numpy = _matplotlib()
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
def _u_figure(u, inputs, title):
    from usim.ops.base import layer_specs

    Figure, _, numpy = _matplotlib()
    for name in ("n", "d", "heads"):
        if getattr(u, name) > MAX_U[name]:
            raise ValueError(f"{u.title}: a U figure draws at most n = {MAX_U['n']}, d = {MAX_U['d']}, "
                             f"heads = {MAX_U['heads']} legibly; got {name} = {getattr(u, name)}")
    if len(inputs) < 3:
        raise TypeError(f"plot(U, x, a, v, ...) needs x, a and v (the arguments of U.attention), "
                        f"got {len(inputs)} input(s)")
    x, a = inputs[0], inputs[1]
    with torch.no_grad():
        y, weights = u.attention(*inputs)
    # Draw the first item of a batch; a and v may be (d, d) for one head.
    while y.dim() > 2:
        y, weights = y[0], weights[0]
    x = x.reshape(-1, *x.shape[-2:])[0]
    a = a if a.dim() > 2 else a[None]
    a = a.reshape(-1, *a.shape[-3:])[0]
    scores = torch.einsum("id,hde,je->hij", x.double(), a.double(), x.double())
    mask = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
    if mask is not None:
        scores = scores.masked_fill(mask.reshape(-1, mask.shape[-1])[0][None, None], float("-inf"))
    direct = torch.softmax(scores.to(x.dtype), -1)
    v = inputs[2] if inputs[2].dim() > 2 else inputs[2][None]
    v = v.reshape(-1, *v.shape[-3:])[0]
    y_direct = (direct @ (x @ v)).sum(0)
    heads = weights.shape[0]

    cell = 3.0 if u.n <= 8 else 4.5
    table_height = 0.25 * (u.depth + 2)  # inches: a line per layer, the header and the title
    fig = Figure(figsize=(3 * cell + 0.6, (heads + 1) * (cell + 0.7) + table_height + 1.0), layout="constrained")
    grid = fig.add_gridspec(heads + 2, 3, height_ratios=[table_height / (cell + 0.7)] + [1] * (heads + 1))
    fig.suptitle(title or f"{u.title}: one encoder of {u.depth} layers computes "
                 f"Σ_h softmax(x a_h xᵀ) x v_h\n(n = {u.n} tokens of dimension d = {u.d}; "
                 f"{u.layout.length} tokens in its input sequence)", fontsize=10)

    table_ax = fig.add_subplot(grid[0, :])
    table_ax.set_label("overview")
    table_ax.axis("off")
    specs = layer_specs(u.encoder)
    computes = _u_computes(u)
    cells = [[str(i + 1), str(s["heads"]), s["activation"] or "—", computes[i]] for i, s in enumerate(specs)]
    table = table_ax.table(cellText=cells, colLabels=["layer", "attention heads", "FFN activation", "computes"],
                           loc="center", cellLoc="left", colWidths=[0.07, 0.14, 0.16, 0.63])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table_ax.set_title("What each layer computes", fontsize=9)

    def heat(ax, matrix, label, text, cmap="viridis", vmin=None, vmax=None, fmt=None):
        m = matrix.detach().double().numpy()
        ax.set_label(label)
        ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
        if m.size <= ANNOTATE_CELLS:
            _annotate(ax, m, numpy, fmt=fmt)
        ax.set_title(text, fontsize=9)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.tick_params(labelsize=7)

    limit = float(max(x.abs().max(), y.abs().max(), y_direct.abs().max(), 1e-12))
    heat(fig.add_subplot(grid[1, 0]), x, "x", "input x (rows = tokens)", "coolwarm", -limit, limit)
    heat(fig.add_subplot(grid[1, 1]), y, "y:U", "output of U", "coolwarm", -limit, limit)
    heat(fig.add_subplot(grid[1, 2]), y_direct, "y:torch",
         f"torch: Σ_h softmax(x a_h xᵀ) x v_h\nmax |U − torch| = {(y.double() - y_direct.double()).abs().max():.1e}",
         "coolwarm", -limit, limit)
    for h in range(heads):
        difference = (weights[h].double() - direct[h].double()).abs()
        heat(fig.add_subplot(grid[h + 2, 0]), weights[h], f"head{h}:U",
             f"head {h + 1}: U's softmax weights\n(row = query token, column = key)", vmin=0, vmax=1)
        heat(fig.add_subplot(grid[h + 2, 1]), direct[h], f"head{h}:torch",
             f"head {h + 1}: torch softmax(x a_{h + 1} xᵀ)\n(as nn.MultiheadAttention)", vmin=0, vmax=1)
        heat(fig.add_subplot(grid[h + 2, 2]), difference, f"head{h}:difference",
             f"head {h + 1}: |U − torch|, max {difference.max():.1e}", "Greys", vmin=0,
             fmt=lambda t: "0" if t == 0 else f"{t:.0e}")
    return fig


def _u_computes(u) -> list[str]:
    """Per layer of U, what it computes (README's table), or "—" where the layer count differs."""
    expected = U_LAYERS + (U_FFN_LAYERS if u.args.get("ffn_hidden") else [])
    if len(expected) != u.depth:
        return ["—"] * u.depth
    return expected
