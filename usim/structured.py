"""The structured program: every planned selection an affine map of block coordinates, run as a view.

``usim.plan`` plans a head per query token (an index each) and ``usim.program`` runs it as a random
gather: about 350 bytes and 25 ns a token. But in a constructed encoder almost every selection is
*affine* in the block coordinates: term token (i, k, t) of a product reads its left operand at
(i, t) and its right one at (t, k); an output (i, k) averages the term tokens (i, k, *). When the
positional features are in closed form (``usim.positions``), this module derives such maps from
the weights, with exact integer arithmetic, per *cell* (a sub-box of a block on which every feature
a head reads is one affine piece), and runs them as strided views: no index arrays, no gathers.

Planning a head at a query cell (``Planner.plan``). Its leading static tier must be a ``match``
(query row c is -1, key row c the sum of squares of the other key rows, exactly as polynomials of
the key's coordinates): the keys kept are those whose features equal the query's targets. On a key
cell whose match features are coordinates (coefficient 1 on one axis, or constant), the solution
is u[axis] = target(q) - const: an affine map of the query's coordinates, the other axes of the
cell free. Exactly one key cell must hold a solution for every query of the cell (checked over the
cell's corners), the others none; else the encoder falls back to ``usim.program``. Later static
tiers (the position tie-break) pick a corner of the free box; content tiers are scored at run time
over the box.

Data structures:

* ``Selection``: the keys of a query cell: key block, ``M`` (key axes x query axes) and ``m`` (the
  map u = M q + m on the determined axes), ``free`` axes (axis, lo, hi) averaged over;
* ``HeadStep`` (one head at one query block: its cells, value rows, content tiers, output rows)
  and ``FFNStep`` (one FFN at one block: pre-activation rows and output rows as (slot, coef) terms);
* at run time, the stream is a dict (slot, block) -> ``Field``: a list of parts (lo, hi, tensor
  (B, *cell)) covering the block; positional fields are made from the closed form, never-written
  ones are -0.0 (the exact additive identity: a first write is its value bitwise).

Liveness is per (slot, block): a head runs at the query blocks where it writes a live slot, an FFN
at the blocks where it does. A query axis along which neither the keys nor the query side vary
(a softmax row's keys are the same for every entry of the row) is computed once and expanded.
The averaging sums are ``usim.average``'s pairwise tree, as in the dense reference.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from usim.activations import ZERO_AT_ZERO, activate
from usim.average import tree_sum
from usim.plan import static_slots, written_slots

MAX_CELLS = 4096  # a block split into more cells than this is not planned structurally


class NotStructured(Exception):
    """The encoder has a selection that is not an affine map of closed-form features."""


# --- polynomials of a cell's coordinates ---------------------------------------------------
@dataclass
class Poly:
    """const + lin . u + u^T quad u, exact (float64 on small integers)."""

    const: float
    lin: torch.Tensor
    quad: torch.Tensor

    @classmethod
    def zero(cls, dims: int) -> "Poly":
        return cls(0.0, torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64))

    def __add__(self, o: "Poly") -> "Poly":
        return Poly(self.const + o.const, self.lin + o.lin, self.quad + o.quad)

    def scale(self, c: float) -> "Poly":
        return Poly(self.const * c, self.lin * c, self.quad * c)

    @property
    def affine(self) -> bool:
        return not bool(self.quad.any())

    @property
    def constant(self) -> bool:
        return self.affine and not bool(self.lin.any())

    def square(self) -> "Poly":
        return Poly(self.const ** 2, 2 * self.const * self.lin, torch.outer(self.lin, self.lin))

    def equals(self, o: "Poly") -> bool:
        sym = lambda q: q + q.T  # noqa: E731 (u^T Q u depends on Q + Q^T only)
        return self.const == o.const and torch.equal(self.lin, o.lin) and torch.equal(sym(self.quad), sym(o.quad))


def _piece_poly(piece, dims: int) -> Poly:
    if not piece.affine:
        raise NotStructured("a positional table")
    p = Poly(float(piece.const), torch.tensor(piece.coef, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64))
    return p.square() if piece.square else p


@dataclass(frozen=True)
class Cell:
    block: int
    lo: tuple
    hi: tuple
    shape: tuple = field(init=False, compare=False, repr=False)  # hi - lo, per axis

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(h - l for l, h in zip(self.lo, self.hi)))


@dataclass
class Selection:
    key_block: int
    M: list  # (key axes) x (query axes) ints
    m: list  # (key axes,) ints; for a free axis, its lo
    free: list  # [(axis, lo, hi)] averaged over, in axis order (increasing key position)


@dataclass
class HeadStep:
    block: int
    cells: list  # [(Cell, Selection)]
    values: list  # per value row j: [(slot, coef)]
    tiers: list  # content tiers: per tier, per d_k row: (query terms [(slot, coef)], key terms)
    outputs: list  # [(slot, j, coef)]


@dataclass
class FFNStep:
    block: int
    activation: str
    pre: list  # per pre-activation row: ([(slot, coef)], bias)
    out: list  # per written slot: (slot, [(hidden row, coef)], bias)


@dataclass
class Program:
    """A structured program: run(seq (B, L)) -> (B, L), as ``usim.program.Program``."""

    shapes: list
    offsets: list
    static: dict  # slot -> {block: pieces} (positional slots no layer writes to)
    value: int
    layers: list  # per layer: (HeadSteps, FFNSteps)
    outputs: list  # [(block, slot)] computed blocks (the others return the input)
    structured: bool = True

    @property
    def size(self) -> int:
        """Numbers per sequence of the largest block (the engine splits batches by it)."""
        return max(math.prod(shape) for shape in self.shapes)

    def to(self, dtype, device) -> "Program":
        return self  # coefficients are Python numbers: cast by each operation

    def make_run(self, batch: int, dtype, device) -> "_Run":
        """One forward pass's state (``usim.fused`` runs its own)."""
        return _Run(self, batch, dtype, device)

    def run(self, seq: torch.Tensor) -> torch.Tensor:
        out = seq.clone()
        fields = self.forward({b: seq[:, self.offsets[b]: self.offsets[b + 1]] for b in range(len(self.shapes))},
                              [b for b, _ in self.outputs])
        for b, flat in fields.items():
            out[:, self.offsets[b]: self.offsets[b + 1]] = flat
        return out

    def forward(self, inputs: dict, blocks: list) -> dict:
        """inputs: block -> (B, size) or (B, *block shape) token values (the value slot; absent
        blocks are 0) -> block -> (B, size) results at the requested computed blocks."""
        any_input = next(iter(inputs.values()))
        run = self.make_run(any_input.shape[0], any_input.dtype, any_input.device)
        for b, t in inputs.items():
            run.fields[self.value, b] = [(Cell(b, (0,) * len(self.shapes[b]), self.shapes[b]),
                                          t.reshape(t.shape[0], *self.shapes[b]))]
        for heads, ffns in self.layers:
            writes = []
            for step in heads:
                writes += run.head(step)
            run.apply(writes)
            for step in ffns:
                run.apply(run.ffn(step))
        wanted = dict(self.outputs)
        return {b: run.whole(wanted[b], b).reshape(run.batch, math.prod(self.shapes[b]))
                for b in blocks if b in wanted}


