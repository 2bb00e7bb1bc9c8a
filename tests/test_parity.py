import itertools

import pytest
import torch

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.parity import SimulatedParity, parity_layer
from helpers import final_stream


def all_strings(length, dtype=torch.float32):
    """(2^length, length): every 0/1 string of that length."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=length)), dtype=dtype).reshape(2 ** length, length)


def parity(bits):
    return bits.sum(-1).remainder(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_string_up_to_length_12(dtype):
    op = SimulatedParity(12)
    for length in range(13):
        bits = all_strings(length, dtype)
        y, stream = final_stream(op, bits)
        assert y.shape == (2 ** length,) and y.dtype == dtype
        assert torch.equal(y, parity(bits)), length
        assert torch.isfinite(stream).all(), length


@pytest.mark.parametrize("max_length", range(1, 10))
def test_every_max_length(seed, max_length):
    # 1, 2, 4, 8 need no pad tokens; the others do.
    op = SimulatedParity(max_length)
    for length in range(max_length + 1):
        bits = torch.randint(0, 2, (32, length)).double()
        assert torch.equal(op(bits), parity(bits)), (seed, max_length, length)
    full = all_strings(max_length)
    assert torch.equal(op(full), parity(full)), max_length


def test_batched_and_unbatched(seed):
    op = SimulatedParity(5)
    bits = torch.randint(0, 2, (2, 3, 4)).float()
    y = op(bits)
    assert y.shape == (2, 3) and torch.equal(y, parity(bits)), seed
    assert op(bits[1, 2]).shape == () and torch.equal(op(bits[1, 2]), parity(bits[1, 2])), seed
    assert torch.equal(op(torch.zeros(0)), torch.tensor(0.0))


@pytest.mark.parametrize("max_length", [1, 3, 12, 33])
def test_depth_width(max_length):
    op = SimulatedParity(max_length)
    assert (op.depth, op.width) == (1, 1)
    assert op.encoder.layers[0].ffn.activation == "relu" and op.encoder.layers[0].ffn.hidden == max_length
    assert op.layout.length == (1 << (max_length - 1).bit_length()) + 1
    assert f"SimulatedParity(max_length={max_length}): depth 1, width 1" in op.describe()


def test_checkpoint_round_trip(seed, tmp_path):
    op = SimulatedParity(6)
    path = tmp_path / "parity.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, SimulatedParity) and loaded.args == {"max_length": 6}
    bits = torch.randint(0, 2, (20, 6)).float()
    assert torch.equal(loaded(bits), op(bits)), seed
    encoder = usim.Encoder.load(path)
    assert torch.equal(op.layout.unpack(encoder(op.layout.pack(bits)))[:, 0], parity(bits)), seed


def test_layer_needs_a_power_of_two():
    b = Builder(Layout.of(inputs={"bits": (3,)}, outputs={"y": (1,)}))
    with pytest.raises(ValueError, match="3 tokens: need a power of two"):
        parity_layer(b, "bits", ("y", b.slot("r")), tag="p.")


def test_bad_input():
    op = SimulatedParity(4)
    for bad in (2.0, 0.5, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="only the values 0 and 1"):
            op(torch.tensor([0.0, 1.0, bad]))
    with pytest.raises(ValueError, match="length 5 > max_length=4"):
        op(torch.zeros(5))
    with pytest.raises(ValueError, match="dtype must be float32 or float64, got torch.int64"):
        op(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0-d"):
        op(torch.tensor(1.0))
    with pytest.raises(TypeError, match="bits must be a torch.Tensor"):
        op([0.0, 1.0])
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        SimulatedParity(0)
    with pytest.raises(TypeError, match="max_length must be an int"):
        SimulatedParity(2.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(dtype):
    op = SimulatedParity(12).cuda()
    for length in (0, 7, 12):
        bits = all_strings(length, dtype).cuda()
        y, stream = final_stream(op, bits)
        assert y.device.type == "cuda" and torch.isfinite(stream).all()
        assert torch.equal(y, parity(bits)), length
