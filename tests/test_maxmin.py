
import pytest
import torch

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.maxmin import MaxMin, exchange_layer, maxmin_layers
from helpers import final_stream, generator


def reference(x):
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([pairs.amax(-1), pairs.amin(-1)], dim=-1).flatten(-2)


def shapes():
    g = generator(f"{__name__}.shapes")
    fixed = [(1, 2), (1, 6), (4, 2), (3, 4), (5, 8), (2, 2)]
    rand = [(int(torch.randint(1, 7, (), generator=g)), 2 * int(torch.randint(1, 5, (), generator=g)))
            for _ in range(2)]
    return fixed + rand


def inputs(shape, dtype):
    """Gaussian and tiny-integer (many ties and zeros) values at scales 1e-3, 1, 1e3."""
    scale = torch.tensor([1e-3, 1.0, 1e3], dtype=dtype).repeat(2)[:, None, None]
    x = torch.cat([torch.randn(3, *shape, dtype=dtype), torch.randint(-1, 2, (3, *shape)).to(dtype)])
    return x * scale


@pytest.mark.parametrize("n,m", shapes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_maxmin(seed, n, m, dtype):
    op = MaxMin(n, m)
    x = inputs((n, m), dtype)
    y, stream = final_stream(op, x)
    assert torch.equal(y, reference(x)), seed
    assert torch.isfinite(stream).all(), seed
    assert torch.equal(op(x[4]), reference(x[4])), seed
    assert torch.equal(op(x.reshape(3, 2, n, m)), reference(x).reshape(3, 2, n, m)), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_ties(dtype):
    # Tied huge values: an average of two of them would overflow; one key is kept, so none does.
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, big, -big, -big, big, -big], [0.0, -0.0, 1.0, 1.0, -big, big]], dtype=dtype)
    y, stream = final_stream(MaxMin(2, 6), x)
    assert torch.equal(y, reference(x))
    assert torch.isfinite(stream).all()


def test_properties_and_describe():
    op = MaxMin(2, 4)
    assert (op.depth, op.width) == (1, 1)
    assert op.encoder.layers[0].ffn is None
    assert "MaxMin(n=2, m=4)" in op.describe()


def test_chained_in_one_builder(seed):
    # MaxMin into y, then a second MaxMin in place at y (a no-op on sorted pairs), then a swap of the
    # two middle columns by a raw exchange layer: separate tags, no collisions.
    layout = Layout.of(inputs={"x": (3, 4)}, outputs={"y": (3, 4)})
    b = Builder(layout)
    b.standard_positions()
    maxmin_layers(b, ("x", "value"), ("y", b.slot("a")), tag="a.")
    maxmin_layers(b, ("y", "a"), ("y", b.slot("b")), tag="b.")
    exchange_layer(b, ("y", "b"), ("y", b.slot("c")), [(1, 2)], "c.")
    b.result("y", "c")
    encoder = b.build()
    assert encoder.depth == 3
    x = torch.randint(-2, 3, (8, 3, 4)).double()
    want = reference(x)
    want[..., 1:3] = torch.stack([want[..., 1:3].amax(-1), want[..., 1:3].amin(-1)], -1)
    assert torch.equal(layout.unpack(encoder(layout.pack(x))), want), seed


def test_checkpoint_round_trip(seed, tmp_path):
    op = MaxMin(3, 4)
    path = tmp_path / "maxmin.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, MaxMin) and loaded.args == {"n": 3, "m": 4}
    x = inputs((3, 4), torch.float32)
    assert torch.equal(loaded(x), op(x)), seed
    encoder = usim.Encoder.load(path)
    assert torch.equal(op.layout.unpack(encoder(op.layout.pack(x))), reference(x)), seed


def test_bad_input():
    op = MaxMin(2, 4)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 2, 4\)"):
        op(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        op(torch.tensor([[0.0, float("nan"), 1.0, 2.0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="infinite"):
        op(torch.tensor([[0.0, -float("inf"), 1.0, 2.0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="m=3"):
        MaxMin(2, 3)
    with pytest.raises(ValueError, match=">= 1"):
        MaxMin(0, 2)
    with pytest.raises(TypeError, match="int"):
        MaxMin(2, "4")
    b = Builder(Layout.of(inputs={"x": (2, 5)}, outputs={"y": (2, 5)}))
    b.standard_positions()
    with pytest.raises(ValueError, match="m=5"):
        maxmin_layers(b, ("x", "value"), ("y", b.slot("r")), tag="r.")
    with pytest.raises(ValueError, match="disjoint"):
        exchange_layer(b, ("x", "value"), ("y", "r"), [(0, 1), (1, 2)], "e.")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    op = MaxMin(5, 4).cuda()
    x = inputs((5, 4), dtype).cuda()
    y, stream = final_stream(op, x)
    assert y.device.type == "cuda"
    assert torch.equal(y, reference(x)), seed
    assert torch.isfinite(stream).all(), seed
