"""One function per RASP node type: its value as Exprs, with the steps that compute it placed.

See ``usim.rasp.emit`` for why each construct is exact.
"""

from __future__ import annotations

import operator

from usim.construct import ONE, Head, Unit
from usim.rasp import language as L
from usim.rasp.encode import BOS, REAL, Cat, Num, Sel, add, is_number, ordered, times
from usim.rasp.schedule import Heads, Units
from usim.rasp.values import apply_named

ACTIVATION_AT = {"relu": 0.0, "exp": 0.0, "reciprocal": 1.0, "rsqrt": 1.0}  # input at BOS: finite
MAX_PRODUCTS = 1 << 16  # one-hot pairs a SequenceMap may multiply out


POSITIONAL = (L.IndicesType, L.LengthType, L.Full, L.ConstantSOp)


def positional(e, memo: dict) -> bool:
    """Whether an SOp depends on the positions and the length only (not on the tokens)."""
    if e.id not in memo:
        memo[e.id] = isinstance(e, POSITIONAL) or (isinstance(e, (L.Map, L.SequenceMap)) and
                                                    all(positional(c, memo) for c in e.children)) \
            or (isinstance(e, L.SelectorWidth) and _every_token(e.selector))
    return memo[e.id]


def _every_token(sel) -> bool:
    """A Select that keeps every key (TRUE over SOps that are never None): its width is the length."""
    primitive = (L.TokensType, L.IndicesType, L.LengthType)
    return isinstance(sel, L.Select) and sel.predicate is L.Comparison.TRUE and \
        isinstance(sel.keys, primitive) and isinstance(sel.queries, primitive)


def _runs(flags: list) -> list:
    """[lo, hi) runs of True."""
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append([start, i])
            start = None
    return runs


def _at_length(e, token, n: int, causal: bool) -> list:
    """The SOp's values on an input of n tokens (all None where it has none: a ConstantSOp of
    another length)."""
    from usim.rasp.evaluate import evaluate
    try:
        return evaluate(e, [token] * n, causal=causal)
    except ValueError:
        return [None] * n


def _positional_table(em, e):
    """A Map or SequenceMap of positions and length only: its values at every length are known when
    the weights are built, so it is positional one-hot slots (closed-form runs per length), no layer."""
    from usim.rasp.evaluate import evaluate
    values = ordered(em.sets[e.id])
    token = em.vocab[0] if em.vocab else 0.0  # no value of a positional SOp depends on it
    per_length = {n: _at_length(e, token, n, em.causal) for n in range(1, em.n + 1)}
    exprs = []
    for j, v in enumerate(values):
        table = {str(n): _runs([x is not None and x == v for x in row]) for n, row in per_length.items()}
        exprs.append({em.pos_later(f"{e.name}#{e.id}={j}", "table", table): 1.0})
    em.log.append((e, [], 0))  # no layer: listed by describe() with its slots
    x = Cat(values, exprs, -1)
    return em.num(x, e) if L.is_numerical(e) else x


def emit_node(em, e):
    if isinstance(e, (L.Map, L.SequenceMap, L.SelectorWidth)) and positional(e, em.memo) and em.sets[e.id] is not None:
        return _positional_table(em, e)
    for kind, fn in _EMITTERS:
        if isinstance(e, kind):
            return fn(em, e)
    raise ValueError(f"{type(e).__name__} {e.name!r} cannot be compiled")


def _tokens(em, e):
    values = em.sets[e.id]
    if em.raw:
        x = Num({"value": 1.0}, -1)
        return x if L.is_numerical(e) else em.cat(x, e, values)
    vocab = em.vocab
    onehot = [em.slot(e, f"={i}") for i in range(len(vocab))]
    units = []
    for c in range(len(vocab) + 2):  # r_c = relu(code - c); one-hot k = r_{k-1} - 2 r_k + r_{k+1}
        out = {}
        for k, w in ((c + 1, 1.0), (c, -2.0), (c - 1, 1.0)):
            if 1 <= k <= len(vocab):
                out[onehot[k - 1]] = w
        if out:
            units.append(Unit({"value": 1.0, ONE: -float(c)}, out))
    ready = em.place(-1, [Units("relu", units)], e)
    order = ordered(vocab)
    x = Cat(order, [{onehot[vocab.index(v)]: 1.0} for v in order], ready)
    return em.num(x, e) if L.is_numerical(e) else x


