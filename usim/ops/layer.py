"""A whole transformer encoder layer in one constructed encoder (Corollary 5.1: "the construction
extends to the entire transformer").

Inputs: x (n, E) and every weight of the layer, H heads of r = E / H features:

    wq{h}, wk{h}, wv{h} (E, r), bq{h}, bk{h}, bv{h} (r,)   projections (1/sqrt(r) folded into wq, bq)
    wo{h} (r, E), bo (E,)                                 output projection
    gamma1, beta1, gamma2, beta2 (E,)                     the two LayerNorms (eps a constant, > 0)
    w1 (E, F), b1 (F,), w2 (F, E), b2 (E,)                the feed-forward network
    one (1,) = 1; per head ignore flags, score bias and weight multiplier (n, n), as in U

and it computes, with LN(z) = (z - mean) / sqrt(var + eps) * gamma + beta row by row (biased
variance, as torch) and act = relu, gelu or gelu_tanh:

    post-norm (torch's default, BERT)          pre-norm (norm_first=True)
    a = x + Attn(x)                            u = LN1(x);  a = x + Attn(u)
    h = LN1(a)                                 h = LN2(a)
    f = act(h W1 + b1)                         f = act(h W1 + b1)
    y = LN2(f W2 + b2 + h)                     y = f W2 + b2 + a

Stages (``usim.ops.pipeline``; every product term a token of its own): the attention is U's
factored form (``usim.ops.simulator.attention_stages``: projections with their biases as one more
term 1 * b[k], scores + bias, masked softmax times the multiplier, P V, output projection + b_O)
with the first residual (x) as the output stage's addend; a LayerNorm is the pipeline's layernorm
stage (the row mean and the variance by averaging heads, rsqrt(var + eps) by the FFN, gamma and beta
by bilinear units); f is one matmul stage with the activation and b1 as one more term 1 * b1[k]; the
second product likewise with b2, and the second residual (h or a) as its addend.

Depth 22 either way: attention 12 (projections 2, scores 2, softmax 4, P V 2, output 2), each
LayerNorm 3, each FFN product 2. Activations: bilinear, identity, exp, reciprocal, rsqrt and the
layer's own (relu, gelu or gelu_tanh).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usim.ops.base import Construction, check_size, register
from usim.ops.pipeline import Pipeline, Product, matrix
from usim.ops.simulator import _col, _with_last_term, _zero, attention_stages, score_masks

LAYER_ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
# The weights, in the order forward takes them: name -> shape given (E, H, r, F) (per head: stacked).
WEIGHTS = ("wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo", "gamma1", "beta1", "w1", "b1", "w2", "b2",
           "gamma2", "beta2")


def _shapes(d: int, heads: int, r: int, hidden: int) -> dict:
    return {"wq": (heads, d, r), "wk": (heads, d, r), "wv": (heads, d, r), "bq": (heads, r), "bk": (heads, r),
            "bv": (heads, r), "wo": (heads, r, d), "bo": (d,), "gamma1": (d,), "beta1": (d,), "w1": (d, hidden),
            "b1": (hidden,), "w2": (hidden, d), "b2": (d,), "gamma2": (d,), "beta2": (d,)}


def _layer_pipeline(n: int, d: int, heads: int, r: int, hidden: int, activation: str, norm_first: bool,
                    eps: float) -> Pipeline:
    per_head = {f"{w}{h}": shape for w, shape in (("wq", (d, r)), ("wk", (d, r)), ("wv", (d, r)))
                for h in range(heads)}
    inputs = {"x": (n, d), **per_head, **{f"{b}{h}": (r,) for b in ("bq", "bk", "bv") for h in range(heads)},
              **{f"wo{h}": (r, d) for h in range(heads)}, "bo": (d,), "one": (1,),
              **{f"{name}{h}": (n, n) for name in ("ignore", "bias", "scale") for h in range(heads)},
              "gamma1": (d,), "beta1": (d,), "w1": (d, hidden), "b1": (hidden,), "w2": (hidden, d), "b2": (d,),
              "gamma2": (d,), "beta2": (d,)}
    pipe = Pipeline(inputs, {"y": (n, d)})
    attended = "x"
    if norm_first:
        attended = pipe.block("u", (n, d))
        pipe.layernorm("ln1.", "x", attended, "gamma1", "beta1", eps)
    a = pipe.block("a", (n, d))
    attention_stages(pipe, heads, r, x=attended, xk=attended, xv=attended, y=a, qkv_bias=True, residual="x")
    h, f = pipe.block("h", (n, d)), pipe.block("f", (n, hidden))
    pipe.layernorm("ln2." if norm_first else "ln1.", a, h, "gamma2" if norm_first else "gamma1",
                   "beta2" if norm_first else "beta1", eps)
    terms = d + 1  # the last term is 1 * b1[k]
    pipe.matmul("ff1.", [Product(f, terms, _with_last_term(matrix(h, "i", "t"), "one", _zero, _zero, terms),
                                 _with_last_term(matrix("w1", "t", "k"), "b1", _zero, _col, terms))],
                activation=activation)
    g = "y" if norm_first else pipe.block("g", (n, d))
    terms = hidden + 1  # the last term is 1 * b2[k]; the residual is the addend
    pipe.matmul("ff2.", [Product(g, terms, _with_last_term(matrix(f, "i", "t"), "one", _zero, _zero, terms),
                                 _with_last_term(matrix("w2", "t", "k"), "b2", _zero, _col, terms),
                                 addend=a if norm_first else h)])
    if not norm_first:
        pipe.layernorm("ln2.", g, "y", "gamma2", "beta2", eps)
    return pipe


@register
class EncoderLayerSimulator(Construction):
    """forward(x (..., n_in, d), wq, wk, wv, bq, bk, bv, wo, bo, gamma1, beta1, w1, b1, w2, b2, gamma2,
    beta2, key_padding_mask=None, attn_mask=None) -> (..., n_in, d): the encoder layer of the module
    docstring, for any n_in <= n (the padded keys are left out of the softmax).

    Shapes: wq, wk, wv (heads, d, r); bq, bk, bv (heads, r); wo (heads, r, d); bo, gamma*, beta*,
    b2 (d,); w1 (d, ffn_hidden); b1 (ffn_hidden,); w2 (ffn_hidden, d); each may carry leading batch
    axes. The scores are (x W_Q,h + b_Q,h)(x W_K,h + b_K,h)^T: fold 1/sqrt(r) into wq and bq.
    key_padding_mask (..., n_in) bool, True = left out; attn_mask (n_in, n_in) or (..., heads,
    n_in, n_in), bool (True = left out) or float (added to the scores, -inf = left out).
    """

    def __init__(self, n: int, d: int, heads: int, ffn_hidden: int, activation: str = "relu",
                 norm_first: bool = False, eps: float = 1e-5, *, execution: str = "fast"):
        for name, value in (("n", n), ("d", d), ("heads", heads), ("ffn_hidden", ffn_hidden)):
            check_size(name, value)
        if d % heads:
            raise ValueError(f"d {d} must be divisible by heads {heads}")
        if activation not in LAYER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {LAYER_ACTIVATIONS}, got {activation!r}")
        if not isinstance(norm_first, bool):
            raise TypeError(f"norm_first must be a bool, got {type(norm_first).__name__}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        pipe = _layer_pipeline(n, d, heads, d // heads, ffn_hidden, activation, norm_first, float(eps))
        b, layout = pipe.build()
        b.result("y", pipe.home["y"])
        args = {"n": n, "d": d, "heads": heads, "ffn_hidden": ffn_hidden, "activation": activation,
                "norm_first": norm_first, "eps": float(eps)}
        super().__init__(b.build(), layout, args, execution=execution)

    @property
    def n(self) -> int:
        return self.args["n"]

    @property
    def d(self) -> int:
        return self.args["d"]

    @property
    def heads(self) -> int:
        return self.args["heads"]

    def forward(self, x, *weights, key_padding_mask=None, attn_mask=None):
        n, d, heads = self.n, self.d, self.heads
        if len(weights) != len(WEIGHTS):
            raise TypeError(f"{self.title} takes x and {', '.join(WEIGHTS)}; got {1 + len(weights)} arrays")
        shapes = _shapes(d, heads, d // heads, self.args["ffn_hidden"])
        for name, t in (("x", x), *zip(WEIGHTS, weights)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            want = (n, d) if name == "x" else shapes[name]
            got = tuple(t.shape[t.dim() - len(want):]) if t.dim() >= len(want) else tuple(t.shape)
            if (name == "x" and (t.dim() < 2 or got[1] != d or got[0] > n)) or (name != "x" and got != want):
                raise ValueError(f"{name} must be (..., {', '.join(map(str, want))})"
                                 f"{' with at most ' + str(n) + ' rows' if name == 'x' else ''}, got {tuple(t.shape)}")
        n_in = x.shape[-2]
        w = dict(zip(WEIGHTS, weights))
        ignore, bias = score_masks(x, heads, n, n, key_padding_mask, attn_mask, n_in, n_in)
        scale = torch.ones(heads, n, n, dtype=x.dtype, device=x.device)
        one = torch.ones(1, dtype=x.dtype, device=x.device)
        arrays = [F.pad(x, (0, 0, 0, n - n_in)), *(t for name in ("wq", "wk", "wv") for t in w[name].unbind(-3)),
                  *(t for name in ("bq", "bk", "bv") for t in w[name].unbind(-2)), *w["wo"].unbind(-3), w["bo"],
                  one, *ignore.unbind(-3), *bias.unbind(-3), *scale.unbind(-3),
                  *(w[name] for name in ("gamma1", "beta1", "w1", "b1", "w2", "b2", "gamma2", "beta2"))]
        return self.run(*arrays)[..., :n_in, :]
