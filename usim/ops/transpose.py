"""Transpose (Lemma 2 of the paper): one layer, one head, a pure move. Activation: none.

Output token (i, j) of y (m x n) selects the token of x (n x m) in block x with row j and
column i, and copies its value. Bitwise exact.
"""

from __future__ import annotations

import torch

from usim.construct import Builder, Head, match
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register


def transpose_layer(b: Builder, src: str, dst: str, src_slot: str = "value", dst_slot: str = "result") -> None:
    """Append a layer writing block src (n x m), transposed, into slot dst_slot at block dst (m x n).

    Reads block, row, col (standard positions) and src_slot; writes dst_slot."""
    select_transposed = match({"block": b.layout.block_index(src), "row": "col", "col": "row"})
    b.layer([Head([select_transposed], [(src_slot, dst_slot)], name=f"transpose {src}->{dst}")])


@register
class Transpose(Construction):
    """forward(x (..., n, m)) -> (..., m, n), computed by the encoder; bitwise x.transpose(-1, -2)."""

    def __init__(self, n: int, m: int, *, execution: str = "fast"):
        check_size("n", n)
        check_size("m", m)
        layout = Layout.of(inputs={"x": (n, m)}, outputs={"y": (m, n)})
        b = Builder(layout)
        b.standard_positions()
        b.slot("result")
        transpose_layer(b, "x", "y")
        b.result("y", "result")
        super().__init__(b.build(), layout, {"n": n, "m": m}, execution=execution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)
