"""The paper's constructions as RASP programs over numerical tokens (Proposition 1 layouts).

Each function takes the sizes and returns an SOp. Its input is the input matrices flattened
row-major and concatenated, followed by the output block (zero tokens), as Proposition 1 lays
them out; the SOp's values over the output block, reshaped, are the result. ``run(name, *tensors)``
packs torch tensors that way, runs the compiled program (cached per sizes and dtype) and returns
the result as a tensor.

The paper's Appendix A.1 listings were not available to us as text: these are the natural RASP
forms of the hand constructions in ``usim/ops`` (their docstrings), with the same head, move and
FFN structure where RASP can say it:

* a *fetch* is ``Aggregate(Select(indices, source_index, EQ), tokens)``: each output token reads the
  token at an address computed from its own index (a categorical Map of ``indices``);
* a product is ``numerical(SequenceMap(operator.mul, ...))`` (a bilinear unit), a sum a
  ``LinearSequenceMap``, an activation a numerical ``Map`` of a ``usim.rasp`` Function;
* softmax averages the row's exponentials (one averaging head) and multiplies by the reciprocal
  of m times that mean; it does not subtract the row maximum (RASP selects by a predicate, it has
  no "keep the largest value" selector), so its logits must stay below exp's overflow;
* MaxMin computes max = b + relu(a - b), min = a - relu(a - b) (arithmetic, not a selection: within
  two roundings of torch, not bitwise as ``usim.MaxMin``);
* determinant and cofactor expand by minors along the first row (Laplace), each minor from fetched
  entries, products by bilinear units, n <= 4.
"""

from __future__ import annotations

import math
import operator

import torch

from usim.rasp import language as L

_CACHE: dict = {}


def _fetch(source, name: str) -> L.SOp:
    """The token at address source(i) at every position i (0 where source(i) is None)."""
    address = L.Map(source, L.indices, simplify=False).named(f"{name}.address")
    select = L.Select(L.indices, address, L.Comparison.EQ).named(f"{name}.select")
    return L.numerical(L.Aggregate(select, L.numerical(L.tokens), default=0)).named(name)


def _out_index(offset: int, rows: int, cols: int):
    """Position -> (row, col) of the output block at offset, or None outside it."""
    def at(p):
        q = p - offset
        return divmod(q, cols) if 0 <= q < rows * cols else None
    return at


def _mul(a, b, name):
    return L.numerical(L.SequenceMap(operator.mul, a, b)).named(name)


def _sum(terms, name):
    total = terms[0]
    for i, t in enumerate(terms[1:]):
        total = L.numerical(L.LinearSequenceMap(total, t, 1, 1)).named(f"{name}.{i}")
    return total.named(name)


def transpose(n: int, m: int) -> L.SOp:
    """x (n, m) -> x.T (m, n): one fetch (one head)."""
    at = _out_index(n * m, m, n)
    return _fetch(lambda p: None if at(p) is None else at(p)[1] * m + at(p)[0], "transpose")


def matmul(n: int, m: int, p: int) -> L.SOp:
    """a (n, m) @ b (m, p): 2m fetches, m bilinear products, their sum."""
    at = _out_index(n * m + m * p, n, p)
    terms = []
    for k in range(m):
        a_k = _fetch(lambda q, k=k: None if at(q) is None else at(q)[0] * m + k, f"a{k}")
        b_k = _fetch(lambda q, k=k: None if at(q) is None else n * m + k * p + at(q)[1], f"b{k}")
        terms.append(_mul(a_k, b_k, f"a{k}b{k}"))
    return _sum(terms, "matmul")


def relu(n: int, m: int) -> L.SOp:
    """relu(x), x (n, m): a fetch, then the relu activation."""
    x = _fetch(lambda q: q - n * m if q >= n * m else None, "x")
    return L.numerical(L.Map(L.relu, x)).named("relu")


