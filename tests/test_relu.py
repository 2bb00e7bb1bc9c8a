
import pytest
import torch

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.relu import ReLU, relu_layer
from usim.ops.transpose import transpose_layer
from helpers import final_stream, generator


def shapes():
    g = generator(f"{__name__}.shapes")
    fixed = [(1, 1), (1, 2), (1, 5), (4, 2), (5, 1), (3, 4), (4, 3)]
    return fixed + [tuple(torch.randint(1, 8, (2,), generator=g).tolist()) for _ in range(2)]


def inputs(shape, dtype):
    """Gaussian and tiny-integer (many ties and zeros) values at scales 1e-3, 1, 1e3."""
    scale = torch.tensor([1e-3, 1.0, 1e3], dtype=dtype).repeat(2)[:, None, None]
    x = torch.cat([torch.randn(3, *shape, dtype=dtype), torch.randint(-2, 3, (3, *shape)).to(dtype)])
    return x * scale


@pytest.mark.parametrize("n,m", shapes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_relu(seed, n, m, dtype):
    op = ReLU(n, m)
    x = inputs((n, m), dtype)
    y, stream = final_stream(op, x)
    assert torch.equal(y, torch.relu(x)), seed
    assert torch.isfinite(stream).all(), seed
    assert torch.equal(op(x[1]), torch.relu(x[1])), seed
    assert torch.equal(op(x.reshape(2, 3, n, m)), torch.relu(x).reshape(2, 3, n, m)), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_values(dtype):
    info = torch.finfo(dtype)
    x = torch.tensor([[info.max, -info.max, info.max, info.tiny], [-info.tiny, 0.0, -0.0, info.max]], dtype=dtype)
    y, stream = final_stream(ReLU(2, 4), x)
    assert torch.equal(y, torch.relu(x))
    assert torch.isfinite(stream).all()


def test_properties_and_describe():
    op = ReLU(2, 3)
    assert (op.depth, op.width) == (1, 1)
    assert op.encoder.layers[0].ffn.activation == "relu"
    text = op.describe()
    assert "ReLU(n=2, m=3)" in text and "relu" in text


def test_chained_in_one_builder(seed):
    # transpose into y, relu in place at y, relu again into z: same-block and cross-block paths, two tags.
    layout = Layout.of(inputs={"x": (3, 4)}, outputs={"z": (4, 3)}, scratch={"y": (4, 3)})
    b = Builder(layout)
    b.standard_positions()
    transpose_layer(b, "x", "y", "value", b.slot("t"))
    relu_layer(b, ("y", "t"), ("y", b.slot("r")), tag="a.")
    relu_layer(b, ("y", "r"), ("z", b.slot("out")), tag="b.")
    b.result("z", "out")
    encoder = b.build()
    assert encoder.depth == 3
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    assert torch.equal(layout.unpack(encoder(layout.pack(x))), torch.relu(x.transpose(-1, -2))), seed


def test_checkpoint_round_trip(seed, tmp_path):
    op = ReLU(3, 4)
    path = tmp_path / "relu.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, ReLU) and loaded.args == {"n": 3, "m": 4}
    x = inputs((3, 4), torch.float32)
    assert torch.equal(loaded(x), op(x)), seed
    encoder = usim.Encoder.load(path)
    assert torch.equal(op.layout.unpack(encoder(op.layout.pack(x))), torch.relu(x)), seed


def test_bad_input():
    op = ReLU(2, 3)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 2, 3\)"):
        op(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"expected shape"):
        op(torch.zeros(6))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="NaN"):
        op(torch.tensor([[0.0, float("nan"), 1.0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="infinite"):
        op(torch.tensor([[0.0, float("inf"), 1.0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=">= 1"):
        ReLU(0, 3)
    with pytest.raises(TypeError, match="int"):
        ReLU(2, 3.0)
    b = Builder(Layout.of(inputs={"x": (2, 3)}, outputs={"y": (3, 2)}))
    b.standard_positions()
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        relu_layer(b, ("x", "value"), ("y", b.slot("r")), tag="r.")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    op = ReLU(5, 3).cuda()
    x = inputs((5, 3), dtype).cuda()
    y, stream = final_stream(op, x)
    assert y.device.type == "cuda"
    assert torch.equal(y, torch.relu(x)), seed
    assert torch.isfinite(stream).all(), seed
