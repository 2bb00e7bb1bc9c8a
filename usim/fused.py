"""The fused execution: a bilinear FFN's terms and the head averaging them, run as one contraction.

In a constructed encoder a product is three steps (``usim.ops.pipeline``): heads fetch the two
operands of each term into slots a and b of a *term token*; a bilinear FFN writes term = a * b; an
averaging head reads the terms over a free box (the term axis) and writes their mean. The
structured execution (``usim.structured``) forms every term, then tree-sums them. Here, found from
the weights alone, each place where

* an averaging head (no content tier) reads a slot over a free box of a key block,
* that slot was written at that block by a bilinear FFN, with no bias, in the layer just before,
  from pre-activations that are sums of slots the FFN does not itself write there,
* nothing else reads the slot at that block (no other head or FFN, no readout), and nothing wrote
  it earlier,

is run without forming the terms: with a[q, f] and b[q, f] the two pre-activations seen through the
head's selection (strided views of the stream, ``_Run.view``), the head's mean is

    mean[q] = sum_units coef_u * sum_f a_u[q, f] * b_u[q, f] / count

one ``torch.einsum`` per pair of slots read by the two pre-activations: an axis along which an
operand view does not move (stride 0) is dropped from that operand, so the einsum is a batched
matmul of the operands as they lie in the stream, each read once. Every other step (the fetches,
the scale back, the softmax, ...) runs exactly as in the structured execution; a slot still read
elsewhere is still formed. The summation order of a fused average is the einsum's, not the tree's:
fused is close to dense (within a small multiple of torch's own float error), not bitwise.

Data structures:

* ``Product``: the lazy slot (slot, block) in place of a term field: per hidden unit, its output
  coefficient and the (slot, coef) terms of its two pre-activations;
* ``Place``: one averaging head step reading one FFN-written slot, fused or not, and why;
* ``FusedProgram``: the structured program with the fused FFN outputs left out and the places; it
  runs with ``_FusedRun``, a ``usim.structured._Run`` whose heads contract the lazy slots.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch

from usim.structured import Cell, FFNStep, HeadStep, Program, Selection, _Run


@dataclass
class Product:
    slot: int
    block: int
    units: list  # [(output coef, left terms [(slot, coef)], right terms [(slot, coef)])]
    layer: int  # the layer whose FFN wrote it


@dataclass
class Place:
    layer: int  # the averaging head's layer
    block: int  # the head's query block
    slot: int  # the slot it averages
    key_block: int
    fused: bool
    why: str

    def line(self, slots: list) -> str:
        state = "fused" if self.fused else "formed"
        return (f"layer {self.layer:>2}  head at block {self.block:>2} averages {slots[self.slot]} "
                f"of block {self.key_block:>2}: {state} ({self.why})")


class FusedProgram(Program):
    """A structured program whose fusable products run as contractions (see the module docstring)."""

    def __init__(self, base: Program, layers: list, products: dict, places: list):
        super().__init__(base.shapes, base.offsets, base.static, base.value, layers, base.outputs)
        self.products, self.places = products, places
        # the head steps that read a product (the others run as in the structured execution)
        self.contracting = {id(step) for heads, _ in layers for step in heads
                            if any((s, sel.key_block) in products for _, sel in step.cells for row in step.values for s, _ in row)}

    def make_run(self, batch, dtype, device) -> "_FusedRun":
        return _FusedRun(self, batch, dtype, device)

    def describe(self, slots: list) -> str:
        fused = sum(p.fused for p in self.places)
        rows = [f"fused execution: {fused} of {len(self.places)} averages of FFN-written terms contracted"]
        return "\n".join(rows + [p.line(slots) for p in self.places])


# --- finding the places ---------------------------------------------------------------------
def _reads(layers: list) -> list:
    """[(layer, stage, step, (slot, block), kind)] every read of a field by a step."""
    reads = []
    for i, (heads, ffns) in enumerate(layers):
        for step in heads:
            for cell, sel in step.cells:
                for row in step.values:
                    reads += [(i, "head", step, (s, sel.key_block), "value") for s, _ in row]
                for tier in step.tiers:
                    for q, k in tier:
                        reads += [(i, "head", step, (s, sel.key_block), "tier") for s, _ in k]
                        reads += [(i, "head", step, (s, step.block), "tier") for s, _ in q]
        for step in ffns:
            reads += [(i, "ffn", step, (s, step.block), "ffn") for terms, _ in step.pre for s, _ in terms]
    return reads


def _writes(layers: list) -> list:
    """[(layer, stage, (slot, block))] every write of a field by a step."""
    writes = []
    for i, (heads, ffns) in enumerate(layers):
        for step in heads:
            writes += [(i, "head", (s, cell.block)) for cell, _ in step.cells for s, _, _ in step.outputs]
        for step in ffns:
            writes += [(i, "ffn", (s, step.block)) for s, _, _ in step.out]
    return writes


def _product(step: FFNStep, slot: int, terms: list, bias: float):
    """(Product units, None) for an FFN output that is a sum of products of bias-free
    pre-activations, or (None, why not)."""
    if step.activation != "bilinear":
        return None, f"its FFN's activation is {step.activation}, not bilinear"
    if bias != 0:
        return None, "the FFN adds a bias to it"
    half = len(step.pre) // 2
    written = {s for s, _, _ in step.out}
    units = []
    for r, coef in terms:
        (left, b_left), (right, b_right) = step.pre[r], step.pre[half + r]
        if b_left != 0 or b_right != 0:
            return None, "a pre-activation has a bias"
        if written & {s for s, _ in left + right}:
            return None, "the FFN writes a slot its product reads"
        units.append((coef, left, right))
    return units, None


def plan_fused(base: Program, slots: list | None = None) -> FusedProgram:
    """The fused program of a structured one: products found from its steps (hence the weights)."""
    layers = base.layers
    reads, writes = _reads(layers), _writes(layers)
    outputs = {(s, b) for b, s in base.outputs}
    products, places = {}, []
    for i, (heads, _) in enumerate(layers):
        for step in heads:
            averaged = {(s, sel.key_block) for cell, sel in step.cells if sel.free for row in step.values for s, _ in row}
            for s, kb in sorted(averaged):
                producers = [(j, st) for j, (_, ffns) in enumerate(layers[:i]) for st in ffns
                             if st.block == kb and any(o == s for o, _, _ in st.out)]
                if not producers:
                    continue  # a slot fetched by heads or an input: nothing to fuse
                j, ffn = producers[-1]
                terms, bias = next((t, b) for o, t, b in ffn.out if o == s)
                units, why = _product(ffn, s, terms, bias)
                if units is not None:
                    why = _why_not(i, step, s, kb, j, ffn, reads, writes, outputs)
                    units = units if why is None else None
                places.append(Place(i, step.block, s, kb, units is not None, why or "bilinear FFN, read only here"))
                if units is not None:
                    products[s, kb] = Product(s, kb, units, j)
    # a product is fused only if every place reading it is
    for p in places:
        if p.fused and not all(q.fused for q in places if (q.slot, q.key_block) == (p.slot, p.key_block)):
            p.fused, p.why = False, "another head reads it unfused"
            products.pop((p.slot, p.key_block), None)
    new_layers = []
    for i, (heads, ffns) in enumerate(layers):
        kept = []
        for st in ffns:
            out = [o for o in st.out if (o[0], st.block) not in products]
            if out:
                kept.append(st if len(out) == len(st.out) else replace(st, out=out))
        new_layers.append((heads, kept))
    return FusedProgram(base, new_layers, products, places)


def _why_not(i, step, s, kb, j, ffn, reads, writes, outputs):
    """Why the slot s at block kb (written by the FFN of layer j) cannot be fused into the head
    step of layer i, or None."""
    if i != j + 1:
        return f"written {i - j} layers before it is averaged"
    if step.tiers:
        return "content tiers choose among the terms"
    if (s, kb) in outputs:
        return "the readout reads it"
    if any(w == (s, kb) and (lw < j or (lw == j and stage == "head")) for lw, stage, w in writes):
        return "written before the FFN too"
    for layer, stage, other, field, kind in reads:
        if field != (s, kb) or layer <= j:
            continue
        if other is step and kind == "value":
            continue
        if layer == i and stage == "head" and kind == "value" and not other.tiers:
            continue  # another averaging head of the same layer: checked as a place of its own
        return "another step reads the terms"
    return None


# --- running ------------------------------------------------------------------------------------
def contract(a: torch.Tensor, b: torch.Tensor, free: int) -> torch.Tensor:
    """sum over the last ``free`` axes of a * b (same shapes (B, *query, *free)) as one einsum over
    the operands as they lie: an axis along which an operand does not move (stride 0) is dropped
    from it; a query axis along which neither moves is computed once and expanded, a free one
    counted."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    n, shape = a.dim(), a.shape
    query = n - free
    drop_a = [axis for axis in range(n) if shape[axis] > 1 and a.stride(axis) == 0]
    drop_b = [axis for axis in range(n) if shape[axis] > 1 and b.stride(axis) == 0]
    sa, sb, out, expand, scale = "", "", "", [], 1
    for axis in range(n):
        in_a, in_b = axis not in drop_a, axis not in drop_b
        sa += letters[axis] if in_a else ""
        sb += letters[axis] if in_b else ""
        if axis < query:
            if in_a or in_b:
                out += letters[axis]
            else:
                expand.append(axis)
        elif not (in_a or in_b):
            scale *= shape[axis]
    for axis in reversed(drop_a):
        a = a.select(axis, 0)
    for axis in reversed(drop_b):
        b = b.select(axis, 0)
    result = torch.einsum(f"{sa},{sb}->{out}", a, b)
    for axis in expand:
        result = result.unsqueeze(axis)
    result = result.expand(shape[:query])
    return result * scale if scale != 1 else result


