"""Matrix inverse by Gauss-Jordan elimination with partial pivoting (Lemma 9 of the paper, done
in O(n) layers for any n instead of by cofactors). Activations: relu, reciprocal, bilinear.

The elimination runs on an augmented scratch block w = [A | I] (n x 2n; n x n when only the
determinant is wanted), slot W. Step k = 0..n-1 (5 layers, the last step 4):

    L1  heads: pivot = among w[:, k] with row >= k (flag GE), the largest |W| (slot ABS), ties to
        the smallest row -> PR (row), P (value), AP (|P|); own = W[row, k] -> F
        FFN relu: EQ = [row == PR], EK = [row == k] (hat functions of integers)
    L2  heads: R = W[PR, col]; Z = [P == 0] (exact: see below)
        FFN reciprocal: RP = 1 / (P + Z)
    L3  FFN bilinear: RR = R*RP (normalised pivot row), G = F*(1-EQ) - EQ, WM = W*(1-EQ),
        T = row + EK*(PR-k) + EQ*(k-row) (row swapped with); zeros += Z
    L4  head: WMs, Gs = WM, G at (T, col)        (the swap of rows k and PR)
        FFN bilinear: W = WMs - Gs*RR  (row k gets RR, others W - F*RR); erase temps
    L5  FFN relu: ABS = |W|, GE = [row >= k+1]

plus an init layer (fetch A, W = A*[col<n] + [col == row+n]) and a relu layer for ABS/GE, and a
readout layer (inverse = W[row, n + col]): depth 5n + 2, width 2 heads. The pivot head's tiers are
block, column k, eligibility, |W|, -row: exactly one key, every score exact. Integer arithmetic
(hat(d) = relu(d+1) - 2relu(d) + relu(d-1) = [d == 0]) and 0/1 gating are exact; each FFN output
gets one nonzero term (or a sum of small integers), so only RP, RR, Gs*RR and WMs - Gs*RR round,
as in textbook elimination.

Comparisons. A flag [x > y] of two values every token holds is a head that keeps one of two
reference tokens (u, v: positions 1 and 0, marked by positional one-hot slots), scoring y at u and
x at v in a content tier, ties to u; it moves v's mark (1 at v). The scores are the values
themselves, never their difference, so the flag is exact, and a NaN keeps no key (the flag is NaN).

Zero pivot. Z = 1 - [|P| > 0], a comparison head; so 1 / (P + Z) stays finite and slot ``zeros``
counts zero pivots. Singular means an exactly-zero pivot, or a pivot that is not finite (the
elimination itself overflowed); the determinant plays no part in it.

The determinant (only when asked for, ``det_out``) is the signed product of the pivots, in the
order of LU with partial pivoting (as torch.linalg.det), kept so that no slot ever overflows: a
state flag BS says whether D holds the running product p (BS = 0, |p| <= 1) or C/p (BS = 1,
|p| >= 1, C = 4), both as magnitudes, the sign apart in SG (+-1: the row swaps and the pivots'
signs). C = 4 keeps C/p a normal number wherever p is finite, in float32 and in float64. Per step:

    L2  FFN reciprocal: RAP = 1/(|P| + Z); RY = C/Y where the last step switched (see L5)
    L3  head: POS = [P > 0]; FFN bilinear: SG *= 1 - 2[swap]; FM = |P| (BS = 0) or 1/|P| (BS = 1;
        0 for a zero pivot); D = Y, or C/Y after a switch
    L4  FFN bilinear: Y = D * FM; SG *= 2 POS - 1
    L5  head: SW = [Y > 1] (BS = 0) or [Y > C] (BS = 1): p left the state's range, switch
    L1  FFN relu: BS = BS xor SW (next step)

A running value that underflows to 0 stays 0, as torch's running product does: with BS = 0 the
determinant underflowed to 0, with BS = 1 it overflows to +-inf. The last three layers finish:
det = SG*Y (BS = 0) or SG*C*(1/Y) (BS = 1), where 1/Y is taken only when Y is at least the
dtype's threshold, 2^-128 (float32) or 2^-1024 (float64) (times 1 + a little), so that it is
finite, and the product with C overflows to +-inf exactly where the determinant does; below the
threshold the result is SG*4C/threshold, +-inf. The dtype is told by the weights themselves:
(1 + 2^-30) is 1.0 in float32. The comparisons (Y > 1, P > 0, Y < threshold, zeros > 0) are
heads that keep one of two reference tokens by a content tier, so they are exact. Every slot
stays finite at every position, except the determinant itself where it overflows (and unless
the elimination overflows). Depth 5n + 4 for the determinant alone, width 2.
"""

from __future__ import annotations

import torch

from usim.construct import FFN, Builder, Head, Unit, match, maximize
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register

