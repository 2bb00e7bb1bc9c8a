"""The compiled program of the fast execution: only the (slot, position) entries the result depends on.

A head or FFN writes every slot it writes at every position, but most of those entries are never
read again (a matmul's term slots matter only at its term tokens). Going backwards from the
readout, ``compile_encoder`` marks the live (slot, position) entries; each head then runs only at
the queries where one of its outputs is live (planned by ``usim.plan`` for those queries only),
each FFN only at the positions where one of its outputs is live, and everything they read there
is marked live in turn. The stream is one flat buffer of the live entries, per sequence.

Data structures:

* ``Liveness``: per slot, an (L,) bool mask of its live positions (allocated on first use), so the
  cost is (slots used) x L bits and the live entries, never a slots x positions table of offsets;
* ``Entries``: the buffer's layout: the live positions of each slot, sorted, one after the other;
  an entry's offset is found by binary search; dead writes go to a sink entry at the end;
* ``Program``: the initial buffer (the positional values at the live entries), where the input
  tokens go, the steps (``AttentionStep`` with its ``HeadStep``s, ``FFNStep``) and the readout.

Every computed entry is computed from the same inputs by the same operations as in the dense
reference. Moves, selections and single products are bitwise those of dense; an FFN sum of several
terms, or an average of several values, can round differently in the last bit, because BLAS orders
a dot product by the matrix shapes (here only the needed positions are rows, in dense all L).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum

from usim.activations import activate
from usim.average import dense_ordered_sum, ordered_sum
from usim.plan import Planner, nonzero_columns, static_slots, written_slots
from usim.progress import track

# A position-only tier scored at run time (after a content tier) is tabulated up to this many scores.
STATIC_TABLE = 1 << 22


class Liveness:
    """Per slot, the positions whose entry the result depends on."""

    def __init__(self, length: int):
        self.length = length
        self.masks: dict[int, torch.Tensor] = {}

    def mark(self, slots, positions: torch.Tensor) -> None:
        positions = positions.reshape(-1)
        for s in (int(s) for s in slots):
            if s not in self.masks:
                self.masks[s] = torch.zeros(self.length, dtype=torch.bool)
            self.masks[s][positions] = True

    def positions(self, slots) -> torch.Tensor:
        """The sorted positions where any of the slots is live."""
        union = torch.zeros(self.length, dtype=torch.bool)
        for s in (int(s) for s in slots):
            if s in self.masks:
                union |= self.masks[s]
        return union.nonzero()[:, 0]

    def snapshot(self, slots) -> dict:
        return {int(s): self.masks[int(s)].clone() for s in slots if int(s) in self.masks}


class Entries:
    """The buffer layout: slot s's live positions, in order, at offsets base[s], base[s] + 1, ...

    ``offsets`` looks entries up in a per-slot table (L,) of offsets (the sink where dead), built
    from the live mask by one cumulative sum and kept for the few slots used last."""

    def __init__(self, liveness: Liveness, keep: int = 6):
        self.masks, self.base = liveness.masks, {}
        size = 0
        for s in sorted(self.masks):
            self.base[s] = size
            size += int(self.masks[s].sum())
        self.size = size  # offset ``size`` is the sink for dead writes, ``size + 1`` a constant 0
        self.zero = size + 1
        self.tables: dict = {}
        self.keep = keep

    def live_positions(self, slot: int) -> torch.Tensor:
        mask = self.masks.get(slot)
        return torch.zeros(0, dtype=torch.long) if mask is None else mask.nonzero()[:, 0]

    def table(self, slot: int) -> torch.Tensor:
        if slot not in self.tables:
            mask = self.masks[slot]
            rank = torch.cumsum(mask, 0, dtype=torch.int64).add_(self.base[slot] - 1)
            self.tables[slot] = rank.masked_fill_(~mask, self.size)  # int64: offsets can pass 2^31
            if len(self.tables) > self.keep:
                del self.tables[next(iter(self.tables))]
        return self.tables[slot]

    def offsets(self, slots, positions: torch.Tensor, reading: bool = True, valid=None) -> torch.Tensor:
        """(len(slots), *positions.shape) offsets of the entries; a dead entry is the sink, and
        where ``valid`` is False (the padding of a candidate table) the constant 0."""
        out = torch.full((len(slots), *positions.shape), self.size, dtype=torch.long)
        for i, s in enumerate(int(s) for s in slots):
            if s in self.masks:
                out[i] = self.table(s)[positions]
        if valid is not None:
            out[:, ~valid] = self.zero
        if reading and bool((out == self.size).any()):
            raise RuntimeError("usim.program: a read of an entry that is not live (a bug in the liveness pass)")
        return out


@dataclass
class HeadStep:
    kind: str  # "candidates" or "dense" (gather heads become moves or "gather" steps)
    value_read: torch.Tensor  # gather: (R, Q); candidates: (R, Q, K); dense: (R, L) flat offsets
    value_coef: torch.Tensor  # (J, R)
    out_coef: torch.Tensor  # (S, J)
    acc_write: torch.Tensor  # (S, Q) offsets into the layer's accumulator
    tiers: list  # per run-time tier (q_read (Rq, Q), q_coef (d_k, Rq), k_read, k_coef, table): table
    #              (Q, K) or (Q, L) holds the scores of a position-only tier instead
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
    size: int  # entries per sequence, the sink and the constant 0 included
    init: torch.Tensor  # (size,) the positional table at the live entries
    value_at: torch.Tensor  # (V,) offsets of the value slot ...
    value_pos: torch.Tensor  # (V,) ... at these positions
    steps: list
    out_pos: torch.Tensor  # (O,) positions whose output is computed (the others return the input)
    readout: torch.Tensor  # (O,) offsets read there

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
        out = seq.clone()
        out[:, self.out_pos] = buf[:, self.readout]
        return out


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
            keep = buf.new_ones(buf.shape[0], head.acc_write.shape[1], values.shape[-1])
        keep = keep.to(buf.dtype)
        count = keep.sum(dim=-1)[:, None]  # (B, 1, Q)
        if head.kind == "dense":
            mean = dense_ordered_sum(keep, values.transpose(-1, -2)).transpose(-1, -2) / count
        else:
            mean = ordered_sum(keep, values.permute(0, 2, 3, 1)).transpose(-1, -2) / count
    return einsum(head.out_coef, mean, "s j, b j q -> b s q")


def _ffn_slots(ffn):
    writes = ((ffn.w_out != 0).any(1) | (ffn.b_out != 0)).nonzero()[:, 0].cpu()
    return writes, nonzero_columns(ffn.w_in)


def _scored_tiers(attn, head: int, first: int) -> list:
    """(query read columns, key read columns, tier) of the run-time tiers that can score anything."""
    tiers = []
    for t in range(first, attn.tiers):
        if not ((attn.query[head, t] != 0).any(1) & (attn.key[head, t] != 0).any(1)).any():
            continue  # every score is 0 (a padding tier): it keeps every key
        tiers.append((nonzero_columns(attn.query[head, t]), nonzero_columns(attn.key[head, t]), t))
    return tiers


def _liveness(encoder, planner: Planner, frame):
    """The backward pass: per layer (in order) what runs where, and the live entries."""
    length = frame.length
    live = Liveness(length)
    value = encoder.slots.index("value")
    readout = frame.readout.cpu()
    passthrough = (readout == value) & ~written_slots(encoder)[value]  # the input token comes back
    out_pos = (~passthrough).nonzero()[:, 0]
    for s in readout[out_pos].unique():
        live.mark([s], out_pos[readout[out_pos] == s])
    needs = []
    for layer in track(list(reversed(encoder.layers)), desc="usim: planning heads (last layer first)"):
        entry = {}
        if layer.ffn is not None:
            writes, reads = _ffn_slots(layer.ffn)
            positions = live.positions(writes)
            if len(positions):
                live.mark(reads, positions)
                entry["ffn"] = (positions, reads, writes)
        if layer.attn is not None:
            a = layer.attn
            outs = [nonzero_columns(a.output[h].T) for h in range(a.heads)]
            after = live.snapshot(torch.cat(outs).unique())  # every head reads the stream before the layer
            heads = []
            for h in range(a.heads):
                union = torch.zeros(length, dtype=torch.bool)
                for s in outs[h].tolist():
                    if s in after:
                        union |= after[s]
                queries = union.nonzero()[:, 0]
                if not len(queries):
                    continue
                plan = planner.plan(a, h, queries)
                keys = torch.arange(length) if plan.kind == "dense" else plan.index  # (L,), (Q,) or (Q, K)
                used = keys if plan.valid is None else keys[plan.valid]  # not the padding of short rows
                vreads = nonzero_columns(a.value[h])
                live.mark(vreads, used)
                tiers = [] if plan.kind == "gather" else _scored_tiers(a, h, plan.first_dynamic)
                for qr, kr, _ in tiers:
                    live.mark(qr, queries)
                    live.mark(kr, used)
                heads.append((h, plan, keys, vreads, outs[h], tiers))
            if heads:
                entry["attn"] = heads
        needs.append(entry)
    return live, out_pos, list(reversed(needs))


def _attention_step(attn, heads, entries: Entries, static, positional) -> AttentionStep:
    writes = [entries.offsets(outs, plan.queries, reading=False) for h, plan, keys, vreads, outs, tiers in heads]
    written = torch.zeros(entries.size + 2, dtype=torch.bool)
    for w in writes:
        written[w.flatten()] = True
    acc_target = written.nonzero()[:, 0]  # each written entry once (dead ones: the sink)
    acc_index = torch.cumsum(written, 0) - 1
    del written
    head_steps, moves = [], []
    for (h, plan, keys, vreads, outs, tiers), write in zip(heads, writes):
        acc_write = acc_index[write]
        value_coef, out_coef = attn.value[h][:, vreads].double().cpu(), attn.output[h][outs].double().cpu()
        terms = (out_coef != 0) & (value_coef != 0).any(1)  # (S, J): slot s gets move j
        if plan.kind == "gather" and len(vreads) == 1 and bool((terms.sum(1) == 1).all()):
            read = entries.offsets(vreads, keys)[0]
            for s, j in terms.nonzero().tolist():
                moves.append((read, float(value_coef[j, 0]), float(out_coef[s, j]), acc_write[s]))
            continue
        tier_reads = []
        for qr, kr, t in tiers:
            q_coef, k_coef = attn.query[h, t][:, qr].double().cpu(), attn.key[h, t][:, kr].double().cpu()
            if static[qr].all() and static[kr].all() and keys.numel() * (1 if keys.dim() > 1 else len(plan.queries)) <= STATIC_TABLE:
                # scores from positions only (e.g. the position tie-break): exact, computed once
                q = positional(qr, plan.queries) @ q_coef.T  # (Q, d_k)
                k = positional(kr, keys.reshape(-1)).reshape(*keys.shape, -1) @ k_coef.T  # (Q, K, d_k) or (L, d_k)
                table = (q[:, None] * k).sum(-1) if plan.kind == "candidates" else q @ k.T
                tier_reads.append((None, None, None, None, table))
                continue
            tier_reads.append((entries.offsets(qr, plan.queries), q_coef, entries.offsets(kr, keys, valid=plan.valid),
                               k_coef, None))
        head_steps.append(HeadStep(
            kind=plan.kind, value_read=entries.offsets(vreads, keys, valid=plan.valid), value_coef=value_coef, out_coef=out_coef,
            acc_write=acc_write, tiers=tier_reads, valid=plan.valid if plan.kind == "candidates" else None))
    unit = all(c_v == 1 and c_o == 1 for _, c_v, c_o, _ in moves)
    read = torch.cat([m[0] for m in moves]) if moves else torch.zeros(0, dtype=torch.long)
    write = torch.cat([m[3] for m in moves]) if moves else torch.zeros(0, dtype=torch.long)
    if unit:  # plain copies: no coefficients to store
        value = out = torch.zeros(0, dtype=torch.float64)
    else:
        value = torch.cat([torch.full((len(m[0]),), m[1], dtype=torch.float64) for m in moves])
        out = torch.cat([torch.full((len(m[0]),), m[2], dtype=torch.float64) for m in moves])
    return AttentionStep(head_steps, acc_target, read, value, out, write, unit)


def _ffn_step(ffn, positions, reads, writes, entries: Entries) -> FFNStep:
    w_in = ffn.w_in[:, reads].double().cpu()
    read = entries.offsets(reads, positions).T  # (P, R)
    single = bool(((w_in != 0).sum(1) <= 1).all())
    if single:  # rows without a read get coefficient 0 on a live (finite) entry
        column = (w_in != 0).int().argmax(1)
        read, w_in = read[:, column], w_in[torch.arange(len(w_in)), column]
    return FFNStep(ffn.activation, read, single, w_in, ffn.b_in.double().cpu(), ffn.w_out[writes].double().cpu(),
                   ffn.b_out[writes].double().cpu(), entries.offsets(writes, positions, reading=False).T)


def compile_encoder(encoder, frame=None) -> Program:
    """The program of an encoder (see the module docstring), from its weights and the positions of
    ``frame`` (default: the encoder's own)."""
    frame = encoder if frame is None else frame
    planner = Planner(encoder, frame)
    live, out_pos, needs = _liveness(encoder, planner, frame)
    planner.memo.clear()  # the sorted key codes are planning's alone: free them before the buffer layout
    entries = Entries(live, keep=3)
    static = static_slots(encoder)
    column = planner.column

    def positional(slots, positions):  # (N, len(slots)) float64 values of static slots
        return torch.stack([planner.values(int(s), positions) for s in slots], dim=1).double()

    steps = []
    for layer, entry in track(list(zip(encoder.layers, needs)), desc="usim: compiling"):
        if "attn" in entry:
            steps.append(_attention_step(layer.attn, entry["attn"], entries, static, positional))
        if "ffn" in entry:
            steps.append(_ffn_step(layer.ffn, *entry["ffn"], entries))
    init = torch.zeros(entries.size + 2, dtype=torch.float64)
    for s in entries.masks:
        if s in column:
            positions = entries.live_positions(s)
            init[entries.base[s]: entries.base[s] + len(positions)] = planner.values(s, positions).double()
    value = encoder.slots.index("value")
    value_pos = entries.live_positions(value)
    readout = frame.readout.cpu()[out_pos]
    read = torch.full((len(out_pos),), entries.size, dtype=torch.long)
    for s in readout.unique().tolist():
        at = readout == s
        read[at] = entries.offsets([s], out_pos[at])[0]
    return Program(entries.size + 2, init, entries.offsets([value], value_pos)[0], value_pos, steps, out_pos, read)
