"""MatMul (Lemma 4 of the paper): one layer, 2m heads, one bilinear FFN. Activation: bilinear.
Depth 1, width 2m (for a (n x m) @ (m x p) product).

Output token (i, k) gathers, for every j < m, A[i, j] (head j) and B[j, k] (head m + j) into scratch
slots; the FFN's unit j multiplies the two (one rounding, as in torch) and the m products are summed
into the result.

Each head first keeps the keys of its block (tier 0), then the entry it wants (tier 1). A token
outside the output block is clamped to the nearest row/column of the operands, so it computes some
entry of A @ B too: the stream stays finite wherever the product does.
"""

from __future__ import annotations

import torch

from usim.construct import FFN, Builder, Head, Unit, match
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register


def matmul_shapes(b: Builder, left: tuple[str, str], right: tuple[str, str], out: tuple[str, str]):
    """(n, m, p) from the blocks of left (n x m), right (m x p) and out (n x p), else ValueError."""
    shapes = {name: b.layout[block].shape for name, (block, _) in (("left", left), ("right", right), ("out", out))}
    for name, shape in shapes.items():
        if len(shape) != 2:
            raise ValueError(f"{name} block must be a matrix (2 axes), got shape {shape}")
    (n, m), (m2, p) = shapes["left"], shapes["right"]
    if m != m2:
        raise ValueError(f"inner sizes differ: left is {shapes['left']}, right is {shapes['right']}")
    if shapes["out"] != (n, p):
        raise ValueError(f"out block must have shape {(n, p)}, got {shapes['out']}")
    return n, m, p


def matmul_layers(b: Builder, left: tuple[str, str], right: tuple[str, str], out: tuple[str, str], tag: str) -> None:
    """Append one layer adding left @ right into slot out[1] (meaningful at the positions of block
    out[0], which it should find zero there).

    left = (block, slot) holds an n x m matrix, right an m x p matrix, block out[0] is n x p. Reads
    block, row, col (standard positions); adds the scratch slots ``tag + "a{j}"``, ``tag + "b{j}"``."""
    _, m, _ = matmul_shapes(b, left, right, out)
    a = b.slots_named(f"{tag}a", m)
    c = b.slots_named(f"{tag}b", m)
    left_block = match({"block": b.layout.block_index(left[0])})
    right_block = match({"block": b.layout.block_index(right[0])})
    heads = [Head([left_block, match({"row": "row", "col": j})], [(left[1], a[j])], name=f"{tag}a{j}")
             for j in range(m)]
    heads += [Head([right_block, match({"row": j, "col": "col"})], [(right[1], c[j])], name=f"{tag}b{j}")
              for j in range(m)]
    b.layer(heads, FFN("bilinear", [Unit(a[j], out[1], gate=c[j]) for j in range(m)]))


@register
class MatMul(Construction):
    """forward(a (..., n, m), b (..., m, p)) -> (..., n, p), computed by the encoder (batch shapes
    broadcast); agrees with torch.matmul to within a few roundings."""

    def __init__(self, n: int, m: int, p: int, *, execution: str = "fast"):
        check_size("n", n)
        check_size("m", m)
        check_size("p", p)
        layout = Layout.of(inputs={"a": (n, m), "b": (m, p)}, outputs={"y": (n, p)})
        b = Builder(layout)
        b.standard_positions()
        matmul_layers(b, ("a", "value"), ("b", "value"), ("y", b.slot("result")), tag="matmul.")
        b.result("y", "result")
        super().__init__(b.build(), layout, {"n": n, "m": m, "p": p}, execution=execution)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n, m, p = self.args["n"], self.args["m"], self.args["p"]
        for name, t in (("a", a), ("b", b)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(f"{name} must have at least 2 axes, got shape {tuple(t.shape)}")
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"inner sizes differ: a has {a.shape[-1]} columns, b has {b.shape[-2]} rows "
                             f"(a {tuple(a.shape)}, b {tuple(b.shape)})")
        if a.shape[-2:] != (n, m) or b.shape[-2:] != (m, p):
            raise ValueError(f"this MatMul is built for a: expected shape (..., {n}, {m}) and b: expected shape "
                             f"(..., {m}, {p}), got a {tuple(a.shape)}, b {tuple(b.shape)}")
        return self.run(a, b)
