"""GroupSort networks (Remark 6.1 of the paper; Anil et al. 2019) as one constructed encoder.

With widths [w_0, ..., w_L], weights W_l (w_l x w_{l-1}) and biases b_l (w_l,),

    y = W_L sigma(... sigma(W_1 x + b_1) ...) + b_L         sigma = GroupSort(group_size)

where GroupSort sorts each consecutive group of g entries in descending order (g = 2 is MaxMin,
g = 1 the identity). The vectors live in the stream as 1 x w row matrices, so each affine map is
h W_l^T + b_l: ``transpose_layer`` makes every W_l^T in the first layer, ``matmul_layers`` the
product, and one more head of that layer adds b_l into the same slot before the FFN adds the
products (b + sum of products, as torch's addmm). sigma is ``groupsort_layers`` (moves only).
``abs_network`` gives the weights for which the network is |x| = MaxMin(x, -x)[0].
Activations: bilinear (matmuls); the sorting is hard attention only.

Depth 1 + L + (L - 1) s, with s = k (k + 1) / 2 sorting layers, k = ceil(log2 g) (s = 0 for g = 1);
width max(L, 1 + 2 max(w_0, ..., w_{L-1})).
"""

from __future__ import annotations

import math

import torch

from usim.construct import Builder, Head, match
from usim.layout import Layout
from usim.ops.base import Construction, check_size, register
from usim.ops.groupsort import groupsort_layers
from usim.ops.matmul import matmul_layers
from usim.ops.transpose import transpose_layer


def check_widths(widths, group_size: int) -> list[int]:
    """Validated list of widths (at least 2, each >= 1, hidden ones divisible by group_size)."""
    if not isinstance(widths, (list, tuple)):
        raise TypeError(f"widths must be a list of ints, got {type(widths).__name__}")
    if len(widths) < 2:
        raise ValueError(f"widths needs at least an input and an output width, got {list(widths)}")
    widths = [check_size(f"widths[{i}]", w) for i, w in enumerate(widths)]
    check_size("group_size", group_size)
    for i, w in enumerate(widths[1:-1], start=1):
        if w % group_size:
            raise ValueError(f"group_size={group_size} does not divide hidden width widths[{i}]={w}")
    return widths


def groupsort_network_blocks(widths: list[int], tag: str) -> dict:
    """The scratch blocks groupsort_network_layers needs: W_l^T and the hidden vectors."""
    blocks = {f"{tag}wt{l}": (widths[l - 1], widths[l]) for l in range(1, len(widths))}
    blocks.update({f"{tag}z{l}": (1, widths[l]) for l in range(1, len(widths) - 1)})
    return blocks


def groupsort_network_layers(b: Builder, x: tuple[str, str], weights: list[str], biases: list[str],
                             out: tuple[str, str], group_size: int, tag: str) -> None:
    """Append the layers of a GroupSort network: x = (block, slot), a 1 x w_0 row; weights[l - 1] and
    biases[l - 1] name the blocks of W_l (w_l x w_{l-1}) and b_l (w_l,) (slot ``value``); adds the
    result into slot out[1] at block out[0] (1 x w_L).

    Needs the scratch blocks ``groupsort_network_blocks(widths, tag)``; adds slots ``tag + ...``."""
    widths = [b.layout[x[0]].shape[-1]] + [b.layout[w].shape[0] for w in weights]
    check_widths(widths, group_size)
    depth = len(weights)
    expected = {x[0]: (1, widths[0]), out[0]: (1, widths[-1]), **groupsort_network_blocks(widths, tag)}
    expected.update({w: (widths[l + 1], widths[l]) for l, w in enumerate(weights)})
    expected.update({bias: (widths[l + 1],) for l, bias in enumerate(biases)})
    if len(biases) != depth:
        raise ValueError(f"{depth} weight blocks but {len(biases)} bias blocks")
    for block, shape in expected.items():
        if b.layout[block].shape != shape:
            raise ValueError(f"block {block!r} must have shape {shape}, got {b.layout[block].shape}")
    wt = [(f"{tag}wt{l}", b.slot(f"{tag}wt{l}")) for l in range(1, depth + 1)]
    b.parallel(*[(lambda w=w, t=t: transpose_layer(b, w, t[0], "value", t[1])) for w, t in zip(weights, wt)])
    h = x
    for l in range(1, depth + 1):
        z = out if l == depth else (f"{tag}z{l}", b.slot(f"{tag}z{l}"))
        bias = Head([match({"block": b.layout.block_index(biases[l - 1]), "col": "col"})], [("value", z[1])],
                    name=f"{tag}b{l}")
        b.parallel(lambda: matmul_layers(b, h, wt[l - 1], z, tag=f"{tag}{l}."), lambda: b.layer([bias]))
        h = z
        if l < depth and group_size > 1:
            h = (z[0], b.slot(f"{tag}h{l}"))
            groupsort_layers(b, z, h, group_size, tag=f"{tag}sort{l}.")