def _indices(em, e):
    if L.is_numerical(e):
        return Num({em.pos("index", "index"): 1.0}, -1)
    return Cat(list(range(em.n)), [{em.pos(f"indices={i}", "index=", i): 1.0} for i in range(em.n)], -1)


def _length(em, e):
    if L.is_numerical(e):
        return Num({em.pos("length", "length"): 1.0}, -1)
    return Cat(list(range(1, em.n + 1)), [{em.pos(f"length={k}", "length=", k): 1.0} for k in range(1, em.n + 1)], -1)


def _full(em, e):
    if L.is_numerical(e):
        if not is_number(e.fill):
            raise ValueError(f"numerical Full {e.name!r} of a non-number {e.fill!r}")
        return Num(times({REAL: 1.0}, float(e.fill)), -1, [(e.fill, {REAL: 1.0})])
    return Cat([e.fill], [{REAL: 1.0}], -1)


def _constant(em, e):
    values = ordered(e.value)
    exprs = [{em.pos(f"{e.name}#{e.id}={j}", "const", [i for i, x in enumerate(e.value) if x == v]): 1.0}
             for j, v in enumerate(values)]
    x = Cat(values, exprs, -1)
    return em.num(x, e) if L.is_numerical(e) else x


def _affine(f, xs):
    """(a, b) with f(x) == a x + b on every x (to 1e-12 relative), else None."""
    try:
        ys = [f(x) for x in xs]
        if not all(is_number(y) for y in ys):
            return None
        if len(xs) == 1:
            return 0.0, float(ys[0])
        a = (ys[1] - ys[0]) / (xs[1] - xs[0])
        b = ys[0] - a * xs[0]
    except (ArithmeticError, TypeError):
        return None
    ok = all(abs(a * x + b - y) <= 1e-12 * max(1.0, abs(y)) for x, y in zip(xs, ys))
    return (a, b) if ok else None


def _map(em, e):
    inner, values = em.values[e.inner.id], em.sets[e.inner.id]
    f = e.f
    if L.is_numerical(e) and isinstance(f, L.Function) and values is None:
        x = em.num(inner, e)
        shift = ACTIVATION_AT[f.activation]
        out = em.slot(e, f.activation)
        ready = em.place(x.ready, [Units(f.activation, [Unit(add(x.expr, {BOS: shift}), out)])], e)
        return Num({out: 1.0, BOS: -float(f(shift))} if f(shift) else {out: 1.0}, ready)
    if values is None:
        raise ValueError(f"Map {e.name!r} over an unbounded value set (real-valued input): it compiles only with "
                         f"a finite vocab, or as numerical Map of a usim.rasp Function (relu, exp, reciprocal, rsqrt)")
    if isinstance(inner, Cat):
        if L.is_numerical(e):
            return _num_of_pairs(em, e, [(f(v), ex) for v, ex in zip(inner.values, inner.exprs)], inner.ready)
        groups = {}
        for v, ex in zip(inner.values, inner.exprs):
            w = f(v)
            if w is not None:
                groups[w] = add(groups.get(w, {}), ex)
        out = ordered(groups)
        return Cat(out, [groups[w] for w in out], inner.ready)
    xs = ordered(values)
    if L.is_numerical(e):
        ab = _affine(f, xs)
        if ab is not None:
            onehot = None if inner.onehot is None else [(f(v), ex) for v, ex in inner.onehot]
            return Num(add(times(inner.expr, ab[0]), times({REAL: 1.0}, ab[1])), inner.ready, onehot)
        c = em.categorize(inner, xs, f, e)
        return _num_of_pairs(em, e, list(zip(c.values, c.exprs)), c.ready)
    return em.categorize(inner, xs, f, e)


def _num_of_pairs(em, e, pairs, ready):
    bad = [v for v, _ in pairs if v is not None and not is_number(v)]
    if bad:
        raise ValueError(f"numerical {type(e).__name__} {e.name!r} has non-numeric values {bad[:3]}")
    pairs = [(v, ex) for v, ex in pairs if v is not None]
    return Num(add(*[times(ex, float(v)) for v, ex in pairs]), ready, pairs)


def _is_product(f, a, b) -> bool:
    if f is operator.mul:
        return True
    if a is None or b is None or len(a) * len(b) > MAX_PRODUCTS:
        return False
    try:
        return all(is_number(x) and is_number(y) and f(x, y) == x * y for x in a for y in b)
    except Exception:  # noqa: BLE001 - not a product
        return False


