"""Building encoder weights by slot name (the Tracr ``craft`` idea, in PyTorch).

A ``Builder`` owns a layout and a residual stream of named scalar slots. Constructions

* allocate slots: ``positional`` (small integers from the layout, fixed per position) or
  ``slot`` (zero at the start, written by a layer);
* append layers of symbolic ``Head``s and an ``FFN``, which say which slots they read and write;
* call ``build()`` to get the weight tensors as a ``usim.Encoder``.

An ``Expr`` is a linear combination of slots, ``{"slot": coef, ...}``; a bare slot name or a
number (a multiple of the constant slot ``one``) is accepted wherever an Expr is.

Score tiers (see ``usim.engine``):

* ``match({key_slot: query_expr, ...})`` keeps the keys whose slots equal the query's values;
  score = -sum (query_expr - key_slot)^2 up to a per-query constant, an exact small integer.
  Needs ``key_slot + "^2"`` (``positional(..., square=True)`` makes it).
* ``maximize(key_expr, sign)`` keeps the keys with the largest (sign * key_expr): a content tier.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from usim.engine import ACTIVATIONS, FFN as FFNModule, Encoder, EncoderLayer, Frame, HardAttention
from usim.layout import Layout
from usim.positions import Piece, Positions, whole

ONE = "one"
POSITION = "position"  # the sequence index, a positional slot of every builder


def expr(e) -> dict[str, float]:
    """Normalise a slot name, number or dict to a dict Expr."""
    if isinstance(e, str):
        return {e: 1.0}
    if isinstance(e, (int, float)):
        return {ONE: float(e)} if e != 0 else {}
    return {k: float(v) for k, v in e.items() if v != 0}


def scaled(e, c: float) -> dict[str, float]:
    return {k: c * v for k, v in expr(e).items()}


# A tier is a list of (query_expr, key_expr) products; its score is their sum.
Tier = list


def match(targets: dict) -> Tier:
    """Keys whose slot k equals the query's targets[k] for every k (exact integer scores)."""
    tier = [(scaled(q, 2.0), expr(k)) for k, q in targets.items()]
    tier.append(({ONE: -1.0}, {f"{k}^2": 1.0 for k in targets}))
    return tier


def maximize(key_expr, sign=ONE) -> Tier:
    """Keys with the largest sign * key_expr; sign is a query Expr (e.g. +1, -1 or a slot)."""
    return [(expr(sign), expr(key_expr))]


def everywhere() -> Tier:
    """All keys tie: a uniform average (with ``Head(..., average=True)``)."""
    return [({}, {})]


@dataclass
class Head:
    """Select by lexicographic tiers, then move: each (src, dst) adds key.src to query.dst.

    Unless ``average`` is set, a last tier ``maximize(POSITION)`` keeps exactly one key, so a head
    copies a single value: exact, and no sum of tied values can overflow at positions whose
    targets are ambiguous. ``average=True`` keeps every tied key (a uniform average)."""

    tiers: list
    moves: list
    name: str = ""
    average: bool = False


@dataclass
class Unit:
    """One hidden unit: act(inp) (or inp * gate for bilinear), added to the ``out`` slots."""

    inp: object
    out: object
    gate: object = None


@dataclass
class FFN:
    activation: str
    units: list
    bias_out: dict = field(default_factory=dict)


def _sum_dicts(dicts) -> dict:
    total: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0.0) + v
    return total


