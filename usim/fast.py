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
constructions average only exact values (0/1 flags, small integers). The compiled program at the
end of this file adds one more such case: FFN sums (see there).

Planning groups queries by their static query features, tier by tier (queries with the same
features keep the same keys), so it costs about (number of distinct query features x candidate
keys) per tier, not L^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum

from usim.activations import activate

# A head whose static tiers would score more (query group, key) pairs than MAX_SCORED, or keep
# more than MAX_PAIRS, runs dense instead; pairs are scored PAIR_CHUNK at a time.
MAX_SCORED = 1_000_000_000
MAX_PAIRS = 40_000_000
PAIR_CHUNK = 1 << 22
# A position-only tier scored at run time (after a content tier) is tabulated up to this many scores.
STATIC_TABLE = 1 << 22
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


class Memo:
    """Shared planning work between heads, keyed by content digests, oldest entries dropped beyond
    a byte budget (a U at d = 64 has thousands of heads; most prefixes are used once)."""

    def __init__(self, budget: int = 1 << 28):
        self.entries: dict = {}
        self.sizes: dict = {}
        self.budget, self.total = budget, 0

    def get(self, name, make):
        if name not in self.entries:
            value = make()
            size = sum(t.nbytes for t in (value or ()) if isinstance(t, torch.Tensor))
            self.entries[name], self.sizes[name] = value, size
            self.total += size
            while self.total > self.budget and len(self.entries) > 1:
                oldest = next(iter(self.entries))
                self.total -= self.sizes.pop(oldest)
                del self.entries[oldest]
        return self.entries[name]