def abs_network(width: int, dtype=torch.float32):
    """(widths, group_size, weights, biases) of the network computing |x| for x of size ``width``:
    W_1 stacks (x_i, -x_i) pairs, MaxMin (group_size 2) puts max(x_i, -x_i) = |x_i| first in each
    pair, W_2 keeps it. Zero biases. Every step is a move or a product by +-1 or 0: exact."""
    check_size("width", width)
    eye = torch.eye(width, dtype=dtype)
    w1 = torch.stack([eye, -eye], dim=1).reshape(2 * width, width)
    w2 = torch.zeros(width, 2 * width, dtype=dtype)
    w2[torch.arange(width), 2 * torch.arange(width)] = 1
    biases = [torch.zeros(2 * width, dtype=dtype), torch.zeros(width, dtype=dtype)]
    return [width, 2 * width, width], 2, [w1, w2], biases


@register
class SimulatedGroupSortNetwork(Construction):
    """forward(x (..., w_0), weights [W_1 (w_1, w_0), ...], biases [b_1 (w_1,), ...]) -> (..., w_L),
    computed by the encoder (weights and biases may carry batch axes; batch shapes broadcast)."""

    def __init__(self, widths, group_size: int, *, execution: str = "fast"):
        widths = check_widths(widths, group_size)
        tag = "gsn."
        depth = len(widths) - 1
        inputs = {"x": (1, widths[0])}
        inputs.update({f"w{l}": (widths[l], widths[l - 1]) for l in range(1, depth + 1)})
        inputs.update({f"b{l}": (widths[l],) for l in range(1, depth + 1)})
        layout = Layout.of(inputs, {"y": (1, widths[-1])}, groupsort_network_blocks(widths, tag))
        b = Builder(layout)
        b.standard_positions()
        groupsort_network_layers(b, ("x", "value"), [f"w{l}" for l in range(1, depth + 1)],
                                 [f"b{l}" for l in range(1, depth + 1)], ("y", b.slot("result")), group_size, tag)
        b.result("y", "result")
        super().__init__(b.build(), layout, {"widths": widths, "group_size": group_size}, execution=execution)

    @staticmethod
    def depth_formula(widths, group_size: int) -> int:
        k = math.ceil(math.log2(group_size))
        return 1 + (len(widths) - 1) + (len(widths) - 2) * (k * (k + 1) // 2)

    def forward(self, x, weights, biases):
        widths = self.args["widths"]
        depth = len(widths) - 1
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != widths[0]:
            raise ValueError(f"x: expected shape (..., {widths[0]}), got {tuple(x.shape)}")
        for name, ts in (("weights", weights), ("biases", biases)):
            if not isinstance(ts, (list, tuple)) or len(ts) != depth:
                raise ValueError(f"{name} must be a list of {depth} tensors for widths {widths}, got "
                                 f"{len(ts) if isinstance(ts, (list, tuple)) else type(ts).__name__}")
        for l in range(1, depth + 1):
            w, bias = weights[l - 1], biases[l - 1]
            for name, t in ((f"weights[{l - 1}]", w), (f"biases[{l - 1}]", bias)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if w.dim() < 2 or tuple(w.shape[-2:]) != (widths[l], widths[l - 1]):
                raise ValueError(f"weights[{l - 1}]: expected shape (..., {widths[l]}, {widths[l - 1]}), "
                                 f"got {tuple(w.shape)}")
            if bias.dim() < 1 or bias.shape[-1] != widths[l]:
                raise ValueError(f"biases[{l - 1}]: expected shape (..., {widths[l]}), got {tuple(bias.shape)}")
        return self.run(x[..., None, :], *weights, *biases)[..., 0, :]
