"""Row-wise Softmax (Lemma 3 of the paper). Activations: exp, reciprocal, bilinear.
Depth 3, width max(2, m) for an n x m input (depth 5 with a key mask).

    layer 1  heads: M = the row's maximum (hard attention: same block and row, then the largest
             value), x = the entry itself;  FFN exp: e = exp(x - M)
    layer 2  m heads: e of each entry of the row;  FFN reciprocal: r = 1 / (e_0 + ... + e_(m-1))
    layer 3  FFN bilinear: out = e * r

The row sum is the reciprocal unit's linear read of the m gathered values: one float sum, as in
torch. (An averaging head would give sum / m, and m * (sum / m) costs up to an ulp more; measured
against float64, that doubled the worst error ratio to torch.)

Subtracting the maximum found by attention keeps e in [0, 1] and the row sum in [1, m], as in
torch's own stable softmax, so logits of any finite size work. Guards come from the construction:
each head keeps its block first (tier 0), then the nearest row (and column), so every token, inside
the block or not, computes e for a real entry against its row's real maximum: e in [0, 1] and a
row sum >= 1 everywhere, and exp and reciprocal need no positional guard.

With ``key_valid`` (a vector of m 0/1 flags, 1 = key kept) a first layer moves 1 - flag of each
column into every token; the maximum is taken over kept keys only; a masked token takes a kept
key's value as its x (so x - M <= 0 still, and a masked score is never read), and a layer after
the exp multiplies by the flag: its weight is exactly 0, whatever the kept scores are.
"""

from __future__ import annotations

import torch

from usim.construct import FFN, ONE, Builder, Head, Unit, match, maximize
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register
from usim.ops.relu import matrix_shape

def softmax_layers(b: Builder, src: tuple[str, str], out: tuple[str, str], tag: str,
                   key_valid: tuple[str, str] | None = None) -> None:
    """Append layers adding the row-wise softmax of src = (block, slot) into slot out[1]
    (meaningful at block out[0]: same shape as src[0], may be the same block; out[1] should be zero
    there).

    key_valid = (block, slot) optionally holds m flags (1 keep, 0 mask) for the m columns; every row
    needs one kept key. Reads block, row, col (standard positions); adds the slots ``tag + "x"``,
    ``"max"``, ``"e"``, ``"e{j}"`` (j < m), ``"r"`` (and ``"drop"`` with a mask)."""
    shape = matrix_shape(b, src, out)
    m = shape[-1]
    block = match({"block": b.layout.block_index(src[0])})
    same_row = match({"row": "row"})
    x, top, e, r = (b.slot(f"{tag}{s}") for s in ("x", "max", "e", "r"))
    if key_valid is None:
        kept = []
        pick_col = match({"col": "col"})
    else:
        kept, pick_col = _mask_layer(b, key_valid, m, tag)
    row_max = Head([block, same_row, *kept, maximize(src[1])], [(src[1], top)], name=f"{tag}max")
    entry = Head([block, same_row, pick_col, maximize(src[1])], [(src[1], x)], name=f"{tag}x")
    if key_valid is None:
        b.layer([row_max, entry], FFN("exp", [Unit({x: 1.0, top: -1.0}, e)]))
    else:  # exp(x - M) in [0, 1], then times the key's flag: exactly 0 for a masked key
        e0 = b.slot(f"{tag}exp")
        b.layer([row_max, entry], FFN("exp", [Unit({x: 1.0, top: -1.0}, e0)]))
        b.layer(ffn=FFN("bilinear", [Unit(e0, e, gate={ONE: 1.0, f"{tag}drop": -1.0})]))
    row = b.slots_named(f"{tag}e", m)
    gather = [Head([block, match({"row": "row", "col": j})], [(e, row[j])], name=f"{tag}e{j}") for j in range(m)]
    b.layer(gather, FFN("reciprocal", [Unit({s: 1.0 for s in row}, r)]))
    b.layer(ffn=FFN("bilinear", [Unit(e, out[1], gate=r)]))


def _mask_layer(b: Builder, key_valid, m: int, tag: str):
    """The first layer of a masked softmax: slot ``tag + "drop"`` = 1 - key_valid[col] everywhere.

    Returns the extra tier of the max head and the tier choosing x's column."""
    if b.layout[key_valid[0]].shape != (m,):
        raise ValueError(f"key_valid block {key_valid[0]!r} must have shape ({m},), got {b.layout[key_valid[0]].shape}")
    drop = b.slot(f"{tag}drop")
    flags = Head([match({"block": b.layout.block_index(key_valid[0])}), match({"col": "col"})],
                 [({ONE: 1.0, key_valid[1]: -1.0}, drop)], name=f"{tag}drop")
    b.layer([flags])
    # Tier choosing x's column within the row: score 2 col_q col_k - col_k^2 - big * drop_k. A kept query
    # keeps its own column (a kept key); a masked one the nearest kept key. big exceeds the spread
    # of the column terms, so every score is an exact small integer.
    cols = int(b.layout.feature(lambda blk, i, c: c[:, -1]).max()) + 1
    big = float(2 * cols * m + m * m + 1)
    pick_col = [({"col": 2.0}, {"col": 1.0}), ({ONE: -1.0}, {"col^2": 1.0}), ({ONE: -big}, {drop: 1.0})]
    return [maximize(drop, -1.0)], pick_col


@register
class Softmax(Construction):
    """forward(x (..., n, m)) -> (..., n, m): torch.softmax(x, -1) computed by the encoder."""

    def __init__(self, n: int, m: int, *, execution: str = "fast"):
        check_size("n", n)
        check_size("m", m)
        layout = Layout.of(inputs={"x": (n, m)}, outputs={"y": (n, m)})
        b = Builder(layout)
        b.standard_positions()
        softmax_layers(b, ("x", "value"), ("y", b.slot("result")), tag="softmax.")
        b.result("y", "result")
        super().__init__(b.build(), layout, {"n": n, "m": m}, execution=execution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)
