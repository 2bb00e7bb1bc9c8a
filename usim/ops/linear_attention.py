"""Linear attention (Remark 5.2, eq. 3 of the paper; Katharopoulos et al. 2020) as one encoder.

With q = x w_q, k = x w_k, v = x w_v (each n x d) and the feature map phi = elu + 1,

    y_i = phi(q_i) (phi(k)^T v) / (phi(q_i) . sum_j phi(k_j))          y (n, d)

phi is built exactly from the declared maps: phi(t) = relu(t) + exp(-relu(-t)), i.e. t + 1 for
t > 0 and exp(t) for t <= 0 (one exp, one rounding of the sum). The column sums sum_j phi(k_j) are
phi(k)^T times a column of ones (a scratch block read through the constant slot ``one``), so the
numerator and the denominator come from the same matmul builder.
Activations: bilinear (matmuls, the final product), relu, exp (phi), reciprocal (the division).
Depth 7, width max(6d, 4n):

    layer 1   q, k, v = x w_q, x w_k, x w_v                       6d heads
    layer 2   k^T (transpose);  FFN relu: relu(q), relu(-q), relu(k^T), relu(-k^T)
    layer 3   FFN exp: phi(q) = relu(q) + exp(-relu(-q)), phi(k^T) likewise
    layer 4   kv = phi(k)^T v (d x d),  ksum = phi(k)^T 1 (d x 1)   4n heads
    layer 5   num = phi(q) kv (n x d),  den = phi(q) ksum (n x 1)   4d heads
    layer 6   den of the token's row (one head);  FFN reciprocal: r = 1 / den
    layer 7   FFN bilinear: y = num * r

phi > 0, so den > 0 unless exp underflows to 0 for every term of a row (then torch's own
elu + 1 gives 0 / 0 as well); forward raises ValueError when the result is not finite. Before the
reciprocal every slot is finite at every position (phi lies in (0, inf) and every head copies a
value of its block).
"""

from __future__ import annotations

import torch

from usim.construct import FFN, ONE, Builder, Head, Unit, match
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register
from usim.ops.matmul import matmul_layers
from usim.ops.transpose import transpose_layer

SCRATCH = ("q", "k", "v", "kt", "kv", "ones", "ksum", "den")


def scratch_blocks(n: int, d: int, tag: str) -> dict:
    """The scratch blocks linear_attention_layers needs, for a layout."""
    shapes = {"q": (n, d), "k": (n, d), "v": (n, d), "kt": (d, n), "kv": (d, d), "ones": (n, 1),
              "ksum": (d, 1), "den": (n, 1)}
    return {f"{tag}{s}": shapes[s] for s in SCRATCH}


def linear_attention_layers(b: Builder, x: str, w_q: str, w_k: str, w_v: str, out: tuple[str, str],
                            tag: str) -> None:
    """Append 7 layers adding linear attention of block x (n x d) with the (d x d) blocks w_q, w_k,
    w_v (matrices in slot ``value``) into slot out[1] at block out[0] (n x d).

    Needs the scratch blocks ``scratch_blocks(n, d, tag)`` in the layout; adds slots ``tag + ...``."""
    n, d = b.layout[x].shape
    expected = {w_q: (d, d), w_k: (d, d), w_v: (d, d), out[0]: (n, d), **scratch_blocks(n, d, tag)}
    for block, shape in expected.items():
        if b.layout[block].shape != shape:
            raise ValueError(f"block {block!r} must have shape {shape}, got {b.layout[block].shape}")
    blk = {s: f"{tag}{s}" for s in SCRATCH}
    q, k, v, kt = (b.slot(f"{tag}{s}") for s in ("q", "k", "v", "kt"))
    b.parallel(*[(lambda w=w, s=s: matmul_layers(b, (x, "value"), (w, "value"), (blk[s], f"{tag}{s}"),
                                                  tag=f"{tag}{s}."))
                 for w, s in ((w_q, "q"), (w_k, "k"), (w_v, "v"))])

    # phi(t) = relu(t) + exp(-relu(-t)), on q (in block q) and on k^T (in block kt).
    phi_q, phi_k, neg_q, neg_k = (b.slot(f"{tag}{s}") for s in ("phi_q", "phi_k", "neg_q", "neg_k"))
    # The FFN of the transpose's layer already sees k^T (attention runs first).
    b.parallel(lambda: transpose_layer(b, blk["k"], blk["kt"], k, kt),
               lambda: b.layer(ffn=FFN("relu", [Unit(q, phi_q), Unit({q: -1.0}, neg_q),
                                                Unit(kt, phi_k), Unit({kt: -1.0}, neg_k)])))
    b.layer(ffn=FFN("exp", [Unit({neg_q: -1.0}, phi_q), Unit({neg_k: -1.0}, phi_k)]))

    kv, ksum, num, den = (b.slot(f"{tag}{s}") for s in ("kv", "ksum", "num", "den"))
    b.parallel(lambda: matmul_layers(b, (blk["kt"], phi_k), (blk["v"], v), (blk["kv"], kv), tag=f"{tag}kv."),
               lambda: matmul_layers(b, (blk["kt"], phi_k), (blk["ones"], ONE), (blk["ksum"], ksum),
                                     tag=f"{tag}ksum."))
    b.parallel(lambda: matmul_layers(b, (blk["q"], phi_q), (blk["kv"], kv), (out[0], num), tag=f"{tag}num."),
               lambda: matmul_layers(b, (blk["q"], phi_q), (blk["ksum"], ksum), (blk["den"], den),
                                     tag=f"{tag}den."))
    row_den, r = b.slot(f"{tag}row_den"), b.slot(f"{tag}r")
    fetch = Head([match({"block": b.layout.block_index(blk["den"]), "row": "row"})], [(den, row_den)],
                 name=f"{tag}den of row")
    b.layer([fetch], FFN("reciprocal", [Unit(row_den, r)]))
    b.layer(ffn=FFN("bilinear", [Unit(num, out[1], gate=r)]))


@register
class SimulatedLinearAttention(Construction):
    """forward(x (..., n, d), w_q, w_k, w_v (each (..., d, d))) -> (..., n, d): linear attention
    with phi = elu + 1, computed by the encoder (batch shapes broadcast)."""

    def __init__(self, n: int, d: int, *, execution: str = "fast"):
        check_size("n", n)
        check_size("d", d)
        tag = "la."
        layout = Layout.of(inputs={"x": (n, d), "w_q": (d, d), "w_k": (d, d), "w_v": (d, d)},
                           outputs={"y": (n, d)}, scratch=scratch_blocks(n, d, tag))
        b = Builder(layout)
        b.standard_positions()
        linear_attention_layers(b, "x", "w_q", "w_k", "w_v", ("y", b.slot("result")), tag=tag)
        b.result("y", "result")
        super().__init__(b.build(), layout, {"n": n, "d": d}, execution=execution)

    def forward(self, x, w_q, w_k, w_v):
        self.check_matrices(x=x, w_q=w_q, w_k=w_k, w_v=w_v)
        y = self.run(x, w_q, w_k, w_v)
        if not torch.isfinite(y).all():
            raise ValueError("linear attention is undefined for this input: a denominator "
                             "phi(q_i) . sum_j phi(k_j) is 0 (exp underflow of phi = elu + 1)")
        return y
