"""The RASP language (Weiss et al. 2021), with Tracr's names and semantics.

Data structures (every object is an immutable node of a program graph; a program is its last SOp):

* ``SOp``: a sequence operation, one value per token. Primitives ``tokens``, ``indices``, ``length``;
  ``Map(f, x)``, ``SequenceMap(f, x, y)``, ``LinearSequenceMap(x, y, a, b)``, ``Full(c)`` /
  ``ConstantSOp(values)``, ``Aggregate(selector, sop, default)``, ``SelectorWidth(selector)``.
* ``Selector``: which keys each query reads. ``Select(keys, queries, predicate)`` (the predicate is
  called as ``predicate(key, query)``, key first, as in Tracr), ``Comparison.EQ / LT / LEQ / GT / GEQ
  / NEQ / TRUE / FALSE``; selectors combine with ``&``, ``|`` and ``~``.
* Annotations: ``numerical(sop)`` / ``categorical(sop)`` (the default) set how the compiler encodes an
  SOp (a scalar slot, or one-hot slots over its value set); ``sop.named(name)`` names it. Both return
  an annotated copy; the original is unchanged.
* ``Function``: a named elementwise function the compiler maps onto a declared FFN activation
  (``relu``, ``exp``, ``reciprocal``, ``rsqrt``), so a numerical ``Map`` over real values of any kind
  (no finite value set) still compiles: ``numerical(Map(relu, x))``.

SOps overload ``+ - * /``, comparisons, ``~ & |`` exactly as Tracr's do (a ``Map`` with a constant,
a ``SequenceMap`` with another SOp). ``==`` builds a ``Map``, so SOps are hashed by identity.
"""

from __future__ import annotations

import copy
import enum
import itertools
import math
import operator

_ids = itertools.count(1)


class RASPExpr:
    """A node: its children, a unique id and annotations (name, encoding)."""

    children: tuple = ()

    def __init__(self):
        self.id = next(_ids)
        self.annotations = {}

    @property
    def name(self) -> str:
        return self.annotations.get("name") or f"{type(self).__name__.lower()}_{self.id}"

    def named(self, name: str):
        return annotate(self, name=name)

    def annotated(self, **annotations):
        return annotate(self, **annotations)

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return self.name


def annotate(expr, **annotations):
    """A copy of ``expr`` (a new node id) with ``annotations`` added."""
    new = copy.copy(expr)
    new.id = next(_ids)
    new.annotations = {**expr.annotations, **annotations}
    return new


# --- SOps --------------------------------------------------------------------------------------
class SOp(RASPExpr):
    @property
    def encoding(self) -> str:
        return self.annotations.get("encoding", "categorical")

    def __call__(self, xs):
        from usim.rasp.evaluate import evaluate
        return evaluate(self, xs)

    # comparisons and arithmetic, as in Tracr: a Map with a constant, a SequenceMap with an SOp
    def _binary(self, other, op, reflected=False):
        if isinstance(other, SOp):
            return SequenceMap(op, other, self) if reflected else SequenceMap(op, self, other)
        return Map((lambda x: op(other, x)) if reflected else (lambda x: op(x, other)), self)

    def __lt__(self, other): return self._binary(other, operator.lt)
    def __le__(self, other): return self._binary(other, operator.le)
    def __eq__(self, other): return self._binary(other, operator.eq)  # noqa: E704
    def __ne__(self, other): return self._binary(other, operator.ne)
    def __gt__(self, other): return self._binary(other, operator.gt)
    def __ge__(self, other): return self._binary(other, operator.ge)
    def __add__(self, other): return self._binary(other, operator.add)
    def __radd__(self, other): return self._binary(other, operator.add, True)
    def __sub__(self, other): return self._binary(other, operator.sub)
    def __rsub__(self, other): return self._binary(other, operator.sub, True)
    def __mul__(self, other): return self._binary(other, operator.mul)
    def __rmul__(self, other): return self._binary(other, operator.mul, True)
    def __truediv__(self, other): return self._binary(other, operator.truediv)
    def __rtruediv__(self, other): return self._binary(other, operator.truediv, True)
    def __and__(self, other): return self._binary(other, lambda x, y: x and y)
    def __rand__(self, other): return self._binary(other, lambda x, y: x and y, True)
    def __or__(self, other): return self._binary(other, lambda x, y: x or y)
    def __ror__(self, other): return self._binary(other, lambda x, y: x or y, True)
    def __invert__(self): return Map(lambda x: not x, self)

    __hash__ = RASPExpr.__hash__


class TokensType(SOp):
    @property
    def name(self) -> str:
        return self.annotations.get("name", "tokens")


class IndicesType(SOp):
    @property
    def name(self) -> str:
        return self.annotations.get("name", "indices")


class LengthType(SOp):
    @property
    def name(self) -> str:
        return self.annotations.get("name", "length")


tokens = TokensType()
indices = IndicesType()
length = LengthType()


def _sop(x, what: str) -> "SOp":
    if not isinstance(x, SOp):
        raise TypeError(f"{what} must be an SOp, got {type(x).__name__}")
    return x


class Map(SOp):
    """f applied to every value of ``inner``. As Tracr's, a Map of a Map is one Map (``simplify``)."""

    def __init__(self, f, inner: SOp, simplify: bool = True):
        super().__init__()
        if not callable(f) or isinstance(f, RASPExpr):
            raise TypeError(f"Map needs a function, got {type(f).__name__}")
        _sop(inner, "Map's input")
        if simplify and isinstance(inner, Map) and not isinstance(f, Function) \
                and not isinstance(inner.f, Function):
            f, inner = (lambda x, f=f, g=inner.f: f(g(x))), inner.inner
        self.f, self.inner = f, inner
        self.children = (inner,)


