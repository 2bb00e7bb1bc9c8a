"""A whole transformer encoder layer in one constructed encoder (Corollary 5.1: "the construction
extends to the entire transformer").

Inputs: x (n, E) and every weight of the layer, H heads of r = E / H features:

    wq{h}, wk{h}, wv{h} (E, r), bq{h}, bk{h}, bv{h} (r,)   projections (1/sqrt(r) folded into wq, bq)
    wo{h} (r, E), bo (E,)                                 output projection
    gamma1, beta1, gamma2, beta2 (E,)                     the two LayerNorms (eps an input, > 0)
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

Depth 25 either way: attention 14 (projections 2, scores 2, softmax 6, P V 2, output 2), each
LayerNorm 3, the first FFN product 3 (the sum, then the activation), the second 2. The weights are
the same for every n, d, heads, ffn_hidden and eps: ``EncoderLayerSimulator(activation=...,
norm_first=...)`` runs every size. Activations: bilinear, identity, exp, reciprocal, rsqrt and the
layer's own (relu, gelu or gelu_tanh).

``EncoderStackSimulator`` chains L such layers in ONE encoder (depth 25 L): layer i's weights,
blocks and stages are named "L{i}.*", its output block is layer i + 1's input, and one, the masks
and the weight multipliers are shared. Its sequence is about L times a layer's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usim.ops.base import Construction, check_size, register
from usim.ops.pipeline import Pipeline, Product, matrix
from usim.ops.simulator import attention_stages, score_masks

LAYER_ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
# The weights of one layer, in the order forward takes them (their shapes: ``_shapes``; per head: stacked).
WEIGHTS = ("wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo", "gamma1", "beta1", "w1", "b1", "w2", "b2",
           "gamma2", "beta2")


def _shapes(d: int, heads: int, r: int, hidden: int) -> dict:
    return {"wq": (heads, d, r), "wk": (heads, d, r), "wv": (heads, d, r), "bq": (heads, r), "bk": (heads, r),
            "bv": (heads, r), "wo": (heads, r, d), "bo": (d,), "gamma1": (d,), "beta1": (d,), "w1": (d, hidden),
            "b1": (hidden,), "w2": (hidden, d), "b2": (d,), "gamma2": (d,), "beta2": (d,)}


def _weight_blocks(d: int, heads: int, r: int, hidden: int, prefix: str) -> dict:
    """One layer's weight input blocks (name -> shape): per head wq{h}, ..., then the rest."""
    blocks = {}
    for name, shape in _shapes(d, heads, r, hidden).items():
        if name in ("wq", "wk", "wv", "bq", "bk", "bv", "wo"):
            blocks.update({f"{prefix}{name}{h}": shape[1:] for h in range(heads)})
        else:
            blocks[f"{prefix}{name}"] = shape
    return blocks


def layer_stages(pipe: Pipeline, x: str, y: str, heads: int, r: int, hidden: int, activation: str,
                 norm_first: bool, eps: str = "eps", prefix: str = "") -> None:
    """Append one encoder layer's stages (the module docstring) from block x to block y; the weight
    inputs are named as in ``_weight_blocks`` with the same prefix, which also starts the names of
    the stages and of their blocks."""
    n, d = pipe.shape(x)
    ln1, ln2 = f"{prefix}ln1.", f"{prefix}ln2."
    attended = x
    if norm_first:
        attended = pipe.block(f"{prefix}u", (n, d))
        pipe.layernorm(ln1, x, attended, f"{prefix}gamma1", f"{prefix}beta1", eps)
    a = pipe.block(f"{prefix}a", (n, d))
    attention_stages(pipe, heads, r, x=attended, xk=attended, xv=attended, y=a, qkv_bias=True, residual=x,
                     prefix=prefix)
    h, f = pipe.block(f"{prefix}h", (n, d)), pipe.block(f"{prefix}f", (n, hidden))
    second = "2" if norm_first else "1"
    pipe.layernorm(ln2 if norm_first else ln1, a, h, f"{prefix}gamma{second}", f"{prefix}beta{second}", eps)
    terms = d + 1  # the last term is 1 * b1[k]
    pipe.matmul(f"{prefix}ff1.", [Product(f, terms, matrix(h, "i", "t").then("one", "0", "0", terms),
                                          matrix(f"{prefix}w1", "t", "k").then(f"{prefix}b1", "0", "k", terms))],
                activation=activation)
    g = y if norm_first else pipe.block(f"{prefix}g", (n, d))
    terms = hidden + 1  # the last term is 1 * b2[k]; the residual is the addend
    pipe.matmul(f"{prefix}ff2.", [Product(g, terms, matrix(f, "i", "t").then("one", "0", "0", terms),
                                          matrix(f"{prefix}w2", "t", "k").then(f"{prefix}b2", "0", "k", terms),
                                          addend=a if norm_first else h)])
    if not norm_first:
        pipe.layernorm(ln2, g, y, f"{prefix}gamma2", f"{prefix}beta2", eps)


