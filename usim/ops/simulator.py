"""The universal simulator U (Theorem 5, Lemma 7, Theorem 8, Corollaries 5.1, 5.2, 8.1).

One encoder maps the packed sequence of (X, A_1..A_H, V_1..V_H, keep[, W1, W2, residual]) to

    Y = sum_h softmax(X A_h X^T, keys masked by keep) X V_h        (n x d)
    out = relu(Y W1) W2 (+ Y when residual = 1)                  (with ffn_hidden)

All routing between the steps is done by the encoder's own attention layers; the heads' chains run
side by side in the same layers (``Builder.parallel``):

    layer 1      X^T, X A_h, X V_h           (transpose, matmuls; bilinear FFN)
    layer 2      S_h = (X A_h) X^T           (matmul)
    layers 3-6   P_h = masked softmax(S_h)   (key flags, row max by attention, exp, row sum,
                                              reciprocal, product)
    layer 7      Y = sum_h P_h (X V_h)       (all heads' products summed by one FFN)
    layers 8-11  relu(Y W1) W2 (+ Y)         (matmul, relu, matmul, residual) with ffn_hidden

Depth 7 (11 with the FFN sublayer); width 1 + 4 * heads * d heads (layer 1).

Activations: bilinear, exp, reciprocal, identity, relu.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usim.construct import FFN, Builder, Head, Unit, match
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register
from usim.ops.matmul import matmul_layers
from usim.ops.softmax import softmax_layers
from usim.ops.transpose import transpose_layer


def _blocks(n: int, d: int, heads: int, ffn_hidden: int | None) -> Layout:
    inputs = {"x": (n, d)}
    inputs.update({f"a{h}": (d, d) for h in range(heads)})
    inputs.update({f"v{h}": (d, d) for h in range(heads)})
    inputs["keep"] = (n,)
    scratch = {"xt": (d, n)}
    for h in range(heads):
        scratch.update({f"xa{h}": (n, d), f"xv{h}": (n, d)})
    # The attention weights P_h are outputs too (read by ``attention``), after the result.
    weights = {f"s{h}": (n, n) for h in range(heads)}
    if ffn_hidden is None:
        return Layout.of(inputs, {"y": (n, d), **weights}, scratch)
    inputs.update({"w1": (d, ffn_hidden), "w2": (ffn_hidden, d), "residual": (1,)})
    scratch.update({"y": (n, d), "hidden": (n, ffn_hidden)})
    return Layout.of(inputs, {"out": (n, d), **weights}, scratch)


@register
class UniversalSimulator(Construction):
    """forward(x (..., n, d), a, v, key_padding_mask=None[, w1, w2, residual]) -> (..., n, d).

    a and v are (d, d) or (heads, d, d), optionally batched. key_padding_mask (..., n) is True
    where a key (token of x) is ignored. A U built for (n, d) also computes any smaller problem
    (n' <= n, d' <= d): inputs are padded with zeros and the padded tokens masked out of the softmax.
    """

    def __init__(self, n: int, d: int, heads: int = 1, ffn_hidden: int | None = None, *,
                 execution: str = "fast"):
        check_size("n", n)
        check_size("d", d)
        check_size("heads", heads)
        if ffn_hidden is not None:
            check_size("ffn_hidden", ffn_hidden)
        layout = _blocks(n, d, heads, ffn_hidden)
        b = Builder(layout)
        b.standard_positions()
        b.slot("xt")

        def first(h):
            def branch():
                matmul_layers(b, ("x", "value"), (f"a{h}", "value"), (f"xa{h}", b.slot(f"xa{h}")), tag=f"xa{h}.")
            return branch

        def second(h):
            def branch():
                matmul_layers(b, ("x", "value"), (f"v{h}", "value"), (f"xv{h}", b.slot(f"xv{h}")), tag=f"xv{h}.")
            return branch

        b.parallel(lambda: transpose_layer(b, "x", "xt", "value", "xt"),
                   *[first(h) for h in range(heads)], *[second(h) for h in range(heads)])
        b.parallel(*[(lambda h=h: matmul_layers(b, (f"xa{h}", f"xa{h}"), ("xt", "xt"), (f"s{h}", b.slot(f"s{h}")),
                                                tag=f"s{h}.")) for h in range(heads)])
        b.parallel(*[(lambda h=h: softmax_layers(b, (f"s{h}", f"s{h}"), (f"s{h}", b.slot(f"p{h}")), tag=f"p{h}.",
                                                 key_valid=("keep", "value"))) for h in range(heads)])
        b.slot("y")
        b.parallel(*[(lambda h=h: matmul_layers(b, (f"s{h}", f"p{h}"), (f"xv{h}", f"xv{h}"), ("y", "y"),
                                                tag=f"y{h}.")) for h in range(heads)])
        for h in range(heads):
            b.result(f"s{h}", f"p{h}")
        if ffn_hidden is None:
            b.result("y", "y")
        else:
            matmul_layers(b, ("y", "y"), ("w1", "value"), ("hidden", b.slot("hidden")), tag="w1.")
            b.slot("z")
            b.layer(ffn=FFN("relu", [Unit("hidden", "z")]))
            # out = z W2 + residual * y: fetch y and the residual flag, then add.
            b.slot("out")
            matmul_layers(b, ("hidden", "z"), ("w2", "value"), ("out", "out"), tag="w2.")
            b.slot("y_here")
            b.slot("flag")
            residual_block = layout.block_index("residual")
            b.layer([Head([match({"block": residual_block})], [("value", "flag")], name="residual flag"),
                     Head([match({"block": layout.block_index("y"), "row": "row", "col": "col"})],
                          [("y", "y_here")], name="y at out")],
                    FFN("bilinear", [Unit("flag", "out", gate="y_here")]))
            b.result("out", "out")
        super().__init__(b.build(), layout, {"n": n, "d": d, "heads": heads, "ffn_hidden": ffn_hidden},
                         execution=execution)

    @property
    def n(self) -> int:
        return self.args["n"]

    @property
    def d(self) -> int:
        return self.args["d"]

    @property
    def heads(self) -> int:
        return self.args["heads"]

    def forward(self, x, a, v, key_padding_mask=None, w1=None, w2=None, residual: bool = False):
        return self.attention(x, a, v, key_padding_mask, w1, w2, residual)[0]

    def attention(self, x, a, v, key_padding_mask=None, w1=None, w2=None, residual: bool = False):
        """(output (..., n, d), attention weights (..., heads, n, n)), both read from the encoder."""
        n, d, heads, hidden = self.n, self.d, self.heads, self.args["ffn_hidden"]
        for name, t in (("x", x), ("a", a), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() < 2:
            raise ValueError(f"x must be (..., n, d), got shape {tuple(x.shape)}")
        n_in, d_in = x.shape[-2:]
        if n_in > n or d_in > d:
            raise ValueError(f"x is (..., {n_in}, {d_in}) but this U was built for n <= {n}, d <= {d}")
        a = self._per_head("a", a, d_in)
        v = self._per_head("v", v, d_in)
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape[-1:] != (n_in,):
            raise ValueError(f"key_padding_mask must be bool (..., {n_in}), got {key_padding_mask.dtype} "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.all(-1).any():
            raise ValueError("key_padding_mask masks every key of some item: the softmax is undefined")
        # Universality by padding: zero rows/columns, padded tokens masked out of the softmax.
        x = F.pad(x, (0, d - d_in, 0, n - n_in))
        a = F.pad(a, (0, d - d_in, 0, d - d_in))
        v = F.pad(v, (0, d - d_in, 0, d - d_in))
        keep = F.pad((~key_padding_mask).to(x.dtype), (0, n - n_in))
        arrays = [x, *a.unbind(-3), *v.unbind(-3), keep]
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
        out, *weights = self.run(*arrays)
        return out[..., :n_in, :d_in], torch.stack(weights, dim=-3)[..., :n_in, :n_in]

    def _per_head(self, name, t, d_in):
        if t.dim() == 2:
            t = t[None]
        if t.dim() < 3 or t.shape[-2:] != (d_in, d_in) or t.shape[-3] != self.heads:
            raise ValueError(f"{name} must be ({d_in}, {d_in}) or (..., {self.heads}, {d_in}, {d_in}) "
                             f"for this U with heads={self.heads}, got {tuple(t.shape)}")
        return t