class _Run:
    """One forward pass: the fields of the stream and the operations on them."""

    def __init__(self, program: Program, batch: int, dtype, device):
        self.p, self.batch, self.dtype, self.device = program, batch, dtype, device
        self.fields: dict = {}
        self.layouts: dict = {}  # (slot, block, axis) -> a copy of the field with that axis contiguous

    # --- reading fields -----------------------------------------------------------------
    def parts(self, slot: int, block: int) -> list:
        if (slot, block) in self.fields:
            return self.fields[slot, block]
        shape = self.p.shapes[block]
        cell = Cell(block, (0,) * len(shape), shape)
        return [(cell, None)]  # positional or never written: made per cell on demand

    def at(self, slot: int, cell: Cell) -> torch.Tensor:
        """The slot's values on a cell (B, *cell shape), a view where possible."""
        for part, t in self.parts(slot, cell.block):
            if all(pl <= l and h <= ph for pl, ph, l, h in zip(part.lo, part.hi, cell.lo, cell.hi)):
                if t is None:
                    return self.static(slot, cell)
                index = (slice(None),) + tuple(slice(l - pl, h - pl) for pl, l, h in zip(part.lo, cell.lo, cell.hi))
                return t[index]
        raise RuntimeError("usim.structured: a cell across parts of a field (a bug in the cell split)")

    def static(self, slot: int, cell: Cell) -> torch.Tensor:
        shape = (self.batch, *cell.shape)
        pieces = self.p.static.get(slot, {}).get(cell.block)
        if not pieces:  # never written, not positional: the stream's initial -0.0
            return torch.full((), -0.0, dtype=self.dtype, device=self.device).expand(shape)
        for piece in pieces:
            if all(pl <= l and h <= ph for pl, ph, l, h in zip(piece.lo, piece.hi, cell.lo, cell.hi)):
                value = torch.full((1,) * (len(cell.lo) + 1), float(piece.const), dtype=self.dtype, device=self.device)
                for axis, c in enumerate(piece.coef):
                    if c:
                        r = torch.arange(cell.lo[axis], cell.hi[axis], dtype=self.dtype, device=self.device)
                        value = value + c * r.reshape([1] * (axis + 1) + [-1] + [1] * (len(cell.lo) - axis - 1))
                return (value * value if piece.square else value).expand(shape)
        inside = [p for p in pieces if all(l < ph and pl < h for pl, ph, l, h in zip(p.lo, p.hi, cell.lo, cell.hi))]
        if not inside:
            return torch.full((), -0.0, dtype=self.dtype, device=self.device).expand(shape)  # outside its pieces: 0
        # pieces covering parts of the cell (a one-hot feature): the values made over the cell, 0 elsewhere
        out = torch.full(cell.shape, -0.0, dtype=self.dtype, device=self.device)
        for p in inside:
            lo = [max(pl, l) for pl, l in zip(p.lo, cell.lo)]
            hi = [min(ph, h) for ph, h in zip(p.hi, cell.hi)]
            grid = p.grid()[tuple(slice(a - pl, b - pl) for a, b, pl in zip(lo, hi, p.lo))]
            out[tuple(slice(a - l, b - l) for a, b, l in zip(lo, hi, cell.lo))] = grid.to(self.dtype)
        return out.expand(shape)

    def whole(self, slot: int, block: int) -> torch.Tensor:
        """The slot over the whole block (B, *shape), materialised when it is in several parts."""
        parts = self.parts(slot, block)
        if len(parts) == 1:
            return self.at(slot, parts[0][0])
        out = torch.empty(self.batch, *self.p.shapes[block], dtype=self.dtype, device=self.device)
        for cell, _ in parts:
            out[(slice(None),) + tuple(slice(l, h) for l, h in zip(cell.lo, cell.hi))] = self.at(slot, cell)
        self.fields[slot, block] = [(Cell(block, (0,) * (out.dim() - 1), self.p.shapes[block]), out)]
        return out

    # --- heads ----------------------------------------------------------------------------
    def head(self, step: HeadStep) -> list:
        """[(slot, cell, delta)] the head's contributions (applied after every head of the layer)."""
        writes = []
        for cell, sel in step.cells:
            # a head that only copies never-written values adds exact -0.0s: nothing to do
            if not step.tiers and all(self.zero(s, sel.key_block) for row in step.values for s, _ in row):
                continue
            mean = self.select(step, cell, sel)
            for slot, j, coef in step.outputs:
                writes.append((slot, cell, mean[j] if coef == 1 else mean[j] * coef))
        return writes

    def zero(self, slot: int, block: int) -> bool:
        """Whether a field is the stream's initial -0.0 everywhere (never written, not positional)."""
        return (slot, block) not in self.fields and not self.p.static.get(slot, {}).get(block)

    def view(self, slot: int, cell: Cell, sel: Selection) -> torch.Tensor:
        """(B, *cell shape, *free sizes): the slot at each query's candidate keys, a strided view."""
        keys = self.whole(slot, sel.key_block)
        inner = self.inner_axis(cell, sel)
        if inner is not None and keys.stride(1 + inner) != 1 and \
                keys.numel() * 8 <= self.batch * math.prod(cell.shape) * max(1, math.prod([h - l for _, l, h in sel.free])):
            # the view's innermost axis walks a strided key axis: read a copy of the (smaller) key
            # block laid out with that axis contiguous, so the product over the view vectorises
            name = (slot, sel.key_block, inner)
            if name not in self.layouts:
                self.layouts[name] = keys.movedim(1 + inner, -1).contiguous().movedim(-1, 1 + inner)
            keys = self.layouts[name]
        # a query axis along which the keys go backwards (a reversal) is walked from its last query
        # and flipped back: as_strided takes no negative strides
        back = [a for a in range(len(cell.lo)) if sum(keys.stride(1 + k) * sel.M[k][a] for k in range(keys.dim() - 1)) < 0]
        first = [h - 1 if a in back else l for a, (l, h) in enumerate(zip(cell.lo, cell.hi))]
        # start at the key of that query (then as_strided keeps that storage offset)
        origin = [sel.m[k] + sum(c * l for c, l in zip(sel.M[k], first)) for k in range(keys.dim() - 1)]
        keys = keys[(slice(None),) + tuple(slice(o, None) for o in origin)]
        stride = keys.stride()[1:]
        sizes = [self.batch, *cell.shape] + [h - l for _, l, h in sel.free]
        strides = [keys.stride(0)] + [abs(sum(stride[k] * sel.M[k][a] for k in range(len(stride))))
                                      for a in range(len(cell.lo))] + [stride[a] for a, _, _ in sel.free]
        view = keys.as_strided(sizes, strides)
        return view.flip([1 + a for a in back]) if back else view

    @staticmethod
    def inner_axis(cell: Cell, sel: Selection):
        """The key axis the view's innermost axis steps along (None if several or none)."""
        if sel.free:
            return sel.free[-1][0]
        steps = [k for k in range(len(sel.M)) if sel.M[k][len(cell.lo) - 1]]
        return steps[0] if len(steps) == 1 else None

    def combine(self, terms: list, get) -> torch.Tensor:
        total = None
        for slot, coef in terms:
            t = get(slot)
            t = t if coef == 1 else t * coef
            total = t if total is None else total + t
        return total

    def select(self, step: HeadStep, cell: Cell, sel: Selection) -> list:
        """Per value row, the mean over the kept keys at each query of the cell (B, *cell)."""
        if not step.tiers and not sel.free and all(len(row) == 1 and row[0][1] == 1 for row in step.values):
            # one key per query, one slot per row (a fetch): the row is the view itself
            return [self.view(row[0][0], cell, sel) for row in step.values]
        views = {s: self.view(s, cell, sel) for s in {s for row in step.values for s, _ in row} |
                 {s for tier in step.tiers for _, k in tier for s, _ in k}}
        queries = {s: self.at(s, cell) for s in {s for tier in step.tiers for q, _ in tier for s, _ in q}}
        q_axes = len(cell.lo)
        # query axes along which nothing varies: computed once, expanded after
        same = [a for a in range(q_axes) if cell.shape[a] > 1 and
                all(v.stride(1 + a) == 0 for v in views.values()) and
                all(t.stride(1 + a) == 0 for t in queries.values())]
        if same:
            narrow = lambda t: t[(slice(None),) + tuple(slice(0, 1) if a in same else slice(None)  # noqa: E731
                                                        for a in range(q_axes))]
            views = {s: narrow(v) for s, v in views.items()}
            queries = {s: narrow(t) for s, t in queries.items()}
        values = [self.combine(row, views.get) for row in step.values]
        free = len(sel.free)
        keep = None
        for tier in step.tiers:
            score = None
            for q_terms, k_terms in tier:
                q = self.combine(q_terms, queries.get) if q_terms else None
                k = self.combine(k_terms, views.get) if k_terms else None
                if q is None or k is None:
                    continue
                term = q[(...,) + (None,) * free] * k
                score = term if score is None else score + term
            if score is None:
                continue  # every score 0: every key ties
            if keep is not None:
                score = score.masked_fill(~keep, float("-inf"))
            best = score == score.flatten(-free).amax(-1).reshape(*score.shape[:-free], *([1] * free)) \
                if free else torch.ones_like(score, dtype=torch.bool)
            keep = best if keep is None else keep & best
        means = []
        count = math.prod([h - l for _, l, h in sel.free])
        for v in values:
            if v is None:  # a value row this head leaves empty (another head of its layer moves more)
                means.append(None)
                continue
            if free == 0:
                mean = v
            elif keep is None:  # every candidate kept: the tree over the box in key order
                flat = v.reshape(*v.shape[:-free], count)
                mean = flat[..., 0] if count == 1 else tree_sum(flat) / count
            else:
                k = keep.expand_as(v).reshape(*v.shape[:-free], count)
                flat = v.reshape(*v.shape[:-free], count)
                order = (~k).to(torch.int8).argsort(dim=-1, stable=True)
                kept = k.gather(-1, order)
                ordered = torch.where(kept, flat.gather(-1, order), torch.zeros((), dtype=v.dtype, device=v.device))
                mean = tree_sum(ordered) / k.sum(-1).to(v.dtype)  # keys not kept take no part
            means.append(mean.expand(self.batch, *cell.shape) if same else mean)
        return means

    # --- FFNs -----------------------------------------------------------------------------
    def ffn(self, step: FFNStep) -> list:
        """[(slot, cell, delta)]: the FFN at its block, cell by cell (where its inputs are one part
        each); over several cells the outputs are written into one tensor per slot."""
        reads = sorted({s for terms, _ in step.pre for s, _ in terms})
        if (step.activation in ZERO_AT_ZERO or step.activation == "bilinear") and all(self.zero(s, step.block) for s in reads) and \
                all(bias == 0 for _, bias in step.pre) and all(bias == 0 for _, _, bias in step.out):
            return []  # zeros in, zeros out: the written slots stay the stream's -0.0
        cells = self.split(step.block, reads)
        shape = self.p.shapes[step.block]
        full = Cell(step.block, (0,) * len(shape), shape)
        dest = {slot: torch.empty(self.batch, *shape, dtype=self.dtype, device=self.device)
                for slot, _, _ in step.out} if len(cells) > 1 else None
        writes = []
        for cell in cells:
            x = {s: self.at(s, cell) for s in reads}
            same = [a for a in range(len(cell.lo)) if cell.shape[a] > 1 and all(t.stride(1 + a) == 0 for t in x.values())]
            if same:
                x = {s: t[(slice(None),) + tuple(slice(0, 1) if a in same else slice(None) for a in range(len(cell.lo)))]
                     for s, t in x.items()}
            at = (slice(None),) + tuple(slice(l, h) for l, h in zip(cell.lo, cell.hi))
            pre = []
            for terms, bias in step.pre:
                t = self.combine(terms, x.get) if terms else torch.zeros((), dtype=self.dtype, device=self.device)
                pre.append(t + bias if bias != 0 else t)
            half = len(pre) // 2
            hidden = None
            for slot, terms, bias in step.out:
                if dest is not None and not same and step.activation == "bilinear" and bias == 0 and \
                        len(terms) == 1 and terms[0][1] == 1 and not torch.compiler.is_compiling() and not (
                            torch.is_grad_enabled() and (dest[slot].requires_grad or
                                                         any(t.requires_grad for t in pre))):  # in place: no copy
                    r = terms[0][0]
                    torch.mul(pre[r], pre[half + r], out=dest[slot][at])
                    continue
                if hidden is None:
                    hidden = _activate(step.activation, pre)
                t = self.combine(terms, lambda r: hidden[r]) if terms else \
                    torch.zeros((), dtype=self.dtype, device=self.device)
                t = (t + bias if bias != 0 else t).expand(self.batch, *cell.shape)
                if dest is not None:
                    dest[slot][at] = t
                else:
                    writes.append((slot, cell, t))
        if dest is not None:
            writes = [(slot, full, t) for slot, t in dest.items()]
        return writes

    def split(self, block: int, slots: list) -> list:
        """The cells of a block on which each slot's field is one part."""
        parts = [cell for s in slots for cell, _ in self.parts(s, block)]
        shape = self.p.shapes[block]
        if all(cell.hi == shape and not any(cell.lo) for cell in parts):  # every field whole: one cell
            return [Cell(block, (0,) * len(shape), shape)]
        return _grid(block, shape, parts)

    # --- writing --------------------------------------------------------------------------
    def apply(self, writes: list) -> None:
        """Add each (slot, cell, delta) to the stream; several deltas to one slot sum in order."""
        grouped: dict = {}
        for slot, cell, delta in writes:
            grouped.setdefault((slot, cell.block), []).append((cell, delta))
        for (slot, block), deltas in grouped.items():
            fresh = self.zero(slot, block)
            by_cell: dict = {}  # deltas to one cell sum in order (a view stays a view when alone)
            for cell, delta in deltas:
                by_cell[cell] = delta if cell not in by_cell else by_cell[cell] + delta
            full = Cell(block, (0,) * len(self.p.shapes[block]), self.p.shapes[block])
            if fresh and _tiles(set(by_cell), full):
                self.fields[slot, block] = list(by_cell.items())  # first writes: their values, as views
                continue
            total = torch.zeros(self.batch, *self.p.shapes[block], dtype=self.dtype, device=self.device)
            for cell, delta in by_cell.items():
                total[(slice(None),) + tuple(slice(l, h) for l, h in zip(cell.lo, cell.hi))] += delta
            self.fields[slot, block] = [(full, total if fresh else self.whole(slot, block) + total)]


