"""Determinant by Gauss elimination with partial pivoting (the layers of usim.ops.inverse on an
n x n scratch block). Activations: relu, reciprocal, bilinear. Depth 5n + 4, width 2.

det(A) = (-1)^(number of real row swaps) * product of the pivots, accumulated pivot by pivot in
the order of LU with partial pivoting (as torch.linalg.det). A matrix that meets an exactly-zero
pivot (singular, e.g. a zero column or an exactly dependent row) gives exactly 0, like torch.
The running product is kept as itself or as its reciprocal, whichever lies in [-1, 1] (see
usim.ops.inverse), so no slot overflows on the way: like torch's, the result underflows to 0 or
overflows to +-inf where the running product of the pivots leaves the dtype's range, and is
finite elsewhere.

Accuracy: relative error <= n * eps * cond_2(A) where the determinant is a normal number (tested
on 200 draws at n = 16 and on every size and scale of tests/test_determinant.py; measured up to
0.2-0.6 of it, torch.linalg.det's own up to 0.25-0.46). The first-order bound of LU with partial
pivoting is about n^2 * growth * eps * cond; both stay far below it. There is no per-matrix bound
relative to torch's error: the elimination here normalises the pivot row (torch's LU scales the
multipliers), and the reciprocal state takes two roundings per pivot (1/|P|, then the product), so
the roundings differ from torch's, and on some matrices torch's happen to cancel (0.007 eps where
ours is 4 eps; both well within n * eps * cond).
"""

from __future__ import annotations

import torch

from usim.construct import Builder
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register
from usim.ops.inverse import gauss_jordan_layers


@register
class Determinant(Construction):
    """forward(a (..., n, n)) -> (...): the determinant, computed by the encoder."""

    def __init__(self, n: int, *, execution: str = "fast"):
        check_size("n", n)
        layout = Layout.of(inputs={"a": (n, n)}, outputs={"det": (1,)}, scratch={"w": (n, n)})
        b = Builder(layout)
        b.standard_positions()
        b.slot("result")
        gauss_jordan_layers(b, ("a", "value"), "w", det_out=("det", "result"), tag="det.")
        b.result("det", "result")
        super().__init__(b.build(), layout, {"n": n}, execution=execution)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.run(a)[..., 0]
