"""The inverse-based construction (Appendix A.3, eq. 4 of the paper) as one encoder.

The paper's text of eq. 4 is incomplete; this module implements the following exact identity. For
x (n, d), a, v (d, d) and any non-singular characterising matrix m (d, d), with the transformed
inputs

    x' = x m,        a' = m^-1 a m^-T,        v' = m^-1 v,

the attention on the transformed inputs is the attention on the original ones:

    softmax(x' a' x'^T) x' v'  =  softmax(x m m^-1 a m^-T m^T x^T) x m m^-1 v  =  softmax(x a x^T) x v.

The encoder computes m^-1 itself (Gauss-Jordan elimination with partial pivoting, the layers of
``usim.Inverse``), forms x', a' and v' with its own transpose and matmul layers, and its final
attention (score, softmax, product) works on the transformed inputs only, the transform undone by
m^-1. In real arithmetic the result does not depend on m; in floating point it agrees with
softmax(x a x^T) x v to within the rounding of the extra products (worse as m gets ill-conditioned).
A singular m (an exactly-zero pivot) raises ValueError.

Activations: relu, reciprocal, bilinear (inverse); bilinear (matmuls); exp, reciprocal (softmax).
Depth 5d + 10, width max(4d + 1, 2n):

    layers 1..5d+2   m^-1 (elimination; x' = x m in the first layer beside it)
    next             t = m^-1 a,  m^-T (transpose),  v' = m^-1 v
    next             a' = t m^-T,  x'^T (transpose),  x' v'
    next             x' a'
    next             s = (x' a') x'^T
    next 3           p = softmax(s) row-wise
    last             y = p (x' v')
"""

from __future__ import annotations

import torch

from usim.construct import Builder
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register
from usim.ops.inverse import gauss_jordan_layers
from usim.ops.matmul import matmul_layers
from usim.ops.softmax import softmax_layers
from usim.ops.transpose import transpose_layer


@register
class SimulatedInverseAttention(Construction):
    """forward(x (..., n, d), a (d, d), v (d, d), m (d, d)) -> (..., n, d): softmax(x a x^T) x v,
    computed by the encoder from the transformed inputs x m, m^-1 a m^-T, m^-1 v (m non-singular;
    every argument may carry batch axes, batch shapes broadcast)."""

    def __init__(self, n: int, d: int, *, execution: str = "fast"):
        check_size("n", n)
        check_size("d", d)
        scratch = {"w": (d, 2 * d), "mi": (d, d), "xm": (n, d), "t": (d, d), "mit": (d, d), "vp": (d, d),
                   "ap": (d, d), "xmt": (d, n), "xvp": (n, d), "xap": (n, d), "s": (n, n)}
        layout = Layout.of(inputs={"x": (n, d), "a": (d, d), "v": (d, d), "m": (d, d)},
                           outputs={"y": (n, d), "zero_pivots": (1,)}, scratch=scratch)
        b = Builder(layout)
        b.standard_positions()
        for name in ("mi", "xm", "t", "mit", "vp", "ap", "xmt", "xvp", "xap", "s", "p", "y"):
            b.slot(name)
        zeros = []
        b.parallel(lambda: zeros.append(gauss_jordan_layers(b, ("m", "value"), "w", inverse_out=("mi", "mi"),
                                                            tag="inv.")),
                   lambda: matmul_layers(b, ("x", "value"), ("m", "value"), ("xm", "xm"), tag="xm."))
        b.parallel(lambda: matmul_layers(b, ("mi", "mi"), ("a", "value"), ("t", "t"), tag="t."),
                   lambda: transpose_layer(b, "mi", "mit", "mi", "mit"),
                   lambda: matmul_layers(b, ("mi", "mi"), ("v", "value"), ("vp", "vp"), tag="vp."))
        b.parallel(lambda: matmul_layers(b, ("t", "t"), ("mit", "mit"), ("ap", "ap"), tag="ap."),
                   lambda: transpose_layer(b, "xm", "xmt", "xm", "xmt"),
                   lambda: matmul_layers(b, ("xm", "xm"), ("vp", "vp"), ("xvp", "xvp"), tag="xvp."))
        matmul_layers(b, ("xm", "xm"), ("ap", "ap"), ("xap", "xap"), tag="xap.")
        matmul_layers(b, ("xap", "xap"), ("xmt", "xmt"), ("s", "s"), tag="s.")
        softmax_layers(b, ("s", "s"), ("s", "p"), tag="p.")
        matmul_layers(b, ("s", "p"), ("xvp", "xvp"), ("y", "y"), tag="y.")
        b.result("y", "y")
        b.result("zero_pivots", zeros[0])
        super().__init__(b.build(), layout, {"n": n, "d": d}, execution=execution)

    def forward(self, x, a, v, m):
        self.check_matrices(x=x, a=a, v=v, m=m)
        y, zero_pivots = self.run(x, a, v, m)
        if (zero_pivots != 0).any():
            raise ValueError("m is singular: Gauss-Jordan elimination met an exactly-zero pivot")
        if not torch.isfinite(y).all():
            raise ValueError("m is singular to working precision: the transformed attention overflows")
        return y