class SequenceMap(SOp):
    """f(x, y) at every position of two SOps."""

    def __init__(self, f, fst: SOp, snd: SOp):
        super().__init__()
        if not callable(f) or isinstance(f, RASPExpr):
            raise TypeError(f"SequenceMap needs a function, got {type(f).__name__}")
        self.f, self.fst, self.snd = f, _sop(fst, "SequenceMap's first input"), _sop(snd, "SequenceMap's second input")
        self.children = (fst, snd)


class LinearSequenceMap(SequenceMap):
    """a * x + b * y."""

    def __init__(self, fst: SOp, snd: SOp, fst_fac: float, snd_fac: float):
        super().__init__(lambda x, y: fst_fac * x + snd_fac * y, fst, snd)
        self.fst_fac, self.snd_fac = fst_fac, snd_fac


class Full(SOp):
    """The constant ``fill`` at every position."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill


class ConstantSOp(SOp):
    """A fixed list of values (the input must have its length)."""

    def __init__(self, value, check_length: bool = True):
        super().__init__()
        self.value, self.check_length = list(value), check_length


class SelectorWidth(SOp):
    """How many keys each query selects."""

    def __init__(self, selector: "Selector"):
        super().__init__()
        if not isinstance(selector, Selector):
            raise TypeError(f"SelectorWidth needs a Selector, got {type(selector).__name__}")
        self.selector = selector
        self.children = (selector,)


class Aggregate(SOp):
    """The mean of ``sop`` over the keys each query selects; ``default`` where it selects none."""

    def __init__(self, selector: "Selector", sop: SOp, default=None):
        super().__init__()
        if not isinstance(selector, Selector):
            raise TypeError(f"Aggregate needs a Selector, got {type(selector).__name__}")
        self.selector, self.sop, self.default = selector, _sop(sop, "Aggregate's values"), default
        self.children = (selector, sop)


# --- selectors ---------------------------------------------------------------------------------
class Comparison(enum.Enum):
    """A predicate of (key, query), as Tracr's."""

    EQ = "=="
    LT = "<"
    LEQ = "<="
    GT = ">"
    GEQ = ">="
    NEQ = "!="
    TRUE = "True"
    FALSE = "False"

    def __call__(self, key, query) -> bool:
        if key is None or query is None:
            raise ValueError("a Comparison of None")
        return _COMPARE[self](key, query)


_COMPARE = {Comparison.EQ: operator.eq, Comparison.LT: operator.lt, Comparison.LEQ: operator.le,
            Comparison.GT: operator.gt, Comparison.GEQ: operator.ge, Comparison.NEQ: operator.ne,
            Comparison.TRUE: lambda k, q: True, Comparison.FALSE: lambda k, q: False}


class Selector(RASPExpr):
    def __and__(self, other): return SelectorAnd(self, other)
    def __or__(self, other): return SelectorOr(self, other)
    def __invert__(self): return SelectorNot(self)

    def __call__(self, xs):
        from usim.rasp.evaluate import evaluate
        return evaluate(self, xs)


class Select(Selector):
    def __init__(self, keys: SOp, queries: SOp, predicate):
        super().__init__()
        if not callable(predicate):
            raise TypeError(f"Select needs a predicate (a Comparison or a function of key, query), "
                            f"got {type(predicate).__name__}")
        self.keys, self.queries = _sop(keys, "Select's keys"), _sop(queries, "Select's queries")
        self.predicate = predicate
        self.children = (keys, queries)


class SelectorAnd(Selector):
    def __init__(self, fst: Selector, snd: Selector):
        super().__init__()
        self.fst, self.snd = fst, snd
        self.children = (fst, snd)


class SelectorOr(Selector):
    def __init__(self, fst: Selector, snd: Selector):
        super().__init__()
        self.fst, self.snd = fst, snd
        self.children = (fst, snd)


class SelectorNot(Selector):
    def __init__(self, inner: Selector):
        super().__init__()
        self.inner = inner
        self.children = (inner,)


# --- annotations and functions -----------------------------------------------------------------
def numerical(sop: SOp) -> SOp:
    """A copy of ``sop`` encoded as one scalar slot."""
    return annotate(_sop(sop, "numerical's argument"), encoding="numerical")


def categorical(sop: SOp) -> SOp:
    """A copy of ``sop`` encoded as one-hot slots over its value set (the default)."""
    return annotate(_sop(sop, "categorical's argument"), encoding="categorical")


def is_numerical(sop: SOp) -> bool:
    return sop.encoding == "numerical"


def is_categorical(sop: SOp) -> bool:
    return sop.encoding == "categorical"


class Function:
    """An elementwise function the compiler runs as a declared FFN activation (any real input)."""

    def __init__(self, activation: str, fn):
        self.activation, self.fn = activation, fn

    def __call__(self, x):
        return self.fn(x)

    def __repr__(self) -> str:
        return self.activation


def _reciprocal(x):
    return math.copysign(math.inf, x) if x == 0 else 1.0 / x


relu = Function("relu", lambda x: max(float(x), 0.0))
exp = Function("exp", lambda x: math.exp(x))
reciprocal = Function("reciprocal", _reciprocal)
rsqrt = Function("rsqrt", lambda x: math.inf if x == 0 else (1.0 / math.sqrt(x) if x > 0 else math.nan))
