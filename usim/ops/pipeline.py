"""Matrix pipelines with one token per product term: a narrow stream whatever the sizes.

``matmul_layers`` (usim/ops/matmul.py) fetches the m terms of an inner product into m slots of the
output token: the stream width and the head count grow with the matrices. Here every term of every
product is a token of its own, so the stream and the heads stay the same for any size and only
the sequence grows; the weights are small and dense again.

A product out = sum_t left_t * right_t, out of shape (n, p) with T terms, gets a scratch *term
block* (n, p, T). Term token (i, k, t) carries, as positional slots, the *addresses* of its two
operands, (block, row, col) each: ``fa.*`` for the left one and ``fb.*`` for the right one. Output
token (i, k) carries the address of its terms, ``rd.* = (term block, i, k)``. A matmul stage of any
number of products is two layers:

    layer 1  fetch heads: key (block, row, col) == the query's fa (resp. fb): copy the operand's
             slot into slot a (resp. b);  FFN bilinear: term = a * b (one rounding, as in torch)
    layer 2  reduce head (averaging): keys (block, row, col) == the query's rd, i.e. the T terms of
             (i, k): their mean, summed in key order;  FFN: out = act(T * mean) (identity or relu)

Every other token's addresses point at ``null``, a scratch token whose addresses point at itself:
every slot a matmul stage writes is 0 there, so a token that takes no part in a stage reads zeros.
Every operand lives in one slot of its block, its *home*: ``value`` for input blocks, the stage's
output slot for its outputs, ``p`` for softmax outputs. One side of a stage may read operands of
two homes: ``value`` and one matmul output slot, since each is exactly 0 where the other lives
(an input block is 0 in every stage output slot, an intermediate block is 0 in ``value``).

A softmax stage, row-wise over blocks of m columns (Lemma 3, as in usim/ops/softmax.py), is three
layers: the row maximum by attention (over the kept keys) then exp(s - max - MASKED * drop); the
row mean of e (averaging head) then r = 1 / (m * mean); then p = e * r. With a key mask (a block
of m flags, 1 = the key is ignored), a head in the first layer of the pipeline copies the flag of
its column into ``drop`` at the softmax blocks' tokens (address ``kp.*``) and the 0 of ``null``
everywhere else, so every row elsewhere keeps a key and stays finite.

A layernorm stage, row-wise over a block z (n, E) into a new block of its shape (torch's LayerNorm:
biased variance, eps inside the root), is three layers. Output token (i, k) carries the address of
its source entry (z, i, k) in ``fa.*``, of gamma[k] in ``fb.*`` (row 0, col k) and of beta[k] in
``lb.block`` (with ``fb.row``, ``fb.col``):

    layer 1  heads: the mean mu of z's row i (averaging head, keys (block, row) == (fa.block, fa.row));
             v = z[i, k]; g = gamma[k]; c = beta[k];  FFN bilinear: sq = (v - mu)^2, dg = (v - mu) * g
    layer 2  head: var = the mean of sq over the token's own row (averaging);  FFN rsqrt: r = 1 / sqrt(var + eps)
    layer 3  FFN bilinear: out = dg * r + c * 1

At every other token but the term tokens (whose operand addresses point elsewhere, and whose
layernorm slots are never read) these addresses point at null, so the output slot is 0 there.

One side of a matmul stage (or its addends) may read operands of several homes when at every token
a fetch can address (never a term token) at most one of those slots is nonzero: ``value`` is 0 at
every token but the input blocks'; a matmul stage's output slot is 0 at every token but the matmul
outputs' (elsewhere ``rd`` and ``ad`` point at null); a layernorm's output slot is 0 at every token
but the layernorm outputs' and the term tokens. So a fetch may mix ``value``, one matmul output slot
and one layernorm output slot; not two of a kind, nor a softmax's weights (computed at every token).
Each block is computed by one stage only.

All scores are exact small integers (block indices and coordinates), never raw positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from usim.activations import ZERO_AT_ZERO
from usim.construct import FFN, ONE, Builder, Head, Unit, match, maximize
from usim.layout import Layout
from usim.progress import track
from usim.ops.softmax import MASKED

ADDRESS = ("block", "row", "col")
MIXING = "a fetch may mix only 'value', one matmul output and one layernorm output"


@dataclass
class Product:
    """out (n, p) = sum over t < terms of left(i, k, t) * right(i, k, t).

    left and right map index tensors (i, k, t) of the term tokens to operand addresses
    (block name or list of block names per term, row tensor, col tensor)."""

    out: str
    terms: int
    left: Callable
    right: Callable
    addend: str | None = None  # a block of out's shape added to the result (a score bias, a residual)


class Pipeline:
    """Declare input/output blocks and stages, then ``build()`` the builder with every layer."""

    def __init__(self, inputs: dict, outputs: dict):
        self.inputs, self.outputs = dict(inputs), dict(outputs)
        self.scratch: dict = {"null": (1,)}
        self.home = {name: "value" for name in self.inputs}
        self.stages: list = []
        self.scales: dict = {}  # softmax tag -> the blocks multiplying its weights

    def shape(self, block: str) -> tuple:
        for blocks in (self.inputs, self.outputs, self.scratch):
            if block in blocks:
                return tuple(blocks[block])
        raise ValueError(f"no block {block!r}")

    def block(self, name: str, shape) -> str:
        """A scratch block for an intermediate matrix (unless it is an output)."""
        if name not in self.outputs:
            self.scratch[name] = tuple(shape)
        return name

    def matmul(self, tag: str, products: list[Product], activation: str = "identity") -> str:
        """A stage computing every product (each into its out block) in two layers; returns the
        stage's output slot. A product with fewer terms than the stage's most gets zero terms (both
        operands read at ``null``), so every output averages the same number of terms."""
        if activation not in ZERO_AT_ZERO:
            raise ValueError(f"stage {tag!r}: activation must map 0 to 0 (one of {ZERO_AT_ZERO}), got {activation!r}")
        out = f"{tag}out"
        terms = max(p.terms for p in products)
        for p in products:
            if len(self.shape(p.out)) != 2:
                raise ValueError(f"stage {tag!r}: output block {p.out!r} must be a matrix")
            self._check_new(tag, p.out)
            self.scratch[f"{tag}terms:{p.out}"] = (*self.shape(p.out), terms)
        self.stages.append(("matmul", tag, products, activation))
        for p in products:
            self.home[p.out] = out
        return out

    def softmax(self, tag: str, blocks: list[str], keep=None, scale: list[str] | None = None) -> str:
        """Row-wise softmax of each block (its home slot) into slot ``tag + "p"``; returns the slot.
        Keys are masked by ignore flags (1 = ignored): ``keep`` names one input block of m flags (one
        per column, for every row), or a list of input blocks, one per softmax block and of its
        shape (one flag per entry). ``scale``: input blocks, one per softmax block, that multiply
        the weights entry by entry (dropout's mask / (1 - p)); one more layer, the result in
        ``tag + "pd"``."""
        widths = {self.shape(b)[-1] for b in blocks}
        if len(widths) != 1 or any(len(self.shape(b)) != 2 for b in blocks):
            raise ValueError(f"softmax {tag!r}: blocks must be matrices with one row length, "
                             f"got {[self.shape(b) for b in blocks]}")
        flags = [keep] * len(blocks) if isinstance(keep, str) else keep
        if flags is not None:
            if len(flags) != len(blocks) or any(f not in self.inputs for f in flags):
                raise ValueError(f"softmax {tag!r}: ignore flags {keep!r} must be input blocks, one per block")
            for blk, f in zip(blocks, flags):
                if self.shape(f) not in ((widths.copy().pop(),), self.shape(blk)):
                    raise ValueError(f"softmax {tag!r}: ignore flags {f!r} {self.shape(f)} fit neither a row nor "
                                     f"block {blk!r} {self.shape(blk)}")
        if scale is not None:
            if flags is None or isinstance(keep, str) or len(scale) != len(blocks) or \
                    any(f not in self.inputs or self.shape(f) != self.shape(b) for f, b in zip(scale, blocks)):
                raise ValueError(f"softmax {tag!r}: scale {scale} must be input blocks of the softmax blocks' "
                                 "shapes, beside per-entry ignore flags")
            self.scales[tag] = list(scale)
        self.stages.append(("softmax", tag, blocks, flags))
        result = f"{tag}pd" if scale is not None else f"{tag}p"
        for b in blocks:
            self.home[b] = result
        return result

    def layernorm(self, tag: str, block: str, out: str, gamma: str, beta: str, eps: float) -> str:
        """out = LayerNorm of each row of ``block`` (its home slot), as torch's: (z - mean) / sqrt(var +
        eps) * gamma + beta with the biased variance; gamma and beta are input vectors (E,), eps > 0 a
        constant of the construction. ``out`` is a new block of block's shape; returns its slot."""
        shape = self.shape(block)
        if len(shape) != 2 or self.shape(out) != shape:
            raise ValueError(f"layernorm {tag!r}: {block!r} {shape} and {out!r} {self.shape(out)} must be matrices "
                             "of one shape")
        for name in (gamma, beta):
            if name not in self.inputs or self.shape(name) != shape[1:]:
                raise ValueError(f"layernorm {tag!r}: {name!r} must be an input vector ({shape[1]},), "
                                 f"got {self.shape(name)}")
        if not (isinstance(eps, (int, float)) and eps > 0 and eps < float("inf")):
            raise ValueError(f"layernorm {tag!r}: eps must be a positive finite number, got {eps!r}")
        self.home_at(block, tag)  # computed before it is read
        self._check_new(tag, out)
        self.stages.append(("layernorm", tag, (block, out, gamma, beta), float(eps)))
        self.home[out] = f"{tag}out"
        return f"{tag}out"

    def _check_new(self, tag: str, block: str) -> None:
        """A stage's output must be a block no input fills and no earlier stage computes."""
        computed = [b for kind, _, items, _ in self.stages for b in
                    ([p.out for p in items] if kind == "matmul" else [items[1]] if kind == "layernorm" else [])]
        if block in self.inputs or block in computed:
            what = "an input" if block in self.inputs else "computed by an earlier stage"
            raise ValueError(f"stage {tag!r}: block {block!r} is already {what}")

    def mixable(self, homes: list[str]) -> bool:
        """Whether one fetch may read blocks of these home slots (see the module docstring)."""
        kinds = ["input" if home == "value" else next((kind for kind, tag, _, _ in self.stages if home == f"{tag}out"
                                                      and kind in ("matmul", "layernorm")), home) for home in homes]
        return len(homes) <= 1 or (len(set(kinds)) == len(kinds) and set(kinds) <= {"input", "matmul", "layernorm"})

    # --- building -------------------------------------------------------------------------
    def build(self) -> tuple[Builder, Layout]:
        layout = Layout.of(self.inputs, self.outputs, self.scratch)
        b = Builder(layout)
        index = {blk.name: i for i, blk in enumerate(layout.blocks)}
        _coordinates(b, layout)
        null = index["null"]
        addresses = {f"{side}.{a}": torch.zeros(layout.length, dtype=torch.long) for side in ("fa", "fb", "rd")
                     for a in ADDRESS}
        for side in ("fa", "fb", "rd"):
            addresses[f"{side}.block"][:] = null
        homes: dict = {}
        for kind, tag, products, _ in track(self.stages, desc="usim: building the stages' addresses"):
            if kind != "matmul":
                continue
            for p in products:
                term_block = f"{tag}terms:{p.out}"
                n, q, terms = self.scratch[term_block]
                i, k, t = (c.reshape(-1) for c in torch.meshgrid(torch.arange(n), torch.arange(q),
                                                                  torch.arange(terms), indexing="ij"))
                span = layout.span(term_block)
                real = t < p.terms  # the padding terms of a shorter product read null's zeros
                positions = torch.arange(span.start, span.stop)[real]
                for side, operand in (("fa", p.left), ("fb", p.right)):
                    blocks, rows, cols = operand(i[real], k[real], t[real])
                    per_term = [blocks] * p.terms if isinstance(blocks, str) else list(blocks)
                    if len(per_term) != p.terms:
                        raise ValueError(f"stage {tag!r}: {len(per_term)} operand blocks for {p.terms} terms")
                    block_of = torch.tensor([index[name] for name in per_term])[t[real]]
                    for name in set(per_term):
                        homes.setdefault((tag, side), set()).add(self.home_at(name, tag))
                        at = block_of == index[name]
                        _check_inside(tag, name, self.shape(name), torch.as_tensor(rows)[at], torch.as_tensor(cols)[at])
                    addresses[f"{side}.block"][positions] = block_of
                    addresses[f"{side}.row"][positions] = torch.as_tensor(rows)
                    addresses[f"{side}.col"][positions] = torch.as_tensor(cols)
                out_span = layout.span(p.out)
                rows, cols = (c.reshape(-1) for c in torch.meshgrid(torch.arange(n), torch.arange(q), indexing="ij"))
                addresses["rd.block"][out_span.start: out_span.stop] = index[term_block]
                addresses["rd.row"][out_span.start: out_span.stop] = rows
                addresses["rd.col"][out_span.start: out_span.stop] = cols
        if self.keep_flags:  # the ignore flag each softmax token reads: its entry's, else null's (0)
            kp = {a: torch.zeros(layout.length, dtype=torch.long) for a in ADDRESS}
            kp["block"][:] = null
            for kind, tag, blocks, flags in self.stages:
                for blk, f in zip(blocks, flags) if kind == "softmax" and flags else ():
                    span, (rows, cols) = layout.span(blk), self.shape(blk)
                    kp["block"][span.start: span.stop] = index[f]
                    if len(self.shape(f)) == 2:  # one flag per entry, else one per column
                        kp["row"][span.start: span.stop] = torch.arange(rows).repeat_interleave(cols)
                    kp["col"][span.start: span.stop] = torch.arange(rows * cols) % cols
            addresses.update({f"kp.{a}": v for a, v in kp.items()})
        if self.scales:  # the weight multiplier each softmax token reads (same entry, its own block)
            addresses["sc.block"] = torch.full((layout.length,), null, dtype=torch.long)
            for kind, tag, blocks, _ in self.stages:
                for blk, f in zip(blocks, self.scales.get(tag, [])) if kind == "softmax" else ():
                    span = layout.span(blk)
                    addresses["sc.block"][span.start: span.stop] = index[f]
        for kind, tag, products, _ in self.stages:  # each output's addend (a bias block), else null (0)
            for p in (products if kind == "matmul" else []):
                if p.addend is not None:
                    if self.shape(p.addend) != self.shape(p.out):
                        raise ValueError(f"stage {tag!r}: addend {p.addend!r} must be a block of "
                                         f"{p.out!r}'s shape {self.shape(p.out)}")
                    if "ad.block" not in addresses:
                        addresses.update({f"ad.{a}": torch.zeros(layout.length, dtype=torch.long) for a in ADDRESS})
                        addresses["ad.block"][:] = null
                    span, (rows, cols) = layout.span(p.out), self.shape(p.out)
                    addresses["ad.block"][span.start: span.stop] = index[p.addend]
                    addresses["ad.row"][span.start: span.stop] = torch.arange(rows).repeat_interleave(cols)
                    addresses["ad.col"][span.start: span.stop] = torch.arange(rows * cols) % cols
        norms = [items for kind, _, items, _ in self.stages if kind == "layernorm"]
        if norms:  # source entry (fa), gamma (fb: row 0, col k), beta (lb.block) of each output token
            addresses["lb.block"] = torch.full((layout.length,), null, dtype=torch.long)
            for block, out, gamma, beta in norms:
                span, (rows, cols) = layout.span(out), self.shape(out)
                row, col = torch.arange(rows).repeat_interleave(cols), torch.arange(rows * cols) % cols
                for name, values in (("fa.block", index[block]), ("fa.row", row), ("fa.col", col),
                                     ("fb.block", index[gamma]), ("fb.row", 0), ("fb.col", col),
                                     ("lb.block", index[beta])):
                    addresses[name][span.start: span.stop] = values
        for name, values in addresses.items():
            b.positional(name, values)
        self._layers(b, index, homes)
        return b, layout

    def home_at(self, block: str, tag: str) -> str:
        """The slot holding block's values when stage ``tag`` runs (its home then)."""
        home = "value" if block in self.inputs else None
        for kind, stage_tag, items, _ in self.stages:
            if stage_tag == tag:
                break
            if kind == "matmul" and block in [p.out for p in items]:
                home = f"{stage_tag}out"
            if kind == "softmax" and block in items:
                home = f"{stage_tag}pd" if stage_tag in self.scales else f"{stage_tag}p"
            if kind == "layernorm" and block == items[1]:
                home = f"{stage_tag}out"
        if home is None:
            raise ValueError(f"stage {tag!r} reads block {block!r} before any stage computes it")
        return home

    def _layers(self, b: Builder, index: dict, homes: dict) -> None:
        first = True
        for kind, tag, items, option in self.stages:
            if kind == "matmul":
                a, c, term, mean, out = (b.slot(f"{tag}{s}") for s in ("a", "b", "term", "mean", "out"))
                heads = []
                for side, slot in (("fa", a), ("fb", c)):
                    sources = sorted(homes[tag, side])
                    if not self.mixable(sources):
                        raise ValueError(f"stage {tag!r}: one side reads operands of homes {sources}; {MIXING}")
                    target = match({name: f"{side}.{name}" for name in ADDRESS})
                    heads += [Head([target], [(src, slot)], name=f"{tag}{side} from {src}") for src in sources]
                if first and self.keep_flags:
                    heads.append(self._drop_head(b, index))
                first = False
                b.layer(heads, FFN("bilinear", [Unit(a, term, gate=c)]))
                terms = max(p.terms for p in items)
                reduce = Head([match({name: f"rd.{name}" for name in ADDRESS})], [(term, mean)],
                              name=f"{tag}sum", average=True)
                heads, total = [reduce], {mean: float(terms)}
                addends = sorted({self.home_at(p.addend, tag) for p in items if p.addend is not None})
                if addends:  # out = act(T * mean + addend)
                    if not self.mixable(addends):
                        raise ValueError(f"stage {tag!r}: addends of homes {addends}: {MIXING}")
                    add = b.slot(f"{tag}add")
                    heads += [Head([match({name: f"ad.{name}" for name in ADDRESS})], [(src, add)],
                                   name=f"{tag}addend" + (f" from {src}" if len(addends) > 1 else ""))
                              for src in addends]
                    total[add] = 1.0
                b.layer(heads, FFN(option, [Unit(total, out)]))
            elif kind == "layernorm":
                self._layernorm_layers(b, tag, *items, eps=option)
            else:
                self._softmax_layers(b, tag, items, option)

    @property
    def keep_flags(self) -> bool:
        """Whether some softmax stage masks keys (then one head of the first layer reads the flags)."""
        return any(kind == "softmax" and option for kind, _, _, option in self.stages)

    def _drop_head(self, b: Builder, index: dict) -> Head:
        """drop = the ignore flag of the token's entry (or column) at the softmax blocks, 0 elsewhere."""
        b.slot("drop")
        return Head([match({a: f"kp.{a}" for a in ADDRESS})], [("value", "drop")], name="key flags")

    def _softmax_layers(self, b: Builder, tag: str, blocks: list[str], keep) -> None:
        src = self.home_at(blocks[0], tag)
        if any(self.home_at(blk, tag) != src for blk in blocks):
            raise ValueError(f"softmax {tag!r}: every block must live in one slot")
        m = self.shape(blocks[0])[-1]
        top, e, mean, r, p = (b.slot(f"{tag}{s}") for s in ("max", "e", "mean", "r", "p"))
        row = match({"block": "block", "row": "row"})
        kept = [maximize("drop", -1.0)] if keep is not None else []
        exp_in = {src: 1.0, top: -1.0, **({"drop": -MASKED} if keep is not None else {})}
        b.layer([Head([row, *kept, maximize(src)], [(src, top)], name=f"{tag}max")], FFN("exp", [Unit(exp_in, e)]))
        b.layer([Head([row], [(e, mean)], name=f"{tag}sum", average=True)],
                FFN("reciprocal", [Unit({mean: float(m)}, r)]))
        if tag not in self.scales:
            b.layer(ffn=FFN("bilinear", [Unit(e, p, gate=r)]))
            return
        multiplier, dropped = b.slot(f"{tag}scale"), b.slot(f"{tag}pd")
        fetch = Head([match({"block": "sc.block", "row": "kp.row", "col": "kp.col"})], [("value", multiplier)],
                     name=f"{tag}scale")
        b.layer([fetch], FFN("bilinear", [Unit(e, p, gate=r)]))
        b.layer(ffn=FFN("bilinear", [Unit(p, dropped, gate=multiplier)]))

    def _layernorm_layers(self, b: Builder, tag: str, block: str, out: str, gamma: str, beta: str,
                          eps: float) -> None:
        src = self.home_at(block, tag)
        mu, v, g, c, sq, dg, var, r, y = (b.slot(f"{tag}{s}") for s in ("mean", "v", "g", "c", "sq", "dg", "var",
                                                                          "r", "out"))
        source = {a: f"fa.{a}" for a in ADDRESS}
        b.layer([Head([match({"block": "fa.block", "row": "fa.row"})], [(src, mu)], name=f"{tag}mean", average=True),
                 Head([match(source)], [(src, v)], name=f"{tag}fetch"),
                 Head([match({a: f"fb.{a}" for a in ADDRESS})], [("value", g)], name=f"{tag}gamma"),
                 Head([match({"block": "lb.block", "row": "fb.row", "col": "fb.col"})], [("value", c)],
                      name=f"{tag}beta")],
                FFN("bilinear", [Unit({v: 1.0, mu: -1.0}, sq, gate={v: 1.0, mu: -1.0}),
                                 Unit({v: 1.0, mu: -1.0}, dg, gate=g)]))
        b.layer([Head([match({"block": "block", "row": "row"})], [(sq, var)], name=f"{tag}var", average=True)],
                FFN("rsqrt", [Unit({var: 1.0, ONE: eps}, r)]))
        b.layer(ffn=FFN("bilinear", [Unit(dg, y, gate=r), Unit(c, y, gate=ONE)]))


