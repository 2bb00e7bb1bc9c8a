"""How an attention head averages the keys it keeps: a tree sum over them in key order, / count.

A hard-attention head that keeps several keys returns (sum of their values) / count. A float sum
depends on its order, so every execution fixes the same one: the kept keys, taken in increasing
position and padded with zeros to a power of two, are added as a *tree of halves*: the upper half
onto the lower half, again and again. Padding to a larger power of two changes nothing (the first
folds add exact zeros), so the dense reference (kept keys compacted out of all L keys, padded to the
most any query keeps) and the fast execution (kept keys among a few candidates, or a whole strided
box of keys) agree bitwise, whatever their tensor shapes (up to the sign of a zero sum). The tree is
vectorised over contiguous halves (log2 K adds) and more accurate than a left-to-right sum.
"""

from __future__ import annotations

import torch


def tree_sum(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The tree sum of values along dim (the axis removed), as if padded with zeros to a power of two."""
    x = values.movedim(dim, -1)
    n = x.shape[-1]
    if n <= 1:
        return x[..., 0] if n else x.new_zeros(x.shape[:-1])
    half = 1 << ((n - 1).bit_length() - 1)  # half the padded length: the upper n - half fold onto the lower
    if (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():  # no out=, no in-place
        folded = torch.cat([x[..., : n - half] + x[..., half:], x[..., n - half: half]], dim=-1)
        while half > 1:
            half //= 2
            folded = folded[..., :half] + folded[..., half:]
        return folded[..., 0]
    folded = torch.empty(*x.shape[:-1], half, dtype=x.dtype, device=x.device)
    torch.add(x[..., : n - half], x[..., half:], out=folded[..., : n - half])
    folded[..., n - half:] = x[..., n - half: half]  # + the padding's zeros
    while half > 1:  # the later folds in place, in the buffer this function owns
        half //= 2
        folded[..., :half] += folded[..., half: 2 * half]
    return folded[..., 0].clone() if folded.shape[-1] > 1 else folded[..., 0]


def ordered_sum(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """keep (..., K) 0/1 and values (..., K, J), keys in increasing position -> (..., J): the tree
    sum of the kept values, compacted in key order."""
    kept = keep != 0
    order = (~kept).to(torch.int8).argsort(dim=-1, stable=True)  # kept keys first, in key order
    kept = kept.gather(-1, order)
    values = values.gather(-2, order[..., None].expand(*order.shape, values.shape[-1]))
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return tree_sum(torch.where(kept[..., None], values, zero), dim=-2)  # keys not kept take no part


def dense_ordered_sum(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """keep (B, Q, L) 0/1 over all keys and values (B, L, J) -> (B, Q, J), as ``ordered_sum``."""
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    if width <= 1:  # at most one kept key: that value (the keys not kept take no part, NaN and inf too)
        index = keep.argmax(-1, keepdim=True).expand(*keep.shape[:-1], values.shape[-1])  # (B, Q, J)
        return torch.where(keep.any(-1, keepdim=True), values.gather(1, index), values.new_zeros(()))
    order = (keep != 0).to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :width]  # (B, Q, K)
    kept = keep.gather(-1, order)
    batch = torch.arange(values.shape[0], device=values.device)[:, None, None]
    return ordered_sum(kept, values[batch, order])