class Builder:
    def __init__(self, layout: Layout):
        self.layout = layout
        self.slots: list[str] = []
        self._pos: dict[str, list[Piece]] = {}  # per positional slot, its pieces (usim.positions)
        self.layers: list[tuple[list[Head], FFN | None]] = []
        self.readout: dict[str, str] = {}
        self.slot("value")
        self.positional_affine(ONE, lambda block, i: (1, (0,) * len(block.shape)))
        # the sequence index: the block's offset plus the row-major strides of its multi-index
        self.positional_affine(POSITION, lambda block, i: (layout.offsets[block.name], _strides(block.shape)))

    # --- slots ---------------------------------------------------------------------------
    def slot(self, name: str) -> str:
        index = self.__dict__.setdefault("_index", {})
        if name in index:
            raise ValueError(f"slot {name!r} already exists")
        index[name] = len(self.slots)
        self.slots.append(name)
        return name

    def slots_named(self, prefix: str, count: int) -> list[str]:
        return [self.slot(f"{prefix}{i}") for i in range(count)]

    def positional(self, name: str, values, square: bool = False) -> str:
        """A slot holding a fixed small integer per position, given per token (optionally with its square)."""
        values = torch.as_tensor(values, dtype=torch.long)
        if values.numel() and values.abs().max() >= 2 ** 31:
            raise ValueError(f"positional {name!r}: values must fit in int32 (the layout has "
                             f"{self.layout.length:,} tokens: choose smaller sizes)")
        if values.shape != (self.layout.length,):
            raise ValueError(f"positional {name!r}: expected ({self.layout.length},), got {tuple(values.shape)}")
        pieces = []
        for i, blk in enumerate(self.layout.blocks):
            span = self.layout.span(blk.name)
            pieces.append(Piece(i, *whole(blk.shape), table=values[span.start: span.stop].to(torch.int32)))
        self.slot(name)
        self._pos[name] = pieces
        if square:
            self.positional(f"{name}^2", values * values)
        return name

    def positional_affine(self, name: str, form, square: bool = False) -> str:
        """A positional slot in closed form: ``form(block, index)`` gives, per block, None (0 there),
        (const, coefs) (value const + coefs . u at multi-index u) or a list of pieces
        (lo, hi, const, coefs) on disjoint sub-boxes (0 elsewhere). With ``square``, slot
        ``name + "^2"`` holds the squares."""
        pieces = []
        for i, blk in enumerate(self.layout.blocks):
            spec = form(blk, i)
            if spec is None:
                continue
            if isinstance(spec, tuple):
                spec = [(*whole(blk.shape), *spec)]
            for lo, hi, const, coef in spec:
                pieces.append(Piece(i, tuple(lo), tuple(hi), int(const), tuple(int(c) for c in coef)))
        for p in pieces:  # the largest value a corner of the piece reaches must fit int32
            top = abs(p.const) + sum(abs(c) * max(abs(l), abs(h - 1)) for c, l, h in zip(p.coef, p.lo, p.hi))
            if (top * top if square else top) >= 2 ** 31:
                raise ValueError(f"positional {name!r}: values must fit in int32 (the layout has "
                                 f"{self.layout.length:,} tokens: choose smaller sizes)")
        self.slot(name)
        self._pos[name] = pieces
        if square:
            self.slot(f"{name}^2")
            self._pos[f"{name}^2"] = [Piece(p.block, p.lo, p.hi, p.const, p.coef, square=True) for p in pieces]
        return name

    def positional_from(self, name: str, fn, square: bool = True) -> str:
        """Positional slot from ``fn(block, block_index, coords)`` evaluated per block."""
        return self.positional(name, self.layout.feature(fn), square=square)

    def standard_positions(self) -> None:
        """Slots block, row, col (with squares): block index and the last two coordinates."""
        self.positional_from("block", lambda b, i, c: i)
        self.positional_from("row", lambda b, i, c: c[:, -2] if c.shape[1] > 1 else 0)
        self.positional_from("col", lambda b, i, c: c[:, -1])

    # --- layers --------------------------------------------------------------------------
    def layer(self, heads=(), ffn: FFN | None = None) -> None:
        heads = list(heads)
        if not heads and ffn is None:
            raise ValueError("a layer needs heads or an FFN")
        if ffn is not None and ffn.activation not in ACTIVATIONS:
            raise ValueError(f"activation {ffn.activation!r} is not one of {ACTIVATIONS}")
        self.layers.append((heads, ffn))

    def parallel(self, *branches) -> None:
        """Run constructions side by side: layer i of every branch becomes one layer.

        Each branch is a callable that appends layers to this builder. The branches must write
        disjoint slots. FFNs with the same activation merge (units concatenated); a branch whose FFN
        activation differs gets an FFN-only layer right after, which keeps every branch's order."""
        stacks = []
        for branch in branches:
            before = len(self.layers)
            branch()
            stacks.append(self.layers[before:])
            del self.layers[before:]
        for i in range(max((len(s) for s in stacks), default=0)):
            heads, ffns = [], {}
            for stack in stacks:
                if i < len(stack):
                    heads += stack[i][0]
                    if stack[i][1] is not None:
                        ffns.setdefault(stack[i][1].activation, []).append(stack[i][1])
            merged = [FFN(act, [u for f in fs for u in f.units], _sum_dicts([f.bias_out for f in fs]))
                      for act, fs in ffns.items()]
            self.layer(heads, merged[0] if merged else None)
            for ffn in merged[1:]:
                self.layer(ffn=ffn)

    def result(self, block: str, slot: str) -> None:
        """Read ``slot`` at the positions of output block ``block``."""
        if self.layout[block].role != "output":
            raise ValueError(f"block {block!r} is not an output block")
        self.readout[block] = slot

    # --- weights -------------------------------------------------------------------------
    def _vec(self, e) -> torch.Tensor:
        v = torch.zeros(len(self.slots), dtype=torch.float64)
        index = self.__dict__.get("_index", {})
        for name, c in expr(e).items():
            if name not in index:
                raise ValueError(f"unknown slot {name!r}")
            v[index[name]] += c
        return v

    def _attention(self, heads: list[Head]) -> HardAttention:
        width = len(self.slots)
        heads = [h if h.average else Head(h.tiers + [maximize(POSITION)], h.moves, h.name, True) for h in heads]
        tiers = max(len(h.tiers) for h in heads)
        d_k = max(max((len(t) for t in h.tiers), default=1) for h in heads) or 1
        d_v = max(len(h.moves) for h in heads) or 1
        query = torch.zeros(len(heads), tiers, d_k, width, dtype=torch.float64)
        key = torch.zeros_like(query)
        value = torch.zeros(len(heads), d_v, width, dtype=torch.float64)
        output = torch.zeros(len(heads), width, d_v, dtype=torch.float64)
        for h, head in enumerate(heads):
            for t, tier in enumerate(head.tiers):
                for j, (q, k) in enumerate(tier):
                    query[h, t, j] = self._vec(q)
                    key[h, t, j] = self._vec(k)
            for j, (src, dst) in enumerate(head.moves):
                value[h, j] = self._vec(src)
                output[h, :, j] = self._vec(dst)
        return HardAttention(query, key, value, output)

    def _ffn(self, ffn: FFN) -> FFNModule:
        width = len(self.slots)
        hidden = len(ffn.units)
        rows = 2 * hidden if ffn.activation == "bilinear" else hidden
        w_in = torch.zeros(rows, width, dtype=torch.float64)
        w_out = torch.zeros(width, hidden, dtype=torch.float64)
        for i, unit in enumerate(ffn.units):
            w_in[i] = self._vec(unit.inp)
            if ffn.activation == "bilinear":
                if unit.gate is None:
                    raise ValueError("a bilinear unit needs a gate")
                w_in[hidden + i] = self._vec(unit.gate)
            w_out[:, i] = self._vec(unit.out)
        return FFNModule(ffn.activation, w_in, torch.zeros(rows, dtype=torch.float64), w_out,
                         self._vec(ffn.bias_out))

    def frame(self) -> Frame:
        """The per-size facts alone (positions and readout), without building any weight."""
        if not self.readout and self.layout.outputs:
            raise ValueError("no result slot set: call result(block, slot)")
        positions = Positions([blk.shape for blk in self.layout.blocks],
                              {self.slots.index(n): pieces for n, pieces in self._pos.items()})
        readout = [self.slots.index(self.readout.get(blk.name, "value")) for blk in self.layout.blocks]
        return Frame(positions, readout)

    def build(self) -> Encoder:
        frame = self.frame()
        positions, readout = frame.positions, frame.readout_blocks.tolist()
        layers = [
            EncoderLayer(self._attention(heads) if heads else None, self._ffn(ffn) if ffn else None)
            for heads, ffn in self.layers
        ]
        return Encoder(self.slots, positions, readout, layers)


def _strides(shape: tuple) -> tuple:
    """Row-major strides of a block's multi-index."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
