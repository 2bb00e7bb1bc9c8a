"""Two more pipeline stages for decoder layers: a norm with eps as an input, and rotary embeddings.

``DecoderPipeline`` is ``usim.ops.pipeline.Pipeline`` (read its docstring first) with two more
stage kinds, each writing a new block of its own (its home: slot ``tag + "out"``).

A *norm* stage, row-wise over a block z (n, E) into a block of its shape, is RMSNorm (Llama's:
z / sqrt(mean(z^2) + eps) * w) or, with a bias, LayerNorm (torch's: (z - mean) / sqrt(var + eps) *
w + b, biased variance). ``eps`` is an input block (1,): a head fetches it at every token (address
``ep.block``), so 1 / sqrt(. + eps) is finite everywhere and the weights hold no eps. Output token
(i, k) carries the address of its source (z, i, k) in ``na.*``, of w[k] in ``nw.block`` and of b[k]
in ``nb.block`` (with ``na.col``). These address slots are the norm's own (as the rope stage's): at
every other token they point at null, so the execution skips the stage's heads and products there
(the term tokens' addresses are the matmul stages' ``fa``, ``fb``):

    layer 1  heads: [mu = the mean of z's row i (averaging; LayerNorm only)], v = z[i, k], g = w[k],
             [c = b[k]], eps;  FFN bilinear: sq = (v - mu)^2, dg = (v - mu) * g   (mu = 0 for RMSNorm)
    layer 2  head: ms = the mean of sq over the token's own row (averaging);  FFN rsqrt: r = 1 / sqrt(ms + eps)
    layer 3  FFN bilinear: out = dg * r [+ c * 1]

A *rope* stage fills blocks of (rows, r) features, each from row segments of source blocks: rows
r0 <= j < r1 read source row j - r0 (with ``rotate``, the rotary embedding of that row, with cos
and sin rows j - r0 of the input blocks cos, sin (n, rot)); the rest copy (the cached keys and
values: one block of cached rows and new rows is how a KV cache enters the encoder). For a rotated
row, with h = rot / 2, HF's q * cos + rotate_half(q) * sin on the first rot features and a copy of
the rest (partial rotary):

    layer 1  heads: x = src[j', k] (ra), y = src[j', k + h] for k < h, src[j', k - h] for h <= k < rot
             (rb; null beyond), c = cos[j', k], s = sin[j', k] (``cs.block``, ``sn.block`` at
             ``ct.row``, ``ct.col``; null beyond rot);  FFN bilinear: t1 = x * c, t2 = y * s
    layer 2  FFN bilinear: out = t2 * sign + t1 * 1 + x * pass   (rope.sign, rope.pass)

with the positional slots rope.sign = -1 (k < h), +1 (h <= k < rot), 0 beyond, and rope.pass = 1 beyond rot
or on a copied row, 0 else: HF's rounding exactly (the sign flip and the zero terms are exact).
A source may live in ``value`` (an input) or in one matmul stage's output slot: one fetch head per
home, each reading 0 where the other's blocks lie.
"""

from __future__ import annotations

from dataclasses import dataclass

from usim.construct import FFN, ONE, Builder, Head, Unit, match
from usim.ops.pipeline import ADDRESS, MIXING, Pipeline


@dataclass(frozen=True)
class Rows:
    """Rows r0 <= j < r1 of a rope output read ``block`` row j - r0; ``rotate``: rotary embedding."""

    r0: int
    r1: int
    block: str
    rotate: bool


