"""Matrix pipelines with one token per product term: a narrow stream whatever the sizes.

``matmul_layers`` (usim/ops/matmul.py) fetches the m terms of an inner product into m slots of the
output token: the stream width and the head count grow with the matrices. Here every term of every
product is a token of its own, so the stream and the heads stay the same for any size and only
the sequence grows; the weights are small and dense again.

A product out = sum_t left_t * right_t, out of shape (n, p) with T terms, gets a scratch *term
block* (n, p, T). Term token (i, k, t) carries, as positional slots, the *addresses* of its two
operands, (block, row, col) each: ``fa.*`` for the left one and ``fb.*`` for the right one. Output
token (i, k) carries the address of its terms, ``rd.* = (term block, i, k)``. A matmul stage of any
number of products is two layers (three with an activation):

    layer 1  fetch heads: key (block, row, col) == the query's fa (resp. fb): copy the operand's
             slot into slot a (resp. b);  FFN bilinear: term = a * b (one rounding, as in torch)
    layer 2  reduce head (averaging): keys (block, row, col) == the query's rd, i.e. the T terms of
             (i, k): their mean, summed in key order;  FFN bilinear: out = terms * mean (+ addend * 1)
    layer 3  (relu and the other activations only) FFN: out = act(the sum of layer 2)

The sizes are never weights: T is the positional feature ``terms`` of the output token (the term
count of its stage), so one set of weights serves every size (a constant T in a weight would not).

Every other token's addresses point at ``null``, a scratch token whose addresses point at itself:
every slot a matmul stage writes is 0 there, so a token that takes no part in a stage reads zeros.
Every operand lives in one slot of its block, its *home*: ``value`` for input blocks, the stage's
output slot for its outputs, ``p`` for softmax outputs. One side of a stage may read operands of
two homes: ``value`` and one matmul output slot, since each is exactly 0 where the other lives
(an input block is 0 in every stage output slot, an intermediate block is 0 in ``value``).

A softmax stage, row-wise over blocks of m columns (Lemma 3, as in usim/ops/softmax.py), is four
layers: the row maximum by attention then exp(s - max); the row mean of e (averaging head) then
total = keys * mean (``keys``: the positional feature m at the softmax tokens, 1 elsewhere); then
r = 1 / total; then p = e * r. With a key mask (a block of m flags, 1 = the key is ignored),
a head in the first layer of the pipeline copies the flag of its column into ``drop`` at the
softmax blocks' tokens (address ``kp.*``) and the 0 of ``null`` everywhere else, so every row
elsewhere keeps a key. A masked key's weight is then exactly 0 whatever the scores (huge, +-inf; the
kept scores as low as the dtype allows), and no step compares a score with a constant:

    layer 1  head: max = the largest kept score of the row, full = that key's flag (1 only in a row
             whose every key is masked); FFN relu: under = relu(max - s) (max - s for a kept key,
             one rounding, as torch's s - max; 0 or +inf where max - s overflows)
    layer 2  FFN exp: e = exp(-under - MASKED * drop): a sum of two non-positive numbers, so no
             cancellation: exp(s - max) for a kept key, exactly 0 for a masked one
    layers 3-5  as above, with r = 1 / (total + full): a fully masked row has e = 0, r = 1

so masked keys get weight exactly 0 and a row whose every key is masked gets weights 0 (torch's
scaled_dot_product_attention does the same), with finite gradients. A masked key's NaN score makes
its row NaN (as an additive mask does in torch). The heads select per row, never per entry, so the
stage costs O(n m) per block. Five layers.

A layernorm stage, row-wise over a block z (n, E) into a new block of its shape (torch's LayerNorm:
biased variance, eps inside the root), is three layers. Output token (i, k) carries the address of
its source entry (z, i, k) in ``fa.*``, of gamma[k] in ``fb.*`` (row 0, col k) and of beta[k] in
``lb.block`` (with ``fb.row``, ``fb.col``); every token carries the index of the eps input block
(one token) in ``ep.<block>``:

    layer 1  heads: the mean mu of z's row i (averaging head, keys (block, row) == (fa.block, fa.row));
             v = z[i, k]; g = gamma[k]; c = beta[k]; eps (an input, not a weight)
             FFN bilinear: sq = (v - mu)^2, dg = (v - mu) * g
    layer 2  head: var = the mean of sq over the token's own row (averaging);  FFN rsqrt: r = 1 / sqrt(var + eps)
    layer 3  FFN bilinear: out = dg * r + c * 1

At every other token but the term tokens (whose operand addresses point elsewhere, and whose
layernorm slots are never read) these addresses point at null, so the output slot is 0 there.

One side of a matmul stage (or its addends) may read operands of several homes when at every token
a fetch can address (never a term token) at most one of those slots is nonzero: ``value`` is 0 at
every token but the input blocks'; a matmul stage's output slot is 0 at every token but the matmul
outputs' (elsewhere ``rd`` and ``ad`` point at null); a layernorm's output slot is 0 at every token
but the layernorm outputs' and the term tokens. So a fetch may mix ``value``, one matmul output slot
and one layernorm output slot; not two of a kind, nor a softmax's weights (computed at every token).
Each block is computed by one stage only.

All scores are exact small integers (block indices and coordinates), never raw positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from usim.activations import ZERO_AT_ZERO
from usim.construct import FFN, ONE, Builder, Head, Unit, match, maximize
from usim.layout import Layout
from usim.progress import track

ADDRESS = ("block", "row", "col")
# exp(-u - MASKED) is 0 for every u >= 0 in float32 and float64 (the exponent is never compared with
# a score: a masked key's weight is 0 whatever the scores are)
MASKED = 1e30
MIXING = "a fetch may mix only 'value', one matmul output and one layernorm output"


@dataclass
class Product:
    """out (n, p) = sum over t < terms of left(i, k, t) * right(i, k, t).

    left and right are ``Operand``s: where term (i, k, t) reads each factor, in closed form."""

    out: str
    terms: int
    left: "Operand"
    right: "Operand"
    addend: str | None = None  # a block of out's shape added to the result (a score bias, a residual)


class Pipeline:
    """Declare input/output blocks and stages, then ``build()`` the builder with every layer."""

    def __init__(self, inputs: dict, outputs: dict):
        self.inputs, self.outputs = dict(inputs), dict(outputs)
        self.scratch: dict = {"null": (1,)}
        self.home = {name: "value" for name in self.inputs}
        self.stages: list = []
        self.scales: dict = {}  # softmax tag -> the blocks multiplying its weights

    def shape(self, block: str) -> tuple:
        for blocks in (self.inputs, self.outputs, self.scratch):
            if block in blocks:
                return tuple(blocks[block])
        raise ValueError(f"no block {block!r}")

    def block(self, name: str, shape) -> str:
        """A scratch block for an intermediate matrix (unless it is an output)."""
        if name not in self.outputs:
            self.scratch[name] = tuple(shape)
        return name

    def matmul(self, tag: str, products: list[Product], activation: str = "identity") -> str:
        """A stage computing every product (each into its out block) in two layers; returns the
        stage's output slot. A product with fewer terms than the stage's most gets zero terms (both
        operands read at ``null``), so every output averages the same number of terms."""
        if activation not in ZERO_AT_ZERO:
            raise ValueError(f"stage {tag!r}: activation must map 0 to 0 (one of {ZERO_AT_ZERO}), got {activation!r}")
        out = f"{tag}out"
        terms = max(p.terms for p in products)
        for p in products:
            if len(self.shape(p.out)) != 2:
                raise ValueError(f"stage {tag!r}: output block {p.out!r} must be a matrix")
            self._check_new(tag, p.out)
            self.scratch[f"{tag}terms:{p.out}"] = (*self.shape(p.out), terms)
        self.stages.append(("matmul", tag, products, activation))
        for p in products:
            self.home[p.out] = out
        return out

    def softmax(self, tag: str, blocks: list[str], keep=None, scale: list[str] | None = None) -> str:
        """Row-wise softmax of each block (its home slot) into slot ``tag + "p"``; returns the slot.
        Keys are masked by ignore flags (1 = ignored): ``keep`` names one input block of m flags (one
        per column, for every row), or a list of input blocks, one per softmax block and of its
        shape (one flag per entry). ``scale``: input blocks, one per softmax block, that multiply
        the weights entry by entry (dropout's mask / (1 - p)); one more layer, the result in
        ``tag + "pd"``."""
        widths = {self.shape(b)[-1] for b in blocks}
        if len(widths) != 1 or any(len(self.shape(b)) != 2 for b in blocks):
            raise ValueError(f"softmax {tag!r}: blocks must be matrices with one row length, "
                             f"got {[self.shape(b) for b in blocks]}")
        flags = [keep] * len(blocks) if isinstance(keep, str) else keep
        if flags is not None:
            if len(flags) != len(blocks) or any(f not in self.inputs for f in flags):
                raise ValueError(f"softmax {tag!r}: ignore flags {keep!r} must be input blocks, one per block")
            for blk, f in zip(blocks, flags):
                if self.shape(f) not in ((widths.copy().pop(),), self.shape(blk)):
                    raise ValueError(f"softmax {tag!r}: ignore flags {f!r} {self.shape(f)} fit neither a row nor "
                                     f"block {blk!r} {self.shape(blk)}")
        if scale is not None:
            if flags is None or isinstance(keep, str) or len(scale) != len(blocks) or \
                    any(f not in self.inputs or self.shape(f) != self.shape(b) for f, b in zip(scale, blocks)):
                raise ValueError(f"softmax {tag!r}: scale {scale} must be input blocks of the softmax blocks' "
                                 "shapes, beside per-entry ignore flags")
            self.scales[tag] = list(scale)
        self.stages.append(("softmax", tag, blocks, flags))
        result = f"{tag}pd" if scale is not None else f"{tag}p"
        for b in blocks:
            self.home[b] = result
        return result

    def layernorm(self, tag: str, block: str, out: str, gamma: str, beta: str, eps: str) -> str:
        """out = LayerNorm of each row of ``block`` (its home slot), as torch's: (z - mean) / sqrt(var +
        eps) * gamma + beta with the biased variance; gamma and beta are input vectors (E,), ``eps``
        names an input block (1,) holding eps (an input, never a weight: one set of weights serves
        every eps). ``out`` is a new block of block's shape; returns its slot."""
        shape = self.shape(block)
        if len(shape) != 2 or self.shape(out) != shape:
            raise ValueError(f"layernorm {tag!r}: {block!r} {shape} and {out!r} {self.shape(out)} must be matrices "
                             "of one shape")
        for name in (gamma, beta):
            if name not in self.inputs or self.shape(name) != shape[1:]:
                raise ValueError(f"layernorm {tag!r}: {name!r} must be an input vector ({shape[1]},), "
                                 f"got {self.shape(name)}")
        if not isinstance(eps, str) or eps not in self.inputs or self.shape(eps) != (1,):
            raise ValueError(f"layernorm {tag!r}: eps must name an input block of shape (1,), got {eps!r}")
        self.home_at(block, tag)  # computed before it is read
        self._check_new(tag, out)
        self.stages.append(("layernorm", tag, (block, out, gamma, beta), eps))
        self.home[out] = f"{tag}out"
        return f"{tag}out"

    def _check_new(self, tag: str, block: str) -> None:
        """A stage's output must be a block no input fills and no earlier stage computes."""
        computed = [b for kind, _, items, _ in self.stages for b in
                    ([p.out for p in items] if kind == "matmul" else [items[1]] if kind == "layernorm" else [])]
        if block in self.inputs or block in computed:
            what = "an input" if block in self.inputs else "computed by an earlier stage"
            raise ValueError(f"stage {tag!r}: block {block!r} is already {what}")

    def mixable(self, homes: list[str]) -> bool:
        """Whether one fetch may read blocks of these home slots (see the module docstring)."""
        kinds = ["input" if home == "value" else next((kind for kind, tag, _, _ in self.stages if home == f"{tag}out"
                                                      and kind in ("matmul", "layernorm")), home) for home in homes]
        return len(homes) <= 1 or (len(set(kinds)) == len(kinds) and set(kinds) <= {"input", "matmul", "layernorm"})

    # --- building -------------------------------------------------------------------------
    def build(self) -> tuple[Builder, Layout]:
        layout = Layout.of(self.inputs, self.outputs, self.scratch)
        b = Builder(layout)
        index = {blk.name: i for i, blk in enumerate(layout.blocks)}
        _coordinates(b, layout)
        null = index["null"]
        # every address slot in closed form: per block index, its pieces (lo, hi, const, coefs)
        # (absent: the block's default: null's index for a .block slot, 0 otherwise)
        addresses: dict = {f"{side}.{a}": {} for side in ("fa", "fb", "rd") for a in ADDRESS}
        homes: dict = {}
        for kind, tag, products, _ in track(self.stages, desc="usim: building the stages' addresses"):
            if kind != "matmul":
                continue
            for p in products:
                term_block = f"{tag}terms:{p.out}"
                n, q, terms = self.scratch[term_block]
                at = index[term_block]
                for side, operand in (("fa", p.left), ("fb", p.right)):
                    if not isinstance(operand, Operand):
                        raise TypeError(f"stage {tag!r}: an operand must be a usim.ops.pipeline.Operand (from "
                                        f"matrix(...) and its methods), got {type(operand).__name__}")
                    pieces = {a: [] for a in ADDRESS}
                    for seg in operand.segments(p.terms):
                        homes.setdefault((tag, side), set()).add(self.home_at(seg.block, tag))
                        box = ((0, 0, seg.lo), (n, q, seg.hi))
                        _check_inside(tag, seg, self.shape(seg.block), box)
                        pieces["block"].append((*box, index[seg.block], (0, 0, 0)))
                        for a, form in (("row", seg.row), ("col", seg.col)):
                            pieces[a].append((*box, form[3], form[:3]))
                    if p.terms < terms:  # the padding terms of a shorter product read null's zeros
                        pieces["block"].append(((0, 0, p.terms), (n, q, terms), null, (0, 0, 0)))
                    for a in ADDRESS:
                        addresses[f"{side}.{a}"][at] = pieces[a]
                out = index[p.out]
                addresses["rd.block"][out] = (index[term_block], (0, 0))
                addresses["rd.row"][out] = (0, (1, 0))
                addresses["rd.col"][out] = (0, (0, 1))
        if self.keep_flags:  # the ignore flag each softmax token reads: its entry's, else null's (0)
            kp = {f"kp.{a}": {} for a in ADDRESS}
            for kind, tag, blocks, flags in self.stages:
                for blk, f in zip(blocks, flags) if kind == "softmax" and flags else ():
                    at = index[blk]
                    kp["kp.block"][at] = (index[f], (0, 0))
                    if len(self.shape(f)) == 2:  # one flag per entry, else one per column
                        kp["kp.row"][at] = (0, (1, 0))
                    kp["kp.col"][at] = (0, (0, 1))
            addresses.update(kp)
        if self.scales:  # the weight multiplier each softmax token reads (same entry, its own block)
            addresses["sc.block"] = {}
            for kind, tag, blocks, _ in self.stages:
                for blk, f in zip(blocks, self.scales.get(tag, [])) if kind == "softmax" else ():
                    addresses["sc.block"][index[blk]] = (index[f], (0, 0))
        for kind, tag, products, _ in self.stages:  # each output's addend (a bias block), else null (0)
            for p in (products if kind == "matmul" else []):
                if p.addend is not None:
                    if self.shape(p.addend) != self.shape(p.out):
                        raise ValueError(f"stage {tag!r}: addend {p.addend!r} must be a block of "
                                         f"{p.out!r}'s shape {self.shape(p.out)}")
                    addresses.setdefault("ad.block", {})[index[p.out]] = (index[p.addend], (0, 0))
                    addresses.setdefault("ad.row", {})[index[p.out]] = (0, (1, 0))
                    addresses.setdefault("ad.col", {})[index[p.out]] = (0, (0, 1))
        norms = [items for kind, _, items, _ in self.stages if kind == "layernorm"]
        if norms:  # source entry (fa), gamma (fb: row 0, col k), beta (lb.block) of each output token
            addresses["lb.block"] = {}
            for block, out, gamma, beta in norms:
                at = index[out]
                for name, form in (("fa.block", (index[block], (0, 0))), ("fa.row", (0, (1, 0))),
                                   ("fa.col", (0, (0, 1))), ("fb.block", (index[gamma], (0, 0))),
                                   ("fb.row", (0, (0, 0))), ("fb.col", (0, (0, 1))),
                                   ("lb.block", (index[beta], (0, 0)))):
                    addresses[name][at] = form
        # the sizes the FFNs scale by, as positional features (never weights): ``terms`` = the term
        # count T at each matmul output token (its reduce head's mean times T is the sum), ``keys`` =
        # the row length m at each softmax token (1 elsewhere, so 1 / (keys * mean) stays finite)
        counts = {"terms": {}, "keys": {}}
        for kind, tag, items, _ in self.stages:
            if kind == "matmul":
                for p in items:
                    counts["terms"][index[p.out]] = (max(q.terms for q in items), (0, 0))
            elif kind == "softmax":
                for blk in items:
                    counts["keys"][index[blk]] = (self.shape(blk)[-1], (0, 0))
        for name, per_block in counts.items():
            if per_block or name == "terms":
                default = (1, None) if name == "keys" else None
                b.positional_affine(name, lambda blk, i, per_block=per_block, default=default:
                                    _form(per_block.get(i), blk.shape, default))
        epsilons = sorted({eps for kind, _, _, eps in self.stages if kind == "layernorm"})
        for eps in epsilons:  # every token fetches eps (rsqrt(var + eps) stays finite everywhere)
            b.positional_affine(f"ep.{eps}", lambda blk, i, at=index[eps]: (at, (0,) * len(blk.shape)))
        self._more_addresses(addresses, index)
        for name, per_block in addresses.items():
            default = (null, None) if name.endswith(".block") else None
            b.positional_affine(name, lambda blk, i, per_block=per_block, default=default:
                                _form(per_block.get(i), blk.shape, default))
        self._layers(b, index, homes)
        return b, layout

    def home_at(self, block: str, tag: str) -> str:
        """The slot holding block's values when stage ``tag`` runs (its home then)."""
        home = "value" if block in self.inputs else None
        for kind, stage_tag, items, _ in self.stages:
            if stage_tag == tag:
                break
            if kind == "matmul" and block in [p.out for p in items]:
                home = f"{stage_tag}out"
            if kind == "softmax" and block in items:
                home = f"{stage_tag}pd" if stage_tag in self.scales else f"{stage_tag}p"
            if kind == "layernorm" and block == items[1]:
                home = f"{stage_tag}out"
        if home is None:
            raise ValueError(f"stage {tag!r} reads block {block!r} before any stage computes it")
        return home

    def _layers(self, b: Builder, index: dict, homes: dict) -> None:
        first = True
        for kind, tag, items, option in self.stages:
            if kind == "matmul":
                a, c, term, mean, out = (b.slot(f"{tag}{s}") for s in ("a", "b", "term", "mean", "out"))
                heads = []
                for side, slot in (("fa", a), ("fb", c)):
                    sources = sorted(homes[tag, side])
                    if not self.mixable(sources):
                        raise ValueError(f"stage {tag!r}: one side reads operands of homes {sources}; {MIXING}")
                    target = match({name: f"{side}.{name}" for name in ADDRESS})
                    heads += [Head([target], [(src, slot)], name=f"{tag}{side} from {src}") for src in sources]
                if first and self.keep_flags:
                    heads.append(self._drop_head(b, index))
                first = False
                b.layer(heads, FFN("bilinear", [Unit(a, term, gate=c)]))
                reduce = Head([match({name: f"rd.{name}" for name in ADDRESS})], [(term, mean)],
                              name=f"{tag}sum", average=True)
                heads, units = [reduce], [Unit(mean, out, gate="terms")]  # the sum: T * the mean
                addends = sorted({self.home_at(p.addend, tag) for p in items if p.addend is not None})
                if addends:  # out = act(T * mean + addend)
                    if not self.mixable(addends):
                        raise ValueError(f"stage {tag!r}: addends of homes {addends}: {MIXING}")
                    add = b.slot(f"{tag}add")
                    heads += [Head([match({name: f"ad.{name}" for name in ADDRESS})], [(src, add)],
                                   name=f"{tag}addend" + (f" from {src}" if len(addends) > 1 else ""))
                              for src in addends]
                    units.append(Unit(add, out, gate=ONE))
                if option == "identity":
                    b.layer(heads, FFN("bilinear", units))
                else:  # out = act(T * mean + addend): the sum first, then the activation
                    pre = b.slot(f"{tag}pre")
                    b.layer(heads, FFN("bilinear", [Unit(u.inp, pre, gate=u.gate) for u in units]))
                    b.layer(ffn=FFN(option, [Unit(pre, out)]))
            elif kind == "layernorm":
                self._layernorm_layers(b, tag, *items, eps=option)
            elif kind == "softmax":
                self._softmax_layers(b, tag, items, option)
            else:  # a stage kind a subclass declares (usim.ops.decoder_stages)
                getattr(self, f"_{kind}_layers")(b, tag, items, option)

    def _more_addresses(self, addresses: dict, index: dict) -> None:
        """Hook: a subclass adds the address slots of its own stages (name -> block index -> form)."""

    @property
    def keep_flags(self) -> bool:
        """Whether some softmax stage masks keys (then one head of the first layer reads the flags)."""
        return any(kind == "softmax" and option for kind, _, _, option in self.stages)

    @staticmethod
    def _kept(keep) -> list:
        """The tier keeping a row's kept keys (ignore flag 0) when the stage masks keys."""
        return [] if keep is None else [maximize("drop", -1.0)]

    def _drop_head(self, b: Builder, index: dict) -> Head:
        """drop = the ignore flag of the token's entry (or column) at the softmax blocks, 0 elsewhere."""
        b.slot("drop")
        return Head([match({a: f"kp.{a}" for a in ADDRESS})], [("value", "drop")], name="key flags")

    def _softmax_layers(self, b: Builder, tag: str, blocks: list[str], keep) -> None:
        src = self.home_at(blocks[0], tag)
        if any(self.home_at(blk, tag) != src for blk in blocks):
            raise ValueError(f"softmax {tag!r}: every block must live in one slot")
        top, e, mean, total, r, p = (b.slot(f"{tag}{s}") for s in ("max", "e", "mean", "total", "r", "p"))
        row = match({"block": "block", "row": "row"})
        heads = [Head([row, *self._kept(keep), maximize(src)], [(src, top)], name=f"{tag}max")]
        norm = {total: 1.0}  # the row sum (+ 1 in a fully masked row)
        if keep is None:
            b.layer(heads, FFN("exp", [Unit({src: 1.0, top: -1.0}, e)]))
        else:  # under = relu(max - s) >= 0 is max - s exactly for a kept key; a masked key's exponent
            #      -under - MASKED * drop adds two non-positive numbers (no cancellation), so its e is
            #      exactly 0 whatever the kept scores (+-inf scores too; NaN makes its row NaN).
            #      full = the flag of the max head's key: 1 only in a row whose every key is masked.
            under, full = b.slot(f"{tag}under"), b.slot(f"{tag}full")
            heads = [Head([row, *self._kept(keep), maximize(src)], [(src, top), ("drop", full)], name=f"{tag}max")]
            b.layer(heads, FFN("relu", [Unit({top: 1.0, src: -1.0}, under)]))
            b.layer(ffn=FFN("exp", [Unit({under: -1.0, "drop": -MASKED}, e)]))
            norm[full] = 1.0
        # the row sum m * mean (m the positional feature ``keys``), then its reciprocal
        b.layer([Head([row], [(e, mean)], name=f"{tag}sum", average=True)],
                FFN("bilinear", [Unit(mean, total, gate="keys")]))
        if tag not in self.scales:
            b.layer(ffn=FFN("reciprocal", [Unit(norm, r)]))
            b.layer(ffn=FFN("bilinear", [Unit(e, p, gate=r)]))
            return
        multiplier, dropped = b.slot(f"{tag}scale"), b.slot(f"{tag}pd")
        fetch = Head([match({"block": "sc.block", "row": "kp.row", "col": "kp.col"})], [("value", multiplier)],
                     name=f"{tag}scale")
        b.layer([fetch], FFN("reciprocal", [Unit(norm, r)]))
        b.layer(ffn=FFN("bilinear", [Unit(e, p, gate=r)]))
        b.layer(ffn=FFN("bilinear", [Unit(p, dropped, gate=multiplier)]))

    def _layernorm_layers(self, b: Builder, tag: str, block: str, out: str, gamma: str, beta: str,
                          eps: str) -> None:
        src = self.home_at(block, tag)
        mu, v, g, c, sq, dg, var, ep, r, y = (b.slot(f"{tag}{s}") for s in ("mean", "v", "g", "c", "sq", "dg", "var",
                                                                              "eps", "r", "out"))
        source = {a: f"fa.{a}" for a in ADDRESS}
        b.layer([Head([match({"block": "fa.block", "row": "fa.row"})], [(src, mu)], name=f"{tag}mean", average=True),
                 Head([match(source)], [(src, v)], name=f"{tag}fetch"),
                 Head([match({a: f"fb.{a}" for a in ADDRESS})], [("value", g)], name=f"{tag}gamma"),
                 Head([match({"block": "lb.block", "row": "fb.row", "col": "fb.col"})], [("value", c)],
                      name=f"{tag}beta"),
                 Head([match({"block": f"ep.{eps}", "row": 0, "col": 0})], [("value", ep)], name=f"{tag}eps")],
                FFN("bilinear", [Unit({v: 1.0, mu: -1.0}, sq, gate={v: 1.0, mu: -1.0}),
                                 Unit({v: 1.0, mu: -1.0}, dg, gate=g)]))
        b.layer([Head([match({"block": "block", "row": "row"})], [(sq, var)], name=f"{tag}var", average=True)],
                FFN("rsqrt", [Unit({var: 1.0, ep: 1.0}, r)]))
        b.layer(ffn=FFN("bilinear", [Unit(dg, y, gate=r), Unit(c, y, gate=ONE)]))


