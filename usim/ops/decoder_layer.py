"""A whole decoder layer (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX) in one constructed encoder.

A ``DecoderForm`` names the layer's kind: sizes d, H query heads and G key/value heads of r
features, F hidden features; the norm (RMSNorm or LayerNorm), which biases there are, the MLP
(gated SiLU or plain with an activation), r_rot rotary features (0: none) and the residual
(sequential or GPT-NeoX's parallel). The encoder for n new tokens and P cached ones (m = P + n
keys) takes as inputs, every weight as it multiplies (x @ W; 1/sqrt(r) folded into W_Q and b_Q):

    x (n, d), one (1,) = 1, eps (1,)                      the new tokens' hidden states, eps of the norms
    n1w, n2w [, n1b, n2b] (d,)                            the two norms
    wq{h} (d, r), wk{g}, wv{g} (d, r) [, bq{h}, bk{g}, bv{g} (r,)]
    wo{h} (r, d) [, bo (d,)]
    gated: wg, wu (d, F), wd (F, d) [, bg, bu (F,), bd (d,)];  plain: w1 (d, F), w2 (F, d) [, b1, b2]
    cos, sin (n, r_rot)                                   the new tokens' rotary embeddings (HF's
                                                          position_embeddings), if r_rot > 0
    pk{g}, pv{g} (P, r)                                   the cached keys (after RoPE) and values, if P > 0
    ignore (n, m)                                         1 where query i may not see key j (causal,
                                                          padding, sliding window), else 0

and computes, with head h reading key/value group g = h // (H / G) (GQA, MQA):

    u = norm1(x);  q_h, k_g, v_g = u W + b;  q_h, k_g = RoPE(q_h), RoPE(k_g)   (first r_rot features)
    K_g = [pk_g; k_g], V_g = [pv_g; v_g] (m, r);  P_h = softmax(q_h K_g^T, ignored keys left out)
    a = sum_h (P_h V_g) W_O,h + b_O + x
    y = a + mlp(norm2(a))        (sequential)         y = a + mlp(norm2(x))        (parallel)
    mlp(z) = (silu(z W_g + b_g) * (z W_u + b_u)) W_d + b_d   or   act(z W_1 + b_1) W_2 + b_2

Outputs: y (n, d) and K_g, V_g (m, r): their last n rows are the new tokens' keys and values for
the cache. Stages (``usim.ops.decoder_stages``; every product term a token of its own): norm 3
layers, projections 2, RoPE + cache 2, scores 2, softmax 5, P V 2, output 2, norm 3, MLP 9 (gated:
gate 3 with its activation, up 2, their product 2, down 2) or 5: depth 30 or 26. Activations: bilinear, identity, exp, reciprocal, relu, rsqrt
and silu / gelu / gelu_tanh.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from usim.ops.base import Construction, check_size, register
from usim.ops.decoder_stages import DecoderPipeline, Rows
from usim.ops.pipeline import Product, matrix, stacked

MLP_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass(frozen=True)
class DecoderForm:
    """What a decoder layer is, sizes included (one encoder per form and shape)."""

    d: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    norm: str = "rms"             # "rms" or "layer"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp: str = "gated"            # "gated" (down(silu(gate) * up)) or "plain" (act, then the second product)
    activation: str = "silu"
    mlp_bias: bool = False
    rot: int = 0                  # rotary features of each head (0: no RoPE)
    parallel: bool = False        # GPT-NeoX's parallel residual

    def check(self) -> "DecoderForm":
        for name in ("d", "heads", "kv_heads", "head_dim", "hidden"):
            check_size(name, getattr(self, name))
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.norm not in ("rms", "layer") or self.mlp not in ("gated", "plain"):
            raise ValueError(f"norm must be 'rms' or 'layer' and mlp 'gated' or 'plain', got {self.norm!r}, {self.mlp!r}")
        if self.activation not in MLP_ACTIVATIONS:
            raise ValueError(f"activation must be one of {MLP_ACTIVATIONS}, got {self.activation!r}")
        if self.rot % 2 or not 0 <= self.rot <= self.head_dim:
            raise ValueError(f"rot must be even, 0 <= rot <= head_dim {self.head_dim}, got {self.rot}")
        return self

    def weights(self) -> dict:
        """Every weight input: name -> shape (per head blocks named with their head index)."""
        d, r, f, H, G = self.d, self.head_dim, self.hidden, self.heads, self.kv_heads
        out = {"n1w": (d,), "n2w": (d,), **({"n1b": (d,), "n2b": (d,)} if self.norm == "layer" else {})}
        for w, count in (("q", H), ("k", G), ("v", G)):
            out.update({f"w{w}{h}": (d, r) for h in range(count)})
            if self.qkv_bias:
                out.update({f"b{w}{h}": (r,) for h in range(count)})
        out.update({f"wo{h}": (r, d) for h in range(H)})
        if self.o_bias:
            out["bo"] = (d,)
        names = (("wg", "bg"), ("wu", "bu"), ("wd", "bd")) if self.mlp == "gated" else (("w1", "b1"), ("w2", "b2"))
        for (w, b), (rows, cols) in zip(names, [(d, f)] * (len(names) - 1) + [(f, d)]):
            out[w] = (rows, cols)
            if self.mlp_bias:
                out[b] = (cols,)
        return out


def _projection(out: str, source: str, weight: str, bias: str | None, terms: int) -> Product:
    """out = source @ weight (+ 1 * bias as one more term)."""
    left, right = matrix(source, "i", "t"), matrix(weight, "t", "k")
    if bias is None:
        return Product(out, terms, left, right)
    return Product(out, terms + 1, left.then("one", "0", "0", terms + 1), right.then(bias, "0", "k", terms + 1))


def decoder_pipeline(form: DecoderForm, n: int, past: int) -> DecoderPipeline:
    """The stages of the module docstring for n new tokens and ``past`` cached ones."""
    d, r, f, H, G = form.d, form.head_dim, form.hidden, form.heads, form.kv_heads
    m, group = past + n, H // G
    inputs = {"x": (n, d), "one": (1,), "eps": (1,), **form.weights()}
    if form.rot:
        inputs.update({"cos": (n, form.rot), "sin": (n, form.rot)})
    if past:
        inputs.update({**{f"pk{g}": (past, r) for g in range(G)}, **{f"pv{g}": (past, r) for g in range(G)}})
    inputs["ignore"] = (n, m)
    pipe = DecoderPipeline(inputs, {"y": (n, d), **{f"k{g}": (m, r) for g in range(G)},
                                    **{f"v{g}": (m, r) for g in range(G)}})
    layer = form.norm == "layer"
    u = pipe.block("u", (n, d))
    pipe.norm("n1.", "x", u, "n1w", "eps", "n1b" if layer else None)
    q = [pipe.block(f"q{h}", (n, r)) for h in range(H)]
    kn, vn = ([pipe.block(f"{w}n{g}", (n, r)) for g in range(G)] for w in ("k", "v"))
    bias = (lambda name: name) if form.qkv_bias else (lambda name: None)
    pipe.matmul("qkv.", [_projection(q[h], u, f"wq{h}", bias(f"bq{h}"), d) for h in range(H)] +
                [_projection(blocks[g], u, f"w{w}{g}", bias(f"b{w}{g}"), d)
                 for w, blocks in (("k", kn), ("v", vn)) for g in range(G)])
    cached = (lambda w, g: [Rows(0, past, f"p{w}{g}", False)]) if past else (lambda w, g: [])
    outputs = {**{f"k{g}": cached("k", g) + [Rows(past, m, kn[g], form.rot > 0)] for g in range(G)},
               **{f"v{g}": cached("v", g) + [Rows(past, m, vn[g], False)] for g in range(G)}}
    if form.rot:
        outputs.update({f"qr{h}": [Rows(0, n, q[h], True)] for h in range(H)})
        q = [pipe.block(f"qr{h}", (n, r)) for h in range(H)]
    pipe.rope("rope.", outputs, rot=form.rot)
    s = [pipe.block(f"s{h}", (n, m)) for h in range(H)]
    pipe.matmul("s.", [Product(s[h], r, matrix(q[h], "i", "t"), matrix(f"k{h // group}", "k", "t")) for h in range(H)])
    pipe.softmax("p.", s, keep=["ignore"] * H)
    o = [pipe.block(f"o{h}", (n, r)) for h in range(H)]
    pipe.matmul("pv.", [Product(o[h], m, matrix(s[h], "i", "t"), matrix(f"v{h // group}", "t", "k")) for h in range(H)])
    a = pipe.block("a", (n, d))
    left, right, terms = stacked(o, "i", "t", r), stacked([f"wo{h}" for h in range(H)], "t", "k", r), H * r
    if form.o_bias:  # the last term is 1 * b_O[k]
        terms += 1
        left, right = left.then("one", "0", "0", terms), right.then("bo", "0", "k", terms)
    pipe.matmul("out.", [Product(a, terms, left, right, addend="x")])
    z = pipe.block("z", (n, d))
    pipe.norm("n2.", "x" if form.parallel else a, z, "n2w", "eps", "n2b" if layer else None)
    bias = (lambda name: name) if form.mlp_bias else (lambda name: None)
    if form.mlp == "gated":
        gate, up, both = (pipe.block(name, (n, f)) for name in ("gate", "up", "gu"))
        pipe.matmul("gate.", [_projection(gate, z, "wg", bias("bg"), d)], activation=form.activation)
        pipe.matmul("up.", [_projection(up, z, "wu", bias("bu"), d)])
        pipe.matmul("gu.", [Product(both, 1, matrix(gate, "i", "k"), matrix(up, "i", "k"))])
        down = _projection("y", both, "wd", bias("bd"), f)
    else:
        both = pipe.block("h", (n, f))
        pipe.matmul("fc.", [_projection(both, z, "w1", bias("b1"), d)], activation=form.activation)
        down = _projection("y", both, "w2", bias("b2"), f)
    pipe.matmul("down.", [Product(down.out, down.terms, down.left, down.right, addend=a)])
    return pipe


@register
class DecoderLayerSimulator(Construction):
    """One decoder layer of a ``DecoderForm`` for at most n new tokens and ``past`` cached ones
    (``usim.ops.decoder_layer``); shorter inputs are padded and the padding masked out.

    forward(x (..., n_in, d), weights {name: tensor} (``DecoderForm.weights``), eps, keep (..., n_in,
    p_in + n_in) bool (True: query i sees key j), cos, sin (..., n_in, rot), past_keys, past_values
    (..., G, p_in, r)) -> (y (..., n_in, d), keys, values (..., G, n_in, r)): the new tokens'
    hidden states and their keys (after RoPE) and values.
    """

    def __init__(self, n: int, past: int = 0, *, execution: str = "fast", **form):
        check_size("n", n)
        check_size("past", past, minimum=0)
        self.form = DecoderForm(**form).check()
        pipe = decoder_pipeline(self.form, n, past)
        b, layout = pipe.build()
        for blk in layout.outputs:
            b.result(blk.name, pipe.home[blk.name])
        super().__init__(b.build(), layout, {"n": n, "past": past, **asdict(self.form)}, execution=execution)

    @classmethod
    def from_parts(cls, encoder, layout, args, execution="fast"):
        module = super().from_parts(encoder, layout, args, execution)
        module.form = DecoderForm(**{k: v for k, v in args.items() if k not in ("n", "past")})
        return module

    def forward(self, x, weights: dict, eps, keep, cos=None, sin=None, past_keys=None, past_values=None):
        form, n, past = self.form, self.args["n"], self.args["past"]
        G, r = form.kv_heads, form.head_dim
        n_in = x.shape[-2]
        p_in = 0 if past_keys is None else past_keys.shape[-2]
        if x.shape[-1] != form.d or n_in > n or p_in > past:
            raise ValueError(f"this {self.kind} takes x (..., n <= {n}, {form.d}) and at most {past} cached tokens, "
                             f"got x {tuple(x.shape)} and {p_in} cached")
        if tuple(keep.shape[-2:]) != (n_in, p_in + n_in) or keep.dtype != torch.bool:
            raise ValueError(f"keep must be bool (..., {n_in}, {p_in + n_in}), got {keep.dtype} {tuple(keep.shape)}")
        shapes = form.weights()
        if set(weights) != set(shapes) or any(tuple(weights[k].shape) != shapes[k] for k in shapes):
            raise ValueError(f"weights must be {shapes}, got { {k: tuple(v.shape) for k, v in weights.items()} }")
        named = dict(weights)
        named["x"] = F.pad(x, (0, 0, 0, n - n_in))
        named["one"] = torch.ones(1, dtype=x.dtype, device=x.device)
        named["eps"] = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(1)
        if form.rot:
            named["cos"], named["sin"] = (F.pad(t.to(x.dtype), (0, 0, 0, n - n_in)) for t in (cos, sin))
        if past:
            for name, t in (("pk", past_keys), ("pv", past_values)):
                t = x.new_zeros(*x.shape[:-2], G, 0, r) if t is None else t
                named.update(zip((f"{name}{g}" for g in range(G)), F.pad(t, (0, 0, 0, past - p_in)).unbind(-3)))
        keep = keep | ~keep.any(-1, keepdim=True)  # a row that sees no key sees every key (finite, unused)
        # keys: p_in cached then padding up to past, n_in new then padding; padded keys are ignored,
        # padded query rows see every key (they stay finite and are dropped)
        ignore = torch.ones(*keep.shape[:-2], n, past + n, dtype=torch.bool, device=x.device)
        ignore[..., :n_in, :p_in] = ~keep[..., :p_in]
        ignore[..., :n_in, past: past + n_in] = ~keep[..., p_in:]
        ignore[..., n_in:, :] = False
        named["ignore"] = ignore.to(x.dtype)
        y, *kv = self.run(*(named[blk.name] for blk in self.layout.inputs), finite=False)
        keys, values = (torch.stack(kv[i * G:(i + 1) * G], dim=-3)[..., past: past + n_in, :] for i in (0, 1))
        return y[..., :n_in, :], keys, values
