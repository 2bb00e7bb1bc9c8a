"""How compiled SOps and selectors live in the residual stream (the compiler's vocabulary).

* ``Cat``: a categorical SOp: one Expr per value of its (ordered) value set, each exactly 1 at the
  tokens holding that value and 0 elsewhere (all 0 for None). Usually a slot each; a categorical
  Map only regroups its input's Exprs (no layer).
* ``Num``: a numerical SOp: one Expr (a linear combination of slots). ``onehot`` keeps, when it
  is known, the one-hot family it is a weighted sum of ([(value, Expr)]), so that reading it as
  categorical later costs nothing.
* ``Sel``: a selector: score terms [(query Expr, key Expr)], each score an exact integer, the
  selected keys exactly those scoring ``top``, the others at most top - 1.

``ready`` is the stage after which the value can be read (-1: from the embedding on).

Two positional slots frame every program: ``bos`` (1 at the BOS token, position 0) and ``real``
(1 at every input token). At the BOS token every Expr is 0 (constants are multiples of ``real``,
not ``one``); selections use that: a query keeps BOS only when it selects nothing, so an
Aggregate returns 0 / None there, the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BOS, REAL = "bos", "real"


def is_number(v) -> bool:
    return isinstance(v, (int, float))


def add(*exprs) -> dict:
    out: dict = {}
    for e in exprs:
        for k, v in e.items():
            out[k] = out.get(k, 0.0) + v
    return {k: v for k, v in out.items() if v != 0}


def times(e: dict, c: float) -> dict:
    return {k: v * c for k, v in e.items() if v * c != 0}


def ordered(values) -> list:
    """A value set in a fixed order (sorted, else by type and repr)."""
    values = [v for v in values if v is not None]
    try:
        return sorted(set(values))
    except TypeError:
        return sorted(set(values), key=lambda v: (type(v).__name__, repr(v)))


@dataclass
class Cat:
    values: list
    exprs: list
    ready: int


@dataclass
class Num:
    expr: dict
    ready: int
    onehot: list | None = None  # [(value, Expr)]: expr = sum value * Expr, the Exprs one-hot


@dataclass
class Sel:
    terms: list
    top: int
    ready: int
    parts: list = field(default_factory=list)  # the names of the Selects ANDed