def _sequence_map(em, e):
    x, y = em.values[e.fst.id], em.values[e.snd.id]
    a, b = em.sets[e.fst.id], em.sets[e.snd.id]
    ready = max(x.ready, y.ready)
    if L.is_numerical(e):
        if isinstance(e, L.LinearSequenceMap):
            return Num(add(times(em.num(x, e).expr, e.fst_fac), times(em.num(y, e).expr, e.snd_fac)), ready)
        if _is_product(e.f, a, b):
            xn, yn = em.num(x, e), em.num(y, e)
            out = em.slot(e, "product")
            return Num({out: 1.0}, em.place(ready, [Units("bilinear", [Unit(xn.expr, out, gate=yn.expr)])], e))
    if a is None or b is None:
        raise ValueError(f"SequenceMap {e.name!r} of an unbounded value set: only a numerical x * y "
                         f"(operator.mul) or a LinearSequenceMap compiles there")
    xc, yc = em.cat(x, e, a), em.cat(y, e, b)
    if len(xc.values) * len(yc.values) > MAX_PRODUCTS:
        raise ValueError(f"SequenceMap {e.name!r} multiplies {len(xc.values)} x {len(yc.values)} one-hot pairs "
                         f"(at most {MAX_PRODUCTS})")
    table = [(i, j, apply_named(e, e.f, (u, v))) for i, u in enumerate(xc.values) for j, v in enumerate(yc.values)]
    table = [(i, j, w) for i, j, w in table if w is not None]
    out_values = ordered({w for _, _, w in table})
    slots = {w: em.slot(e, f"={k}") for k, w in enumerate(out_values)}
    units = [Unit(xc.exprs[i], slots[w], gate=yc.exprs[j]) for i, j, w in table if xc.exprs[i] and yc.exprs[j]]
    ready = em.place(max(xc.ready, yc.ready), [Units("bilinear", units)], e)
    cat = Cat(out_values, [{slots[w]: 1.0} for w in out_values], ready)
    return em.num(cat, e) if L.is_numerical(e) else cat


def _select(em, e):
    primitive = (L.TokensType, L.IndicesType, L.LengthType)
    if isinstance(e.keys, primitive) and isinstance(e.queries, primitive) and e.predicate is L.Comparison.TRUE:
        return Sel([({REAL: 1.0}, {REAL: 1.0})], 1, -1, [e.name])  # every input token (never None)
    k = em.cat(em.values[e.keys.id], e, em.sets[e.keys.id])
    q = em.cat(em.values[e.queries.id], e, em.sets[e.queries.id])
    terms = []
    for kv, kx in zip(k.values, k.exprs):
        qs = [qx for qv, qx in zip(q.values, q.exprs) if apply_named(e, e.predicate, (kv, qv))]
        if qs and kx:
            terms.append((add(*qs), kx))
    return Sel(terms, 1, max(k.ready, q.ready), [e.name])


def _affine_runs(values: list) -> list:
    """[lo, hi, const, coef] runs with values[i] = const + coef * i (greedy, maximal)."""
    runs, i = [], 0
    while i < len(values):
        j, step = i + 1, (values[i + 1] - values[i] if i + 1 < len(values) else 0)
        while j < len(values) and values[j] - values[j - 1] == step:
            j += 1
        runs.append([i, j, values[i] - step * i, step])
        i = j
    return runs


MAX_STATIC = 128  # a static selection is worked out per length up to this max_seq_len


def _static_match(em, selector):
    """A Select of positional SOps whose queries each select the keys of one key value (or none):
    a ``match`` of two positional integer features, the key's value code (BOS 0) and the code the
    query selects (0: none, so BOS) - an exact join the executions plan once, structured when the
    codes are affine in the index. None when the selection is not of that form."""
    lowered = em.lowered[selector.id]
    if em.causal or em.n > MAX_STATIC or len(lowered) != 1:
        return None
    s = lowered[0]
    if not (positional(s.keys, em.memo) and positional(s.queries, em.memo)):
        return None
    token = em.vocab[0] if em.vocab else 0.0
    keys_at, targets_at = {}, {}
    for n in range(1, em.n + 1):
        keys, queries = _at_length(s.keys, token, n, False), _at_length(s.queries, token, n, False)
        present = ordered(keys)
        code = {v: i + 1 for i, v in enumerate(present)}
        targets = []
        for q in queries:
            chosen = [v for v in present if q is not None and _apply_safe(s.predicate, v, q)]
            if len(chosen) > 1:
                return None
            targets.append(code[chosen[0]] if chosen else 0)
        keys_at[str(n)] = _affine_runs([-1 if k is None else code[k] for k in keys])  # None: never selected
        targets_at[str(n)] = _affine_runs(targets)
    key = em.pos(f"{s.name}#{s.id}.key", "affine", keys_at)
    target = em.pos(f"{s.name}#{s.id}.target", "affine", targets_at)
    return [(times({target: 1.0}, 2.0), {key: 1.0}), ({ONE: -1.0}, {key + "^2": 1.0})]


