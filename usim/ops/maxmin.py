"""MaxMin (Lemma 6 of the paper): each row's pairs (x0, x1), (x2, x3), ... -> (max, min).
One layer, one head, no arithmetic. Activation: none. Depth 1, width 1.

Hard attention selects, it never computes: output token (i, 2k) keeps the keys of row i, pair k
(tier 0, positions only), then the larger value (tier 1, sign +1); token (i, 2k+1) the smaller
(sign -1). Equal values leave both keys; a last positional tier keeps one of them, so every token is
a copy of one input token: bitwise exact, ties and +-0 included, whatever the magnitude.
"""

from __future__ import annotations

import torch

from usim.construct import Builder, Head, match, maximize
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register
from usim.ops.relu import matrix_shape


def exchange_layer(b: Builder, src: tuple[str, str], out: tuple[str, str], pairs, tag: str) -> None:
    """Append one layer of compare-exchanges along every row: out = src with, for each column pair
    (i, j) in ``pairs`` (i < j, disjoint), the max of the two at column i and the min at column j.

    Columns in no pair are copied. Adds positional slots ``tag + "pair"`` (the pair's first column,
    or the column itself) and ``tag + "sign"`` (-1 at each pair's second column, else +1). Equal
    values leave two keys; the head's position tie-break (``Head``) keeps one of them."""
    shape = matrix_shape(b, src, out)
    partner = list(range(shape[-1]))
    sign = [1] * shape[-1]
    used = set()
    for i, j in pairs:
        if not 0 <= i < j < shape[-1] or {i, j} & used:
            raise ValueError(f"pair {(i, j)} is not i < j < {shape[-1]} disjoint from the others")
        used |= {i, j}
        partner[j] = i
        sign[j] = -1
    partner, sign = torch.tensor(partner), torch.tensor(sign)

    def per_column(values, outside):
        return lambda block, i, c: values[c[:, -1]] if block.name in (src[0], out[0]) else outside

    pair = b.positional_from(f"{tag}pair", per_column(partner, 0))
    sign = b.positional_from(f"{tag}sign", per_column(sign, 1), square=False)
    same_pair = match({"block": b.layout.block_index(src[0]), "row": "row", pair: pair})
    head = Head([same_pair, maximize(src[1], sign)], [(src[1], out[1])], name=f"{tag}exchange")
    b.layer([head])


def maxmin_layers(b: Builder, src: tuple[str, str], out: tuple[str, str], tag: str) -> None:
    """Append one layer writing MaxMin of src (n x m, m even, pairs along rows) into out.

    Reads block, row (standard positions) and src[1]; writes out[1] (which must exist and be zero at
    out[0]); adds positional slots ``tag + "pair"``, ``tag + "sign"``."""
    m = matrix_shape(b, src, out)[-1]
    if m % 2:
        raise ValueError(f"MaxMin needs an even number of columns, got m={m}")
    exchange_layer(b, src, out, [(k, k + 1) for k in range(0, m, 2)], tag)


@register
class MaxMin(Construction):
    """forward(x (..., n, m)) -> (..., n, m), m even: each pair (x[..., 2k], x[..., 2k+1]) becomes
    (max, min), computed by the encoder; bitwise exact."""

    def __init__(self, n: int, m: int, *, execution: str = "fast"):
        check_size("n", n)
        check_size("m", m)
        if m % 2:
            raise ValueError(f"MaxMin needs an even number of columns, got m={m}")
        layout = Layout.of(inputs={"x": (n, m)}, outputs={"y": (n, m)})
        b = Builder(layout)
        b.standard_positions()
        maxmin_layers(b, ("x", "value"), ("y", b.slot("result")), tag="maxmin.")
        b.result("y", "result")
        super().__init__(b.build(), layout, {"n": n, "m": m}, execution=execution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)