class _FusedRun(_Run):
    """A structured run whose averaging heads contract the products they read (``Product``)."""

    def head(self, step: HeadStep) -> list:
        if id(step) not in self.p.contracting:
            return super().head(step)
        products = self.p.products
        writes = []
        for cell, sel in step.cells:
            rest = [[(s, c) for s, c in row if (s, sel.key_block) not in products
                     and not self.zero(s, sel.key_block)] for row in step.values]
            formed = [j for j, row in enumerate(rest) if row]
            means = {}
            if formed:  # the slots read as the structured run reads them
                part = replace(step, cells=[(cell, sel)], values=[rest[j] for j in formed])
                means = dict(zip(formed, self.select(part, cell, sel)))
            for j, row in enumerate(step.values):
                for s, c in row:
                    if (s, sel.key_block) in products:
                        t = self.contracted(products[s, sel.key_block], cell, sel)
                        t = t if c == 1 else t * c
                        means[j] = t if j not in means else means[j] + t
            for slot, j, coef in step.outputs:
                if j in means:
                    writes.append((slot, cell, means[j] if coef == 1 else means[j] * coef))
        return writes

    def contracted(self, product: Product, cell, sel) -> torch.Tensor:
        """(B, *cell) the mean over the selection's free box of the product's terms, not formed."""
        count = math.prod([h - l for _, l, h in sel.free])
        total = None
        for coef, left, right in product.units:
            for sl, cl in left:
                if self.zero(sl, sel.key_block):
                    continue
                for sr, cr in right:
                    if self.zero(sr, sel.key_block):
                        continue
                    for a, b in self.operands(sl, sr, cell, sel):
                        t = contract(a, b, len(sel.free))
                        k = coef * cl * cr
                        t = t if k == 1 else t * k
                        total = t if total is None else total + t
        if total is None:  # every factor the stream's -0.0: the terms are 0
            return torch.zeros((self.batch, *cell.shape), dtype=self.dtype, device=self.device)
        return total / count if count != 1 else total

    def operands(self, left: int, right: int, cell: Cell, sel: Selection) -> list:
        """[(a, b)] views of the two slots over the selection, one pair per sub-box of the free box
        on which each field is one part (a field written in parts is never copied whole)."""
        fields = [self.parts(s, sel.key_block) for s in (left, right)]
        if all(len(f) == 1 for f in fields):
            return [(self.view(left, cell, sel), self.view(right, cell, sel))]
        # the key range of the determined axes, and cuts of the free axes at every part's edges
        span = {k: _bounds(sel, k, cell) for k in range(len(sel.m))}
        cuts = {a: {lo, hi} for a, lo, hi in sel.free}
        for parts in fields:
            for part, _ in parts:
                for a, lo, hi in sel.free:
                    cuts[a] |= {e for e in (part.lo[a], part.hi[a]) if lo < e < hi}
        pairs = []
        for box in itertools.product(*[list(zip(sorted(cuts[a]), sorted(cuts[a])[1:])) for a, _, _ in sel.free]):
            m = list(sel.m)
            free = [(a, lo, hi) for (a, _, _), (lo, hi) in zip(sel.free, box)]
            for a, lo, _ in free:
                m[a], span[a] = lo, (lo, hi_of(free, a) - 1)
            sub = Selection(sel.key_block, sel.M, m, free)
            views = []
            for s, parts in zip((left, right), fields):
                inside = [(part, t) for part, t in parts if all(part.lo[k] <= lo and hi < part.hi[k]
                                                                 for k, (lo, hi) in span.items())]
                view = _part_view(*inside[0], cell, sub, self.batch) if inside and inside[0][1] is not None else None
                # across parts (copied whole), positional, or walking keys backwards: as the structured run
                views.append(self.view(s, cell, sub) if view is None else view)
            pairs.append(tuple(views))
        return pairs