def _apply_safe(predicate, k, q) -> bool:
    try:
        return bool(predicate(k, q))
    except Exception:  # noqa: BLE001 - the content path names the error
        return False


def _aggregate(em, e):
    tier = _static_match(em, e.selector)
    if tier is not None:
        return _static_aggregate(em, e, tier)
    sel = em.selection(e.selector)
    x = em.values[e.sop.id]
    if L.is_numerical(e):
        x = em.num(x, e)
        out, default = em.slot(e, "mean"), e.default or 0.0
        moves = [(x.expr, out)]
        none = em.slot(e, "none") if default else None
        if none:
            moves.append(({BOS: 1.0}, none))
        head = Head(em.tiers(sel, sel.top - 0.5), moves, name=e.name, average=True)
        ready = em.place(max(sel.ready, x.ready), [Heads([head])], e)
        return Num(add({out: 1.0}, {none: float(default)} if none else {}), ready)
    x = em.cat(x, e, em.sets[e.sop.id])
    outs = [em.slot(e, f"={i}") for i in range(len(x.values))]
    moves = [(ex, o) for ex, o in zip(x.exprs, outs) if ex]
    none = em.slot(e, "none") if e.default is not None else None
    if none:
        moves.append(({BOS: 1.0}, none))
    head = Head(em.tiers(sel, sel.top - 0.5), moves, name=e.name, average=True)
    ready = em.place(max(sel.ready, x.ready), [Heads([head])], e)
    values = ordered(list(x.values) + ([e.default] if none else []))
    exprs = []
    for v in values:
        ex = {outs[x.values.index(v)]: 1.0} if v in x.values else {}
        exprs.append(add(ex, {none: 1.0}) if none and v == e.default else ex)
    return Cat(values, exprs, ready)


def _static_aggregate(em, e, tier):
    """An Aggregate over a static match: the same moves as the content head, one match tier."""
    x = em.values[e.sop.id]
    if L.is_numerical(e):
        x = em.num(x, e)
        outs, exprs, values = [em.slot(e, "mean")], [x.expr], None
    else:
        x = em.cat(x, e, em.sets[e.sop.id])
        outs = [em.slot(e, f"={i}") for i in range(len(x.values))]
        exprs, values = x.exprs, x.values
    default = e.default if not L.is_numerical(e) else (e.default or 0.0)
    none = em.slot(e, "none") if default not in (None, 0.0) or (values is not None and default is not None) else None
    moves = [(ex, o) for ex, o in zip(exprs, outs) if ex] + ([({BOS: 1.0}, none)] if none else [])
    ready = em.place(x.ready, [Heads([Head([tier], moves, name=e.name, average=True)])], e)
    if values is None:
        return Num(add({outs[0]: 1.0}, {none: float(default)} if none else {}), ready)
    values_out = ordered(list(values) + ([default] if none else []))
    cat = []
    for v in values_out:
        ex = {outs[values.index(v)]: 1.0} if v in values else {}
        cat.append(add(ex, {none: 1.0}) if none and v == default else ex)
    return Cat(values_out, cat, ready)


def _selector_width(em, e):
    sel = em.selection(e.selector)
    mean = em.slot(e, "bos_share")
    head = Head(em.tiers(sel, float(sel.top)), [({BOS: 1.0}, mean)], name=e.name, average=True)
    ready = em.place(sel.ready, [Heads([head])], e)
    shares = [1.0 / (w + 1) for w in range(em.n + 1)]
    cat = em.categorize(Num({mean: 1.0, BOS: -1.0}, ready), shares, lambda s: round(1.0 / s) - 1, e)
    return em.num(cat, e) if L.is_numerical(e) else cat


_EMITTERS = [(L.TokensType, _tokens), (L.IndicesType, _indices), (L.LengthType, _length), (L.Full, _full),
             (L.ConstantSOp, _constant), (L.Map, _map), (L.SequenceMap, _sequence_map), (L.Select, _select),
             (L.Aggregate, _aggregate), (L.SelectorWidth, _selector_width)]