def _coordinates(b: Builder, layout: Layout) -> None:
    """Positional slots block, row, col with squares: a matrix's row and column; a vector is one
    row; a term block (n, p, T) is addressed by its output entry (i, k)."""
    b.positional_from("block", lambda blk, i, c: i)
    b.positional_from("row", lambda blk, i, c: c[:, 0] if c.shape[1] > 1 else 0)
    b.positional_from("col", lambda blk, i, c: c[:, 1] if c.shape[1] > 1 else c[:, 0])


def _check_inside(tag: str, name: str, shape: tuple, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Every address must name an entry of its block (ValueError with the sizes otherwise)."""
    n_rows, n_cols = (1, shape[0]) if len(shape) == 1 else shape[:2]
    if len(rows) and (rows.min() < 0 or rows.max() >= n_rows or cols.min() < 0 or cols.max() >= n_cols):
        raise ValueError(f"stage {tag!r}: operand addresses rows {int(rows.min())}..{int(rows.max())}, cols "
                         f"{int(cols.min())}..{int(cols.max())} fall outside block {name!r} of shape {shape}")


def matrix(block: str, rows: str = "i", cols: str = "t"):
    """An operand read from one block: rows and cols each name an index of the term token
    ("i", "k" or "t"), e.g. matrix("a", "i", "t") for A[i, t] or matrix("x", "k", "t") for X^T[t, k].
    (An operand may also be any function (i, k, t) -> (block name or one name per term, rows, cols).)"""
    def operand(i, k, t):
        pick = {"i": i, "k": k, "t": t}
        return block, pick[rows], pick[cols]
    return operand
