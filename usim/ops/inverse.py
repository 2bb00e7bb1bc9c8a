"""Matrix inverse by Gauss-Jordan elimination with partial pivoting (Lemma 9 of the paper, done
in O(n) layers for any n instead of by cofactors). Activations: relu, reciprocal, bilinear.

The elimination runs on an augmented scratch block w = [A | I] (n x 2n; n x n when only the
determinant is wanted), slot W. Step k = 0..n-1 (5 layers, the last step 4):

    L1  heads: pivot = among w[:, k] with row >= k (flag GE), the largest |W| (slot ABS), ties to
        the smallest row -> PR (row), P (value), AP (|P|); own = W[row, k] -> F
        FFN relu: EQ = [row == PR], NS = [PR == k], EK = [row == k] (hat functions of integers)
    L2  heads: R = W[PR, col]; Z = [P == 0] (exact: see below)
        FFN reciprocal: RP = 1 / (P + Z)
    L3  FFN bilinear: RR = R*RP (normalised pivot row), G = F*(1-EQ) - EQ, WM = W*(1-EQ),
        T = row + EK*(PR-k) + EQ*(k-row) (row swapped with), PS = P*(1-2[swap]); zeros += Z
    L4  head: WMs, Gs = WM, G at (T, col)        (the swap of rows k and PR)
        FFN bilinear: W = WMs - Gs*RR  (row k gets RR, others W - F*RR), det *= PS; erase temps
    L5  FFN relu: ABS = |W|, GE = [row >= k+1]

plus an init layer (fetch A, W = A*[col<n] + [col == row+n], det = 1) and a relu layer for
ABS/GE, and a readout layer (inverse = W[row, n + col]): depth 5n + 2 (5n + 1 for the
determinant alone), width 2 heads. The pivot head's tiers are block, column k, eligibility, |W|,
-row: exactly one key, every score exact. Integer arithmetic (hat(d) = relu(d+1) - 2relu(d) +
relu(d-1) = [d == 0]) and 0/1 gating are exact; each FFN output gets one nonzero term (or a sum
of small integers), so only RP, RR, Gs*RR and WMs - Gs*RR round, as in textbook elimination.

Zero pivot. The Z head scores -|P| * NREF (NREF = 0 at one reference token, 1 elsewhere): for
|P| > 0 it keeps the reference token alone (ZV = 0 there), for P == 0 every token ties and it
averages ZV (= L at one token) to exactly 1. So 1 / (P + Z) stays finite, the determinant becomes
exactly 0, and slot ``zeros`` counts zero pivots (Inverse raises on it). Every slot stays finite
at every position (unless the values themselves overflow).
"""

from __future__ import annotations

import torch

from usim.construct import FFN, Builder, Head, Unit, match, maximize
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register

TEMPS = ("PR", "P", "AP", "F", "EQ", "NS", "EK", "R", "Z", "RP", "RR", "G", "WM", "T", "PS", "WMs", "Gs")


def _hat(d: dict, out: str) -> list[Unit]:
    """Units adding [d == 0] to out, for an integer-valued Expr d."""
    up, down = dict(d), dict(d)
    up["one"] = d.get("one", 0.0) + 1.0
    down["one"] = d.get("one", 0.0) - 1.0
    return [Unit(up, out), Unit(d, {out: -2.0}), Unit(down, out)]


