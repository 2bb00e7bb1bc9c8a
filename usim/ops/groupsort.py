"""GroupSort: each consecutive group of g entries of a row sorted in descending order.
Activation: none (hard attention only). Depth max(1, k (k + 1) / 2) with k = ceil(log2 g), width 1.

Batcher's odd-even merge sort network on g wires, cut to g (a network for 2^k wires whose extra
wires hold -inf never moves them, so comparators touching them are dropped). Each of its layers is
a set of disjoint compare-exchanges, done by one MaxMin-like head (``maxmin.exchange_layer``) for
all groups and rows at once. Every output token is a copy of one input token: bitwise exact.
g = 1 is one copy layer, g = 2 is MaxMin.
"""

from __future__ import annotations

import torch

from usim.construct import Builder
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register
from usim.ops.maxmin import exchange_layer
from usim.ops.relu import matrix_shape


def sorting_network(g: int) -> list[list[tuple[int, int]]]:
    """Layers of comparators (i, j), i < j: max to i, min to j, sorts g wires descending."""
    layers = []
    p = 1
    while p < g:  # merge sorted runs of length p into runs of length 2p
        k = p
        while k >= 1:
            layers.append([(i + j, i + j + k) for j in range(k % p, g - k, 2 * k) for i in range(min(k, g - j - k))
                           if (i + j) // (2 * p) == (i + j + k) // (2 * p)])
            k //= 2
        p *= 2
    return [layer for layer in layers if layer]


def groupsort_layers(b: Builder, src: tuple[str, str], out: tuple[str, str], group_size: int, tag: str) -> None:
    """Append layers writing src (n x m) with each row's groups of group_size sorted descending into out.

    Reads block, row (standard positions) and src[1]; writes out[1] (which must exist and be zero at
    out[0]) and scratch slots ``tag + "s<r>"``; adds positional slots, per layer r, ``tag + "<r>.pair"``, ``tag + "<r>.sign"``."""
    m = matrix_shape(b, src, out)[-1]
    check_size("group_size", group_size)
    if m % group_size:
        raise ValueError(f"group_size={group_size} does not divide the number of columns m={m}")
    network = sorting_network(group_size) or [[]]  # g = 1: one layer with no comparator, a copy
    for r, layer in enumerate(network):
        dst = out if r == len(network) - 1 else (out[0], b.slot(f"{tag}s{r}"))
        pairs = [(start + i, start + j) for start in range(0, m, group_size) for i, j in layer]
        exchange_layer(b, src, dst, pairs, f"{tag}{r}.")
        src = dst


@register
class GroupSort(Construction):
    """forward(x (..., n, m)) -> (..., n, m): each group x[..., g*t : g*(t+1)] sorted descending,
    computed by the encoder; bitwise exact. group_size g must divide m."""

    def __init__(self, n: int, m: int, group_size: int, *, execution: str = "fast"):
        check_size("n", n)
        check_size("m", m)
        check_size("group_size", group_size)
        if m % group_size:
            raise ValueError(f"group_size={group_size} does not divide the number of columns m={m}")
        layout = Layout.of(inputs={"x": (n, m)}, outputs={"y": (n, m)})
        b = Builder(layout)
        b.standard_positions()
        groupsort_layers(b, ("x", "value"), ("y", b.slot("result")), group_size, tag="groupsort.")
        b.result("y", "result")
        super().__init__(b.build(), layout, {"n": n, "m": m, "group_size": group_size}, execution=execution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)
