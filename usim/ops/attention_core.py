"""U's attention core: softmax(scaling * Q K^T + bias, ignored scores left out) V, from per-head Q, K, V.

The full drop-in (usim/mha.py) hands U the input X and the projection weights, so U computes the
projections too (n * d * r product terms per head). A model whose projections stay its own (every
``transformers`` model through ``attn_implementation="usim"``, usim/hf.py) hands over the projected
heads instead. For query heads h < H and key/value heads g < G (G divides H; head h reads group
g = h // (H / G): multi-head G = H, grouped-query 1 < G < H, multi-query G = 1):

    S_h = Q_h K_g^T                         (n x m; r terms per entry)
    Z_h = scaling_h * S_h + bias_h          (n x m; 1 term per entry, the bias as its addend)
    P_h = softmax(Z_h), entries with ignore_h = 1 left out of the row max and the row sum
    W_h = P_h * scale_h                     (scale: dropout's mask / (1 - p), else 1)
    O_h = W_h V_g                           (n x r; m terms per entry)

with Q_h (n, r), K_g, V_g (m, r) and scaling_h (n, 1), one factor per row (usually all the same
number). The scaling is an input multiplied in by its own stage, so Z_h is
the arithmetic of eager attention, fl(fl(S * scaling) + bias), not a rescaled Q.
The outputs are O_h and W_h (the attention weights, as eager attention returns them).

Built by ``usim.ops.pipeline`` (one token per product term): S is a matmul stage of 2 layers, Z
another (term = S[i, j] * scaling[i]; the addend head brings bias[i, j]), the softmax 6 layers (with
per-entry ignore flags and the scale multiplier), O 2 layers: depth 12. Each query head costs
2 * n * m * r + n * m product terms (its inputs: n * r + n * (3 m + 1) tokens). Grouped-query heads read their group's K and V blocks by
address: the term tokens of head h name block k{g}, so nothing is copied and K, V are packed once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usim.ops.base import Construction, check_size, register
from usim.ops.pipeline import Pipeline, Product, matrix


def _core_pipeline(n: int, m: int, heads: int, kv_heads: int, r: int) -> Pipeline:
    group = heads // kv_heads
    per_head = {"scaling": (n, 1), "ignore": (n, m), "bias": (n, m), "scale": (n, m)}
    inputs = {**{f"q{h}": (n, r) for h in range(heads)}, **{f"k{g}": (m, r) for g in range(kv_heads)},
              **{f"v{g}": (m, r) for g in range(kv_heads)},
              **{f"{name}{h}": shape for name, shape in per_head.items() for h in range(heads)}}
    pipe = Pipeline(inputs, {**{f"o{h}": (n, r) for h in range(heads)}, **{f"w{h}": (n, m) for h in range(heads)}})
    s = [pipe.block(f"s{h}", (n, m)) for h in range(heads)]
    pipe.matmul("s.", [Product(s[h], r, matrix(f"q{h}", "i", "t"), matrix(f"k{h // group}", "k", "t"))
                       for h in range(heads)])
    pipe.matmul("z.", [Product(f"w{h}", 1, matrix(s[h], "i", "k"), matrix(f"scaling{h}", "i", "t"),
                               addend=f"bias{h}")
                       for h in range(heads)])
    pipe.softmax("p.", [f"w{h}" for h in range(heads)], keep=[f"ignore{h}" for h in range(heads)],
                 scale=[f"scale{h}" for h in range(heads)])
    pipe.matmul("o.", [Product(f"o{h}", m, matrix(f"w{h}", "i", "t"), matrix(f"v{h // group}", "t", "k"))
                       for h in range(heads)])
    return pipe


def _builder(sizes: tuple):
    """(Builder, Layout) of the core at (n, m, heads, kv_heads, head_dim), result slots set."""
    n, m, heads, kv_heads, r = sizes
    pipe = _core_pipeline(n, m, heads, kv_heads, r)
    b, layout = pipe.build()
    for h in range(heads):
        b.result(f"o{h}", pipe.home[f"o{h}"])
        b.result(f"w{h}", pipe.home[f"w{h}"])
    return b, layout


@register
class AttentionCore(Construction):
    """attention(query (..., H, n, r), key, value (..., G, m, r), scaling, ignore, bias, weight_scale)
    -> (output (..., H, n, r), weights (..., H, n, m)), for at most n queries, m keys and head_dim r.

    ``AttentionCore()`` (no sizes) runs every size: n, m, H, G and r are read off the inputs and the
    layout of each call shape is built once, over the same weights (those of every sized core,
    bitwise). A sized core pads smaller problems (universality by padding): padded keys are ignored,
    padded query rows and head features dropped. Non-finite inputs are not checked: they propagate as in eager
    attention (a NaN score makes its row NaN; a row whose every kept score is -inf gives NaN). An
    ignored score takes part in no arithmetic: its weight is exactly 0 whatever it is and whatever
    the kept scores are (the dtype's minimum too); a row whose every score is ignored has weights 0,
    as in torch's scaled_dot_product_attention.
    """

    def __init__(self, n: int | None = None, m: int | None = None, heads: int | None = None,
                 head_dim: int | None = None, kv_heads: int | None = None, *, execution: str = "fast"):
        if n is None and m is None:
            given = {k: v for k, v in (("heads", heads), ("head_dim", head_dim), ("kv_heads", kv_heads)) if v is not None}
            if given:
                raise ValueError(f"a universal AttentionCore (no n, m) reads its sizes off the inputs; got {given}")
            b, layout = _builder((1, 1, 1, 1, 1))
            super().__init__(b.build(), layout, {}, execution=execution)
            return
        if n is None or m is None:
            raise ValueError(f"give both n and m (a core of fixed sizes) or neither (a universal core), got n={n}, m={m}")
        heads = 1 if heads is None else heads
        head_dim = 1 if head_dim is None else head_dim
        for name, value in (("n", n), ("m", m), ("heads", heads), ("head_dim", head_dim)):
            check_size(name, value)
        kv_heads = heads if kv_heads is None else check_size("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"heads {heads} must be a multiple of kv_heads {kv_heads}")
        b, layout = _builder((n, m, heads, kv_heads, head_dim))
        super().__init__(b.build(), layout, {"n": n, "m": m, "heads": heads, "head_dim": head_dim,
                                             "kv_heads": kv_heads}, execution=execution)

    @property
    def universal(self) -> bool:
        return "n" not in self.args

    def plan(self, n: int, m: int, heads: int, kv_heads: int, head_dim: int) -> None:
        """Build the layout, frame and structured program of one call shape ahead of its first call."""
        at = self.frame_for((n, m, heads, kv_heads, head_dim), lambda: _builder((n, m, heads, kv_heads, head_dim)))
        if self.encoder.execution == "fast":
            self.encoder.program(torch.float32, None, at[1])

    def forward(self, query, key, value, **options):
        return self.attention(query, key, value, **options)[0]

    def attention(self, query, key, value, scaling=None, ignore=None, bias=None, weight_scale=None,
                  execution: str | None = None):
        """``scaling``: a number or a tensor (..., H or 1, n_in, 1) of factors per row (default
        1 / sqrt(head_dim of the inputs)); ``ignore``: bool, True leaves a score out; ``bias``: added
        to the scaled scores; ``weight_scale``: multiplies the softmax weights (and the returned
        weights); each (..., H or 1, n_in, m_in) or broadcastable."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 3:
                raise ValueError(f"{name} must be (..., heads, length, head_dim), got shape {tuple(t.shape)}")
        (h_in, n_in, r_in), (g_in, m_in, rk) = query.shape[-3:], key.shape[-3:]
        at = None
        if self.universal:  # this call's sizes (no keys or queries: one ignored key, one dropped query)
            n, m, heads, kv_heads, r = max(n_in, 1), max(m_in, 1), h_in, g_in, r_in
            for name, size in (("query length", n), ("heads", heads), ("kv_heads", kv_heads), ("head_dim", r)):
                check_size(name, size)
            if heads % kv_heads:
                raise ValueError(f"query heads {heads} must be a multiple of key/value heads {kv_heads}")
            sizes = (n, m, heads, kv_heads, r)
            at = self.frame_for(sizes, lambda: _builder(sizes))
        else:
            n, m, heads, kv_heads, r = (self.args[k] for k in ("n", "m", "heads", "kv_heads", "head_dim"))
        if h_in != heads or g_in != kv_heads or value.shape[-3:] != key.shape[-3:] or rk != r_in:
            raise ValueError(f"this {self.title} takes query (..., {heads}, n, r) and key, value (..., {kv_heads}, "
                             f"m, r); got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if n_in > n or m_in > m or r_in > r:
            raise ValueError(f"query length {n_in}, key length {m_in}, head_dim {r_in} exceed this {self.title}")
        dtype, device = query.dtype, query.device
        if scaling is None:
            scaling = r_in ** -0.5
        full = (heads, n_in, m_in)
        scaling = torch.as_tensor(scaling, dtype=dtype, device=device)
        try:
            scaling = torch.broadcast_tensors(scaling, torch.empty(heads, n_in, 1, device=device))[0]
        except RuntimeError:
            raise ValueError(f"scaling must be a number or broadcast to (..., {heads}, {n_in}, 1), got "
                             f"{tuple(scaling.shape)}") from None
        ignore = torch.zeros(full, dtype=torch.bool, device=device) if ignore is None else ignore.to(torch.bool)
        bias = torch.zeros((), dtype=dtype, device=device) if bias is None else bias.to(dtype)
        scale = torch.ones((), dtype=dtype, device=device) if weight_scale is None else weight_scale.to(dtype)
        try:
            ignore, bias, scale = torch.broadcast_tensors(ignore, bias, scale, torch.empty(full, device=device))[:3]
        except RuntimeError:
            raise ValueError(f"ignore, bias and weight_scale must broadcast to (..., {heads}, {n_in}, {m_in}), got "
                             f"{[tuple(t.shape) for t in (ignore, bias, scale)]}") from None
        # padded keys are ignored; padded query rows keep every real key
        ignore = F.pad(F.pad(ignore, (0, m - m_in), value=True), (0, 0, 0, n - n_in), value=False)
        bias = F.pad(bias, (0, m - m_in, 0, n - n_in))
        scale = F.pad(scale, (0, m - m_in, 0, n - n_in), value=1.0)
        scaling = F.pad(scaling, (0, 0, 0, n - n_in))
        arrays = {}
        for name, t, rows in (("q", query, n), ("k", key, m), ("v", value, m)):
            arrays.update(zip((f"{name}{h}" for h in range(t.shape[-3])),
                              F.pad(t, (0, r - r_in, 0, rows - t.shape[-2])).unbind(-3)))
        for name, t in (("scaling", scaling), ("ignore", ignore.to(dtype)), ("bias", bias), ("scale", scale)):
            arrays.update(zip((f"{name}{h}" for h in range(heads)), t.unbind(-3)))
        layout = self.layout if at is None else at[0]
        results = self.run(*(arrays[blk.name] for blk in layout.inputs), finite=False, at=at, execution=execution)
        out = torch.stack(results[:heads], dim=-3)[..., :n_in, :r_in]  # the outputs o0.., then w0..
        weights = torch.stack(results[heads:], dim=-3)[..., :n_in, :m_in]
        return out, weights
