"""The universal simulator U (Theorem 5, Lemma 7, Theorem 8, Corollaries 5.1, 5.2, 8.1).

One encoder maps the packed sequence of its inputs to the attention output. Two parameterisations:

* the paper's (A, V) form, from (X, A_1..A_H, V_1..V_H, ignore[, W1, W2, residual]):

      Y = sum_h softmax(X A_h X^T, keys with ignore = 1 masked) X V_h        (n x d)
      out = relu(Y W1) W2 (+ Y when residual = 1)                  (with ffn_hidden)

  stages: X A_h and X V_h; S_h = (X A_h) X^T; P_h = softmax(S_h); Y = sum over h and j of
  P_h[i, j] (X V_h)[j, k] (one sum over all heads' terms); [relu(Y W1); (.) W2 + residual * Y].
  Every head costs n * d^2 terms.

* the factored form of ``nn.MultiheadAttention`` (``head_dim=r``), from (X, W_Q,h, W_K,h, W_V,h
  (d x r), W_O,h (r x d), b_O, ignore):

      Y = sum_h softmax((X W_Q,h)(X W_K,h)^T, keys masked) (X W_V,h) W_O,h + b_O

  stages: X W_Q,h, X W_K,h, X W_V,h; S_h = Q_h K_h^T; P_h = softmax(S_h); O_h = P_h V_h;
  Y = sum over h and j of O_h[i, j] W_O,h[j, k] + 1 * b_O[k]. Every head costs n * d * r terms.

Both are built by ``usim.ops.pipeline``: every product term is a token of its own, a matmul stage
is two layers (fetch the two operands and multiply; average the terms and scale back), the softmax
five with masked keys (a masked key's score is never read: its weight is exactly 0, whatever the
kept scores), and the stream width and head count do not grow with n, d or the number of heads. All
routing between the steps is done by the encoder's own attention layers.

Depth: (A, V) form 11 (16 with ffn_hidden); factored form 14. Activations: bilinear, exp,
reciprocal (+ relu). The weights are the same for every size of a form (the sizes are positional
features and inputs: ``usim.ops.pipeline``), so ``UniversalSimulator()`` runs every size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usim import budget
from usim.ops.base import Construction, check_size, register
from usim.ops.pipeline import Pipeline, Product, matrix, stacked


def _av_pipeline(n: int, d: int, heads: int, ffn_hidden: int | None) -> Pipeline:
    inputs = {"x": (n, d), **{f"a{h}": (d, d) for h in range(heads)}, **{f"v{h}": (d, d) for h in range(heads)}}
    weights = {f"s{h}": (n, n) for h in range(heads)}  # the attention weights are outputs too
    if ffn_hidden is None:
        pipe = Pipeline({**inputs, "ignore": (n,)}, {"y": (n, d), **weights})
    else:
        inputs.update({"w1": (d, ffn_hidden), "w2": (ffn_hidden, d), "residual": (1,), "ignore": (n,)})
        pipe = Pipeline(inputs, {"out": (n, d), **weights})
    xa = [pipe.block(f"xa{h}", (n, d)) for h in range(heads)]
    xv = [pipe.block(f"xv{h}", (n, d)) for h in range(heads)]
    pipe.matmul("xa.", [Product(xa[h], d, matrix("x", "i", "t"), matrix(f"a{h}", "t", "k")) for h in range(heads)]
                + [Product(xv[h], d, matrix("x", "i", "t"), matrix(f"v{h}", "t", "k")) for h in range(heads)])
    pipe.matmul("s.", [Product(f"s{h}", d, matrix(xa[h], "i", "t"), matrix("x", "k", "t")) for h in range(heads)])
    pipe.softmax("p.", list(weights), keep="ignore")
    y = pipe.block("y", (n, d))
    pipe.matmul("y.", [Product(y, heads * n, stacked(list(weights), "i", "t", n), stacked(xv, "t", "k", n))])
    if ffn_hidden is not None:
        hidden = pipe.block("hidden", (n, ffn_hidden))
        pipe.matmul("w1.", [Product(hidden, d, matrix(y, "i", "t"), matrix("w1", "t", "k"))], activation="relu")
        terms = ffn_hidden + 1  # the last term is residual * y[i, k]
        pipe.matmul("w2.", [Product("out", terms,
                                    matrix(hidden, "i", "t").then("residual", "0", "0", terms),
                                    matrix("w2", "t", "k").then(y, "i", "k", terms))])
    return pipe


def _factored_pipeline(n: int, d: int, heads: int, r: int, m: int, kdim: int, vdim: int) -> Pipeline:
    """Queries x (n, d); keys xk (m, kdim) and values xv (m, vdim) (the same tensors for
    self-attention); per head ignore flags (n, m) (1 = the score is left out), a score bias (n, m) and
    a multiplier of the weights (n, m) (1, or dropout's mask / (1 - p))."""
    proj = ("wq", "wk", "wv")
    sizes = {"wq": d, "wk": kdim, "wv": vdim}
    inputs = {"x": (n, d), "xk": (m, kdim), "xv": (m, vdim),
              **{f"{w}{h}": (sizes[w], r) for w in proj for h in range(heads)},
              **{f"wo{h}": (r, d) for h in range(heads)}, "bo": (d,), "one": (1,),
              **{f"ignore{h}": (n, m) for h in range(heads)}, **{f"bias{h}": (n, m) for h in range(heads)},
              **{f"scale{h}": (n, m) for h in range(heads)}}
    weights = {f"s{h}": (n, m) for h in range(heads)}
    pipe = Pipeline(inputs, {"y": (n, d), **weights})
    attention_stages(pipe, heads, r)
    return pipe


def attention_stages(pipe: Pipeline, heads: int, r: int, x: str = "x", xk: str = "xk", xv: str = "xv",
                     y: str = "y", qkv_bias: bool = False, residual: str | None = None, prefix: str = "") -> None:
    """Append the factored attention's stages to ``pipe``: y = sum_h softmax((x W_Q,h)(xk W_K,h)^T)
    (xv W_V,h) W_O,h + 1 * b_O [+ residual]. Reads the input blocks wq{h}, wk{h}, wv{h}, wo{h}, bo,
    one, ignore{h}, bias{h} and scale{h} (see ``_factored_pipeline``); with ``qkv_bias`` also bq{h},
    bk{h}, bv{h} (r,), added as one more term 1 * b[k] of each projection; ``residual`` names a block
    of y's shape added to y (the stage's addend). The weights go to blocks s{h}. ``prefix`` starts the
    names of the stages, of their blocks and of the weight inputs (not of one and the masks), so that
    several attentions can share one pipeline."""
    n, d = pipe.shape(x)
    m, kdim = pipe.shape(xk)
    proj = ("wq", "wk", "wv")
    sizes = {"wq": d, "wk": kdim, "wv": pipe.shape(xv)[1]}
    weights = [pipe.block(f"{prefix}s{h}", (n, m)) for h in range(heads)]
    q, o = ([pipe.block(f"{prefix}{name}{h}", (n, r)) for h in range(heads)] for name in ("q", "o"))
    k, v = ([pipe.block(f"{prefix}{name}{h}", (m, r)) for h in range(heads)] for name in ("k", "v"))
    source = {"wq": x, "wk": xk, "wv": xv}

    def projection(w, h, out):
        left, right, terms = matrix(source[w], "i", "t"), matrix(f"{prefix}{w}{h}", "t", "k"), sizes[w]
        if qkv_bias:  # the last term is 1 * b[k]
            terms += 1
            left = left.then("one", "0", "0", terms)
            right = right.then(f"{prefix}b{w[1]}{h}", "0", "k", terms)
        return Product(out, terms, left, right)

    pipe.matmul(f"{prefix}qkv.", [projection(w, h, blk[h]) for w, blk in zip(proj, (q, k, v)) for h in range(heads)])
    pipe.matmul(f"{prefix}s.", [Product(weights[h], r, matrix(q[h], "i", "t"), matrix(k[h], "k", "t"),
                                        addend=f"bias{h}") for h in range(heads)])
    pipe.softmax(f"{prefix}p.", weights, keep=[f"ignore{h}" for h in range(heads)],
                 scale=[f"scale{h}" for h in range(heads)])  # 1, or dropout's mask / (1 - p)
    pipe.matmul(f"{prefix}pv.", [Product(o[h], m, matrix(weights[h], "i", "t"), matrix(v[h], "t", "k"))
                                 for h in range(heads)])
    terms = heads * r + 1  # the last term is 1 * b_O[k]
    pipe.matmul(f"{prefix}out.", [Product(y, terms,
                                          stacked(o, "i", "t", r).then("one", "0", "0", terms),
                                          stacked([f"{prefix}wo{h}" for h in range(heads)], "t", "k", r)
                                          .then(f"{prefix}bo", "0", "k", terms),
                                          addend=residual)])


def score_masks(x, heads: int, n: int, m: int, key_padding_mask, attn_mask, n_in: int, m_in: int,
                finite: bool = True):
    """Per head (..., heads, n, m): the ignore flags (1 = left out of max and sum) and the score
    bias of a U built for n queries and m keys, from key_padding_mask (..., m_in) and attn_mask
    ((n_in, m_in) or (..., heads, n_in, m_in), bool or float) for n_in queries and m_in keys: True and
    -inf are ignore flags, every finite value (the dtype's minimum too) a bias. Padded keys are
    ignored, padded queries ignore only padded keys. ``finite=False`` lets NaN and +inf of a float
    attn_mask into the bias."""
    ignore = torch.zeros(heads, n_in, m_in, dtype=torch.bool, device=x.device)
    bias = torch.zeros(heads, n_in, m_in, dtype=x.dtype, device=x.device)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape[-1:] != (m_in,):
            raise ValueError(f"key_padding_mask must be bool (..., {m_in}), got {key_padding_mask.dtype} "
                             f"{tuple(key_padding_mask.shape)}")
        ignore = ignore | key_padding_mask[..., None, None, :]
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.shape[-2:] != (n_in, m_in) or (attn_mask.dim() > 2 and attn_mask.shape[-3] != heads):
            raise ValueError(f"attn_mask must be ({n_in}, {m_in}) or (..., {heads}, {n_in}, {m_in}), "
                             f"got {tuple(attn_mask.shape)}")
        if attn_mask.dtype == torch.bool:
            ignore = ignore | attn_mask
        elif attn_mask.is_floating_point():
            if finite and (torch.isnan(attn_mask).any() or (attn_mask == float("inf")).any()):
                raise ValueError("a float attn_mask may hold finite values and -inf only")
            attn_mask = attn_mask.to(x.dtype)  # a value below x's range is -inf: left out
            left_out = attn_mask == float("-inf")
            ignore = ignore | left_out
            bias = bias + attn_mask.masked_fill(left_out, 0)
        else:
            raise TypeError(f"attn_mask must be bool or floating, got {attn_mask.dtype}")
    ignore, bias = torch.broadcast_tensors(ignore, bias)
    # padded keys are ignored (with no keys at all, every row is fully masked: weights 0)
    ignore = F.pad(F.pad(ignore, (0, m - m_in), value=True), (0, 0, 0, n - n_in), value=False)
    ignore[..., n_in:, :m_in] = False
    return ignore.to(x.dtype), F.pad(bias, (0, m - m_in, 0, n - n_in))


FORMS = ("av", "av_ffn", "factored")


def _builder(form: str, sizes: tuple):
    """(Builder, Layout) of U of one form at the given sizes, result slots set: (n, d, heads,
    ffn_hidden or None) for the (A, V) forms, (n, d, heads, head_dim, kv_len, kdim, vdim) factored."""
    pipe = _factored_pipeline(*sizes) if form == "factored" else _av_pipeline(*sizes)
    b, layout = pipe.build()
    for h in range(sizes[2]):
        b.result(f"s{h}", pipe.home[f"s{h}"])
    result = "y" if "y" in [blk.name for blk in layout.outputs] else "out"
    b.result(result, pipe.home[result])
    return b, layout


@register
class UniversalSimulator(Construction):
    """forward(x (..., n, d), *weights, key_padding_mask=None, ...) -> (..., n, d).

    (A, V) form: weights = a, v, each (d, d) or (heads, d, d), optionally batched; with
    ``ffn_hidden`` also w1, w2, residual. Factored form (``head_dim=r``): weights = wq, wk, wv
    ((heads, d, r) or (d, r) for one head), wo ((heads, r, d) or (r, d)), and bo (d,) optional.
    key_padding_mask (..., n) is True where a key (token of x) is ignored (an item whose every key is
    ignored gets weights 0, as in torch's scaled_dot_product_attention).

    ``UniversalSimulator()`` (no sizes; ``form="av"``, ``"av_ffn"`` or ``"factored"``) runs every
    size: n, d, heads (and ffn_hidden, head_dim, kv_len, kdim, vdim) are read off the inputs, and
    the layout of each call shape is built once. Its weights are those of every sized U of its form,
    bitwise. A sized U (``UniversalSimulator(n, d, ...)``) also computes any smaller problem: inputs
    are padded with zeros and the padded tokens masked out of the softmax.
    """

    def __init__(self, n: int | None = None, d: int | None = None, heads: int | None = None,
                 ffn_hidden: int | None = None, *, head_dim: int | None = None, kv_len: int | None = None,
                 kdim: int | None = None, vdim: int | None = None, form: str | None = None,
                 execution: str = "fast"):
        if form is not None and form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if n is None and d is None:  # universal: every size of the form
            given = {k: v for k, v in (("heads", heads), ("ffn_hidden", ffn_hidden), ("head_dim", head_dim),
                                       ("kv_len", kv_len), ("kdim", kdim), ("vdim", vdim)) if v is not None}
            if given:
                raise ValueError(f"a universal U (no n, d) reads its sizes off the inputs; got {given}: give n and d "
                                 "too for a U of fixed sizes, or pass form='av', 'av_ffn' or 'factored'")
            form = form or "av"
            sizes = (1, 1, 1, 1, 1, 1, 1) if form == "factored" else (1, 1, 1, 1 if form == "av_ffn" else None)
            b, layout = _builder(form, sizes)
            super().__init__(b.build(), layout, {"form": form}, execution=execution)
            return
        if n is None or d is None:
            raise ValueError(f"give both n and d (a U of fixed sizes) or neither (a universal U), got n={n}, d={d}")
        heads = 1 if heads is None else heads
        check_size("n", n)
        check_size("d", d)
        check_size("heads", heads)
        if ffn_hidden is not None:
            check_size("ffn_hidden", ffn_hidden)
        cross = {"kv_len": kv_len, "kdim": kdim, "vdim": vdim}
        for name, value in cross.items():
            if value is not None:
                check_size(name, value)
                if head_dim is None:
                    raise ValueError(f"{name} is for the factored form: pass head_dim too")
        if head_dim is not None:
            check_size("head_dim", head_dim)
            if ffn_hidden is not None:
                raise ValueError("ffn_hidden is for the (A, V) form; the factored form (head_dim) has none")
            cross = {"kv_len": kv_len or n, "kdim": kdim or d, "vdim": vdim or d}
        tokens = budget.u_tokens(n, d, heads, head_dim, **(cross if head_dim is not None else {}))
        if tokens > budget.MAX_TOKENS:  # before anything is built: positions are int32
            raise ValueError(f"U for n={n}, d={d}, heads={heads}" + (f", head_dim={head_dim}" if head_dim else "")
                             + f" would lay out {tokens:,} tokens, more than positions can number "
                               f"({budget.MAX_TOKENS:,}): choose smaller sizes")
        built = "factored" if head_dim is not None else "av_ffn" if ffn_hidden is not None else "av"
        if form is not None and form != built:
            raise ValueError(f"form={form!r} but these sizes make the {built!r} form")
        if head_dim is None:
            b, layout = _builder(built, (n, d, heads, ffn_hidden))
            args = {"n": n, "d": d, "heads": heads, "ffn_hidden": ffn_hidden}
        else:
            b, layout = _builder(built, (n, d, heads, head_dim, cross["kv_len"], cross["kdim"], cross["vdim"]))
            args = {"n": n, "d": d, "heads": heads, "head_dim": head_dim, **cross}
        super().__init__(b.build(), layout, args, execution=execution)

    @property
    def universal(self) -> bool:
        return "form" in self.args

    @property
    def form(self) -> str:
        """"av", "av_ffn" or "factored"."""
        if self.universal:
            return self.args["form"]
        return "factored" if "head_dim" in self.args else "av_ffn" if self.args["ffn_hidden"] is not None else "av"

    @property
    def n(self) -> int | None:
        return self.args.get("n")

    @property
    def d(self) -> int | None:
        return self.args.get("d")

    @property
    def heads(self) -> int | None:
        return self.args.get("heads")

    @property
    def head_dim(self) -> int | None:
        return self.args.get("head_dim")

    def forward(self, x, *weights, key_padding_mask=None, w1=None, w2=None, residual: bool = False, bo=None,
                key=None, value=None, attn_mask=None, weight_scale=None):
        return self.attention(x, *weights, key_padding_mask=key_padding_mask, w1=w1, w2=w2, residual=residual,
                              bo=bo, key=key, value=value, attn_mask=attn_mask, weight_scale=weight_scale)[0]

    def plan(self, *sizes) -> None:
        """Build the layout, frame and structured program of one call shape ahead of its first call
        (a universal U; sizes as ``frame_for`` takes them)."""
        at = self._at(tuple(sizes))
        if self.encoder.execution == "fast":
            self.encoder.program(torch.float32, None, at[1])

    def _at(self, sizes: tuple):
        """(Layout, Frame) of a call shape, or None for a sized U (its own)."""
        if not self.universal:
            return None
        return self.frame_for(sizes, lambda: _builder(self.form, sizes))

    def attention(self, x, *weights, key_padding_mask=None, w1=None, w2=None, residual: bool = False, bo=None,
                  key=None, value=None, attn_mask=None, weight_scale=None, finite: bool = True,
                  execution: str | None = None):
        """(output (..., n, d), attention weights (..., heads, n, m)), both read from the encoder.

        Factored form only: ``key`` (..., m, kdim) and ``value`` (..., m, vdim) for cross-attention
        (default: x), ``attn_mask`` (n, m) or (..., heads, n, m), bool (True = left out) or float
        (added to the scores; -inf = left out); a row with every score left out has weights 0, as in
        torch's scaled_dot_product_attention (its output is b_O). ``weight_scale`` (..., heads, n, m)
        multiplies the softmax weights entry by entry before they weight the values (dropout: its
        mask / (1 - p)); the returned weights include it, as nn.MultiheadAttention's do. With no keys
        at all (m = 0) the output is b_O, as nn.MultiheadAttention's. ``finite=False`` (factored form): NaN and infinite inputs (a
        float attn_mask's too) are not refused but go through the encoder, as through
        nn.MultiheadAttention (no host sync looks for them). ``execution``: this call's (default:
        the module's)."""
        factored = self.form == "factored"
        if not factored and (key is not None or value is not None or attn_mask is not None or
                             weight_scale is not None):
            raise ValueError("key, value, attn_mask and weight_scale are for the factored form (head_dim)")
        if factored:
            return self._factored_attention(x, weights, key, value, key_padding_mask, attn_mask, bo, weight_scale,
                                            finite, execution)
        names = ("a", "v")
        if 2 < len(weights) <= 6:  # (x, a, v, key_padding_mask, w1, w2, residual) by position
            extra = dict(zip(("key_padding_mask", "w1", "w2", "residual"), weights[2:]))
            weights = weights[:2]
            key_padding_mask = extra.get("key_padding_mask", key_padding_mask)
            w1, w2, residual = extra.get("w1", w1), extra.get("w2", w2), extra.get("residual", residual)
        if len(weights) != len(names):
            raise TypeError(f"this U ((A, V) form) takes x and {', '.join(names)}; got {1 + len(weights)} arrays")
        for name, t in (("x", x), *zip(names, weights)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() < 2:
            raise ValueError(f"x must be (..., n, d), got shape {tuple(x.shape)}")
        n_in, d_in = x.shape[-2:]
        if self.universal:
            heads = weights[0].shape[-3] if weights[0].dim() > 2 else 1
            hidden = None
            if self.form == "av_ffn":
                if not isinstance(w1, torch.Tensor) or w1.dim() < 2:
                    raise ValueError("this U has an FFN sublayer: pass w1 (d, ffn_hidden) and w2 (ffn_hidden, d)")
                hidden = w1.shape[-1]
            for name, size in (("n", n_in), ("d", d_in), ("heads", heads), ("ffn_hidden", hidden)):
                if size is not None:
                    check_size(name, size)
            n, d = n_in, d_in
            at = self._at((n, d, heads, hidden))
        else:
            n, d, heads, hidden, at = self.n, self.d, self.heads, self.args["ffn_hidden"], None
            if n_in > n or d_in > d:
                raise ValueError(f"x is (..., {n_in}, {d_in}) but this U was built for n <= {n}, d <= {d}")
        ignore = self._ignored(key_padding_mask, x, n_in, n)
        x = F.pad(x, (0, d - d_in, 0, n - n_in))
        arrays = self._av_inputs(x, weights, d_in, d, heads, hidden, w1, w2, residual)
        out, *probs = self.run(*arrays, ignore, at=at, execution=execution)
        return out[..., :n_in, :d_in], torch.stack(probs, dim=-3)[..., :n_in, :n_in]

    def _ignored(self, mask, x, n_in, n):
        """Key flags (..., n): 1 ignores a token (masked or padding), 0 keeps it."""
        if mask is None:
            mask = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool or mask.shape[-1:] != (n_in,):
            raise ValueError(f"key_padding_mask must be bool (..., {n_in}), got {mask.dtype} {tuple(mask.shape)}")
        return F.pad(mask.to(x.dtype), (0, n - n_in), value=1.0)

    def _av_inputs(self, x, weights, d_in, d, heads, hidden, w1, w2, residual):
        a, v = (self._per_head(name, t, (d_in, d_in), heads) for name, t in zip(("a", "v"), weights))
        a = F.pad(a, (0, d - d_in, 0, d - d_in))
        v = F.pad(v, (0, d - d_in, 0, d - d_in))
        arrays = [x, *a.unbind(-3), *v.unbind(-3)]
        if hidden is not None:
            if w1 is None or w2 is None:
                raise ValueError("this U has an FFN sublayer: pass w1 (d, ffn_hidden) and w2 (ffn_hidden, d)")
            if w1.shape[-2:] != (d_in, hidden) or w2.shape[-2:] != (hidden, d_in):
                raise ValueError(f"w1 must be (..., {d_in}, {hidden}) and w2 (..., {hidden}, {d_in}), "
                                 f"got {tuple(w1.shape)} and {tuple(w2.shape)}")
            flag = torch.ones(1, dtype=x.dtype, device=x.device) * float(bool(residual))
            arrays += [F.pad(w1, (0, 0, 0, d - d_in)), F.pad(w2, (0, d - d_in)), flag]
        elif w1 is not None or w2 is not None:
            raise ValueError("w1/w2 given but this U was built without ffn_hidden")
        return arrays

    def _factored_attention(self, x, weights, key, value, key_padding_mask, attn_mask, bo, weight_scale, finite,
                            execution=None):
        key = x if key is None else key
        value = key if value is None else value
        names = ("wq", "wk", "wv", "wo")
        if len(weights) != len(names):
            raise TypeError(f"this U (factored) takes x and {', '.join(names)}; got {1 + len(weights)} arrays")
        for name, t in (("x", x), ("key", key), ("value", value), *zip(names, weights)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(f"{name} must have at least 2 axes, got shape {tuple(t.shape)}")
        (n_in, d_in), (m_in, k_in), (m_v, v_in) = x.shape[-2:], key.shape[-2:], value.shape[-2:]
        if m_v != m_in:
            raise ValueError(f"key and value must have the same length, got {tuple(key.shape)} and {tuple(value.shape)}")
        wq, wk, wv, wo = weights
        r_in = wq.shape[-1]
        if self.universal:  # the sizes of this call; no keys (or queries) run at one padded key (query)
            heads = wq.shape[-3] if wq.dim() > 2 else 1
            n, d, r, m, kdim, vdim = max(n_in, 1), d_in, r_in, max(m_in, 1), k_in, v_in
            for name, size in (("n", n), ("d", d), ("heads", heads), ("head_dim", r), ("kdim", kdim), ("vdim", vdim)):
                check_size(name, size)
            at = self._at((n, d, heads, r, m, kdim, vdim))
        else:
            n, d, r, heads, at = self.n, self.d, self.head_dim, self.heads, None
            m, kdim, vdim = self.args["kv_len"], self.args["kdim"], self.args["vdim"]
            for what, got, built in (("x", (n_in, d_in), (n, d)), ("key", (m_in, k_in), (m, kdim)),
                                     ("value", (m_v, v_in), (m, vdim))):
                if got[0] > built[0] or got[1] > built[1]:
                    raise ValueError(f"{what} is (..., {got[0]}, {got[1]}) but this U was built for at most "
                                     f"(..., {built[0]}, {built[1]})")
            if r_in > r:
                raise ValueError(f"wq is {tuple(wq.shape)}: head_dim {r_in} exceeds this U's head_dim {r}")
        wq = F.pad(self._per_head("wq", wq, (d_in, r_in), heads), (0, r - r_in, 0, d - d_in))
        wk = F.pad(self._per_head("wk", wk, (k_in, r_in), heads), (0, r - r_in, 0, kdim - k_in))
        wv = F.pad(self._per_head("wv", wv, (v_in, r_in), heads), (0, r - r_in, 0, vdim - v_in))
        wo = F.pad(self._per_head("wo", wo, (r_in, d_in), heads), (0, d - d_in, 0, r - r_in))
        if bo is None:
            bo = x.new_zeros(d_in)
        if not isinstance(bo, torch.Tensor) or bo.shape[-1:] != (d_in,):
            raise ValueError(f"bo must be a tensor (..., {d_in}), got {tuple(getattr(bo, 'shape', ()))}")
        ignore, bias = score_masks(x, heads, n, m, key_padding_mask, attn_mask, n_in, m_in, finite=finite)
        scale = torch.ones(heads, n_in, m_in, dtype=x.dtype, device=x.device)
        if weight_scale is not None:
            if not isinstance(weight_scale, torch.Tensor) or weight_scale.shape[-3:] != scale.shape:
                raise ValueError(f"weight_scale must be (..., {heads}, {n_in}, {m_in}), "
                                 f"got {tuple(getattr(weight_scale, 'shape', ()))}")
            scale = scale * weight_scale.to(x.dtype)
        scale = F.pad(scale, (0, m - m_in, 0, n - n_in), value=1.0)
        arrays = [F.pad(x, (0, d - d_in, 0, n - n_in)), F.pad(key, (0, kdim - k_in, 0, m - m_in)),
                  F.pad(value, (0, vdim - v_in, 0, m - m_in)), *wq.unbind(-3), *wk.unbind(-3), *wv.unbind(-3),
                  *wo.unbind(-3), F.pad(bo, (0, d - d_in)), torch.ones(1, dtype=x.dtype, device=x.device),
                  *ignore.unbind(-3), *bias.unbind(-3), *scale.unbind(-3)]
        out, *probs = self.run(*arrays, finite=finite, at=at, execution=execution)
        return out[..., :n_in, :d_in], torch.stack(probs, dim=-3)[..., :n_in, :m_in]

    def _per_head(self, name, t, shape, heads):
        if t.dim() == 2:
            t = t[None]
        if t.dim() < 3 or tuple(t.shape[-2:]) != tuple(shape) or t.shape[-3] != heads:
            raise ValueError(f"{name} must be ({shape[0]}, {shape[1]}) or (..., {heads}, {shape[0]}, "
                             f"{shape[1]}) for this U with heads={heads}, got {tuple(t.shape)}")
        return t