TEMPS = ("PR", "P", "AP", "F", "EQ", "EK", "R", "Z", "RP", "RR", "G", "WM", "T", "WMs", "Gs")
# The determinant's slots: temporaries erased every step, then the running state.
DET_TEMPS = ("NS", "RAP", "POS", "FM")
DET_SLOTS = ("D", "Y", "BS", "SG", "SW", "NSW", "RY", "V1", "V2", "SGs", "SGb", "NZ", "OV", "XB", "G2", "YI", "is64")
# Threshold below which 1/Y would overflow: 2^-128 (1 + 2^-20) in float32, 2^-1024 (1 + 2^-40) in
# float64 (both exact subnormals of their dtype; the float64 one casts to 0 in float32).
THRESHOLD32 = 2.0 ** -128 * (1 + 2.0 ** -20)
THRESHOLD64 = 2.0 ** -1024 * (1 + 2.0 ** -40)
# The reciprocal state holds C / (running product): C = 4 keeps it a normal number wherever the
# product is finite (in float32 and float64 alike), so it is as precise as the product itself.
C = 4.0


def _hat(d: dict, out: str) -> list[Unit]:
    """Units adding [d == 0] to out, for an integer-valued Expr d."""
    up, down = dict(d), dict(d)
    up["one"] = d.get("one", 0.0) + 1.0
    down["one"] = d.get("one", 0.0) - 1.0
    return [Unit(up, out), Unit(d, {out: -2.0}), Unit(down, out)]


def _erase(slot: str) -> Unit:
    """A bilinear unit setting slot back to 0."""
    return Unit(slot, {slot: -1.0}, gate="one")


def _greater(name: str, left: list, right: list, dst: str | None, ref: tuple[str, str],
             negated: str | None = None) -> Head:
    """A head writing the exact flag [left > right] into dst (ties: 0), and 1 - flag into negated.
    left and right are lists of (query Expr) terms summed; ref = (u, v), positional one-hot slots
    of two tokens, u later than v: the head keeps u or v, scoring right at u and left at v (a
    content tier, exact: no sum of the two sides is ever formed), and moves v's and u's flags."""
    u, v = ref
    tier = [(q, {v: 1.0}) for q in left] + [(q, {u: 1.0}) for q in right]
    moves = ([(v, dst)] if dst is not None else []) + ([(u, negated)] if negated is not None else [])
    return Head([maximize({u: 1.0, v: 1.0}), tier], moves, name=name)


