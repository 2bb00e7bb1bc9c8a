"""How an attention head averages the keys it keeps: their sum in key order, left to right, / count.

A hard-attention head that keeps several keys returns (sum of their values) / count. A float sum
depends on its order, so both executions fix it: the kept keys are added one at a time in
increasing position, starting from 0 (adding the exact zeros of keys not kept changes nothing).
The dense reference and the fast execution then agree bitwise, whatever their tensor shapes.
"""

from __future__ import annotations

import torch


def ordered_sum(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """keep (..., K) 0/1 and values (..., K, J), keys in increasing position -> (..., J)."""
    total = values.new_zeros(values.shape[:-2] + values.shape[-1:])
    for c in range(keep.shape[-1]):
        total = total + keep[..., c, None] * values[..., c, :]
    return total


def dense_ordered_sum(keep: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """keep (B, Q, L) 0/1 over all keys and values (B, L, J) -> (B, Q, J), as ``ordered_sum``."""
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    if width <= 1:  # at most one kept key: the product is that value, exactly
        return keep @ values
    order = (keep != 0).to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :width]  # (B, Q, K)
    kept = keep.gather(-1, order)
    batch = torch.arange(values.shape[0], device=values.device)[:, None, None]
    return ordered_sum(kept, values[batch, order])