def _grid(block: int, shape: tuple, boxes: list, limit: int | None = None) -> list:
    """The cells of a block cut along every edge of the boxes (anything with lo and hi): on each
    cell every box is either whole or absent."""
    cuts = [{0, n} for n in shape]
    for box in boxes:
        for a, (l, h) in enumerate(zip(box.lo, box.hi)):
            cuts[a] |= {l, h}
    axes = [sorted(c) for c in cuts]
    if limit is not None and math.prod([len(c) - 1 for c in axes]) > limit:
        raise NotStructured("too many cells")
    return [Cell(block, tuple(lo), tuple(hi)) for lo, hi in
            (zip(*pairs) for pairs in itertools.product(*[list(zip(c, c[1:])) for c in axes]))]


def _tiles(cells: set, full: Cell) -> bool:
    return sum([math.prod(c.shape) for c in cells]) == math.prod(full.shape)


def _activate(activation: str, pre: list) -> list:
    """The declared activation on each pre-activation (bilinear: the first half times the second)."""
    if activation == "bilinear":
        half = len(pre) // 2
        return [a * b for a, b in zip(pre[:half], pre[half:])]
    return [activate(activation, t) for t in pre]


# --- planning ------------------------------------------------------------------------------
def _terms(row: torch.Tensor) -> list:
    return [(int(s), float(row[s])) for s in row.nonzero()[:, 0].tolist()]