def hi_of(free: list, axis: int) -> int:
    return next(hi for a, _, hi in free if a == axis)


def _bounds(sel: Selection, k: int, cell: Cell) -> tuple:
    """(lowest, highest) key coordinate k the selection reads from the cell's queries."""
    low = high = sel.m[k]
    for c, lo, hi in zip(sel.M[k], cell.lo, cell.hi):
        low += min(c * lo, c * (hi - 1))
        high += max(c * lo, c * (hi - 1))
    return low, high


def _part_view(part: Cell, t: torch.Tensor, cell: Cell, sel: Selection, batch: int):
    """(B, *cell shape, *free sizes): one part of a field (t over part) at each query's keys (None
    where the keys go backwards along a query axis)."""
    origin = [sel.m[k] + sum(c * l for c, l in zip(sel.M[k], cell.lo)) - part.lo[k] for k in range(t.dim() - 1)]
    keys = t[(slice(None),) + tuple(slice(o, None) for o in origin)]
    stride = keys.stride()[1:]
    sizes = [batch, *cell.shape] + [h - l for _, l, h in sel.free]
    strides = [keys.stride(0)] + [sum(stride[k] * sel.M[k][a] for k in range(len(stride)))
                                  for a in range(len(cell.lo))] + [stride[a] for a, _, _ in sel.free]
    if any(st < 0 for st in strides):
        return None  # a reversal: the structured run's view flips it
    return keys.as_strided(sizes, strides)
