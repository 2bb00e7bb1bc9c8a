"""Value-set inference (Tracr's ``basis_inference``): the values each SOp can take.

``value_sets(nodes, vocab, max_seq_len)`` -> {node id: set of values, or None (unbounded)}.

As Tracr, a Map's values are f over its input's values and a SequenceMap's are f over every pair;
tokens take the vocabulary, indices 0 .. max_seq_len - 1, length 1 .. max_seq_len and a
SelectorWidth 0 .. max_seq_len. Unlike Tracr, a numerical Aggregate takes *every* mean of up to
max_seq_len selected values (k / m for 0/1 values, not only 1 / m), and its default. ``None``
results are no value (a Map of None is None). A Map that raises on a value of its input is a
ValueError naming the node and the value. A set that would exceed ``MAX_VALUES`` (or a vocabulary of
``None``: any real token) is unbounded; only constructs that need no value set may read it.
"""

from __future__ import annotations

from usim.rasp import language as L

MAX_VALUES = 1 << 21


def apply_named(node, f, args):
    try:
        return f(*args)
    except Exception as e:  # noqa: BLE001 - any error of the user's function names the node
        shown = ", ".join(repr(a) for a in args)
        raise ValueError(f"{type(node).__name__} {node.name!r} raises {type(e).__name__} ({e}) on the value "
                         f"{shown} of its input's value set") from None


def _bounded(values: set):
    return values if len(values) <= MAX_VALUES else None


def value_sets(nodes: list, vocab, max_seq_len: int) -> dict:
    """nodes: every node of the program, children before parents."""
    sets: dict = {}
    for e in nodes:
        if not isinstance(e, L.SOp):
            continue
        sets[e.id] = _value_set(e, sets, vocab, max_seq_len)
    return sets


def _value_set(e, sets, vocab, n):
    if isinstance(e, L.TokensType):
        return None if vocab is None else set(vocab)
    if isinstance(e, L.IndicesType):
        return set(range(n))
    if isinstance(e, L.LengthType):
        return set(range(1, n + 1))
    if isinstance(e, L.SelectorWidth):
        return set(range(n + 1))
    if isinstance(e, L.Full):
        return {e.fill}
    if isinstance(e, L.ConstantSOp):
        return {v for v in e.value if v is not None}
    if isinstance(e, L.Map):
        inner = sets[e.inner.id]
        if inner is None:
            return None
        return _bounded({r for r in (apply_named(e, e.f, (x,)) for x in inner) if r is not None})
    if isinstance(e, L.SequenceMap):
        a, b = sets[e.fst.id], sets[e.snd.id]
        if a is None or b is None or len(a) * len(b) > 4 * MAX_VALUES:
            return None
        if isinstance(e, L.LinearSequenceMap):
            fa, fb = e.fst_fac, e.snd_fac
            return _bounded({fa * x + fb * y for x in a for y in b})
        return _bounded({r for r in (apply_named(e, e.f, (x, y)) for x in a for y in b) if r is not None})
    if isinstance(e, L.Aggregate):
        inner = sets[e.sop.id]
        if inner is None:
            return None
        extra = set() if e.default is None else {e.default}
        if L.is_categorical(e):
            return inner | extra
        return _means(inner, n, extra)
    raise ValueError(f"{type(e).__name__} {e.name!r} is not an SOp the compiler knows")


def _means(values: set, n: int, extra: set):
    """Every mean of 1..n values drawn from ``values`` (with repetition), or None if too many."""
    values = {float(v) for v in values}
    out, sums = set(extra) | values, set(values)
    for count in range(2, n + 1):
        sums = {s + v for s in sums for v in values}
        if len(sums) * len(values) > MAX_VALUES or len(out) > MAX_VALUES:
            return None
        out |= {s / count for s in sums}
    return out