class Planner:
    """Structured plans over an encoder's closed-form positions (see the module docstring)."""

    def __init__(self, encoder, frame=None):
        self.positions = (encoder if frame is None else frame).positions
        if not self.positions.closed_form:
            raise NotStructured("positional tables, not closed forms")
        self.shapes = self.positions.shapes
        self.static = static_slots(encoder)
        self.memo: dict = {}

    def cells(self, block: int, slots) -> list:
        """The cells of a block on which every slot is one piece (or none)."""
        return _grid(block, self.shapes[block], [p for s in slots for p in self.positions.block_pieces(int(s), block)],
                     limit=MAX_CELLS)

    def poly(self, w: torch.Tensor, cell: Cell) -> Poly:
        """The static feature w (W,) reads, as a polynomial of the cell's coordinates."""
        dims = len(cell.lo)
        total = Poly.zero(dims)
        for s, c in _terms(w):
            inside = [p for p in self.positions.block_pieces(s, cell.block)
                      if all(pl <= l and h <= ph for pl, ph, l, h in zip(p.lo, p.hi, cell.lo, cell.hi))]
            if inside:
                total = total + _piece_poly(inside[0], dims).scale(c)
        return total

    def plan(self, attn, head: int, block: int) -> tuple[list, int]:
        """([(Cell, Selection)] covering the query block, first content tier)."""
        qw, kw = attn.query[head].cpu().double(), attn.key[head].cpu().double()
        tiers = qw.shape[0]
        first_dynamic = tiers
        for t in range(tiers):
            used = ((qw[t] != 0) | (kw[t] != 0)).any(0)
            if (used & ~self.static).any():
                first_dynamic = t
                break
        static = [t for t in range(first_dynamic) if ((qw[t] != 0).any(1) & (kw[t] != 0).any(1)).any()]
        if not static:
            raise NotStructured("a head without a static tier scores every key")
        t0 = static[0]
        q_slots = (qw[static] != 0).any(0).any(0).nonzero()[:, 0].tolist()
        out = []
        for cell in self.cells(block, q_slots):
            sel = self.match(qw[t0], kw[t0], cell)
            for t in static[1:]:
                sel = self.narrow(qw[t], kw[t], cell, sel)
            out.append((cell, sel))
        return out, first_dynamic

    def key_index(self, kw: torch.Tensor) -> dict:
        """A match tier's keys, per key cell of every block, indexed by their constant features
        (memoised per definition): {row c: {constant rows: {their values: [(cell, rows)]}}}, where
        rows[i] = (axis, const): key feature i is u[axis] + const (axis None: the constant)."""
        name = (kw.numpy().tobytes(), tuple(kw.shape))
        if name not in self.memo:
            slots = (kw != 0).any(0).nonzero()[:, 0].tolist()
            index: dict = {}
            for b in range(len(self.shapes)):
                for cell in self.cells(b, slots):
                    k = [self.poly(kw[j], cell) for j in range(kw.shape[0])]
                    dims = len(cell.lo)
                    matched = False
                    for c in range(len(k)):
                        others = [i for i in range(len(k)) if i != c]
                        if not all(k[i].affine for i in others) or \
                                not k[c].equals(sum((k[i].square() for i in others), Poly.zero(dims))):
                            continue
                        rows = {}
                        for i in others:
                            nonzero = k[i].lin.nonzero()[:, 0].tolist()
                            if len(nonzero) > 1 or (nonzero and float(k[i].lin[nonzero[0]]) != 1):
                                rows = None  # a feature that is not one coordinate
                                break
                            rows[i] = (nonzero[0] if nonzero else None, k[i].const)
                        pattern = None if rows is None else tuple(i for i in others if rows[i][0] is None)
                        key = None if rows is None else tuple(rows[i][1] for i in pattern)
                        index.setdefault(c, {}).setdefault(pattern, {}).setdefault(key, []).append((cell, rows))
                        matched = True
                    if not matched:
                        index.setdefault("unmatched", []).append(cell)
            self.memo[name] = index
        return self.memo[name]

    def match(self, qw: torch.Tensor, kw: torch.Tensor, cell: Cell) -> Selection:
        q = [self.poly(qw[j], cell) for j in range(qw.shape[0])]
        if not any(p.constant and p.const == -1 for p in q):  # no match form: say so before indexing keys
            raise NotStructured("a leading static tier that is not a match")
        index = self.key_index(kw)
        c = next((c for c in range(len(q)) if q[c].constant and q[c].const == -1 and c in index), None)
        if c is None or index.get("unmatched"):
            raise NotStructured("a leading static tier that is not a match")
        targets = {}
        for i in range(len(q)):
            if i != c:
                t = q[i].scale(0.5)  # the query side is 2 * target
                if not t.affine or t.const != round(t.const) or not bool((t.lin == t.lin.round()).all()):
                    raise NotStructured("a match target that is not an affine integer form")
                targets[i] = (t.const, t.lin.tolist())
        found = []
        for pattern, by_value in index[c].items():
            if pattern is None:
                raise NotStructured("a match feature that is not one coordinate")
            if all(not any(targets[i][1]) for i in pattern):  # constant targets: one look-up
                candidates = by_value.get(tuple(targets[i][0] for i in pattern), [])
            else:
                candidates = [e for es in by_value.values() for e in es]
            for kcell, rows in candidates:
                result = _solve(targets, rows, cell, kcell)
                if result == "partial":
                    raise NotStructured("a match that some queries of a cell meet and others do not")
                if result is not None:
                    found.append(result)
        if len(found) != 1:
            raise NotStructured(f"{len(found)} key cells meet a query cell's match")
        return found[0]

    def narrow(self, qw: torch.Tensor, kw: torch.Tensor, cell: Cell, sel: Selection) -> Selection:
        """A later static tier over the free box: its best corner (the query side must be constant)."""
        if not sel.free:
            return sel
        q = [self.poly(qw[j], cell) for j in range(qw.shape[0])]
        if not all(p.constant for p in q):
            raise NotStructured("a later static tier whose query side varies")
        kshape = self.shapes[sel.key_block]
        cells = [c for c in self.cells(sel.key_block, (kw != 0).any(0).nonzero()[:, 0].tolist())
                 if all(c.lo[a] <= l and h <= c.hi[a] for a, l, h in sel.free)]
        if len(cells) != 1:
            raise NotStructured("a later static tier across key pieces")
        kcell = cells[0]
        score = Poly.zero(len(kshape))
        for j in range(kw.shape[0]):
            if q[j].const:
                score = score + self.poly(kw[j], kcell).scale(q[j].const)
        if not score.affine:
            raise NotStructured("a quadratic later static tier")
        free = []
        m = list(sel.m)
        for a, lo, hi in sel.free:
            g = float(score.lin[a])
            if g == 0:
                free.append((a, lo, hi))
            else:
                m[a] = hi - 1 if g > 0 else lo
        return Selection(sel.key_block, sel.M, m, free)