def _stack_pipeline(n: int, d: int, heads: int, hidden: int, layers: int, activation: str,
                    norm_first: bool) -> Pipeline:
    """x -> layer 0 -> ... -> layer (layers - 1) -> y; layer i's blocks, stages and weights are
    prefixed "L{i}." when there is more than one; one, the masks and the multipliers are shared."""
    r = d // heads
    prefixes = [f"L{i}." if layers > 1 else "" for i in range(layers)]
    inputs = {"x": (n, d)}
    for prefix in prefixes:
        inputs.update(_weight_blocks(d, heads, r, hidden, prefix))
    inputs.update({"one": (1,), "eps": (1,), **{f"{name}{h}": (n, n) for name in ("ignore", "bias", "scale") for h in range(heads)}})
    pipe = Pipeline(inputs, {"y": (n, d)})
    x = "x"
    for i, prefix in enumerate(prefixes):
        y = "y" if i == layers - 1 else pipe.block(f"{prefix}y", (n, d))
        layer_stages(pipe, x, y, heads, r, hidden, activation, norm_first, "eps", prefix)
        x = y
    return pipe


def _builder(sizes: tuple, layers: int, activation: str, norm_first: bool):
    """(Builder, Layout) of the layers at sizes (n, d, heads, ffn_hidden), result slot set."""
    pipe = _stack_pipeline(*sizes, layers, activation, norm_first)
    b, layout = pipe.build()
    b.result("y", pipe.home["y"])
    return b, layout


