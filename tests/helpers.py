"""Shared test helpers (pytest puts tests/ on sys.path, so tests import this as `helpers`)."""

import torch


def final_stream(op, *args):
    """The op's output and its whole final residual stream (to check every slot stays finite)."""
    seen = []
    handle = op.encoder.layers[-1].hook_resid.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        y = op(*args)
    finally:
        handle.remove()
    return y, seen[0]


def ulp_floor(ref, dtype):
    """One ulp of the largest reference output. Where torch's own error is 0 (it rounds correctly,
    e.g. at size 1), "within k times torch's error" would forbid the one or two roundings any other
    order of the same arithmetic makes; this floor allows them and nothing more."""
    return torch.finfo(dtype).eps * ref.abs().max().item() + 1e-30