def _coordinates(b: Builder, layout: Layout) -> None:
    """Positional slots block, row, col with squares: a matrix's row and column; a vector is one
    row; a term block (n, p, T) is addressed by its output entry (i, k)."""
    def axis(a: int, shape: tuple) -> tuple:
        return (0, tuple(int(j == a) for j in range(len(shape))))

    b.positional_affine("block", lambda blk, i: (i, (0,) * len(blk.shape)), square=True)
    b.positional_affine("row", lambda blk, i: axis(0, blk.shape) if len(blk.shape) > 1 else None, square=True)
    b.positional_affine("col", lambda blk, i: axis(1 if len(blk.shape) > 1 else 0, blk.shape), square=True)


def _form(spec, shape: tuple, default) -> list | tuple | None:
    """A block's pieces for ``Builder.positional_affine``: the given ones (coefficients padded to the
    block's axes), or the default (a constant, or None: 0) where none is given."""
    if spec is None:
        return None if default is None else (default[0], (0,) * len(shape))
    if isinstance(spec, tuple):
        const, coef = spec
        return const, tuple(coef[: len(shape)]) + (0,) * (len(shape) - len(coef))
    return spec


def _check_inside(tag: str, seg: "Segment", shape: tuple, box: tuple) -> None:
    """Every address a segment makes must name an entry of its block (ValueError with the sizes)."""
    n_rows, n_cols = (1, shape[0]) if len(shape) == 1 else shape[:2]
    (lo, hi) = box
    ranges = []
    for form in (seg.row, seg.col):  # the extremes of an affine form over the box: at its corners
        low = form[3] + sum(min(c * l, c * (h - 1)) for c, l, h in zip(form[:3], lo, hi))
        high = form[3] + sum(max(c * l, c * (h - 1)) for c, l, h in zip(form[:3], lo, hi))
        ranges.append((low, high))
    (r0, r1), (c0, c1) = ranges
    if r0 < 0 or r1 >= n_rows or c0 < 0 or c1 >= n_cols:
        raise ValueError(f"stage {tag!r}: operand addresses rows {r0}..{r1}, cols {c0}..{c1} fall outside "
                         f"block {seg.block!r} of shape {shape}")