def gauss_jordan_layers(b: Builder, src: tuple[str, str], work: str,
                        inverse_out: tuple[str, str] | None = None,
                        det_out: tuple[str, str] | None = None, tag: str = "gj.") -> str:
    """Append the layers of Gauss-Jordan elimination with partial pivoting of the n x n matrix
    src = (block, slot).

    work: a block of shape (n, 2n), or (n, n) when inverse_out is None, used as scratch.
    inverse_out = (block, slot): adds A^-1 into that slot (block of shape (n, n)).
    det_out = (block, slot): adds det(A) into that slot (every token holds it; exactly 0 when a
    pivot is exactly 0; +-inf where the determinant overflows the dtype). Both out slots must exist
    and be zero; like every head here they are written at every position, meaningful at their
    block. Needs b.standard_positions(); adds the slots ``tag + name``. Returns the slot holding
    the number of exactly-zero pivots (any position; nonzero means A is singular and the inverse
    is meaningless)."""
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
    det = det_out is not None

    names = ("W", "ABS", "GE", "zeros", "in") + TEMPS + ((DET_TEMPS + DET_SLOTS) if det else ())
    s = {name: b.slot(tag + name) for name in names}
    wi = b.layout.block_index(work)
    # 0/1 on w: the A part (col < n) and the identity part (col == row + n); 0 elsewhere.
    ina = b.positional_from(tag + "ina", lambda blk, i, c: (c[:, 1] < n) if i == wi else 0, square=False)
    eye = b.positional_from(tag + "eye", lambda blk, i, c: (c[:, 1] == c[:, 0] + n) if i == wi else 0, square=False)
    # The two reference tokens of the comparison heads (positions 1 and 0).
    cu, cv = torch.zeros(b.layout.length, dtype=torch.long), torch.zeros(b.layout.length, dtype=torch.long)
    cu[1], cv[0] = 1, 1
    cmp = (b.positional(tag + "cu", cu), b.positional(tag + "cv", cv))
    in_work = match({"block": wi})
    same_col = match({"col": "col"})
    one = "one"

    # Init: W = [A | I] (and for the determinant D = 1, SG = 1, is64 = [dtype is float64]); then
    # |W| and the eligibility flag of step 0.
    fetch = Head([match({"block": b.layout.block_index(src[0])}), match({"row": "row", "col": "col"})],
                 [(src[1], s["in"])], name=f"{tag}fetch")
    units = [Unit(s["in"], s["W"], gate=ina), Unit(eye, s["W"], gate=one), Unit(s["in"], {s["in"]: -1.0}, gate=one)]
    bias = {}
    if det:
        # (1 + 2^-30) * 2^30 - 2^30 is 1 in float64; the weight 1 + 2^-30 is 1.0 in float32, giving 0.
        units.append(Unit({one: 1.0 + 2.0 ** -30}, s["is64"], gate={one: 2.0 ** 30}))
        bias = {s["D"]: 1.0, s["SG"]: 1.0, s["is64"]: -2.0 ** 30}
    b.layer([fetch], FFN("bilinear", units, bias_out=bias))

    def abs_ge(k: int) -> FFN:  # ABS = |W|, GE = [row >= k]
        return FFN("relu", [Unit(s["W"], s["ABS"]), Unit({s["W"]: -1.0}, s["ABS"]),
                            Unit({"row": 1.0, one: 1.0 - k}, s["GE"]), Unit({"row": 1.0, one: -k}, {s["GE"]: -1.0})])

    b.layer(ffn=abs_ge(0))
    for k in range(n):
        last = k == n - 1
        switched = det and k > 0  # a comparison SW of the previous step to apply
        # L1: the pivot, the own multiplier; integer flags.
        pivot = Head([in_work, match({"col": k}), maximize(s["GE"]), maximize(s["ABS"]), maximize("row", -1.0)],
                     [("row", s["PR"]), (s["W"], s["P"]), (s["ABS"], s["AP"])], name=f"{tag}pivot{k}")
        own = Head([in_work, match({"row": "row", "col": k})], [(s["W"], s["F"])], name=f"{tag}own{k}")
        units = _hat({s["PR"]: 1.0, "row": -1.0}, s["EQ"]) + _hat({"row": 1.0, one: -k}, s["EK"])
        if det:
            units += _hat({s["PR"]: 1.0, one: -k}, s["NS"])
        if switched:  # BS = BS xor SW, exact on 0/1
            units += [Unit({s["BS"]: 1.0, s["SW"]: -1.0}, s["BS"]), Unit({s["SW"]: 1.0, s["BS"]: -1.0}, s["BS"]),
                      Unit(s["BS"], {s["BS"]: -1.0})]
        b.layer([pivot, own], FFN("relu", units))
        # L2: the pivot row, the zero-pivot flag; reciprocals (every input nonzero).
        # (the static column tier first: the fast execution then scores only the n keys of a column)
        pivot_row = Head([in_work, same_col, match({"row": s["PR"]})], [(s["W"], s["R"])], name=f"{tag}prow{k}")
        zero = _greater(f"{tag}zero{k}", [{s["AP"]: 1.0}], [], None, cmp, negated=s["Z"])  # Z = [|P| == 0]
        units = [Unit({s["P"]: 1.0, s["Z"]: 1.0}, s["RP"])]
        if det:
            units.append(Unit({s["AP"]: 1.0, s["Z"]: 1.0}, s["RAP"]))
        if switched:  # C/Y where SW = 1 (then Y > 1); Y/C + 3 >= 3 otherwise (exact: NSW = 1 - SW)
            units.append(Unit({s["Y"]: 1.0 / C, s["NSW"]: 3.0}, s["RY"]))
        b.layer([pivot_row, zero], FFN("reciprocal", units))
        # L3: the products of textbook elimination; the determinant's factor and sign.
        keep = {one: 1.0, s["EQ"]: -1.0}
        units = [
            Unit(s["R"], s["RR"], gate=s["RP"]),
            Unit(s["F"], s["G"], gate=keep), Unit(s["EQ"], {s["G"]: -1.0}, gate=one),
            Unit(s["W"], s["WM"], gate=keep), Unit(s["W"], {s["W"]: -1.0}, gate=one),
            Unit("row", s["T"], gate=one), Unit(s["EK"], s["T"], gate={s["PR"]: 1.0, one: -k}),
            Unit(s["EQ"], s["T"], gate={one: k, "row": -1.0}),
            Unit(s["Z"], s["zeros"], gate=one)]
        heads = []
        if det:
            heads.append(_greater(f"{tag}pos{k}", [{s["P"]: 1.0}], [], s["POS"], cmp))
            sign = {s["POS"]: 2.0, one: -1.0}
            units += [Unit(s["SG"], s["SG"], gate={s["NS"]: 2.0, one: -1.0}), _erase(s["SG"]),
                      Unit(s["AP"], s["FM"], gate={one: 1.0, s["BS"]: -1.0}),
                      Unit({s["RAP"]: 1.0, s["Z"]: -1.0}, s["FM"], gate=s["BS"])]
            if switched:
                units += [Unit(s["Y"], s["D"], gate={one: 1.0, s["SW"]: -1.0}), Unit(s["RY"], s["D"], gate=s["SW"]),
                          _erase(s["Y"]), _erase(s["RY"]), _erase(s["SW"]), _erase(s["NSW"])]
            if last:
                units += [Unit({one: 1.0, s["BS"]: -1.0}, s["V1"], gate=sign), Unit(s["BS"], s["V2"], gate=sign)]
        b.layer(heads, FFN("bilinear", units))
        # L4: the row swap and the update of W; the running product.
        swap = Head([in_work, same_col, match({"row": s["T"]})], [(s["WM"], s["WMs"]), (s["G"], s["Gs"])],
                    name=f"{tag}swap{k}")
        heads = [swap]
        units = [Unit(s["WMs"], s["W"], gate=one), Unit(s["Gs"], {s["W"]: -1.0}, gate=s["RR"])]
        units += [_erase(s[t]) for t in TEMPS + ("ABS", "GE")]
        if det:
            units += [Unit(s["D"], s["Y"], gate=s["FM"]), _erase(s["D"])]
            units += [_erase(s[t]) for t in DET_TEMPS]
            if last:
                heads.append(_greater(f"{tag}nz", [{s["zeros"]: 1.0}], [{one: 0.5}], s["NZ"], cmp))
                units += [Unit(s["SG"], s["SGs"], gate=s["V1"]), Unit(s["SG"], s["SGb"], gate=s["V2"])]
            else:
                units += [Unit(s["SG"], s["SG"], gate={s["POS"]: 2.0, one: -1.0}), _erase(s["SG"])]
        b.layer(heads, FFN("bilinear", units))
        if not last:  # L5: |W| and eligibility for the next step; whether the running value switches
            # switch where the product left [0, 1] (BS = 0) or went below 1 (BS = 1: Y > C)
            heads = [_greater(f"{tag}switch{k}", [{s["Y"]: 1.0}], [{one: 1.0, s["BS"]: C - 1.0}], s["SW"], cmp,
                              negated=s["NSW"])] if det else []
            b.layer(heads, abs_ge(k + 1))
    read = None
    if inverse_out is not None:
        read = Head([in_work, match({"row": "row", "col": {"col": 1.0, one: float(n)}})],
                    [(s["W"], inverse_out[1])], name=f"{tag}readout")
    if det:
        # T1: OV = [Y < threshold of the dtype]; the result where D held the product (BS = 0);
        # XB = Y where 1/Y is wanted and finite, else a safe value; G the sign of 1/Y's term.
        threshold = [{one: THRESHOLD32, s["is64"]: -THRESHOLD32}, {s["is64"]: THRESHOLD64}]
        over = _greater(f"{tag}overflow", threshold, [{s["Y"]: 1.0}], s["OV"], cmp)
        b.layer([over] + ([read] if read is not None else []), FFN("bilinear", [
            Unit(s["Y"], det_out[1], gate=s["SGs"]),
            Unit(s["Y"], s["XB"], gate={one: 1.0, s["OV"]: -1.0}),
            Unit(s["OV"], s["XB"], gate=threshold[0]), Unit(s["OV"], s["XB"], gate=threshold[1]),
            Unit({one: 1.0, s["BS"]: -1.0}, s["XB"], gate=one),
            # sign where the reciprocal holds the result; 4x where it overflows; 0 for a zero pivot
            Unit(s["SGb"], s["G2"], gate={one: C, s["OV"]: 3.0 * C, s["NZ"]: -4.0 * C})]))
        b.layer(ffn=FFN("reciprocal", [Unit(s["XB"], s["YI"])]))  # T2
        b.layer(ffn=FFN("bilinear", [Unit(s["YI"], det_out[1], gate=s["G2"])]))  # T3
    elif read is not None:
        b.layer([read])
    return s["zeros"]


@register
class Inverse(Construction):
    """forward(a (..., n, n)) -> (..., n, n): the inverse, computed by the encoder.

    Depth 5n + 2, width 2. Raises ValueError for a singular matrix (an exactly-zero pivot, or a
    pivot that is not finite) or when the inverse itself overflows the dtype (singular to working
    precision). A determinant too large for the dtype is no reason: it is not computed."""

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
        if (zero_pivots != 0).any() and torch.isfinite(zero_pivots).all():
            raise ValueError("matrix is singular: Gauss-Jordan elimination met an exactly-zero pivot")
        if not (torch.isfinite(zero_pivots).all() and torch.isfinite(inv).all()):
            raise ValueError(f"matrix is singular to working precision: a pivot of the elimination or the "
                             f"inverse is not finite in {str(a.dtype).removeprefix('torch.')}")
        return inv