def maxmin(n: int, m: int) -> L.SOp:
    """Each row's pairs (a, b) -> (max, min), m even: b + relu(a - b), a - relu(a - b)."""
    if m % 2:
        raise ValueError(f"MaxMin needs an even number of columns, got m={m}")
    at = _out_index(n * m, n, m)
    first = _fetch(lambda q: None if at(q) is None else at(q)[0] * m + at(q)[1] // 2 * 2, "a")
    second = _fetch(lambda q: None if at(q) is None else at(q)[0] * m + at(q)[1] // 2 * 2 + 1, "b")
    gap = L.numerical(L.Map(L.relu, L.numerical(L.LinearSequenceMap(first, second, 1, -1)))).named("relu(a-b)")
    is_max = L.numerical(L.Map(lambda q: 1 if at(q) is not None and at(q)[1] % 2 == 0 else 0, L.indices,
                               simplify=False)).named("is_max")
    is_min = L.numerical(L.Map(lambda q: 1 if at(q) is not None and at(q)[1] % 2 == 1 else 0, L.indices,
                               simplify=False)).named("is_min")
    high = _mul(is_max, L.numerical(L.LinearSequenceMap(second, gap, 1, 1)), "max")
    low = _mul(is_min, L.numerical(L.LinearSequenceMap(first, gap, 1, -1)), "min")
    return L.numerical(L.LinearSequenceMap(high, low, 1, 1)).named("maxmin")


def softmax(n: int, m: int) -> L.SOp:
    """Row-wise softmax of x (n, m): e = exp(x), the row's mean of e (one averaging head), the
    reciprocal of m times it, e times that."""
    at = _out_index(n * m, n, m)
    x = _fetch(lambda q: None if at(q) is None else q - n * m, "x")
    e = L.numerical(L.Map(L.exp, x)).named("exp")
    row = L.Map(lambda q: None if at(q) is None else at(q)[0], L.indices, simplify=False).named("row")
    mean = L.numerical(L.Aggregate(L.Select(row, row, L.Comparison.EQ), e, default=0)).named("row_mean")
    total = L.numerical(L.LinearSequenceMap(mean, mean, m, 0)).named("row_sum")
    inverse = L.numerical(L.Map(L.reciprocal, total)).named("1/row_sum")
    return _mul(e, inverse, "softmax")


def _det_terms(entry, rows, cols, name):
    """The determinant of the minor on rows x cols, expanded along its first row (Laplace)."""
    if len(rows) == 1:
        return entry(rows[0], cols[0])
    terms = []
    for j, c in enumerate(cols):
        minor = _det_terms(entry, rows[1:], cols[:j] + cols[j + 1:], f"{name}{c}")
        product = _mul(entry(rows[0], c), minor, f"{name}{c}*")
        terms.append(product if j % 2 == 0 else
                     L.numerical(L.LinearSequenceMap(product, product, -1, 0)).named(f"-{name}{c}*"))
    return _sum(terms, name)


def _entries(n: int, offset_of):
    """entry(r, c): the matrix entry (r, c) fetched to every output position (memoised)."""
    memo = {}

    def entry(r, c):
        if (r, c) not in memo:
            memo[r, c] = _fetch(lambda q: r * n + c if offset_of(q) else None, f"x{r}{c}")
        return memo[r, c]
    return entry


def determinant(n: int) -> L.SOp:
    """det(x), x (n, n), n <= 4: entries fetched to the output token, Laplace expansion."""
    if not 1 <= n <= 4:
        raise ValueError(f"the determinant listing is for n <= 4, got n={n}")
    entry = _entries(n, lambda q: q == n * n)
    return _det_terms(entry, list(range(n)), list(range(n)), "det").named("determinant")


def cofactor(n: int) -> L.SOp:
    """The cofactor matrix C (n, n) of x (n, n), 2 <= n <= 4: C[i, j] = (-1)^(i+j) det(minor i, j),
    each entry's minor fetched to its own output token (a per-position address)."""
    if not 2 <= n <= 4:
        raise ValueError(f"the cofactor listing is for 2 <= n <= 4, got n={n}")
    at = _out_index(n * n, n, n)
    memo = {}

    def entry(r, c):  # row r, col c of the minor of the output token's (i, j)
        if (r, c) not in memo:
            def source(q, r=r, c=c):
                if at(q) is None:
                    return None
                i, j = at(q)
                rows = [k for k in range(n) if k != i]
                cols = [k for k in range(n) if k != j]
                return rows[r] * n + cols[c]
            memo[r, c] = _fetch(source, f"m{r}{c}")
        return memo[r, c]
    minor = _det_terms(entry, list(range(n - 1)), list(range(n - 1)), "minor")
    sign = L.numerical(L.Map(lambda q: 0 if at(q) is None else (-1) ** sum(at(q)), L.indices,
                             simplify=False)).named("sign")
    return _mul(sign, minor, "cofactor")


LISTINGS = {"transpose": (transpose, lambda n, m: [(n, m)], lambda n, m: (m, n)),
            "matmul": (matmul, lambda n, m, p: [(n, m), (m, p)], lambda n, m, p: (n, p)),
            "relu": (relu, lambda n, m: [(n, m)], lambda n, m: (n, m)),
            "maxmin": (maxmin, lambda n, m: [(n, m)], lambda n, m: (n, m)),
            "softmax": (softmax, lambda n, m: [(n, m)], lambda n, m: (n, m)),
            "determinant": (determinant, lambda n: [(n, n)], lambda n: (1,)),
            "cofactor": (cofactor, lambda n: [(n, n)], lambda n: (n, n))}


def _sizes(name: str, tensors) -> tuple:
    if name in ("transpose", "relu", "maxmin", "softmax"):
        return tuple(tensors[0].shape[-2:])
    if name == "matmul":
        return (*tensors[0].shape[-2:], tensors[1].shape[-1])
    return (tensors[0].shape[-1],)


def compiled(name: str, *sizes, dtype=torch.float32):
    """The compiled listing for these sizes (cached)."""
    from usim.rasp.compile import compile as rasp_compile
    if name not in LISTINGS:
        raise ValueError(f"unknown listing {name!r}: one of {sorted(LISTINGS)}")
    key = (name, sizes, dtype)
    if key not in _CACHE:
        build, inputs, output = LISTINGS[name]
        length = sum(math.prod(s) for s in inputs(*sizes)) + math.prod(output(*sizes))
        _CACHE[key] = rasp_compile(build(*sizes), None, length, dtype=dtype)
    return _CACHE[key]


def run(name: str, *tensors: torch.Tensor) -> torch.Tensor:
    """The listing on torch tensors (batch axes first), computed by its compiled encoder."""
    if name not in LISTINGS:
        raise ValueError(f"unknown listing {name!r}: one of {sorted(LISTINGS)}")
    sizes = _sizes(name, tensors)
    _, inputs, output = LISTINGS[name]
    shapes = inputs(*sizes)
    if len(tensors) != len(shapes) or any(tuple(t.shape[-2:]) != s for t, s in zip(tensors, shapes)):
        raise ValueError(f"{name} of sizes {sizes} takes tensors of shapes {shapes}, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    dtype = tensors[0].dtype
    module = compiled(name, *sizes, dtype=dtype)
    batch = torch.broadcast_shapes(*[t.shape[:-2] for t in tensors])
    out_shape = output(*sizes)
    flat = [t.expand(*batch, *t.shape[-2:]).reshape(-1, t.shape[-2] * t.shape[-1]) for t in tensors]
    zeros = torch.zeros(flat[0].shape[0], math.prod(out_shape), dtype=dtype)
    rows = torch.cat(flat + [zeros], dim=1).tolist()
    result = torch.tensor(module(rows), dtype=dtype)[:, -math.prod(out_shape):]
    return result.reshape(*batch, *out_shape)
