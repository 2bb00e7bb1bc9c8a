"""Emitting each RASP node as slots, heads and FFN units (Tracr's ``expr_to_craft_graph``).

Every construct is exact (see ``usim.rasp.encode`` for the representations):

* tokens (categorical): relu triangles of the integer code, relu(c-k+1) - 2 relu(c-k) + relu(c-k-1),
  exactly 1 at code k; indices and length: positional one-hot slots (or one scalar slot);
* a Map or SequenceMap of categorical inputs only regroups one-hot Exprs (no layer) or multiplies
  one-hot pairs (one bilinear layer: each product is 0 or 1); numerical x*y is one bilinear unit,
  affine maps are Exprs, a numerical Map with a ``Function`` is its declared activation;
* reading a numerical SOp as categorical (a Map of it, a Select on it) splits its finite value set
  where the result changes: per threshold t between neighbours a < b, u = relu(s (t - x)) with
  s = 4 / (b - a), then relu(1 - u) is exactly 1 above t and exactly 0 below (margins of 2
  against rounding; values too close for the dtype are a ValueError);
* Select: a score of 0/1 products of the key's and the query's one-hots (an AND sums them), BOS
  scoring top - 1/2, so a query keeps exactly its selected keys, or BOS alone;
* Aggregate: that head averaging the values (the exact mean of any reals, any number of keys);
* SelectorWidth: the same head with BOS always kept, averaging the BOS flag: 1 / (w + 1), split
  into w = 0..max_seq_len by thresholds as above;
* an SOp of positions and length only is positional one-hot slots (its values per length are known
  when the weights are built), and an Aggregate over a Select of such SOps a static ``match``
  (``usim.rasp.emit_nodes``).

``Emitter`` holds the builder, the value sets and each node's value; ``usim.rasp.emit_nodes`` has
one function per node type.
"""

from __future__ import annotations

import re

import torch

from usim.construct import ONE, Unit
from usim.rasp.emit_nodes import emit_node
from usim.rasp.encode import BOS, REAL, Cat, Num, Sel, add, is_number, ordered, times
from usim.rasp.schedule import Copy, Heads, Schedule, Units
from usim.rasp.compiled import positional_pieces


