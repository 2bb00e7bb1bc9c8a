"""Linformer attention (Remark 5.2, eq. 2 of the paper) as one constructed encoder.

    y = softmax(x a (e x)^T) (f x) v        x (n, d), a, v (d, d), e, f (k, n), y (n, d)

The n keys and values are projected to k rows by e and f, so the softmax is over k columns.
Activations: bilinear (matmuls, the softmax product), exp, reciprocal (softmax).
Depth 7, width max(2n + 2d + 2, 2k):

    layer 1      x^T, e^T (transposes), x a, f x (matmuls)       2 + 2d + 2n heads
    layer 2      (e x)^T = x^T e^T,  (f x) v                       2n + 2d heads
    layer 3      s = (x a) (e x)^T                  (n x k)        2d heads
    layers 4-6   p = softmax(s) row-wise            (row max by attention, exp, row sum, reciprocal)
    layer 7      y = p ((f x) v)                                   2k heads

Every step is a layer builder of ``usim.ops`` (transpose_layer, matmul_layers, softmax_layers) on
scratch blocks of one layout; independent steps share layers through ``Builder.parallel``. The
products are associated as written: (f x) v, then p times it, as in the direct torch evaluation.
"""

from __future__ import annotations

import torch

from usim.construct import Builder
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register
from usim.ops.matmul import matmul_layers
from usim.ops.softmax import softmax_layers
from usim.ops.transpose import transpose_layer


def linformer_layers(b: Builder, x: str, a: str, v: str, e: str, f: str, out: tuple[str, str], tag: str) -> None:
    """Append 7 layers adding softmax(x a (e x)^T) (f x) v into slot out[1] at block out[0] (n x d).

    x, a, v, e, f name blocks (n x d, d x d, d x d, k x n, k x n) holding their matrix in slot
    ``value``. Needs the scratch blocks ``tag + s`` for s in xt (d, n), et (n, k), xa (n, d), fx (k, d),
    ext (d, k), fxv (k, d), s (n, k) in the layout; adds slots named ``tag + ...``."""
    n, d = b.layout[x].shape
    k = b.layout[e].shape[0]
    expected = {a: (d, d), v: (d, d), e: (k, n), f: (k, n), out[0]: (n, d)}
    expected.update({f"{tag}{s}": shape for s, shape in (("xt", (d, n)), ("et", (n, k)), ("xa", (n, d)),
                                                          ("fx", (k, d)), ("ext", (d, k)), ("fxv", (k, d)),
                                                          ("s", (n, k)))})
    for block, shape in expected.items():
        if b.layout[block].shape != shape:
            raise ValueError(f"block {block!r} must have shape {shape}, got {b.layout[block].shape}")
    blk = {s: (f"{tag}{s}", b.slot(f"{tag}{s}")) for s in ("xt", "et", "xa", "fx", "ext", "fxv", "s")}
    b.parallel(lambda: transpose_layer(b, x, blk["xt"][0], "value", blk["xt"][1]),
               lambda: transpose_layer(b, e, blk["et"][0], "value", blk["et"][1]),
               lambda: matmul_layers(b, (x, "value"), (a, "value"), blk["xa"], tag=f"{tag}xa."),
               lambda: matmul_layers(b, (f, "value"), (x, "value"), blk["fx"], tag=f"{tag}fx."))
    b.parallel(lambda: matmul_layers(b, blk["xt"], blk["et"], blk["ext"], tag=f"{tag}ext."),
               lambda: matmul_layers(b, blk["fx"], (v, "value"), blk["fxv"], tag=f"{tag}fxv."))
    matmul_layers(b, blk["xa"], blk["ext"], blk["s"], tag=f"{tag}s.")
    p = (blk["s"][0], b.slot(f"{tag}p"))
    softmax_layers(b, blk["s"], p, tag=f"{tag}softmax.")
    matmul_layers(b, p, blk["fxv"], out, tag=f"{tag}y.")


@register
class SimulatedLinformer(Construction):
    """forward(x (..., n, d), a (d, d), v (d, d), e (k, n), f (k, n)) -> (..., n, d):
    softmax(x a (e x)^T) (f x) v computed by the encoder. Every argument may carry batch axes
    (batch shapes broadcast)."""

    def __init__(self, n: int, d: int, k: int, *, execution: str = "fast"):
        check_size("n", n)
        check_size("d", d)
        check_size("k", k)
        tag = "lf."
        scratch = {f"{tag}xt": (d, n), f"{tag}et": (n, k), f"{tag}xa": (n, d), f"{tag}fx": (k, d),
                   f"{tag}ext": (d, k), f"{tag}fxv": (k, d), f"{tag}s": (n, k)}
        layout = Layout.of(inputs={"x": (n, d), "a": (d, d), "v": (d, d), "e": (k, n), "f": (k, n)},
                           outputs={"y": (n, d)}, scratch=scratch)
        b = Builder(layout)
        b.standard_positions()
        linformer_layers(b, "x", "a", "v", "e", "f", ("y", b.slot("result")), tag=tag)
        b.result("y", "result")
        super().__init__(b.build(), layout, {"n": n, "d": d, "k": k}, execution=execution)

    def forward(self, x, a, v, e, f):
        self.check_matrices(x=x, a=a, v=v, e=e, f=f)
        return self.run(x, a, v, e, f)
