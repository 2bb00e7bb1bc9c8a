"""Head plans: which keys each query of a head keeps, found once from the weights and positions.

The dense reference scores every query against every key: O(L^2) per head. But most score tiers
read only *static* slots: slots that only the positional table sets and no layer writes (block,
row, col, position, addresses, ...). Which keys survive those tiers depends on the layout alone,
not on the data, so it is worked out once per encoder and kept as a ``HeadPlan``:

* ``gather``: one key per query (every tier static, no averaging): the head is a gather;
* ``candidates``: the static tiers leave each query a few candidate keys (say, the entries of its
  row); the remaining (content) tiers are scored at run time over those candidates only;
* ``dense``: the static tiers leave too many candidates: the head runs as in the reference.

Data structures. ``Planner`` holds the encoder's positional table (L, P) and a memo of key-side
work shared by heads. A head is planned for a given set of queries (the live ones, or all L) as a
list of (query, key) *pairs*, sorted by query, refined tier by tier:

* a run of leading ``match`` tiers (score -|k - e|^2, see ``usim.construct.match``) is one exact
  join: every key's features are encoded as one integer and sorted once (memoised by the tier's
  definition, so heads that differ only in their query-side constants share it), and each query
  finds its equal keys by binary search: O((Q + L) log L), never Q x L;
* a query with no exactly equal key (a token outside the block a head targets) is scored against
  all keys instead, in chunks, tier by tier, as the reference does;
* later static tiers (e.g. the position tie-break) are scored over the pairs: keys below the
  best score of their query are dropped.

Every static score is an exact small integer (positional features are small integers), so the
plan keeps exactly the keys the dense reference keeps, and a kept set of one key copies its value
bitwise. At run time the content tiers are the same products of the same stream values as in the
dense scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A head whose static tiers keep more than MAX_PAIRS (query, key) pairs, or leave some query more
# than MAX_CANDIDATES keys (or more than L / 4), runs dense. Unmatched queries are scored against
# all keys SCORE_CHUNK scores at a time.
MAX_PAIRS = 50_000_000
MAX_CANDIDATES = 4096
SCORE_CHUNK = 1 << 22
# Unique match codes below this range are looked up in a direct table (int32 entries).
DIRECT_TABLE = 1 << 27


@dataclass
class HeadPlan:
    kind: str  # "gather", "candidates" or "dense"
    queries: torch.Tensor  # (Q,) the planned query positions, sorted
    index: torch.Tensor | None = None  # gather: (Q,) key of each query; candidates: (Q, K) keys
    valid: torch.Tensor | None = None  # candidates: (Q, K) bool, False on padding
    first_dynamic: int = 0  # candidates: the first tier scored at run time

    def to(self, device) -> "HeadPlan":
        move = (lambda t: None if t is None else t.to(device))
        return HeadPlan(self.kind, move(self.queries), move(self.index), move(self.valid), self.first_dynamic)


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


def nonzero_columns(w: torch.Tensor) -> torch.Tensor:
    """The stream columns a (..., W) read or write matrix uses."""
    return (w.reshape(-1, w.shape[-1]) != 0).any(0).nonzero()[:, 0].cpu()


def _group_by(pair_query: torch.Tensor, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count per query, start of each query's run) for pairs sorted by query."""
    count = torch.bincount(pair_query, minlength=queries)
    return count, torch.cumsum(count, 0) - count


def _keep_best(pair_query, pair_key, score, queries: int):
    """The pairs whose score is their query's maximum (ties all kept)."""
    best = torch.full((queries,), float("-inf"), dtype=score.dtype).scatter_reduce(0, pair_query, score, "amax")
    kept = score == best[pair_query]
    return pair_query[kept], pair_key[kept]


