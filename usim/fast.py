"""Plans for the fast execution of average-hard attention (``execution="fast"``).

The dense reference scores every query against every key: O(L^2) per head. But most score tiers
read only *static* slots: slots the positional table sets and no layer ever writes (block, row,
col, position, ...). Which keys survive those tiers depends on the layout alone, not on the data,
so it is computed once per encoder, from its weights and positional table, and kept as:

* ``gather``: one key per query (every tier static, no averaging): the head is a gather;
* ``candidates``: the static tiers leave each query a few candidate keys (say, the entries of its
  row); the remaining (content) tiers are scored at run time over those candidates only;
* ``dense``: the static tiers leave too many candidates: the head runs as in the reference.

Every static score is an exact small integer (positional features are small integers), so the
plan selects exactly the keys the dense reference selects. At run time the content tiers are the
same products of the same stream values as in the dense scores, so the kept keys are the same too;
a head that keeps one key copies its value bitwise. Only an averaging head whose tied keys hold
inexact values can differ from dense in the last bit (its sum runs in another order); the
constructions average only exact values (0/1 flags, small integers).

Planning groups queries by their static query features, tier by tier (queries with the same
features keep the same keys), so it costs about (number of distinct query features x candidate
keys) per tier, not L^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A static tier prefix that would need more (group, key) pairs than this runs dense instead.
MAX_PAIRS = 40_000_000
# A head whose static tiers leave some query more candidates than this (or than L / 4) runs dense.
MAX_CANDIDATES = 512


@dataclass
class HeadPlan:
    kind: str  # "gather", "candidates" or "dense"
    index: torch.Tensor | None = None  # gather: (L,) key of each query; candidates: (L, K) keys
    valid: torch.Tensor | None = None  # candidates: (L, K) bool, False on padding
    first_dynamic: int = 0  # candidates: the first tier scored at run time

    def to(self, device) -> "HeadPlan":
        move = (lambda t: None if t is None else t.to(device))
        return HeadPlan(self.kind, move(self.index), move(self.valid), self.first_dynamic)


def written_slots(encoder) -> torch.Tensor:
    """(W,) bool: the slots some layer writes (attention output rows, FFN output rows and bias)."""
    written = torch.zeros(encoder.stream_width, dtype=torch.bool)
    for layer in encoder.layers:
        if layer.attn is not None:
            written |= (layer.attn.output != 0).any(-1).any(0).cpu()
        if layer.ffn is not None:
            written |= ((layer.ffn.w_out != 0).any(-1) | (layer.ffn.b_out != 0)).cpu()
    return written


def static_slots(encoder) -> torch.Tensor:
    """(W,) bool: slots that hold the positional table's values through the whole encoder."""
    static = ~written_slots(encoder)
    static[encoder.slots.index("value")] = False
    return static


def _reads(w: torch.Tensor) -> torch.Tensor:
    """(W,) bool: the stream columns a (..., W) read matrix uses."""
    return (w.reshape(-1, w.shape[-1]) != 0).any(0).cpu()


def _row_codes(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Equal rows -> equal codes 0..U-1 (a faster torch.unique(dim=0) for a few columns)."""
    codes = torch.zeros(rows.shape[0], dtype=torch.long)
    size = 1
    for column in rows.T:
        _, rank = torch.unique(column, return_inverse=True)
        _, codes = torch.unique(codes * (int(rank.max()) + 1) + rank, return_inverse=True)
        size = int(codes.max()) + 1
    return codes, size


def _refine(state, qf: torch.Tensor, kf: torch.Tensor):
    """One static tier: split the query groups by their features qf, keep each group's best keys.

    state = (group (L,) of each query, pair_group, pair_key sorted by group, number of groups);
    returns the new state, or None when the pairs would exceed MAX_PAIRS."""
    group, pair_group, pair_key, groups = state
    new_group, new_groups = _row_codes(torch.cat([group[:, None].double(), qf], dim=1))
    parent = torch.empty(new_groups, dtype=torch.long).scatter_(0, new_group, group)
    representative = torch.empty(new_groups, dtype=torch.long).scatter_(0, new_group, torch.arange(len(group)))
    count = torch.bincount(pair_group, minlength=groups)
    start = torch.cumsum(count, 0) - count
    n_new = count[parent]
    total = int(n_new.sum())
    if total > MAX_PAIRS:
        return None
    child = torch.repeat_interleave(n_new)
    offset = torch.arange(total) - (torch.cumsum(n_new, 0) - n_new)[child]
    key = pair_key[start[parent][child] + offset]
    score = (qf[representative][child] * kf[key]).sum(-1)  # exact: small integers
    best = torch.full((new_groups,), float("-inf"), dtype=torch.float64).scatter_reduce(0, child, score, "amax")
    kept = score == best[child]
    return new_group, child[kept], key[kept], new_groups


def _static_prefix(features, length: int, memo: dict):
    """The state after the static tiers (see _refine); features[t] = (qf, kf) of tier t as
    (L, d_k) float64 exact features. memo shares prefixes between heads; None = too many pairs."""
    state = (torch.zeros(length, dtype=torch.long), torch.zeros(length, dtype=torch.long), torch.arange(length), 1)
    name = ()
    for qf, kf in features:
        name += (qf.numpy().tobytes(), kf.numpy().tobytes())
        if name not in memo:
            memo[name] = None if state is None else _refine(state, qf, kf)
        state = memo[name]
    return state


def plan_head(attn, head: int, static: torch.Tensor, pos_table: torch.Tensor, memo: dict | None = None) -> HeadPlan:
    """The plan of one head of a HardAttention module (see the module docstring)."""
    query, key = attn.query[head].cpu(), attn.key[head].cpu()  # (T, d_k, W)
    tiers = query.shape[0]
    first_dynamic = tiers
    for t in range(tiers):
        if (_reads(query[t]) & ~static).any() or (_reads(key[t]) & ~static).any():
            first_dynamic = t
            break
    pos = pos_table.cpu().double()
    length = pos.shape[0]

    def features(w):  # (L, d_k): the static features a tier's read w (d_k, W) sees
        used = _reads(w)
        return pos[:, used] @ w[:, used].T

    prefix = _static_prefix([(features(query[t]), features(key[t])) for t in range(first_dynamic)],
                            length, {} if memo is None else memo)
    if prefix is None:
        return HeadPlan("dense")
    group, pair_group, pair_key, groups = prefix
    count = torch.bincount(pair_group, minlength=groups)
    if first_dynamic == tiers and bool((count == 1).all()):
        return HeadPlan("gather", index=pair_key[group])  # pairs sorted by group: one per group
    width = int(count.max())
    if width > MAX_CANDIDATES or 4 * width > length:  # gathering K keys per query costs more than a dense row
        return HeadPlan("dense")
    start = torch.cumsum(count, 0) - count
    slot = torch.arange(len(pair_group)) - start[pair_group]
    table = torch.zeros(groups, width, dtype=torch.long)
    valid = torch.zeros(groups, width, dtype=torch.bool)
    table[pair_group, slot] = pair_key
    valid[pair_group, slot] = True
    return HeadPlan("candidates", index=table[group], valid=valid[group], first_dynamic=first_dynamic)


def plan_encoder(encoder) -> list[list[HeadPlan] | None]:
    """Per layer, the plan of each attention head (None for a layer without attention)."""
    static, memo = static_slots(encoder), {}
    return [None if layer.attn is None else
            [plan_head(layer.attn, h, static, encoder.pos_table, memo) for h in range(layer.attn.heads)]
            for layer in encoder.layers]
