"""Lowering selectors: every selector becomes an AND of plain ``Select``s (the compiler's input).

``~`` is pushed down to the Selects (a Select with the negated predicate); an ``&`` of parts splits
into its parts (the compiled head sums their 0/1 scores and keeps the keys scoring all of them).
A part that is not a single Select (an ``|``, or a ``~`` of an ``&``) becomes one Select: over its
common keys and queries if its Selects share them, else over *tuple* SOps, the keys of every leaf
paired by ``SequenceMap`` (one bilinear layer) and likewise the queries, with the part's boolean
formula as predicate. Exact, at the cost of a value set as large as the product of the leaves'.
"""

from __future__ import annotations

from usim.rasp import language as L


def _formula(sel, negate: bool = False):
    """("leaf", Select, negate) | ("and" | "or", [formulas]), with negations at the leaves."""
    if isinstance(sel, L.Select):
        return ("leaf", sel, negate)
    if isinstance(sel, L.SelectorNot):
        return _formula(sel.inner, not negate)
    if isinstance(sel, (L.SelectorAnd, L.SelectorOr)):
        op = "and" if isinstance(sel, L.SelectorAnd) != negate else "or"
        parts = []
        for child in (sel.fst, sel.snd):
            f = _formula(child, negate)
            parts += f[1] if f[0] == op else [f]
        return (op, parts)
    raise ValueError(f"{type(sel).__name__} {sel.name!r} cannot be compiled (a constant selector has no "
                     f"weights: build it from Select)")


def _leaves(f) -> list:
    return [f] if f[0] == "leaf" else [leaf for part in f[1] for leaf in _leaves(part)]


def _truth(f, key_of, query_of) -> bool:
    if f[0] == "leaf":
        value = bool(f[1].predicate(key_of(f[1]), query_of(f[1])))
        return value != f[2]
    results = (_truth(p, key_of, query_of) for p in f[1])
    return all(results) if f[0] == "and" else any(results)


def _tuple_sop(sops: list, name: str) -> L.SOp:
    out = L.Map(lambda x: (x,), sops[0], simplify=False)
    for sop in sops[1:]:
        out = L.SequenceMap(lambda t, y: t + (y,), out, sop)
    return out.named(name)


def _one_select(f, name: str) -> L.Select:
    leaves = _leaves(f)
    if f[0] == "leaf" and not f[2]:
        return f[1]
    keys = list({id(leaf[1].keys): leaf[1].keys for leaf in leaves}.values())
    queries = list({id(leaf[1].queries): leaf[1].queries for leaf in leaves}.values())
    if len(keys) == 1 and len(queries) == 1:
        return L.Select(keys[0], queries[0], lambda k, q: _truth(f, lambda s: k, lambda s: q)).named(name)
    ki = {id(s): i for i, s in enumerate(keys)}
    qi = {id(s): i for i, s in enumerate(queries)}
    predicate = (lambda k, q: _truth(f, lambda s: k[ki[id(s.keys)]], lambda s: q[qi[id(s.queries)]]))
    return L.Select(_tuple_sop(keys, f"{name}.keys"), _tuple_sop(queries, f"{name}.queries"),
                    predicate).named(name)


def lower(selector) -> list:
    """The Selects whose AND is ``selector``."""
    f = _formula(selector)
    parts = f[1] if f[0] == "and" else [f]
    return [_one_select(p, f"{selector.name}.{i}" if len(parts) > 1 else selector.name)
            for i, p in enumerate(parts)]