class _Stack(Construction):
    """The shared body of EncoderLayerSimulator and EncoderStackSimulator."""

    def _build(self, n, d, heads, ffn_hidden, layers, activation, norm_first, eps, execution):
        if activation not in LAYER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {LAYER_ACTIVATIONS}, got {activation!r}")
        if not isinstance(norm_first, bool):
            raise TypeError(f"norm_first must be a bool, got {type(norm_first).__name__}")
        _check_eps(eps)
        form = {**({"layers": layers} if layers > 1 else {}), "activation": activation, "norm_first": norm_first}
        if n is None and d is None:  # universal: every size (and eps) of the form
            given = {k: v for k, v in (("heads", heads), ("ffn_hidden", ffn_hidden)) if v is not None}
            if given:
                raise ValueError(f"a universal {type(self).__name__} (no n, d) reads its sizes off the inputs; "
                                 f"got {given}")
            b, layout = _builder((1, 1, 1, 1), layers, activation, norm_first)
            Construction.__init__(self, b.build(), layout, {**form, "eps": float(eps)}, execution=execution)
            return
        for name, value in (("n", n), ("d", d), ("heads", heads), ("ffn_hidden", ffn_hidden), ("layers", layers)):
            check_size(name, value)
        if d % heads:
            raise ValueError(f"d {d} must be divisible by heads {heads}")
        b, layout = _builder((n, d, heads, ffn_hidden), layers, activation, norm_first)
        args = {"n": n, "d": d, "heads": heads, "ffn_hidden": ffn_hidden, **form, "eps": float(eps)}
        Construction.__init__(self, b.build(), layout, args, execution=execution)

    @property
    def universal(self) -> bool:
        return "n" not in self.args

    def plan(self, n: int, d: int, heads: int, ffn_hidden: int) -> None:
        """Build the layout, frame and structured program of one call shape ahead of its first call
        (a universal simulator)."""
        if not self.universal:
            return
        sizes, form = (n, d, heads, ffn_hidden), (self.args.get("layers", 1), self.args["activation"],
                                                  self.args["norm_first"])
        at = self.frame_for(sizes, lambda: _builder(sizes, *form))
        if self.encoder.execution == "fast":
            self.encoder.program(torch.float32, None, at[1])

    @property
    def n(self) -> int | None:
        return self.args.get("n")

    @property
    def d(self) -> int | None:
        return self.args.get("d")

    @property
    def heads(self) -> int | None:
        return self.args.get("heads")

    def _run_layers(self, x, per_layer: list, key_padding_mask, attn_mask, eps=None, execution=None):
        """per_layer: one sequence of the 16 weights (``WEIGHTS``) per layer."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        at = None
        if self.universal:  # this call's sizes, read off x, wq and w1 of the first layer
            weights = per_layer[0] if per_layer else ()
            if x.dim() < 2 or len(weights) != len(WEIGHTS) or not all(isinstance(t, torch.Tensor) for t in weights[:11]):
                raise TypeError(f"{self.title} takes x (..., n, d) and {', '.join(WEIGHTS)} per layer")
            wq, w1 = weights[0], weights[10]
            if wq.dim() < 3 or w1.dim() < 2:
                raise ValueError(f"wq must be (..., heads, d, r) and w1 (..., d, ffn_hidden), got {tuple(wq.shape)} "
                                 f"and {tuple(w1.shape)}")
            n, d, heads, hidden = x.shape[-2], x.shape[-1], wq.shape[-3], w1.shape[-1]
            for name, size in (("n", n), ("d", d), ("heads", heads), ("ffn_hidden", hidden)):
                check_size(name, size)
            if d % heads:
                raise ValueError(f"d {d} must be divisible by heads {heads}")
            sizes = (n, d, heads, hidden)
            layers, activation, norm_first = len(per_layer), self.args["activation"], self.args["norm_first"]
            at = self.frame_for(sizes, lambda: _builder(sizes, layers, activation, norm_first))
        else:
            n, d, heads, hidden = self.n, self.d, self.heads, self.args["ffn_hidden"]
        shapes = _shapes(d, heads, d // heads, hidden)
        if x.dim() < 2 or x.shape[-1] != d or x.shape[-2] > n:
            raise ValueError(f"x must be (..., n_in <= {n}, {d}), got {tuple(x.shape)}")
        named = {"x": F.pad(x, (0, 0, 0, n - x.shape[-2]))}
        prefixes = [f"L{i}." if len(per_layer) > 1 else "" for i in range(len(per_layer))]
        for prefix, weights in zip(prefixes, per_layer):
            if len(weights) != len(WEIGHTS):
                raise TypeError(f"{self.title} takes {', '.join(WEIGHTS)} per layer; got {len(weights)} arrays")
            for name, t in zip(WEIGHTS, weights):
                where = f"{name} (layer {prefix[1:-1]})" if prefix else name
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
                want = shapes[name]
                if t.dim() < len(want) or tuple(t.shape[t.dim() - len(want):]) != want:
                    raise ValueError(f"{where} must be (..., {', '.join(map(str, want))}), got {tuple(t.shape)}")
                if name in ("wq", "wk", "wv", "bq", "bk", "bv", "wo"):
                    axis = -len(want)
                    named.update({f"{prefix}{name}{h}": part for h, part in enumerate(t.unbind(axis))})
                else:
                    named[f"{prefix}{name}"] = t
        n_in = x.shape[-2]
        ignore, bias = score_masks(x, heads, n, n, key_padding_mask, attn_mask, n_in, n_in)
        named["one"] = torch.ones(1, dtype=x.dtype, device=x.device)
        eps = _check_eps(self.args["eps"] if eps is None else eps)
        named["eps"] = torch.full((1,), eps, dtype=x.dtype, device=x.device)
        for name, t in (("ignore", ignore), ("bias", bias), ("scale", torch.ones_like(ignore))):
            named.update({f"{name}{h}": part for h, part in enumerate(t.unbind(-3))})
        layout = self.layout if at is None else at[0]
        return self.run(*(named[block.name] for block in layout.inputs), at=at, execution=execution)[..., :n_in, :]


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


@register
class EncoderLayerSimulator(_Stack):
    """forward(x (..., n_in, d), wq, wk, wv, bq, bk, bv, wo, bo, gamma1, beta1, w1, b1, w2, b2, gamma2,
    beta2, key_padding_mask=None, attn_mask=None) -> (..., n_in, d): the encoder layer of the module
    docstring, for any n_in <= n (the padded keys are left out of the softmax).

    Shapes: wq, wk, wv (heads, d, r); bq, bk, bv (heads, r); wo (heads, r, d); bo, gamma*, beta*,
    b2 (d,); w1 (d, ffn_hidden); b1 (ffn_hidden,); w2 (ffn_hidden, d); each may carry leading batch
    axes. The scores are (x W_Q,h + b_Q,h)(x W_K,h + b_K,h)^T: fold 1/sqrt(r) into wq and bq.
    key_padding_mask (..., n_in) bool, True = left out; attn_mask (n_in, n_in) or (..., heads,
    n_in, n_in), bool (True = left out) or float (added to the scores, -inf = left out).
    """

    def __init__(self, n: int | None = None, d: int | None = None, heads: int | None = None,
                 ffn_hidden: int | None = None, activation: str = "relu", norm_first: bool = False,
                 eps: float = 1e-5, *, execution: str = "fast"):
        self._build(n, d, heads, ffn_hidden, 1, activation, norm_first, eps, execution)

    def forward(self, x, *weights, key_padding_mask=None, attn_mask=None, eps=None, execution=None):
        return self._run_layers(x, [weights], key_padding_mask, attn_mask, eps, execution)


@register
class EncoderStackSimulator(_Stack):
    """``layers`` encoder layers chained in ONE encoder (depth 25 * layers): forward(x, per_layer,
    key_padding_mask=None, attn_mask=None), per_layer a sequence of one weight sequence per layer
    (the 16 arrays of ``EncoderLayerSimulator.forward``); the masks hold for every layer. Layer i's
    blocks and stages are named "L{i}.*"; the output of one is the next one's input block."""

    def __init__(self, n: int | None = None, d: int | None = None, heads: int | None = None,
                 ffn_hidden: int | None = None, layers: int = 2, activation: str = "relu", norm_first: bool = False,
                 eps: float = 1e-5, *, execution: str = "fast"):
        check_size("layers", layers, minimum=2)
        self._build(n, d, heads, ffn_hidden, layers, activation, norm_first, eps, execution)

    def forward(self, x, per_layer, key_padding_mask=None, attn_mask=None, eps=None, execution=None):
        if len(per_layer) != self.args["layers"]:
            raise ValueError(f"{self.title} takes weights for {self.args['layers']} layers, got {len(per_layer)}")
        return self._run_layers(x, list(per_layer), key_padding_mask, attn_mask, eps, execution)