def _bounds(const: float, lin: list, lo: tuple, hi: tuple) -> tuple[float, float]:
    """Min and max of const + lin . u over the box [lo, hi)."""
    low = high = const
    for c, l, h in zip(lin, lo, hi):
        low += min(c * l, c * (h - 1))
        high += max(c * l, c * (h - 1))
    return low, high


def _solve(targets: dict, rows: dict, cell: Cell, kcell: Cell):
    """The keys of kcell a match tier keeps for the queries of cell: a Selection (every query has
    them), None (no query has any), or "partial". targets[i] = (const, lin) of the query's target
    for key feature i, rows[i] = (axis, const) of the key feature."""
    dims_k = len(kcell.lo)
    M = [[0] * len(cell.lo) for _ in range(dims_k)]
    m = [None] * dims_k
    inside = True
    for i, (axis, const) in rows.items():
        t_const, t_lin = targets[i]
        low, high = _bounds(t_const - const, t_lin, cell.lo, cell.hi)  # u[axis] = target - const
        if axis is None:  # a constant key feature: every target must equal it
            if high < 0 or low > 0:
                return None
            if low != high:
                return "partial"
            continue
        if high < kcell.lo[axis] or low >= kcell.hi[axis]:
            return None
        if low < kcell.lo[axis] or high >= kcell.hi[axis]:
            inside = False
        row = [int(v) for v in t_lin]
        if m[axis] is not None and (m[axis] != int(t_const - const) or M[axis] != row):
            raise NotStructured("two match rows on one coordinate")
        M[axis], m[axis] = row, int(t_const - const)
    if not inside:
        return "partial"
    free = [(a, kcell.lo[a], kcell.hi[a]) for a in range(dims_k) if m[a] is None]
    for a, lo, _ in free:
        m[a] = lo
    return Selection(kcell.block, M, m, free)