def _row_codes(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Equal rows -> equal codes 0..U-1 (a faster torch.unique(dim=0) for a few columns)."""
    codes = torch.zeros(rows.shape[0], dtype=torch.long)
    size = 1
    for column in rows.T:
        _, rank = torch.unique(column, return_inverse=True)
        _, codes = torch.unique(codes * (int(rank.max()) + 1) + rank, return_inverse=True)
        size = int(codes.max()) + 1
    return codes, size


def _split(state_name, group: torch.Tensor, qf, memo: Memo):
    """Queries grouped by (old group, features qf): (new group (L,), count, parent, representative).
    Constant feature columns split nothing, so heads that differ only in constants share the work.
    qf = (definition, features (L, d_k), used columns, coefficients); state_name names group."""
    _, values, used, coef = qf
    varying = (values != values[:1]).any(0)

    def make():
        new_group, groups = _row_codes(torch.cat([group[:, None].double(), values[:, varying]], dim=1))
        parent = torch.empty(groups, dtype=torch.long).scatter_(0, new_group, group)
        representative = torch.empty(groups, dtype=torch.long).scatter_(0, new_group, torch.arange(len(group)))
        return new_group, groups, parent, representative

    definition = used.numpy().tobytes() + coef[varying].numpy().tobytes()
    return memo.get(("split", state_name, definition), make)


def _match_form(qf: torch.Tensor, kf: torch.Tensor):
    """The other columns if the tier is a ``match`` (score = sum 2 e_i k_i - sum k_i^2, i.e.
    -|k - e|^2 up to a per-query constant: a query column of -1s against the keys' sum of squares),
    else None. Then the keys equal to e are the best ones whenever there is one."""
    for c in range(qf.shape[1]):
        others = [i for i in range(qf.shape[1]) if i != c]
        if bool((qf[:, c] == -1).all()) and torch.equal(kf[:, c], (kf[:, others] ** 2).sum(1)):
            return others
    return None


def _best_pairs(children, parent, representative, start, count, pair_key, qf, kf):
    """For each child group, its parent's candidate keys with the best score: (child, key) pairs."""
    n_new = count[parent[children]]
    ends = torch.cumsum(n_new, 0)
    kept_child, kept_key, first = [], [], 0
    while first < len(children):  # children in chunks of about PAIR_CHUNK scored pairs
        last = max(first + 1, int(torch.searchsorted(ends, ends[first] - n_new[first] + PAIR_CHUNK)))
        n = n_new[first:last]
        local = torch.repeat_interleave(n)
        child = children[first:last][local]
        offset = torch.arange(len(local)) - (torch.cumsum(n, 0) - n)[local]
        key = pair_key[start[parent[child]] + offset]
        score = (qf[representative[child]] * kf[key]).sum(-1)  # exact: small integers
        best = torch.full((last - first,), float("-inf"), dtype=torch.float64)
        best = best.scatter_reduce(0, local, score, "amax")
        kept = score == best[local]
        kept_child.append(child[kept])
        kept_key.append(key[kept])
        first = last
    empty = torch.zeros(0, dtype=torch.long)
    return torch.cat(kept_child) if kept_child else empty, torch.cat(kept_key) if kept_key else empty


def _refine(state, state_name, qf, kf, memo: Memo):
    """One static tier: split the query groups by their features qf, keep each group's best keys.

    state = (group (L,) of each query, pair_group, pair_key sorted by group, number of groups);
    qf, kf = (definition, features (L, d_k), used columns, coefficients); returns the new state, or
    None when there would be too many pairs."""
    group, pair_group, pair_key, groups = state
    new_group, new_groups, parent, representative = _split(state_name, group, qf, memo)
    qf, kf = qf[1], kf[1]
    count = torch.bincount(pair_group, minlength=groups)
    start = torch.cumsum(count, 0) - count
    children = torch.arange(new_groups)
    found_child, found_key = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    others = _match_form(qf, kf)
    if others is not None:  # exact matches by a join on (parent group, features); the rest by scoring
        target = qf[representative][:, others] / 2
        rows = torch.cat([torch.cat([parent[:, None].double(), target], 1),
                          torch.cat([pair_group[:, None].double(), kf[pair_key][:, others]], 1)])
        codes, _ = _row_codes(rows)
        child_code, pair_code = codes[:new_groups], codes[new_groups:]
        order = torch.argsort(pair_code, stable=True)
        sorted_code = pair_code[order]
        low = torch.searchsorted(sorted_code, child_code)
        hits = torch.searchsorted(sorted_code, child_code, right=True) - low
        local = torch.repeat_interleave(hits)
        found_child = children[local]
        found_key = pair_key[order[low[local] + torch.arange(len(local)) - (torch.cumsum(hits, 0) - hits)[local]]]
        children = children[hits == 0]
    if int(count[parent[children]].sum()) > MAX_SCORED:
        return None
    scored_child, scored_key = _best_pairs(children, parent, representative, start, count, pair_key, qf, kf)
    pair_group, pair_key = torch.cat([found_child, scored_child]), torch.cat([found_key, scored_key])
    order = torch.argsort(pair_group, stable=True)
    pair_group, pair_key = pair_group[order], pair_key[order]
    if len(pair_key) > MAX_PAIRS:
        return None
    return new_group, pair_group, pair_key, new_groups


def _static_prefix(features, length: int, memo: Memo):
    """The state after the static tiers (see _refine); features[t] = (qf, kf) of tier t, each
    (definition, features (L, d_k) float64 exact, used columns, coefficients). memo shares prefixes
    between heads, by definition; None = too many pairs."""
    state = (torch.zeros(length, dtype=torch.long), torch.zeros(length, dtype=torch.long), torch.arange(length), 1)
    name = ("prefix",)
    for qf, kf in features:
        previous, name = name, name + (qf[0], kf[0])
        state = memo.get(name, lambda state=state, previous=previous, qf=qf, kf=kf: None if state is None
                         else _refine(state, previous, qf, kf, memo))
    return state


def plan_head(attn, head: int, static: torch.Tensor, pos_table: torch.Tensor, memo: Memo | None = None,
              columns: torch.Tensor | None = None) -> HeadPlan:
    """The plan of one head of a HardAttention module (see the module docstring)."""
    query, key = attn.query[head].cpu(), attn.key[head].cpu()  # (T, d_k, W)
    tiers = query.shape[0]
    first_dynamic = tiers
    for t in range(tiers):
        if (_reads(query[t]) & ~static).any() or (_reads(key[t]) & ~static).any():
            first_dynamic = t
            break
    memo = Memo() if memo is None else memo
    columns = pos_table.cpu().double().T.contiguous() if columns is None else columns  # (W, L)
    length = columns.shape[1]

    def features(w):  # the static features (L, d_k) a tier's read w (d_k, W) sees, with their definition
        used = _reads(w).nonzero()[:, 0]
        coef = w[:, used]
        return used.numpy().tobytes() + coef.numpy().tobytes(), columns[used].T @ coef.T, used, coef

    prefix = _static_prefix([(features(query[t]), features(key[t])) for t in range(first_dynamic)],
                            length, memo)
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
    static, memo = static_slots(encoder), Memo()
    columns = encoder.pos_table.cpu().double().T.contiguous()  # (W, L)
    return [None if layer.attn is None else
            [plan_head(layer.attn, h, static, encoder.pos_table, memo, columns) for h in range(layer.attn.heads)]
            for layer in encoder.layers]


# --- The compiled program: only the (slot, position) entries the result depends on ---------------
#
# A head or FFN writes every slot it writes at every position, but most of those entries are never
# read again (a matmul's term slots matter only inside its output block). Going backwards from the
# readout, the program marks the live (slot, position) entries; each head then runs only at the
# queries where one of its outputs is live, each FFN only at the positions where one of its outputs
# is live, and everything they read there is marked live in turn. The stream is stored as one flat
# buffer of the live entries. Every computed entry is computed from the same inputs by the same
# operations as in the dense reference; entries the result does not depend on are not computed at
# all. Moves, selections and single products are bitwise those of dense; an FFN sum of several terms
# can round differently in the last bit, because BLAS orders a dot product by the matrix shapes
# (here only the needed positions are rows, in dense all L).


def _nonzero_cols(w: torch.Tensor) -> torch.Tensor:
    return (w.reshape(-1, w.shape[-1]) != 0).any(0).nonzero()[:, 0]


@dataclass
class HeadStep:
    kind: str  # "gather", "candidates" or "dense"
    queries: torch.Tensor  # (Q,) positions, for the accumulator of the layer
    value_read: torch.Tensor  # gather: (R, Q); candidates: (R, Q, K); dense: (R, L) flat offsets
    value_coef: torch.Tensor  # (J, R)
    out_coef: torch.Tensor  # (S, J)
    acc_write: torch.Tensor  # (S, Q) offsets into the layer's accumulator
    tiers: list  # candidates/dense: per run-time tier (q_read (Rq, Q), q_coef (d_k, Rq), k_read, k_coef,
    #              table): table (Q, K) or (Q, L) holds the scores of a position-only tier instead
    valid: torch.Tensor | None = None  # candidates: (Q, K)


@dataclass
class AttentionStep:
    heads: list  # HeadSteps, run one at a time
    acc_target: torch.Tensor  # (A,) flat offsets the accumulator is added to
    # The layer's plain moves (gather heads copying one slot c_v * x into slots as c_o * (c_v * x)),
    # all in one gather: (N,) flat offsets read, coefficients, accumulator offsets written.
    move_read: torch.Tensor
    move_value: torch.Tensor
    move_out: torch.Tensor
    move_write: torch.Tensor
    unit_moves: bool  # every move coefficient is 1: plain copies


@dataclass
class FFNStep:
    activation: str
    read: torch.Tensor  # (P, R) flat offsets; with ``single``, (P, rows): the one entry each row reads
    single: bool  # every pre-activation reads at most one slot: a gather and a scale, no matmul
    w_in: torch.Tensor  # (rows, R); with ``single``, (rows,) the coefficients
    b_in: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    write: torch.Tensor  # (P, S) flat offsets


@dataclass
class Program:
    size: int  # live entries per sequence
    init: torch.Tensor  # (size,) the positional table at the live entries
    value_at: torch.Tensor  # (V,) flat offsets of the value slot ...
    value_pos: torch.Tensor  # (V,) ... at these positions
    steps: list
    readout: torch.Tensor  # (L,) flat offsets read as the output sequence
    entries: torch.Tensor  # (2, size - 1): the (slot, position) of each live entry (the last is the sink)

    def to(self, dtype, device) -> "Program":
        """The program with float tensors cast to dtype and everything on device."""
        def move(obj):
            if isinstance(obj, torch.Tensor):
                return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
            if isinstance(obj, list):
                return [move(o) for o in obj]
            if isinstance(obj, tuple):
                return tuple(move(o) for o in obj)
            if hasattr(obj, "__dataclass_fields__"):
                return type(obj)(**{k: move(getattr(obj, k)) for k in obj.__dataclass_fields__})
            return obj
        return move(self)

    def run(self, seq: torch.Tensor) -> torch.Tensor:
        buf = self.init.expand(seq.shape[0], -1).clone()
        buf[:, self.value_at] += seq[:, self.value_pos]
        for step in self.steps:
            if isinstance(step, FFNStep):
                if step.single:  # c * x + b: what the matmul computes when its row has one nonzero
                    pre = buf[:, step.read] * step.w_in + step.b_in  # (B, P, rows)
                else:
                    pre = buf[:, step.read] @ step.w_in.T + step.b_in
                out = activate(step.activation, pre) @ step.w_out.T + step.b_out
                buf.index_add_(1, step.write.flatten(), out.flatten(1))
                continue
            acc = buf.new_zeros(buf.shape[0], len(step.acc_target))
            moved = buf[:, step.move_read]
            if not step.unit_moves:  # c_o * (c_v * x), as the dense head computes it
                moved = moved * step.move_value * step.move_out
            acc.index_add_(1, step.move_write, moved)
            for head in step.heads:
                acc.index_add_(1, head.acc_write.flatten(), _head_output(buf, head).flatten(1))
            buf.index_add_(1, step.acc_target, acc)
        return buf[:, self.readout]


def _head_output(buf: torch.Tensor, head: HeadStep) -> torch.Tensor:
    """(B, S, Q): a head's contribution to its written slots at its queries."""
    values = einsum(head.value_coef, buf[:, head.value_read], "j r, b r ... -> b j ...")
    if head.kind == "gather":
        mean = values  # (B, J, Q)
    else:
        keep = None if head.valid is None else head.valid.expand(buf.shape[0], -1, -1)
        for q_read, q_coef, k_read, k_coef, table in head.tiers:
            if table is not None:
                s = table.expand(buf.shape[0], -1, -1)
            else:
                q = einsum(q_coef, buf[:, q_read], "d r, b r q -> b q d")
                k = einsum(k_coef, buf[:, k_read], "d r, b r ... -> b ... d")
                s = q @ k.transpose(-1, -2) if head.kind == "dense" else einsum(q, k, "b q d, b q c d -> b q c")
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            best = s == s.amax(dim=-1, keepdim=True)
            keep = best if keep is None else keep & best
        if keep is None:  # a dense head whose tiers all score 0: every key ties
            keep = buf.new_ones(buf.shape[0], len(head.queries), values.shape[-1])
        keep = keep.to(buf.dtype)
        count = keep.sum(dim=-1)[:, None]  # (B, 1, Q)
        if head.kind == "dense":
            mean = einsum(keep, values, "b q l, b j l -> b j q") / count
        else:
            mean = einsum(keep, values, "b q c, b j q c -> b j q") / count
    return einsum(head.out_coef, mean, "s j, b j q -> b s q")


def compile_encoder(encoder, plans) -> Program:
    """The program of an encoder (see above), from its weights and its head plans."""
    width, length = encoder.stream_width, encoder.length
    live = torch.zeros(width, length, dtype=torch.bool)
    live[encoder.readout.cpu(), torch.arange(length)] = True
    needs = []  # per layer (reverse order): the read requests, resolved to offsets once live is known
    for layer, layer_plans in zip(reversed(encoder.layers), reversed(plans)):
        entry = {}
        if layer.ffn is not None:
            f = layer.ffn
            writes = ((f.w_out != 0).any(1) | (f.b_out != 0)).nonzero()[:, 0].cpu()
            positions = live[writes].any(0).nonzero()[:, 0]
            if len(positions):
                reads = _nonzero_cols(f.w_in).cpu()
                live[reads[:, None], positions] = True
                entry["ffn"] = (positions, reads, writes)
        if layer.attn is not None:
            a = layer.attn
            after = live.clone()
            heads = []
            for h, plan in enumerate(layer_plans if layer_plans is not None else [None] * a.heads):
                outs = _nonzero_cols(a.output[h].T).cpu()
                queries = after[outs].any(0).nonzero()[:, 0]
                if not len(queries):
                    continue
                kind = "dense" if plan is None else plan.kind
                vreads = _nonzero_cols(a.value[h]).cpu()
                first = 0 if plan is None else plan.first_dynamic
                keys = torch.arange(length) if kind == "dense" else plan.index[queries]  # (Q,) or (Q, K)
                live[vreads[:, None], keys.flatten()] = True
                tiers = []
                if kind != "gather":
                    for t in range(first, a.tiers):
                        if not ((a.query[h, t] != 0).any(1) & (a.key[h, t] != 0).any(1)).any():
                            continue  # every score is 0 (a padding tier): it keeps every key
                        qr, kr = _nonzero_cols(a.query[h, t]).cpu(), _nonzero_cols(a.key[h, t]).cpu()
                        live[qr[:, None], queries] = True
                        live[kr[:, None], keys.flatten()] = True
                        tiers.append((qr, kr, t))
                heads.append((h, kind, queries, keys, vreads, outs, tiers, plan))
            if heads:
                entry["attn"] = heads
        needs.append(entry)

    static, pos = static_slots(encoder), encoder.pos_table.cpu().double()
    size = int(live.sum())
    # int32 tables (width x length can be large); offsets are taken out as int64
    where = torch.full((width, length), size, dtype=torch.int32)  # entry ``size``: a sink for dead writes
    where[live] = torch.arange(size, dtype=torch.int32)
    value = encoder.slots.index("value")
    value_pos = live[value].nonzero()[:, 0]

    def offsets(slots, positions, reading=True):  # (len(slots), *positions.shape)
        found = where[slots][:, positions.flatten()].reshape(len(slots), *positions.shape).long()
        if reading and (found == size).any():
            raise RuntimeError("usim.fast: a read of an entry that is not live (a bug in the liveness pass)")
        return found

    steps = []
    for layer, entry in zip(encoder.layers, reversed(needs)):
        if "attn" in entry:
            a = layer.attn
            written = torch.zeros(width, length, dtype=torch.bool)
            for h, kind, queries, keys, vreads, outs, tiers, plan in entry["attn"]:
                written[outs[:, None], queries] = True
            acc_index = torch.full((width, length), -1, dtype=torch.int32)
            acc_index[written] = torch.arange(int(written.sum()), dtype=torch.int32)
            acc_target = where[written].long()  # dead entries go to the sink
            head_steps, moves = [], []
            for h, kind, queries, keys, vreads, outs, tiers, plan in entry["attn"]:
                value_coef, out_coef = a.value[h][:, vreads].double().cpu(), a.output[h][outs].double().cpu()
                terms = (out_coef != 0) & (value_coef != 0).T  # (S, J): slot s gets move j
                if kind == "gather" and len(vreads) == 1 and bool((terms.sum(1) == 1).all()):
                    read = offsets(vreads, keys)[0]
                    for s, j in terms.nonzero().tolist():
                        moves.append((read, value_coef[j, 0].expand(len(read)), out_coef[s, j].expand(len(read)),
                                      acc_index[outs[s], queries].long()))
                    continue
                tier_reads = []
                for qr, kr, t in tiers:
                    q_coef, k_coef = a.query[h, t][:, qr].double().cpu(), a.key[h, t][:, kr].double().cpu()
                    if static[qr].all() and static[kr].all() and len(queries) * keys.shape[-1] <= STATIC_TABLE:
                        # scores from positions only (e.g. the position tie-break): exact, computed once
                        q = pos[:, qr][queries] @ q_coef.T  # (Q, d_k)
                        k = pos[:, kr][keys] @ k_coef.T  # (Q, K, d_k) or (L, d_k)
                        table = (q[:, None] * k).sum(-1) if kind == "candidates" else q @ k.T
                        tier_reads.append((None, None, None, None, table))
                        continue
                    tier_reads.append((offsets(qr, queries), q_coef, offsets(kr, keys), k_coef, None))
                head_steps.append(HeadStep(
                    kind=kind, queries=queries, value_read=offsets(vreads, keys), value_coef=value_coef,
                    out_coef=out_coef, acc_write=acc_index[outs][:, queries].long(), tiers=tier_reads,
                    valid=plan.valid[queries] if kind == "candidates" else None))
            move = [torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
                    for parts, dtype in zip(zip(*moves) if moves else [[]] * 4,
                                            (torch.long, torch.float64, torch.float64, torch.long))]
            unit = bool((move[1] == 1).all() and (move[2] == 1).all())
            steps.append(AttentionStep(head_steps, acc_target, *move, unit))
        if "ffn" in entry:
            f = layer.ffn
            positions, reads, writes = entry["ffn"]
            w_in = f.w_in[:, reads].double().cpu()
            read = offsets(reads, positions).T  # (P, R)
            single = bool(((w_in != 0).sum(1) <= 1).all())
            if single:  # rows without a read get coefficient 0 on a live (finite) entry
                column = (w_in != 0).int().argmax(1)
                read, w_in = read[:, column], w_in[torch.arange(len(w_in)), column]
            steps.append(FFNStep(f.activation, read, single, w_in,
                                 f.b_in.double().cpu(), f.w_out[writes].double().cpu(), f.b_out[writes].double().cpu(),
                                 offsets(writes, positions, reading=False).T))
    readout = where[encoder.readout.cpu(), torch.arange(length)].long()
    init = torch.cat([encoder.pos_table.cpu().double().T[live], torch.zeros(1, dtype=torch.float64)])
    return Program(size + 1, init, where[value, value_pos].long(), value_pos, steps, readout, live.nonzero().T)