# An index of a term token as an affine form (c_i, c_k, c_t, const) of (i, k, t).
FORMS = {"i": (1, 0, 0, 0), "k": (0, 1, 0, 0), "t": (0, 0, 1, 0), "0": (0, 0, 0, 0)}


@dataclass(frozen=True)
class Segment:
    """Terms lo <= t < hi read block ``block`` at (row, col), each an affine form of (i, k, t)."""

    lo: int
    hi: int
    block: str
    row: tuple
    col: tuple


@dataclass(frozen=True)
class Operand:
    """Where the term tokens of a product read one factor, in closed form: segments of the term
    axis, each reading one block at affine addresses (so plans over them are affine maps too)."""

    parts: tuple  # Segments; hi = None: up to the product's last term

    def segments(self, terms: int) -> list:
        out = []
        for seg in self.parts:
            hi = terms if seg.hi is None else min(seg.hi, terms)
            if seg.lo < hi:
                out.append(Segment(seg.lo, hi, seg.block, seg.row, seg.col))
        if sum(seg.hi - seg.lo for seg in out) != terms or any(a.hi != b.lo for a, b in zip(out, out[1:])) or \
                (out and out[0].lo != 0):
            raise ValueError(f"operand segments {[(s.lo, s.hi) for s in out]} do not cover the {terms} terms once")
        return out

    def then(self, block: str, rows: str, cols: str, terms: int) -> "Operand":
        """This operand for t < terms - 1 and block[rows, cols] (rows, cols: "i", "k" or "0") for the last."""
        parts = [Segment(s.lo, terms - 1 if s.hi is None else min(s.hi, terms - 1), s.block, s.row, s.col)
                 for s in self.parts if s.lo < terms - 1]
        return Operand(tuple(parts) + (Segment(terms - 1, terms, block, FORMS[rows], FORMS[cols]),))


def _shifted(form: tuple, shift: int) -> tuple:
    """The form with t replaced by t - shift."""
    return (*form[:3], form[3] - form[2] * shift)


def matrix(block: str, rows: str = "i", cols: str = "t") -> Operand:
    """An operand read from one block: rows and cols each name an index of the term token
    ("i", "k" or "t"), e.g. matrix("a", "i", "t") for A[i, t] or matrix("x", "k", "t") for X^T[t, k]."""
    return Operand((Segment(0, None, block, FORMS[rows], FORMS[cols]),))


def stacked(blocks: list[str], rows: str, cols: str, size: int) -> Operand:
    """Blocks stacked along the term index: term t reads blocks[t // size] at (rows, cols) with
    t % size in place of "t" (e.g. the heads of a multi-head sum)."""
    return Operand(tuple(Segment(h * size, (h + 1) * size, blk, _shifted(FORMS[rows], h * size),
                                 _shifted(FORMS[cols], h * size)) for h, blk in enumerate(blocks)))
