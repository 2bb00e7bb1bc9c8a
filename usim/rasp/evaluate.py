"""The reference interpreter: ``evaluate(program, xs, causal=False)`` in plain Python.

Semantics are Tracr's ``rasp.evaluate``: a Map or SequenceMap of None is None; a Select calls
``predicate(key, query)``; an Aggregate returns the mean of the selected values (the value itself
when one is selected, ``default`` when none is). Two choices are pinned here:

* a **categorical** Aggregate whose selected values differ has no value in its value set: a
  ValueError naming the node (Tracr would return their mean);
* ``causal=True`` masks every selector to the keys at or before the query (Tracr's causal model).

Values are memoised per node for one call, so a program that reuses a node evaluates it once.
"""

from __future__ import annotations

from usim.rasp import language as L


def evaluate(program, xs, causal: bool = False):
    """The values of an SOp (a list) or a Selector (a list of query rows of key booleans) on ``xs``."""
    if not isinstance(program, L.RASPExpr):
        raise TypeError(f"evaluate needs a RASP SOp or Selector, got {type(program).__name__}")
    return _Evaluator(list(xs), causal).value(program)


class _Evaluator:
    def __init__(self, xs: list, causal: bool):
        self.xs, self.causal, self.memo = xs, causal, {}

    def value(self, expr):
        if expr.id not in self.memo:
            self.memo[expr.id] = self._compute(expr)
        return self.memo[expr.id]

    def _compute(self, e):
        n = len(self.xs)
        if isinstance(e, L.TokensType):
            return list(self.xs)
        if isinstance(e, L.IndicesType):
            return list(range(n))
        if isinstance(e, L.LengthType):
            return [n] * n
        if isinstance(e, L.Full):
            return [e.fill] * n
        if isinstance(e, L.ConstantSOp):
            if e.check_length and len(e.value) != n:
                raise ValueError(f"{e.name}: ConstantSOp of length {len(e.value)} on an input of length {n}")
            return list(e.value)
        if isinstance(e, L.Map):
            return [None if x is None else e.f(x) for x in self.value(e.inner)]
        if isinstance(e, L.SequenceMap):
            return [None if x is None or y is None else e.f(x, y)
                    for x, y in zip(self.value(e.fst), self.value(e.snd))]
        if isinstance(e, L.Select):
            keys, queries = self.value(e.keys), self.value(e.queries)
            return [[bool(e.predicate(k, q)) for k in keys] for q in queries]
        if isinstance(e, L.SelectorAnd):
            return _elementwise(self.value(e.fst), self.value(e.snd), lambda a, b: a and b)
        if isinstance(e, L.SelectorOr):
            return _elementwise(self.value(e.fst), self.value(e.snd), lambda a, b: a or b)
        if isinstance(e, L.SelectorNot):
            return [[not a for a in row] for row in self.value(e.inner)]
        if isinstance(e, L.SelectorWidth):
            return [sum(row) for row in self.selection(e.selector)]
        if isinstance(e, L.Aggregate):
            values = self.value(e.sop)
            return [self._mean(e, [v for s, v in zip(row, values) if s]) for row in self.selection(e.selector)]
        raise TypeError(f"cannot evaluate {type(e).__name__} {e.name}")

    def selection(self, selector):
        rows = self.value(selector)
        if self.causal:
            rows = [[s and k <= q for k, s in enumerate(row)] for q, row in enumerate(rows)]
        return rows

    @staticmethod
    def _mean(e, selected: list):
        if not selected:
            return e.default
        if len(selected) == 1:
            return selected[0]
        if L.is_categorical(e):
            if any(v != selected[0] for v in selected[1:]):
                raise ValueError(f"categorical Aggregate {e.name!r} selects several different values "
                                 f"{selected[:4]}{' ...' if len(selected) > 4 else ''}: their mean is not a "
                                 f"value of the SOp (make it numerical, or select one key)")
            return selected[0]
        if any(v is None for v in selected):
            return None
        return sum(selected) / len(selected)


def _elementwise(a, b, op):
    return [[op(x, y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
