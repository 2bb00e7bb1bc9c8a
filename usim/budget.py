"""Sizes refused up front: what a construction or a run needs, estimated from its sizes alone,
before anything is allocated (``python -m usim`` refuses with a message naming the option).

Token counts (the layout's sequence length L) are exact, from the block shapes of each layout
(tests/test_cli.py compares them with real constructions):

    U, (A, V) form:  x, y (n d each), a_h, v_h (d^2 each), ignore (n), s_h (n^2), null (1),
                     xa_h, xv_h (n d each), their terms (n d^2 each), s_h's terms (n^2 d),
                     y's terms (n d * n heads)
    U, factored (head_dim r, kv_len m, kdim, vdim): x (n d), keys (m kdim), values (m vdim), per head
                     wq (d r), wk (kdim r), wv (vdim r), wo (r d), ignore, bias, scale, s (n m each),
                     q, o (n r each), k, v (m r each), the terms of q (n r t), k and v (m r t
                     each, t = max(d, kdim, vdim)), s (n m r), o (n r m); bo (d), one (1), y (n d), null (1),
                     y's terms (n d (heads r + 1))
    ops: Transpose, Softmax, ReLU, MaxMin, GroupSort 2 n m; MatMul n m + m p + n p;
         Inverse 4 n^2 + 1; Determinant 2 n^2 + 1.

Positions are numbered in int32, so no layout may exceed ``MAX_TOKENS`` tokens.
"""

from __future__ import annotations

import os

MAX_TOKENS = 2 ** 31 - 1
"""Most tokens of one layout (positions are int32)."""
WORK_LIMIT = 2 * 10 ** 9
"""Most token-items (batch x tokens, summed over the runs) a demo computes: a few minutes on a CPU."""


def u_tokens(n: int, d: int, heads: int = 1, head_dim: int | None = None, kv_len: int | None = None,
             kdim: int | None = None, vdim: int | None = None) -> int:
    """The sequence length of ``UniversalSimulator(n, d, heads, head_dim=...)`` (no FFN sublayer)."""
    h = heads
    if head_dim is None:
        return (n * d + 2 * h * d * d + n + n * d + h * n * n + 1 + 2 * h * n * d + 2 * h * n * d * d
                + h * n * n * d + n * d * n * h)
    r, m, kdim, vdim = head_dim, kv_len or n, kdim or d, vdim or d
    t = max(d, kdim, vdim)  # the projections' terms share one length
    per_head = (d * r + kdim * r + vdim * r + r * d + 3 * n * m + n * m + 2 * n * r + 2 * m * r
                + (n + 2 * m) * r * t + n * m * r + n * r * m)
    return n * d + m * kdim + m * vdim + d + 1 + n * d + 1 + n * d * (h * r + 1) + h * per_head


def op_tokens(kind: str, sizes: list[int]) -> int:
    """The sequence length of a construction of ``kind`` (a class name) with these sizes."""
    if kind in ("Transpose", "Softmax", "ReLU", "MaxMin", "GroupSort"):
        n, m = sizes
        return 2 * n * m
    if kind == "MatMul":
        n, m, p = sizes
        return n * m + m * p + n * p
    if kind == "Inverse":
        return 4 * sizes[0] ** 2 + 1
    if kind == "Determinant":
        return 2 * sizes[0] ** 2 + 1
    raise ValueError(f"no token count for {kind!r}")


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def gigabytes(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.3g} GB"
