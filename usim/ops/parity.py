"""PARITY (Remark 8.1 of the paper): one average-hard attention layer decides whether a 0/1 string
has an odd number of ones, for every length 0..max_length. Activation: relu. Depth 1, width 1.

Strings shorter than max_length are fed zero-padded (``forward`` pads them): a 0 adds nothing to
the count, so one encoder serves every length. The sequence is the N = max_length bits, then
P - N zero tokens (a scratch block), P = the least power of two >= N, then the output token.

    head    uniform average over the P bit and pad tokens: a = c / P, c = the number of ones
    FFN     parity = relu(P a) + sum_{j=1}^{N-1} 2 (-1)^j relu(P a - j)

The average is exact: a sum of 0/1 values is an exact integer and P a power of two, so P a = c
exactly. The FFN is the sum over odd k of the integer bumps relu(c-k+1) - 2 relu(c-k) + relu(c-k-1)
(1 at c = k, 0 at every other integer), collapsed to the triangle wave above: every pre-activation
and partial sum is a small integer, so the output is exactly 0 or 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from usim.construct import FFN, ONE, Builder, Head, Unit, match
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register


def parity_layer(b: Builder, bits: str, out: tuple[str, str], tag: str, pad: str | None = None) -> None:
    """Append one layer adding the parity of the 0/1 values (slot ``value``) of block ``bits`` (and
    of the zero tokens of block ``pad``, if given) into slot out[1]. Correct at every position when
    the two blocks hold a power of two tokens in all (the average is then exact); adds the
    positional slot ``tag + "pool"`` (1 on the averaged tokens) and the slot ``tag + "mean"``."""
    pool_blocks = {bits} | ({pad} if pad else set())
    size = sum(b.layout[name].size for name in pool_blocks)
    if size & (size - 1):
        raise ValueError(f"the averaged blocks hold {size} tokens: need a power of two for an exact count")
    pool = b.positional_from(f"{tag}pool", lambda block, i, c: int(block.name in pool_blocks))
    mean = b.slot(f"{tag}mean")
    b.layer([Head([match({pool: 1})], [("value", mean)], name=f"{tag}count", average=True)],
            FFN("relu", [Unit({mean: float(size), ONE: -float(j)}, {out[1]: 1.0 if j == 0 else 2.0 * (-1) ** j})
                         for j in range(b.layout[bits].size)]))


@register
class SimulatedParity(Construction):
    """forward(bits (..., length)) with 0/1 float entries and 0 <= length <= max_length -> (...,):
    1.0 where the string has an odd number of ones, else 0.0, computed by the encoder."""

    def __init__(self, max_length: int, *, execution: str = "fast"):
        check_size("max_length", max_length)
        padded = 1 << (max_length - 1).bit_length()
        scratch = {"pad": (padded - max_length,)} if padded > max_length else {}
        layout = Layout.of(inputs={"bits": (max_length,)}, outputs={"y": (1,)}, scratch=scratch)
        b = Builder(layout)
        parity_layer(b, "bits", ("y", b.slot("result")), tag="parity.", pad="pad" if scratch else None)
        b.result("y", "result")
        super().__init__(b.build(), layout, {"max_length": max_length}, execution=execution)

    def forward(self, bits):
        n = self.args["max_length"]
        if not isinstance(bits, torch.Tensor):
            raise TypeError(f"bits must be a torch.Tensor, got {type(bits).__name__}")
        if bits.dim() < 1:
            raise ValueError("bits must have shape (..., length), got a 0-d tensor")
        if bits.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"bits: dtype must be float32 or float64, got {bits.dtype}")
        if bits.shape[-1] > n:
            raise ValueError(f"bits has length {bits.shape[-1]} > max_length={n}")
        if not ((bits == 0) | (bits == 1)).all():
            raise ValueError("bits must hold only the values 0 and 1")
        return self.run(F.pad(bits, (0, n - bits.shape[-1])))[..., 0]
