import itertools
import math

import pytest
import torch

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.groupsort import GroupSort, groupsort_layers, sorting_network
from usim.ops.maxmin import MaxMin
from helpers import final_stream, generator


def reference(x, g):
    return x.unflatten(-1, (x.shape[-1] // g, g)).sort(dim=-1, descending=True).values.flatten(-2)


def cases():
    """(n, m, g) with g in 1, 2, 3, 4, m and shapes 1x1, 1x2, 1xm, nx2, non-square, random."""
    r = generator(f"{__name__}.shapes")
    fixed = [(1, 1, 1), (1, 2, 1), (1, 2, 2), (1, 6, 3), (1, 6, 6), (4, 2, 2), (5, 2, 1), (3, 4, 4),
             (2, 8, 4), (2, 8, 8), (4, 3, 3), (3, 6, 2), (2, 7, 7)]
    rand = []
    for _ in range(2):
        n, g, groups = (int(torch.randint(1, hi, (), generator=r)) for hi in (5, 6, 3))
        rand.append((n, g * groups, g))
    return fixed + rand


def inputs(shape, dtype):
    """Gaussian and tiny-integer (many ties and zeros) values at scales 1e-3, 1, 1e3."""
    scale = torch.tensor([1e-3, 1.0, 1e3], dtype=dtype).repeat(2)[:, None, None]
    x = torch.cat([torch.randn(3, *shape, dtype=dtype), torch.randint(-1, 2, (3, *shape)).to(dtype)])
    return x * scale


@pytest.mark.parametrize("n,m,g", cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_groupsort(seed, n, m, g, dtype):
    op = GroupSort(n, m, g)
    x = inputs((n, m), dtype)
    y, stream = final_stream(op, x)
    assert torch.equal(y, reference(x, g)), (seed, n, m, g)
    assert torch.isfinite(stream).all(), seed
    assert torch.equal(op(x[4]), reference(x[4], g)), seed
    assert torch.equal(op(x.reshape(2, 3, n, m)), reference(x, g).reshape(2, 3, n, m)), seed


@pytest.mark.parametrize("g", range(1, 11))
def test_network_sorts_every_zero_one_input(g):
    # 0-1 principle: a comparator network sorting all 0/1 vectors sorts everything.
    x = torch.tensor(list(itertools.product([0, 1], repeat=g)))
    for layer in sorting_network(g):
        wires = [w for pair in layer for w in pair]
        assert len(wires) == len(set(wires)) and all(i < j for i, j in layer)
        i, j = torch.tensor(layer).T
        x[:, i], x[:, j] = torch.maximum(x[:, i], x[:, j]), torch.minimum(x[:, i], x[:, j])
    assert (x[:, :-1] >= x[:, 1:]).all()


@pytest.mark.parametrize("g", range(1, 18))
def test_depth_formula(g):
    k = math.ceil(math.log2(g))
    assert len(sorting_network(g)) == k * (k + 1) // 2
    if g <= 9:
        op = GroupSort(1, g, g)
        assert (op.depth, op.width) == (max(1, k * (k + 1) // 2), 1)


def test_group_of_two_is_maxmin(seed):
    x = torch.randint(-2, 3, (5, 3, 6)).float()
    assert torch.equal(GroupSort(3, 6, 2)(x), MaxMin(3, 6)(x)), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_ties(dtype):
    big, tiny = torch.finfo(dtype).max, torch.finfo(dtype).tiny
    x = torch.tensor([[big, -big, big, big, 0.0, -0.0, tiny, -tiny], [-big] * 4 + [big] * 4], dtype=dtype)
    for g in (2, 4, 8):
        y, stream = final_stream(GroupSort(2, 8, g), x)
        assert torch.equal(y, reference(x, g)), g
        assert torch.isfinite(stream).all(), g


def test_describe():
    text = GroupSort(2, 6, 3).describe()
    assert "GroupSort(n=2, m=6, group_size=3): depth 3, width 1" in text


def test_chained_in_one_builder(seed):
    # Groups of 2 into y, then groups of 4 in place at y with another tag.
    layout = Layout.of(inputs={"x": (3, 8)}, outputs={"y": (3, 8)})
    b = Builder(layout)
    b.standard_positions()
    groupsort_layers(b, ("x", "value"), ("y", b.slot("a")), 2, tag="a.")
    groupsort_layers(b, ("y", "a"), ("y", b.slot("b")), 4, tag="b.")
    b.result("y", "b")
    encoder = b.build()
    assert encoder.depth == 1 + 3
    x = torch.randn(4, 3, 8)
    assert torch.equal(layout.unpack(encoder(layout.pack(x))), reference(x, 4)), seed


def test_checkpoint_round_trip(seed, tmp_path):
    op = GroupSort(2, 6, 3)
    path = tmp_path / "groupsort.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, GroupSort) and loaded.args == {"n": 2, "m": 6, "group_size": 3}
    x = inputs((2, 6), torch.float64)
    assert torch.equal(loaded(x), op(x)), seed
    encoder = usim.Encoder.load(path)
    assert torch.equal(op.layout.unpack(encoder(op.layout.pack(x))), reference(x, 3)), seed


def test_bad_input():
    op = GroupSort(2, 4, 2)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 2, 4\)"):
        op(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="NaN"):
        op(torch.tensor([[0.0, float("nan"), 1.0, 2.0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="infinite"):
        op(torch.tensor([[0.0, float("inf"), 1.0, 2.0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="group_size=4 .*m=6"):
        GroupSort(2, 6, 4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        GroupSort(2, 6, 0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        GroupSort(2, 6, 2.0)
    with pytest.raises(ValueError, match=">= 1"):
        GroupSort(2, 0, 1)
    b = Builder(Layout.of(inputs={"x": (2, 5)}, outputs={"y": (2, 5)}))
    b.standard_positions()
    with pytest.raises(ValueError, match="group_size=2 .*m=5"):
        groupsort_layers(b, ("x", "value"), ("y", b.slot("r")), 2, tag="r.")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    op = GroupSort(3, 6, 3).cuda()
    x = inputs((3, 6), dtype).cuda()
    y, stream = final_stream(op, x)
    assert y.device.type == "cuda"
    assert torch.equal(y, reference(x, 3)), seed
    assert torch.isfinite(stream).all(), seed
