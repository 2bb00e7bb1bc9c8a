"""``from_tracr(expr)``: a program built with Tracr's ``tracr.rasp.rasp`` as a ``usim.rasp`` program.

Tracr (the ``[tracr]`` extra, then ``pip install --no-deps tracr-pypi==1.0.0``: its ``rasp``
module needs numpy, absl-py and typing-extensions, not JAX) and ``usim.rasp`` share names and semantics, so the conversion is node
for node: the same functions, predicates (a Tracr ``Comparison`` becomes ours of the same name),
defaults, names and encodings. Shared subprograms stay shared (memoised by Tracr's unique id).
Tracr's own ``ConstantSelector`` has no weights: a ValueError names it.
"""

from __future__ import annotations

from usim.rasp import language as L


def _tracr_rasp():
    try:
        from tracr.rasp import rasp
    except ImportError as e:
        raise ImportError("from_tracr needs Tracr: pip install -e '.[tracr]' && pip install --no-deps "
                          "tracr-pypi==1.0.0 (its rasp module, without JAX)") from e
    return rasp


def from_tracr(expr):
    rasp = _tracr_rasp()
    if not isinstance(expr, rasp.RASPExpr):
        raise TypeError(f"from_tracr needs a Tracr RASP expression, got {type(expr).__name__}")
    memo: dict = {}

    def convert(e):
        if e.unique_id in memo:
            return memo[e.unique_id]
        node = _node(rasp, e, convert)
        node.annotations = {"name": e.name}
        if isinstance(e, rasp.SOp):
            node.annotations["encoding"] = "numerical" if rasp.is_numerical(e) else "categorical"
        memo[e.unique_id] = node
        return node

    return convert(expr)


def _node(rasp, e, convert):
    if isinstance(e, rasp.TokensType):
        return L.TokensType()
    if isinstance(e, rasp.IndicesType):
        return L.IndicesType()
    if isinstance(e, rasp.LengthType):
        return L.LengthType()
    if isinstance(e, rasp.Map):
        return L.Map(e.f, convert(e.inner), simplify=False)
    if isinstance(e, rasp.LinearSequenceMap):
        return L.LinearSequenceMap(convert(e.fst), convert(e.snd), e.fst_fac, e.snd_fac)
    if isinstance(e, rasp.SequenceMap):
        return L.SequenceMap(e.f, convert(e.fst), convert(e.snd))
    if isinstance(e, rasp.Full):
        return L.Full(e.fill)
    if isinstance(e, rasp.ConstantSOp):
        return L.ConstantSOp(e.value, e.check_length)
    if isinstance(e, rasp.SelectorWidth):
        return L.SelectorWidth(convert(e.selector))
    if isinstance(e, rasp.Aggregate):
        return L.Aggregate(convert(e.selector), convert(e.sop), e.default)
    if isinstance(e, rasp.Select):
        predicate = L.Comparison[e.predicate.name] if isinstance(e.predicate, rasp.Comparison) else e.predicate
        return L.Select(convert(e.keys), convert(e.queries), predicate)
    if isinstance(e, rasp.SelectorAnd):
        return L.SelectorAnd(convert(e.fst), convert(e.snd))
    if isinstance(e, rasp.SelectorOr):
        return L.SelectorOr(convert(e.fst), convert(e.snd))
    if isinstance(e, rasp.SelectorNot):
        return L.SelectorNot(convert(e.inner))
    raise ValueError(f"Tracr {type(e).__name__} {e.name!r} has no usim.rasp counterpart (a constant selector "
                     f"or an unknown node): build it from Select")
