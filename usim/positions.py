"""Positional features in closed form: per block and slot, affine pieces of the block's multi-index.

A constructed encoder's positional slots (block, row, col, operand addresses, ...) are small
integers fixed per token. Stored per token they cost as much as the sequence is long (88 M tokens
for U at E = 384 and 128 tokens). But they are almost always *affine* in the multi-index u of the
token inside its block (row = u_0, col = u_1, an operand address = u_0 or u_2 - 32 h, ...), piece by
piece. So they are kept in closed form and a per-token table is made only on demand (the dense
execution, small encoders, inspection).

Data structures:

* ``Piece``: one slot's values on a sub-box [lo, hi) of one block: ``const + coef . u``, or its square
  (``square``: the ``x^2`` slots that ``match`` scores need), or a stored int table of the sub-box
  (``table``, row-major: arbitrary values, e.g. from a per-token tensor);
* ``Positions``: the blocks' shapes (in sequence order, concatenated row-major) and, per slot, its
  pieces; outside its pieces a slot is 0. The pieces of one slot never overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Piece:
    block: int
    lo: tuple
    hi: tuple
    const: int = 0
    coef: tuple = ()  # one integer per axis of the block; () with a table
    square: bool = False
    table: torch.Tensor | None = None  # (prod(hi - lo),) values, row-major over the sub-box (int, or float64
    #                                    for a bare encoder given non-integer positional values)

    @property
    def shape(self) -> tuple:
        return tuple(h - l for l, h in zip(self.lo, self.hi))

    @property
    def affine(self) -> bool:
        return self.table is None

    def evaluate(self, coords: torch.Tensor) -> torch.Tensor:
        """(N,) int64 values at multi-indices coords (N, ndim) inside the sub-box."""
        if self.table is not None:
            local = coords - torch.tensor(self.lo)
            return _exact(self.table)[_ravel(local, self.shape)]
        value = torch.full((len(coords),), self.const, dtype=torch.long)
        for axis, c in enumerate(self.coef):
            if c:
                value += c * coords[:, axis]
        return value * value if self.square else value

    def grid(self) -> torch.Tensor:
        """The values over the whole sub-box, shaped like it (int64)."""
        if self.table is not None:
            return _exact(self.table).reshape(self.shape)
        value = torch.full(self.shape, self.const, dtype=torch.long)
        for axis, c in enumerate(self.coef):
            if c:
                shape = [1] * len(self.shape)
                shape[axis] = -1
                value = value + c * torch.arange(self.lo[axis], self.hi[axis]).reshape(shape)
        return value * value if self.square else value


def _exact(table: torch.Tensor) -> torch.Tensor:
    return table.double() if table.is_floating_point() else table.long()


def _ravel(coords: torch.Tensor, shape: tuple) -> torch.Tensor:
    flat = torch.zeros(len(coords), dtype=torch.long)
    for axis, size in enumerate(shape):
        flat = flat * size + coords[:, axis]
    return flat


def whole(shape: tuple) -> tuple[tuple, tuple]:
    return (0,) * len(shape), tuple(shape)


class Positions:
    """The positional features of a sequence of blocks (see the module docstring)."""

    def __init__(self, shapes: list[tuple], pieces: dict[int, list[Piece]]):
        self.shapes = [tuple(int(s) for s in shape) for shape in shapes]
        self.offsets = [0]
        for shape in self.shapes:
            self.offsets.append(self.offsets[-1] + math.prod(shape))
        self.length = self.offsets[-1]
        self.pieces = {int(s): list(p) for s, p in pieces.items()}  # a slot without pieces is 0 everywhere
        for slot, ps in self.pieces.items():
            for p in ps:
                shape = self.shapes[p.block]
                if len(p.lo) != len(shape) or any(not 0 <= l < h <= s for l, h, s in zip(p.lo, p.hi, shape)):
                    raise ValueError(f"positional slot {slot}: piece [{p.lo}, {p.hi}) is not inside block "
                                     f"{p.block} of shape {shape}")
                if p.table is not None and p.table.numel() != math.prod(p.shape):
                    raise ValueError(f"positional slot {slot}: table of {p.table.numel()} values for a piece "
                                     f"of shape {p.shape}")

    @classmethod
    def from_table(cls, values: torch.Tensor, columns) -> "Positions":
        """One block of shape (L,) with a stored row per slot: values (P, L), slots columns (P,)."""
        length = values.shape[1]
        pieces = {int(c): [Piece(0, (0,), (length,), table=values[i] if values.is_floating_point() else
                                 values[i].to(torch.int32))]
                  for i, c in enumerate(columns) if length}
        return cls([(length,)], pieces)

    @property
    def slots(self) -> list[int]:
        """The positional slots, in the order they were declared."""
        return list(self.pieces)

    @property
    def closed_form(self) -> bool:
        """Whether every piece is affine (or a square of an affine form): no stored table."""
        return all(p.affine for ps in self.pieces.values() for p in ps)

    def block_pieces(self, slot: int, block: int) -> list[Piece]:
        return [p for p in self.pieces.get(slot, []) if p.block == block]

    def row(self, slot: int) -> torch.Tensor:
        """(L,) int64: the slot's value at every token (materialised)."""
        floating = any(p.table is not None and p.table.is_floating_point() for p in self.pieces.get(slot, []))
        out = torch.zeros(self.length, dtype=torch.float64 if floating else torch.long)
        for p in self.pieces.get(slot, []):
            view = out[self.offsets[p.block]: self.offsets[p.block + 1]].view(self.shapes[p.block])
            view[tuple(slice(l, h) for l, h in zip(p.lo, p.hi))] = p.grid()
        return out

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (P, L), slots (P,)): every positional slot, a row each; int32 when the values are
        integers that fit, else float64."""
        slots = self.slots
        rows = [self.row(s) for s in slots]
        values = torch.stack([r.double() for r in rows]) if rows else torch.zeros(0, self.length, dtype=torch.float64)
        if bool((values == values.round()).all()) and bool((values.abs() < 2 ** 31).all()):
            values = values.to(torch.int32)
        return values, torch.tensor(slots, dtype=torch.long)

    def values(self, slot: int, positions: torch.Tensor) -> torch.Tensor:
        """(N,) int64: the slot's values at the given token positions."""
        positions = positions.long()
        floating = any(p.table is not None and p.table.is_floating_point() for p in self.pieces.get(slot, []))
        out = torch.zeros(len(positions), dtype=torch.float64 if floating else torch.long)
        if slot not in self.pieces or not len(positions):
            return out
        offsets = torch.tensor(self.offsets)
        block = torch.searchsorted(offsets, positions, right=True) - 1
        for b in block.unique().tolist():
            at = (block == b).nonzero()[:, 0]
            coords = _unravel(positions[at] - self.offsets[b], self.shapes[b])
            for p in self.block_pieces(slot, b):
                inside = torch.ones(len(at), dtype=torch.bool)
                for axis, (l, h) in enumerate(zip(p.lo, p.hi)):
                    inside &= (coords[:, axis] >= l) & (coords[:, axis] < h)
                out[at[inside]] = p.evaluate(coords[inside])
        return out


def _unravel(flat: torch.Tensor, shape: tuple) -> torch.Tensor:
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], dim=1)