class Emitter:
    def __init__(self, b, vocab, sets, lowered, max_seq_len, causal, raw, dtype):
        self.b, self.vocab, self.sets, self.lowered = b, vocab, sets, lowered
        self.n, self.causal, self.raw, self.dtype = max_seq_len, causal, raw, dtype
        self.values, self.schedule, self.log, self.memo, self.pending = {}, Schedule(), [], {}, {}
        self.positional = {"one": ["one", 0], "position": ["position", 0]}
        self.pos(BOS, "bos")
        self.pos(REAL, "real")

    # --- slots -------------------------------------------------------------------------------
    def pos(self, name: str, kind: str, param=0) -> str:
        if name not in self.positional:
            pieces = positional_pieces(kind, param, self.n)
            square = kind == "affine"  # an affine feature is matched on: with its square (usim.construct.match)
            self.b.positional_affine(name, lambda block, i: pieces.get(i, []), square=square)
            self.positional[name] = [kind, param]
            if square:
                self.positional[name + "^2"] = ["affine^2", param]
        return name

    def pos_later(self, name: str, kind: str, param) -> str:
        """A positional slot made only if a layer or the readout reads it (``register_read``)."""
        self.pending[name] = (kind, param)
        return name

    def register_read(self, readout: dict) -> None:
        """Make the pending positional slots that the placed heads, units or the readout read."""
        names = set(readout)
        for stage in self.schedule.stages:
            for head in stage.heads:
                names |= {n for tier in head.tiers for q, k in tier for n in list(q) + list(k)}
                names |= {n for src, _ in head.moves for n in src}
            for unit in stage.units:
                names |= {n for e in (unit.inp, unit.gate) if isinstance(e, dict) for n in e}
            names |= {n for c in stage.copies for n in c.expr}
        for name in sorted(names & set(self.pending)):
            self.pos(name, *self.pending.pop(name))

    def slot(self, e, what: str) -> str:
        return self.b.slot(f"{e.name}#{e.id}.{what}")

    def place(self, ready: int, steps: list, e) -> int:
        last, used = self.schedule.place(ready, steps)
        heads = sum(len(s.heads) for s in steps if isinstance(s, Heads))
        self.log.append((e, used, heads))
        return last

    def rows(self, layer_of: list) -> list:
        rows = {}
        for e, used, heads in self.log:
            row = rows.setdefault(e.id, [e.name, type(e).__name__, getattr(e, "encoding", "selector"), [], 0, 0])
            row[3] += [layer_of[s] for s in used if layer_of[s] is not None]
            row[4] += heads
        for name in self.b.slots:
            digits = re.match(r"\d+", name.split("#")[-1]) if "#" in name else None
            if digits and int(digits.group()) in rows:
                rows[int(digits.group())][5] += 1
        return [[r[0], r[1], r[2], sorted(set(r[3])), r[4], r[5]] for r in rows.values()]

    # --- conversions -------------------------------------------------------------------------
    def cat(self, x, e, values) -> Cat:
        """x as categorical (values: its value set, for a Num)."""
        if isinstance(x, Cat):
            return x
        if values is None:
            raise ValueError(f"{type(e).__name__} {e.name!r} reads a numerical SOp with an unbounded value set "
                             f"as categorical (a finite vocab makes it finite)")
        return self.categorize(x, ordered(values), lambda v: v, e)

    def num(self, x, e) -> Num:
        if isinstance(x, Num):
            return x
        bad = [v for v in x.values if not is_number(v)]
        if bad:
            raise ValueError(f"{type(e).__name__} {e.name!r} reads a categorical SOp with non-numeric values "
                             f"{bad[:3]} as a number")
        pairs = list(zip(x.values, x.exprs))
        return Num(add(*[times(ex, float(v)) for v, ex in pairs]), x.ready, pairs)

    def categorize(self, x: Num, values: list, label, e) -> Cat:
        """One-hot Exprs of label(x) over x's finite value set."""
        labels = [label(v) for v in values]
        out = ordered(labels)
        if x.onehot is not None:
            groups = {}
            for v, ex in x.onehot:
                lab = label(v)
                if lab is not None:
                    groups[lab] = add(groups.get(lab, {}), ex)
            return Cat(out, [groups.get(v, {}) for v in out], x.ready)
        xs = sorted(values)
        runs = [[xs[0]]]
        for v in xs[1:]:
            if label(v) == label(runs[-1][-1]):
                runs[-1].append(v)
            else:
                runs.append([v])
        if len(runs) == 1:
            lab = label(xs[0])
            return Cat(out, [{REAL: 1.0} if v == lab else {} for v in out], x.ready)
        eps = torch.finfo(self.dtype).eps
        self.splits = getattr(self, "splits", 0) + 1
        tag = f"split{self.splits}."
        u_slots = [self.slot(e, tag + "u0")]
        first = [Unit({BOS: 1.0}, u_slots[0])]
        for r in range(1, len(runs)):
            a, c = runs[r - 1][-1], runs[r][0]
            if not (c - a) > 64 * eps * max(abs(a), abs(c)):
                raise ValueError(f"{type(e).__name__} {e.name!r}: the values {a!r} and {c!r} of its input are too "
                                 f"close to tell apart in {str(self.dtype).replace('torch.', '')}")
            s, t = 4.0 / (c - a), (a + c) / 2
            u = self.slot(e, f"{tag}u{r}")
            u_slots.append(u)
            first.append(Unit(add({ONE: s * t, BOS: 2.0 + abs(s * t)}, times(x.expr, -s)), u))
        ind = [self.slot(e, f"{tag}is{r}") for r in range(len(runs))]
        second = []
        for r, u in enumerate(u_slots):
            out_r = {ind[r]: 1.0}
            if r > 0:
                out_r[ind[r - 1]] = -1.0
            second.append(Unit({ONE: 1.0, u: -1.0}, out_r))
        ready = self.place(x.ready, [Units("relu", first), Units("relu", second)], e)
        groups = {}
        for r, run in enumerate(runs):
            lab = label(run[0])
            if lab is not None:
                groups[lab] = add(groups.get(lab, {}), {ind[r]: 1.0})
        return Cat(out, [groups.get(v, {}) for v in out], ready)

    # --- nodes -------------------------------------------------------------------------------
    def emit(self, e) -> None:
        self.values[e.id] = emit_node(self, e)

    def selection(self, selector) -> Sel:
        sels = [self.values[s.id] for s in self.lowered[selector.id]]
        return Sel([t for s in sels for t in s.terms], sum(s.top for s in sels), max(s.ready for s in sels))

    def tiers(self, sel: Sel, bos_score: float) -> list:
        tiers = []
        if self.causal:
            tiers.append([({self.pos(f"after={i}", "after", i): 1.0}, {self.pos(f"indices={i}", "index=", i): 1.0})
                          for i in range(self.n)] + [({REAL: 1.0}, {BOS: 1.0})])
        tiers.append(sel.terms + [({ONE: bos_score}, {BOS: 1.0})])
        return tiers

    def readout(self, program) -> dict:
        x = self.values[program.id]
        if isinstance(x, Cat):
            expr = add(*[times(ex, float(i + 1)) for i, ex in enumerate(x.exprs)])
            output = {"encoding": "categorical", "values": x.values}
        else:
            expr, output = x.expr, {"encoding": "numerical"}
        positional = set(self.positional) | set(self.pending)
        if len(expr) == 1 and next(iter(expr.values())) == 1.0 and next(iter(expr)) not in positional:
            return {"slot": next(iter(expr)), "output": output}
        out = self.b.slot("result")
        if not any(s in positional for s in expr) and self.schedule.fuse(expr, out, integral="values" in output) is not None:
            return {"slot": out, "output": output}
        self.place(x.ready, [Copy(expr, out)], program)
        return {"slot": out, "output": output, "reads": expr}

