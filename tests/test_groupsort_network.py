import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.groupsort_network import SimulatedGroupSortNetwork, abs_network, groupsort_network_blocks, \
    groupsort_network_layers
from helpers import final_stream, generator, within_torch

SCALES = (1e-3, 1.0, 1e3)


def networks():
    """(widths, group_size): no hidden layer, g = 1 (affine), g = 2 (MaxMin), g = 3, 4, g = width."""
    g = generator(f"{__name__}.shapes")
    group = int(torch.randint(1, 4, (), generator=g))
    rand = [int(torch.randint(1, 5, (), generator=g))] + [group * int(torch.randint(1, 3, (), generator=g))] * 2 + \
        [int(torch.randint(1, 5, (), generator=g))]
    return [([1, 1], 1), ([3, 2], 2), ([1, 4, 1], 2), ([4, 1, 3], 1), ([2, 6, 3, 2], 3), ([3, 4, 4, 1], 4),
            ([4, 4, 2], 2), (rand, group)]


def groupsort(z, g):
    return z.unflatten(-1, (z.shape[-1] // g, g)).sort(dim=-1, descending=True).values.flatten(-2)


def direct(x, weights, biases, g):
    h = x
    for l, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w, b)
        if l < len(weights) - 1:
            h = groupsort(h, g)
    return h


def exact(x, weights, biases, g):
    """The network in rationals (float64 inputs without batch axes on the weights), rounded once."""
    rows = []
    ws = [[[Fraction(c) for c in row] for row in w.tolist()] for w in weights]
    bs = [[Fraction(c) for c in b.tolist()] for b in biases]
    for xb in x.tolist():
        h = [Fraction(c) for c in xb]
        for l, (w, b) in enumerate(zip(ws, bs)):
            h = [sum((wi * hi for wi, hi in zip(row, h)), bi) for row, bi in zip(w, b)]
            if l < len(ws) - 1:
                h = [c for s in range(0, len(h), g) for c in sorted(h[s: s + g], reverse=True)]
        rows.append([float(c) for c in h])
    return torch.tensor(rows, dtype=torch.float64)


def random_parameters(widths, scale, dtype=torch.float32):
    weights = [torch.randn(widths[l], widths[l - 1], dtype=dtype) for l in range(1, len(widths))]
    biases = [torch.randn(widths[l], dtype=dtype) * scale for l in range(1, len(widths))]
    return weights, biases


@pytest.mark.parametrize("widths,g", networks())
def test_float32_within_10x_of_torch(seed, widths, g):
    op = SimulatedGroupSortNetwork(widths, g)
    for scale in SCALES:
        x = torch.randn(16, widths[0]) * scale
        weights, biases = random_parameters(widths, scale)
        ref = direct(x.double(), [w.double() for w in weights], [b.double() for b in biases], g)
        ours = within_torch(op, (x, weights, biases), ref, direct(x, weights, biases, g), torch.float32,
                            (seed, widths, g, scale))
        assert ours.shape == (16, widths[-1]) and ours.dtype == torch.float32, seed


@pytest.mark.parametrize("widths,g", [([3, 2], 2), ([2, 4, 1], 2), ([2, 6, 3, 2], 3)])
def test_float64_within_10x_of_torch(seed, widths, g):
    op = SimulatedGroupSortNetwork(widths, g)
    for scale in SCALES:
        x = torch.randn(6, widths[0], dtype=torch.float64) * scale
        weights, biases = random_parameters(widths, scale, torch.float64)
        within_torch(op, (x, weights, biases), exact(x, weights, biases, g), direct(x, weights, biases, g),
                     torch.float64, (seed, widths, g, scale))


@pytest.mark.parametrize("widths,g", networks())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_on_small_integers(seed, widths, g, dtype):
    # Small integers: every sum and product is exact in both, so the results must agree bitwise.
    op = SimulatedGroupSortNetwork(widths, g)
    x = torch.randint(-3, 4, (8, widths[0])).to(dtype)
    weights = [torch.randint(-3, 4, (widths[l], widths[l - 1])).to(dtype) for l in range(1, len(widths))]
    biases = [torch.randint(-3, 4, (widths[l],)).to(dtype) for l in range(1, len(widths))]
    assert torch.equal(op(x, weights, biases), direct(x, weights, biases, g)), (seed, widths, g)


@pytest.mark.parametrize("width", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_abs_network_is_bitwise_abs(seed, width, dtype):
    widths, g, weights, biases = abs_network(width, dtype)
    assert (widths, g) == ([width, 2 * width, width], 2)
    op = SimulatedGroupSortNetwork(widths, g)
    info = torch.finfo(dtype)
    magnitudes = torch.logspace(-30, 30, 7, dtype=dtype)[:, None]
    x = torch.cat([torch.randn(7, width, dtype=dtype) * magnitudes, torch.zeros(1, width, dtype=dtype),
                   -torch.zeros(1, width, dtype=dtype), torch.full((1, width), info.max / 2, dtype=dtype),
                   torch.full((1, width), -info.tiny, dtype=dtype)])
    ours, stream = final_stream(op, x, weights, biases)
    assert torch.equal(ours, torch.abs(x)), seed
    assert torch.isfinite(stream).all(), seed
    assert torch.equal(op(x[0], weights, biases), torch.abs(x[0])), seed


@pytest.mark.parametrize("widths,g", networks() + [([2, 8, 8, 1], 8), ([2, 5, 5, 5, 1], 5)])
def test_depth_width(widths, g):
    op = SimulatedGroupSortNetwork(widths, g)
    k = math.ceil(math.log2(g))
    layers = len(widths) - 1
    assert op.depth == 1 + layers + (layers - 1) * (k * (k + 1) // 2) == op.depth_formula(widths, g)
    assert op.width == max(layers, 1 + 2 * max(widths[:-1]))
    assert f"SimulatedGroupSortNetwork(widths={widths}, group_size={g}): depth {op.depth}" in op.describe()


def test_batched_unbatched_and_broadcast(seed):
    widths, g = [3, 4, 2], 2
    op = SimulatedGroupSortNetwork(widths, g)
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    weights, biases = random_parameters(widths, 1.0, torch.float64)
    y = op(x, weights, biases)
    assert y.shape == (2, 3, 2), seed
    assert torch.equal(op(x[1, 2], weights, biases), y[1, 2]), seed
    # Per-item weights: a batch axis on W_1.
    w1 = torch.randn(2, 1, 4, 3, dtype=torch.float64)
    batched = op(x, [w1, weights[1]], biases)
    for i in range(2):
        torch.testing.assert_close(batched[i], direct(x[i], [w1[i, 0], weights[1]], biases, g), rtol=1e-12,
                                   atol=1e-12, msg=f"seed {seed}")


def test_checkpoint_round_trip(seed, tmp_path):
    widths, g = [2, 6, 3, 2], 3
    op = SimulatedGroupSortNetwork(widths, g)
    path = tmp_path / "gsn.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, SimulatedGroupSortNetwork) and loaded.args == {"widths": widths, "group_size": g}
    x = torch.randn(5, 2)
    weights, biases = random_parameters(widths, 1.0)
    assert torch.equal(loaded(x, weights, biases), op(x, weights, biases)), seed
    encoder = usim.Encoder.load(path)
    y = op.layout.unpack(encoder(op.layout.pack(x[:, None, :], *weights, *biases)))
    assert torch.equal(y[:, 0, :], op(x, weights, biases)), seed


def test_layer_builder_checks_blocks():
    layout = Layout.of(inputs={"x": (1, 2), "w1": (4, 2), "w2": (1, 4), "b1": (4,), "b2": (2,)},
                       outputs={"y": (1, 1)}, scratch=groupsort_network_blocks([2, 4, 1], "t."))
    b = Builder(layout)
    b.standard_positions()
    with pytest.raises(ValueError, match=r"block 'b2' must have shape \(1,\)"):
        groupsort_network_layers(b, ("x", "value"), ["w1", "w2"], ["b1", "b2"], ("y", b.slot("r")), 2, "t.")
    with pytest.raises(ValueError, match="group_size=3 does not divide hidden width widths\\[1\\]=4"):
        groupsort_network_layers(b, ("x", "value"), ["w1", "w2"], ["b1", "b2"], ("y", "r"), 3, "t.")


def test_bad_input():
    with pytest.raises(ValueError, match=r"group_size=2 does not divide hidden width widths\[2\]=3"):
        SimulatedGroupSortNetwork([2, 4, 3, 1], 2)
    with pytest.raises(ValueError, match="at least an input and an output width"):
        SimulatedGroupSortNetwork([3], 1)
    with pytest.raises(TypeError, match="widths must be a list"):
        SimulatedGroupSortNetwork(3, 1)
    with pytest.raises(ValueError, match=r"widths\[1\] must be >= 1"):
        SimulatedGroupSortNetwork([3, 0, 1], 1)
    with pytest.raises(TypeError, match=r"widths\[0\] must be an int"):
        SimulatedGroupSortNetwork([3.0, 2], 1)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        SimulatedGroupSortNetwork([3, 2], 0)
    with pytest.raises(ValueError, match="width must be >= 1"):
        abs_network(0)
    widths = [3, 4, 2]
    op = SimulatedGroupSortNetwork(widths, 2)
    x = torch.randn(3)
    weights, biases = random_parameters(widths, 1.0)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 3\), got \(4,\)"):
        op(torch.randn(4), weights, biases)
    with pytest.raises(ValueError, match="weights must be a list of 2 tensors"):
        op(x, weights[:1], biases)
    with pytest.raises(ValueError, match="biases must be a list of 2 tensors"):
        op(x, weights, biases[0])
    with pytest.raises(ValueError, match=r"weights\[1\]: expected shape \(\.\.\., 2, 4\), got \(4, 2\)"):
        op(x, [weights[0], weights[1].T], biases)
    with pytest.raises(ValueError, match=r"biases\[0\]: expected shape \(\.\.\., 4\), got \(2,\)"):
        op(x, weights, [biases[1], biases[1]])
    with pytest.raises(TypeError, match=r"biases\[1\] must be a torch.Tensor"):
        op(x, weights, [biases[0], [0.0, 0.0]])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        op([1.0, 2.0, 3.0], weights, biases)
    with pytest.raises(ValueError, match="share one dtype"):
        op(x.double(), weights, biases)
    with pytest.raises(ValueError, match="NaN"):
        op(torch.tensor([0.0, float("nan"), 1.0]), weights, biases)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    widths, g, weights, biases = abs_network(3, dtype)
    op = SimulatedGroupSortNetwork(widths, g).cuda()
    x = torch.randn(4, 3, dtype=dtype).cuda() * 1e3
    ours, stream = final_stream(op, x, [w.cuda() for w in weights], [b.cuda() for b in biases])
    assert ours.device.type == "cuda" and torch.isfinite(stream).all(), seed
    assert torch.equal(ours, x.abs()), seed