def gauss_jordan_layers(b: Builder, src: tuple[str, str], work: str,
                        inverse_out: tuple[str, str] | None = None,
                        det_out: tuple[str, str] | None = None, tag: str = "gj.") -> str:
    """Append the layers of Gauss-Jordan elimination with partial pivoting of the n x n matrix
    src = (block, slot).

    work: a block of shape (n, 2n), or (n, n) when inverse_out is None, used as scratch.
    inverse_out = (block, slot): adds A^-1 into that slot (block of shape (n, n)).
    det_out = (block, slot): adds det(A) into that slot (every token holds it; 0 exactly when a
    pivot is exactly 0). Both out slots must exist and be zero; like every head here they are
    written at every position, meaningful at their block. Needs b.standard_positions(); adds the
    slots ``tag + name``. Returns the slot holding the number of exactly-zero pivots (any position;
    nonzero means A is singular and the inverse is meaningless)."""
    for s in ("block", "row", "col"):
        if s not in b.slots:
            raise ValueError(f"gauss_jordan_layers needs the standard positional slot {s!r}")
    shape = b.layout[src[0]].shape
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"block {src[0]!r} must be square (n, n), got shape {shape}")
    n = shape[0]
    allowed = [(n, 2 * n)] if inverse_out is not None else [(n, n), (n, 2 * n)]
    if b.layout[work].shape not in allowed:
        raise ValueError(f"work block {work!r} must have shape {' or '.join(map(str, allowed))}, "
                         f"got {b.layout[work].shape}")
    if inverse_out is not None and b.layout[inverse_out[0]].shape != (n, n):
        raise ValueError(f"inverse block {inverse_out[0]!r} must have shape ({n}, {n}), "
                         f"got {b.layout[inverse_out[0]].shape}")

    s = {name: b.slot(tag + name) for name in ("W", "ABS", "GE", "D0", "D1", "zeros", "in") + TEMPS}
    wi = b.layout.block_index(work)
    # 0/1 on w: the A part (col < n) and the identity part (col == row + n); 0 elsewhere.
    ina = b.positional_from(tag + "ina", lambda blk, i, c: (c[:, 1] < n) if i == wi else 0, square=False)
    eye = b.positional_from(tag + "eye", lambda blk, i, c: (c[:, 1] == c[:, 0] + n) if i == wi else 0, square=False)
    ref = b.layout.offsets[work]
    nref = torch.ones(b.layout.length, dtype=torch.long)
    nref[ref] = 0
    zv = torch.zeros(b.layout.length, dtype=torch.long)
    zv[(ref + 1) % b.layout.length] = b.layout.length
    nref, zv = b.positional(tag + "nref", nref), b.positional(tag + "zv", zv)
    in_work = match({"block": wi})
    one = "one"

    # Init: W = [A | I], det = 1; then |W| and the eligibility flag of step 0.
    fetch = Head([match({"block": b.layout.block_index(src[0])}), match({"row": "row", "col": "col"})],
                 [(src[1], s["in"])], name=f"{tag}fetch")
    b.layer([fetch], FFN("bilinear", [Unit(s["in"], s["W"], gate=ina), Unit(eye, s["W"], gate=one),
                                      Unit(s["in"], {s["in"]: -1.0}, gate=one)], bias_out={s["D0"]: 1.0}))

    def abs_ge(k: int) -> FFN:  # ABS = |W|, GE = [row >= k]
        return FFN("relu", [Unit(s["W"], s["ABS"]), Unit({s["W"]: -1.0}, s["ABS"]),
                            Unit({"row": 1.0, one: 1.0 - k}, s["GE"]), Unit({"row": 1.0, one: -k}, {s["GE"]: -1.0})])

    b.layer(ffn=abs_ge(0))
    for k in range(n):
        last = k == n - 1
        pivot = Head([in_work, match({"col": k}), maximize(s["GE"]), maximize(s["ABS"]), maximize("row", -1.0)],
                     [("row", s["PR"]), (s["W"], s["P"]), (s["ABS"], s["AP"])], name=f"{tag}pivot{k}")
        own = Head([in_work, match({"row": "row", "col": k})], [(s["W"], s["F"])], name=f"{tag}own{k}")
        b.layer([pivot, own], FFN("relu", _hat({s["PR"]: 1.0, "row": -1.0}, s["EQ"])
                                  + _hat({s["PR"]: 1.0, one: -k}, s["NS"]) + _hat({"row": 1.0, one: -k}, s["EK"])))
        pivot_row = Head([in_work, match({"row": s["PR"], "col": "col"})], [(s["W"], s["R"])], name=f"{tag}prow{k}")
        zero = Head([maximize(nref, {s["AP"]: -1.0})], [(zv, s["Z"])], name=f"{tag}zero{k}", average=True)
        b.layer([pivot_row, zero], FFN("reciprocal", [Unit({s["P"]: 1.0, s["Z"]: 1.0}, s["RP"])]))
        keep = {one: 1.0, s["EQ"]: -1.0}
        b.layer(ffn=FFN("bilinear", [
            Unit(s["R"], s["RR"], gate=s["RP"]),
            Unit(s["F"], s["G"], gate=keep), Unit(s["EQ"], {s["G"]: -1.0}, gate=one),
            Unit(s["W"], s["WM"], gate=keep), Unit(s["W"], {s["W"]: -1.0}, gate=one),
            Unit("row", s["T"], gate=one), Unit(s["EK"], s["T"], gate={s["PR"]: 1.0, one: -k}),
            Unit(s["EQ"], s["T"], gate={one: k, "row": -1.0}),
            Unit(s["P"], s["PS"], gate={s["NS"]: 2.0, one: -1.0}),
            Unit(s["Z"], s["zeros"], gate=one)]))
        swap = Head([in_work, match({"row": s["T"], "col": "col"})], [(s["WM"], s["WMs"]), (s["G"], s["Gs"])],
                    name=f"{tag}swap{k}")
        det, det_next = s[f"D{k % 2}"], s[f"D{(k + 1) % 2}"]
        det_dst = det_out[1] if last and det_out is not None else det_next
        erase = [Unit(s[t], {s[t]: -1.0}, gate=one) for t in TEMPS + ("ABS", "GE")]
        b.layer([swap], FFN("bilinear", [Unit(s["WMs"], s["W"], gate=one), Unit(s["Gs"], {s["W"]: -1.0}, gate=s["RR"]),
                                         Unit(det, det_dst, gate=s["PS"]), Unit(det, {det: -1.0}, gate=one)] + erase))
        if not last:
            b.layer(ffn=abs_ge(k + 1))
    if inverse_out is not None:
        read = Head([in_work, match({"row": "row", "col": {"col": 1.0, one: float(n)}})],
                    [(s["W"], inverse_out[1])], name=f"{tag}readout")
        b.layer([read])
    return s["zeros"]


@register
class Inverse(Construction):
    """forward(a (..., n, n)) -> (..., n, n): the inverse, computed by the encoder.

    Depth 5n + 2, width 2. Raises ValueError for a singular matrix (an exactly-zero pivot) or when
    the result overflows (singular to working precision)."""

    def __init__(self, n: int, *, execution: str = "fast"):
        check_size("n", n)
        layout = Layout.of(inputs={"a": (n, n)}, outputs={"inv": (n, n), "zero_pivots": (1,)},
                           scratch={"w": (n, 2 * n)})
        b = Builder(layout)
        b.standard_positions()
        b.slot("result")
        zeros = gauss_jordan_layers(b, ("a", "value"), "w", inverse_out=("inv", "result"), tag="inv.")
        b.result("inv", "result")
        b.result("zero_pivots", zeros)
        super().__init__(b.build(), layout, {"n": n}, execution=execution)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        inv, zero_pivots = self.run(a)
        if not (torch.isfinite(inv).all() and torch.isfinite(zero_pivots).all()):
            raise ValueError("matrix is singular to working precision: the elimination overflows")
        if (zero_pivots != 0).any():
            raise ValueError("matrix is singular: Gauss-Jordan elimination met an exactly-zero pivot")
        return inv
