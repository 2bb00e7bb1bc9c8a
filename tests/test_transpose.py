import pytest
import torch

import usim
from helpers import generator


def shapes():
    g = generator(f"{__name__}.shapes")
    fixed = [(1, 1), (1, 5), (5, 1), (3, 4), (4, 3)]
    return fixed + [tuple(torch.randint(1, 9, (2,), generator=g).tolist()) for _ in range(3)]


@pytest.mark.parametrize("n,m", shapes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_transpose(seed, n, m, dtype):
    op = usim.Transpose(n, m)
    x = torch.randn(6, n, m, dtype=dtype) * torch.logspace(-3, 3, 6, dtype=dtype)[:, None, None]
    assert torch.equal(op(x), x.transpose(-1, -2)), seed
    assert torch.equal(op(x[0]), x[0].T), seed
    assert torch.equal(op(x.reshape(2, 3, n, m)), x.reshape(2, 3, n, m).transpose(-1, -2)), seed


def test_properties_and_describe():
    op = usim.Transpose(2, 3)
    assert (op.depth, op.width) == (1, 1)
    assert op.layout.length == 12
    text = op.describe()
    assert "Transpose(n=2, m=3)" in text and "result" in text


def test_bad_input():
    op = usim.Transpose(2, 3)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 2, 3\)"):
        op(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        op(torch.tensor([[0.0, float("nan"), 1.0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=">= 1"):
        usim.Transpose(0, 3)
    with pytest.raises(TypeError, match="int"):
        usim.Transpose(2.0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    op = usim.Transpose(5, 3).cuda()
    x = torch.randn(4, 5, 3, dtype=dtype, device="cuda")
    assert torch.equal(op(x), x.transpose(-1, -2)), seed
