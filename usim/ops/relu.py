"""ReLU: one layer. Activation: relu. Depth 1, width 1 (one head, one relu unit).

The head moves each entry of x to the same (row, col) of the output block; the FFN unit reads it
with weight 1 and writes relu of it with weight 1. Reads of one slot with 0/1 weights add only exact
zeros, so the result is bitwise torch.relu(x).
"""

from __future__ import annotations

import torch

from usim.construct import FFN, Builder, Head, Unit, match
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register


def matrix_shape(b: Builder, src: tuple[str, str], out: tuple[str, str]) -> tuple[int, ...]:
    """The common shape of the src and out blocks (1 or 2 axes), else ValueError."""
    shape, out_shape = b.layout[src[0]].shape, b.layout[out[0]].shape
    if shape != out_shape:
        raise ValueError(f"block {src[0]!r} has shape {shape} but block {out[0]!r} has shape {out_shape}")
    if len(shape) > 2:
        raise ValueError(f"block {src[0]!r} must have 1 or 2 axes, got shape {shape}")
    return shape


def relu_layer(b: Builder, src: tuple[str, str], out: tuple[str, str], tag: str) -> None:
    """Append one layer writing relu(src) into slot out[1] at block out[0] (same shape as src[0]).

    Reads block, row, col (standard positions) and src[1]; writes out[1] (which must exist and be
    zero at out[0]) and, when the blocks differ, the scratch slot ``tag + "in"``."""
    matrix_shape(b, src, out)
    if src[0] == out[0]:
        b.layer(ffn=FFN("relu", [Unit(src[1], out[1])]))
        return
    moved = b.slot(f"{tag}in")
    here = match({"block": b.layout.block_index(src[0]), "row": "row", "col": "col"})
    head = Head([here], [(src[1], moved)], name=f"{tag}move {src[0]}->{out[0]}")
    b.layer([head], FFN("relu", [Unit(moved, out[1])]))


@register
class ReLU(Construction):
    """forward(x (..., n, m)) -> (..., n, m), computed by the encoder; bitwise torch.relu(x)."""

    def __init__(self, n: int, m: int, *, execution: str = "fast"):
        check_size("n", n)
        check_size("m", m)
        layout = Layout.of(inputs={"x": (n, m)}, outputs={"y": (n, m)})
        b = Builder(layout)
        b.standard_positions()
        relu_layer(b, ("x", "value"), ("y", b.slot("result")), tag="relu.")
        b.result("y", "result")
        super().__init__(b.build(), layout, {"n": n, "m": m}, execution=execution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)