class DecoderPipeline(Pipeline):
    """``Pipeline`` with ``norm`` (RMSNorm / LayerNorm, eps an input) and ``rope`` stages."""

    def norm(self, tag: str, block: str, out: str, weight: str, eps: str, bias: str | None = None) -> str:
        """out = RMSNorm (bias None) or LayerNorm (with bias) of each row of ``block``; weight and
        bias input vectors (E,), eps an input block (1,). Returns the output slot."""
        shape = self.shape(block)
        if len(shape) != 2 or self.shape(out) != shape:
            raise ValueError(f"norm {tag!r}: {block!r} {shape} and {out!r} {self.shape(out)} must be matrices of "
                             "one shape")
        for name in (weight, bias) if bias is not None else (weight,):
            if name not in self.inputs or self.shape(name) != shape[1:]:
                raise ValueError(f"norm {tag!r}: {name!r} must be an input vector ({shape[1]},), got "
                                 f"{self.shape(name)}")
        if eps not in self.inputs or self.shape(eps) != (1,):
            raise ValueError(f"norm {tag!r}: eps {eps!r} must be an input block (1,)")
        self.home_at(block, tag)  # computed before it is read
        self._check_new(tag, out)
        self.stages.append(("norm", tag, (block, out, weight, bias, eps), None))
        self.home[out] = f"{tag}out"
        return f"{tag}out"

    def rope(self, tag: str, outputs: dict, rot: int = 0, cos: str = "cos", sin: str = "sin") -> str:
        """Fill each block of ``outputs`` (name -> list of ``Rows`` covering its rows once) with its
        rows' sources, rotated (first ``rot`` features, with input blocks cos and sin (n, rot)) or
        copied. Returns the output slot."""
        if rot % 2 or rot < 0:
            raise ValueError(f"rope {tag!r}: the rotary features must be an even number >= 0, got {rot}")
        for out, rows in outputs.items():
            n_rows, r = self.shape(out)
            if [(s.r0, s.r1) for s in rows] != list(zip([0] + [s.r1 for s in rows[:-1]], [s.r1 for s in rows])) or \
                    rows[-1].r1 != n_rows:
                raise ValueError(f"rope {tag!r}: rows {[(s.r0, s.r1) for s in rows]} must cover {out!r}'s "
                                 f"{n_rows} rows once, in order")
            for s in rows:
                src = self.shape(s.block)
                if src[1] != r or s.r1 - s.r0 > src[0]:
                    raise ValueError(f"rope {tag!r}: {s.block!r} {src} cannot fill rows {s.r0}..{s.r1} of {out!r} "
                                     f"{(n_rows, r)}")
                if s.rotate and (rot > r or self.shape(cos) != (src[0], rot) or self.shape(sin) != (src[0], rot)):
                    raise ValueError(f"rope {tag!r}: cos and sin must be ({src[0]}, {rot}) inputs, rot <= {r}")
                self.home_at(s.block, tag)
            self._check_new(tag, out)
        self.stages.append(("rope", tag, dict(outputs), (rot, cos, sin)))
        for out in outputs:
            self.home[out] = f"{tag}out"
        return f"{tag}out"

    # --- bookkeeping: the new kinds' outputs --------------------------------------------------
    def _new_outputs(self, before: str | None = None) -> dict:
        """block -> the tag of the norm / rope stage computing it (stages before ``before``)."""
        found = {}
        for kind, tag, items, _ in self.stages:
            if tag == before:
                break
            if kind == "norm":
                found[items[1]] = tag
            elif kind == "rope":
                found.update({out: tag for out in items})
        return found

    def home_at(self, block: str, tag: str) -> str:
        computed = self._new_outputs(before=tag)
        return f"{computed[block]}out" if block in computed else super().home_at(block, tag)

    def _check_new(self, tag: str, block: str) -> None:
        super()._check_new(tag, block)
        if block in self._new_outputs():
            raise ValueError(f"stage {tag!r}: block {block!r} is already computed by an earlier stage")

    def mixable(self, homes: list[str]) -> bool:
        """As Pipeline's, a norm's output counting as a layernorm's (0 at every token a fetch addresses
        but its own outputs); a rope output mixes with nothing."""
        norms = {f"{tag}out" for kind, tag, _, _ in self.stages if kind == "norm"}
        kinds = ["input" if h == "value" else "layernorm" if h in norms else
                 next((k for k, t, _, _ in self.stages if h == f"{t}out" and k in ("matmul", "layernorm")), h)
                 for h in homes]
        return len(homes) <= 1 or (len(set(kinds)) == len(kinds) and set(kinds) <= {"input", "matmul", "layernorm"})

    # --- addresses and layers ----------------------------------------------------------------
    def _more_addresses(self, addresses: dict, index: dict) -> None:
        null = index["null"]
        extra = {name: {} for name in ("ep.block", "na.block", "na.row", "na.col", "nw.block", "nb.block", "ra.block",
                                       "ra.row", "ra.col", "rb.block", "rb.row", "rb.col", "cs.block", "sn.block",
                                       "ct.row", "ct.col",
                                       "rope.sign", "rope.pass")}
        eps = {items[4] for kind, _, items, _ in self.stages if kind == "norm"}
        if len(eps) > 1:
            raise ValueError(f"the norm stages of one pipeline share one eps input, got {sorted(eps)}")
        for kind, tag, items, option in self.stages:
            if kind == "norm":
                block, out, weight, bias, _ = items
                at = index[out]
                for name, form in (("na.block", (index[block], (0, 0))), ("na.row", (0, (1, 0))),
                                   ("na.col", (0, (0, 1))), ("nw.block", (index[weight], (0, 0)))):
                    extra[name][at] = form
                if bias is not None:
                    extra["nb.block"][at] = (index[bias], (0, 0))
            elif kind == "rope":
                rot, cos, sin = option
                for out, rows in items.items():
                    _rope_pieces(extra, index, index[out], self.shape(out), rows, rot, index[cos] if
                                 cos in index else null, index[sin] if sin in index else null, null)
        if eps:  # every token fetches eps (so 1 / sqrt(ms + eps) is finite everywhere)
            at = index[eps.pop()]
            extra["ep.block"] = {i: (at, (0, 0)) for i in range(len(index))}
        for name, per_block in extra.items():
            if per_block:
                addresses[name] = per_block

    def _norm_layers(self, b: Builder, tag: str, items: tuple, option) -> None:
        block, out, weight, bias, _ = items
        src = self.home_at(block, tag)
        v, g, eps, sq, dg, ms, r, y = (b.slot(f"{tag}{s}") for s in ("v", "g", "eps", "sq", "dg", "ms", "r", "out"))
        heads = [Head([match({a: f"na.{a}" for a in ADDRESS})], [(src, v)], name=f"{tag}fetch"),
                 Head([match({"block": "nw.block", "col": "na.col"})], [("value", g)], name=f"{tag}weight"),
                 Head([match({"block": "ep.block"})], [("value", eps)], name=f"{tag}eps")]
        centred = {v: 1.0}
        if bias is not None:  # LayerNorm: subtract the row mean; the bias is one more unit of layer 3
            mu, c = b.slot(f"{tag}mean"), b.slot(f"{tag}c")
            heads += [Head([match({"block": "na.block", "row": "na.row"})], [(src, mu)], name=f"{tag}mean",
                           average=True),
                      Head([match({"block": "nb.block", "col": "na.col"})], [("value", c)],
                           name=f"{tag}bias")]
            centred = {v: 1.0, mu: -1.0}
        b.layer(heads, FFN("bilinear", [Unit(centred, sq, gate=centred), Unit(centred, dg, gate=g)]))
        b.layer([Head([match({"block": "block", "row": "row"})], [(sq, ms)], name=f"{tag}ms", average=True)],
                FFN("rsqrt", [Unit({ms: 1.0, eps: 1.0}, r)]))
        units = [Unit(dg, y, gate=r)] + ([Unit(c, y, gate=ONE)] if bias is not None else [])
        b.layer(ffn=FFN("bilinear", units))

    def _rope_layers(self, b: Builder, tag: str, items: dict, option) -> None:
        sources = sorted({self.home_at(s.block, tag) for rows in items.values() for s in rows})
        if not self.mixable(sources):
            raise ValueError(f"rope {tag!r}: sources of homes {sources}; {MIXING}")
        x, y, c, s, t1, t2, out = (b.slot(f"{tag}{name}") for name in ("x", "y", "c", "s", "t1", "t2", "out"))
        heads = []
        for side, slot in (("ra", x), ("rb", y)):
            heads += [Head([match({a: f"{side}.{a}" for a in ADDRESS})], [(src, slot)], name=f"{tag}{side} from {src}")
                      for src in sources]
        if option[0]:
            heads += [Head([match({"block": f"{which}.block", "row": "ct.row", "col": "ct.col"})], [("value", slot)],
                           name=f"{tag}{which}") for which, slot in (("cs", c), ("sn", s))]
        b.layer(heads, FFN("bilinear", [Unit(x, t1, gate=c), Unit(y, t2, gate=s)]))
        b.layer(ffn=FFN("bilinear", [Unit(t2, out, gate="rope.sign"), Unit(t1, out, gate=ONE), Unit(x, out, gate="rope.pass")]))