# --- compiling -----------------------------------------------------------------------------
def compile_structured(encoder, frame=None) -> Program:
    """The structured program of an encoder at the sizes of ``frame`` (default: the encoder's own);
    NotStructured when a selection is not affine."""
    frame = encoder if frame is None else frame
    planner = Planner(encoder, frame)
    positions = frame.positions
    nblocks = len(positions.shapes)
    written = written_slots(encoder)
    value = encoder.slots.index("value")
    if hasattr(frame, "readout_blocks"):
        readout = frame.readout_blocks.tolist()
    else:
        tokens = frame.readout.cpu()
        readout = []
        for b in range(nblocks):
            part = tokens[positions.offsets[b]: positions.offsets[b + 1]]
            if len(part) and not bool((part == part[0]).all()):
                raise NotStructured("a readout that changes inside a block")
            readout.append(int(part[0]) if len(part) else value)
    outputs = [(b, s) for b, s in enumerate(readout) if s != value or bool(written[value])]
    live = {(s, b) for b, s in outputs}
    layers = []
    for layer in reversed(encoder.layers):
        ffns, heads = [], []
        if layer.ffn is not None:
            f = layer.ffn
            w_in, b_in, w_out, b_out = (t.detach().double().cpu() for t in (f.w_in, f.b_in, f.w_out, f.b_out))
            outs = ((w_out != 0).any(1) | (b_out != 0)).nonzero()[:, 0].tolist()
            reads = (w_in != 0).any(0).nonzero()[:, 0].tolist()
            for b in range(nblocks):
                if any((s, b) in live for s in outs):
                    pre = [(_terms(w_in[r]), float(b_in[r])) for r in range(w_in.shape[0])]
                    out = [(s, _terms(w_out[s]), float(b_out[s])) for s in outs]
                    ffns.append(FFNStep(b, f.activation, pre, out))
                    live |= {(s, b) for s in reads}
        if layer.attn is not None:
            a = layer.attn
            marks = set()
            for h in range(a.heads):
                value_w, out_w = a.value[h].detach().double().cpu(), a.output[h].detach().double().cpu()
                outs = [(s, j, float(out_w[s, j])) for s, j in (out_w != 0).nonzero().tolist()]
                for b in range(nblocks):
                    if not any((s, b) in live for s, _, _ in outs):
                        continue
                    cells, first = planner.plan(a, h, b)
                    tiers = []
                    for t in range(first, a.tiers):
                        qw, kw = a.query[h, t].detach().double().cpu(), a.key[h, t].detach().double().cpu()
                        rows = [(_terms(qw[j]), _terms(kw[j])) for j in range(qw.shape[0])]
                        rows = [(q, k) for q, k in rows if q and k]
                        if rows:
                            tiers.append(rows)
                    values = [_terms(value_w[j]) for j in range(value_w.shape[0])]
                    heads.append(HeadStep(b, cells, values, tiers, outs))
                    key_slots = {s for row in values for s, _ in row} | \
                        {s for tier in tiers for _, k in tier for s, _ in k}
                    query_slots = {s for tier in tiers for q, _ in tier for s, _ in q}
                    marks |= {(s, b) for s in query_slots}
                    marks |= {(s, sel.key_block) for _, sel in cells for s in key_slots}
            live |= marks
        layers.append((heads, ffns))
    layers.reverse()
    static = {}
    for s in positions.slots:
        if not bool(written[s]):
            per_block = {}
            for p in positions.pieces[s]:
                per_block.setdefault(p.block, []).append(p)
            static[s] = per_block
    return Program(positions.shapes, positions.offsets, static, value, layers, outputs)