class Planner:
    """Plans the heads of one encoder (see the module docstring); ``plan(attn, head, queries)``."""

    def __init__(self, encoder, frame=None):
        frame = encoder if frame is None else frame  # the per-size facts (usim.engine.Frame)
        self.length = frame.length
        self.static = static_slots(encoder)
        self.positional = frame.positional.cpu()  # (P, L) small integers, a row per positional slot
        self.column = {int(s): i for i, s in enumerate(frame.positional_slots.cpu())}
        self.memo: dict = {}

    def values(self, slot: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The positional values of a slot (int) at positions (all L if None); 0 if not positional."""
        if slot not in self.column:
            return torch.zeros(self.length if positions is None else len(positions), dtype=torch.int32)
        row = self.positional[self.column[slot]]
        return row if positions is None else row[positions]

    # --- static features -----------------------------------------------------------------
    def features(self, w: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(N, d_k) float64: the exact static features w (d_k, W) reads at positions (all L if None)."""
        n = self.length if positions is None else len(positions)
        columns = [self.feature(w[j], positions) for j in range(w.shape[0])]
        return torch.stack([c.double() for c in columns], dim=1) if columns else torch.zeros(n, 0, dtype=torch.float64)

    def feature(self, w: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) one static feature: sum of w[slot] * the slot's positional value, exact: in int64
        when the coefficients are integers (constructions use small ones), else in float64."""
        n = self.length if positions is None else len(positions)
        used = [int(c) for c in nonzero_columns(w[None]) if int(c) in self.column]
        coefs = [float(w[c]) for c in used]
        integral = all(c == int(c) for c in coefs)
        total = torch.zeros(n, dtype=torch.int64 if integral else torch.float64)
        for c, coef in zip(used, coefs):
            values = self.values(c, positions)
            total += values.long() * int(coef) if integral else values.double() * coef
        return total

    # --- the join of leading match tiers -------------------------------------------------
    def _match_columns(self, qw: torch.Tensor, kw: torch.Tensor, queries: torch.Tensor):
        """The target rows if the tier is a ``match`` (a query row of -1s against the keys' sum of
        squares of the other rows), else None."""
        name = ("match", _definition(kw))
        if name not in self.memo:  # the key side: a row equal to the sum of squares of the others
            def squares(positions, c):
                rows = [self.feature(kw[i], positions) for i in range(kw.shape[0])]
                total = sum((r * r for i, r in enumerate(rows) if i != c), torch.zeros_like(rows[c]))
                return torch.equal(rows[c], total) if rows[c].dtype == total.dtype else \
                    torch.equal(rows[c].double(), total.double())
            sample = torch.randint(self.length, (min(self.length, 256),))
            columns = [c for c in range(kw.shape[0]) if squares(sample, c)]  # cheap first look
            self.memo[name] = [c for c in columns if squares(None, c)]
        for c in self.memo[name]:
            if bool((self.feature(qw[c], queries) == -1).all()):
                return [i for i in range(qw.shape[0]) if i != c]
        return None

    def _sorted_codes(self, key_rows: list) -> tuple:
        """Every key's match features as one int64 code, sorted: (sorted codes, positions, lo, radix,
        whether every code is unique); None when the features do not fit one code."""
        name = ("codes", tuple(_definition(w[None]) for w in key_rows))
        if name not in self.memo:
            code, lo, radix = torch.zeros(self.length, dtype=torch.long), [], []
            for w in key_rows:
                values = self.feature(w)
                if values.is_floating_point() and not bool((values == values.round()).all()):
                    self.memo[name] = None
                    return None
                low, high = int(values.min()), int(values.max())
                lo.append(low)
                radix.append(high - low + 1)
                if float(torch.tensor(radix, dtype=torch.float64).prod()) > 2.0 ** 62:
                    self.memo[name] = None  # too many distinct features for one int64 code
                    return None
                code = code * radix[-1] + (values.long() - low)
            sorted_codes, order = torch.sort(code, stable=True)
            unique = bool((sorted_codes[1:] != sorted_codes[:-1]).all())
            span = int(sorted_codes[-1]) + 1 if len(sorted_codes) else 0
            where = None
            if unique and span <= DIRECT_TABLE:  # code -> key position by one gather, not a binary search
                where = torch.full((span + 1,), -1, dtype=torch.int32 if self.length < 2 ** 31 else torch.long)
                where[sorted_codes] = order.to(where.dtype)
            self.memo[name] = (sorted_codes, order, lo, radix, unique, where)
        return self.memo[name]

    def _join(self, tiers, queries):
        """(found (Q,) bool, pair_query, pair_key) for queries with keys equal to their targets in
        every tier of ``tiers`` [(qw, kw, target rows)]; None when no single code fits."""
        table = self._sorted_codes([kw[c] for _, kw, cols in tiers for c in cols])
        if table is None:
            return None
        sorted_codes, order, lo, radix, unique, where = table
        code = torch.zeros(len(queries), dtype=torch.long)
        inside = torch.ones(len(queries), dtype=torch.bool)
        for (qw, c), low, size in zip([(qw, c) for qw, _, cols in tiers for c in cols], lo, radix):
            twice = self.feature(qw[c], queries)  # the match score is 2 target . key - |key|^2
            if twice.is_floating_point():
                inside &= twice == twice.round()
                twice = twice.round().long()
            target = torch.div(twice, 2, rounding_mode="floor")
            inside &= (twice % 2 == 0) & (target >= low) & (target < low + size)
            code = code * size + (target - low).clamp_(0, size - 1)
        code[~inside] = -1
        if where is not None:  # unique codes, small range: a direct table
            code[code >= len(where) - 1] = -1  # past the largest key code: no key
            key = where[code]  # -1 reads the table's last entry: -1
            found = key >= 0
            return found, found.nonzero()[:, 0], key[found].long()
        first = torch.searchsorted(sorted_codes, code)
        if unique:  # at most one key per code: found or not
            hits = (sorted_codes[first.clamp(max=len(sorted_codes) - 1)] == code).long()
        else:
            hits = torch.searchsorted(sorted_codes, code, right=True) - first
        hits[~inside] = 0
        pair_query = torch.repeat_interleave(torch.arange(len(queries)), hits)
        start = torch.cumsum(hits, 0) - hits
        pair_key = order[first[pair_query] + torch.arange(len(pair_query)) - start[pair_query]]
        return hits > 0, pair_query, pair_key

    # --- scoring -------------------------------------------------------------------------
    def _score_all(self, qf: torch.Tensor, kf: torch.Tensor):
        """Pairs (query, key) of the best keys of each query among all L keys, scored in chunks."""
        rows = max(1, SCORE_CHUNK // max(1, kf.shape[0]))
        pair_query, pair_key = [], []
        for first in range(0, qf.shape[0], rows):
            score = qf[first: first + rows] @ kf.T  # exact small integers
            best = score == score.amax(1, keepdim=True)
            q, k = best.nonzero(as_tuple=True)
            pair_query.append(q + first)
            pair_key.append(k)
        empty = torch.zeros(0, dtype=torch.long)
        return torch.cat(pair_query) if pair_query else empty, torch.cat(pair_key) if pair_key else empty

    def _pair_scores(self, qw, kw, query_positions, key_positions) -> torch.Tensor:
        """The static scores of (query, key) pairs, exact."""
        return (self.features(qw, query_positions) * self.features(kw, key_positions)).sum(1)

    def plan(self, attn, head: int, queries: torch.Tensor | None = None) -> HeadPlan:
        """The plan of one head of a HardAttention module at the given query positions (all L if None)."""
        queries = torch.arange(self.length) if queries is None else queries.cpu()
        qw_all, kw_all = attn.query[head].cpu(), attn.key[head].cpu()  # (T, d_k, W)
        tiers = qw_all.shape[0]
        first_dynamic = tiers
        for t in range(tiers):
            reads = torch.zeros_like(self.static)
            reads[nonzero_columns(qw_all[t])] = True
            reads[nonzero_columns(kw_all[t])] = True
            if (reads & ~self.static).any():
                first_dynamic = t
                break
        n = len(queries)
        # (query w, key w) of the static tiers that can score anything
        static = [(qw_all[t], kw_all[t]) for t in range(first_dynamic)
                  if ((qw_all[t] != 0).any(1) & (kw_all[t] != 0).any(1)).any()]
        matches = []
        for qw, kw in static:
            cols = self._match_columns(qw, kw, queries) if n else None
            if cols is None:
                break
            matches.append((qw, kw, cols))
        joined = self._join(matches, queries) if matches else None
        if joined is None:
            found = torch.zeros(n, dtype=torch.bool)
            pair_query, pair_key, rest = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0
        else:
            found, pair_query, pair_key = joined
            rest = len(matches)
        # queries without an exact match: every static tier scored over all keys, as the reference
        missing = (~found).nonzero()[:, 0]
        if len(missing):
            if not static:  # no static tier: every key is a candidate, as many as a dense row
                return HeadPlan("dense", queries)
            if len(missing) * self.length > MAX_PAIRS * 8:
                return HeadPlan("dense", queries)
            qw, kw = static[0]
            mq, mk = self._score_all(self.features(qw, queries[missing]), self.features(kw))
            mq = missing[mq]
            for qw, kw in static[1:rest]:
                mq, mk = _keep_best(mq, mk, self._pair_scores(qw, kw, queries[mq], mk), n)
            pair_query, pair_key = torch.cat([pair_query, mq]), torch.cat([pair_key, mk])
            order = torch.argsort(pair_query, stable=True)
            pair_query, pair_key = pair_query[order], pair_key[order]
        if len(pair_key) > MAX_PAIRS:
            return HeadPlan("dense", queries)
        count, start = _group_by(pair_query, n)
        for qw, kw in static[rest:]:
            if bool((count <= 1).all()):
                break  # a single candidate is always its own best
            pair_query, pair_key = _keep_best(pair_query, pair_key,
                                              self._pair_scores(qw, kw, queries[pair_query], pair_key), n)
            count, start = _group_by(pair_query, n)
        if first_dynamic == tiers and bool((count == 1).all()):
            return HeadPlan("gather", queries, index=pair_key)
        width = int(count.max()) if n else 0
        if width > MAX_CANDIDATES or 4 * width > self.length:  # K keys per query cost more than a dense row
            return HeadPlan("dense", queries)
        slot = torch.arange(len(pair_query)) - start[pair_query]
        index = torch.zeros(n, width, dtype=torch.long)
        valid = torch.zeros(n, width, dtype=torch.bool)
        index[pair_query, slot] = pair_key
        valid[pair_query, slot] = True
        return HeadPlan("candidates", queries, index=index, valid=valid, first_dynamic=first_dynamic)


def _definition(w: torch.Tensor) -> bytes:
    """The identity of a read matrix: its used columns and their coefficients."""
    used = nonzero_columns(w)
    return used.numpy().tobytes() + w[:, used].double().cpu().numpy().tobytes()


def plan_encoder(encoder, frame=None) -> list[list[HeadPlan] | None]:
    """Per layer, the plan of each attention head at every query (None for a layer without attention),
    at the sizes of ``frame`` (default: the encoder's own)."""
    planner = Planner(encoder, frame)
    return [None if layer.attn is None else [planner.plan(layer.attn, h) for h in range(layer.attn.heads)]
            for layer in encoder.layers]