def _rope_pieces(extra: dict, index: dict, at: int, shape: tuple, rows: list, rot: int, cos: int,
                 sin: int, null: int) -> None:
    """The address pieces (lo, hi, const, coefs over (j, k)) of one rope output block."""
    r = shape[1]
    half = rot // 2
    pieces: dict = {name: [] for name in ("ra.block", "ra.row", "ra.col", "rb.block", "rb.row", "rb.col", "cs.block",
                                          "sn.block", "ct.row", "ct.col", "rope.sign", "rope.pass")}
    for seg in rows:
        src = index[seg.block]

        def put(name, c0, c1, const, coef=(0, 0)):
            if c0 < c1:
                pieces[name].append(((seg.r0, c0), (seg.r1, c1), const, coef))

        put("ra.block", 0, r, src)
        put("ra.row", 0, r, -seg.r0, (1, 0))
        put("ra.col", 0, r, 0, (0, 1))
        turn = half if seg.rotate else 0
        for c0, c1, shift, sign in ((0, turn, turn, -1), (turn, 2 * turn, -turn, 1)):
            put("rb.block", c0, c1, src)
            put("rb.row", c0, c1, -seg.r0, (1, 0))
            put("rb.col", c0, c1, shift, (0, 1))
            put("cs.block", c0, c1, cos)
            put("sn.block", c0, c1, sin)
            put("ct.row", c0, c1, -seg.r0, (1, 0))
            put("ct.col", c0, c1, 0, (0, 1))
            put("rope.sign", c0, c1, sign)
        for name in ("rb.block", "cs.block", "sn.block"):
            put(name, 2 * turn, r, null)
        put("rope.pass", 2 * turn, r, 1)
    for name, forms in pieces.items():
        extra[name][at] = forms
