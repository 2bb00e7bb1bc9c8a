"""The inverse-based construction: softmax(x' a' x'^T) x' v' with x' = x m, a' = m^-1 a m^-T,
v' = m^-1 v equals softmax(x a x^T) x v, with m^-1 computed by the encoder."""

import pytest
import torch

import usim
from helpers import final_stream, ulp_floor

SHAPES = [(1, 1), (1, 3), (3, 1), (3, 2), (2, 4), (4, 4)]


def direct(x, a, v):
    return torch.softmax(x @ a @ x.mT, -1) @ (x @ v)


def transformed(x, a, v, m):
    """The same identity in torch: the attention on the transformed inputs."""
    mi = torch.linalg.inv(m)
    xm = x @ m
    return torch.softmax(xm @ (mi @ a @ mi.mT) @ xm.mT, -1) @ (xm @ (mi @ v))


def characterising(batch, d, dtype):
    """Well-conditioned m: orthogonal times a diagonal in [1, 2] (condition number <= 2)."""
    q, _ = torch.linalg.qr(torch.randn(batch, d, d, dtype=torch.float64))
    return (q * (1 + torch.rand(batch, 1, d, dtype=torch.float64))).to(dtype)


def inputs(batch, n, d, dtype):
    return (torch.randn(batch, n, d, dtype=dtype), torch.randn(batch, d, d, dtype=dtype) / d,
            torch.randn(batch, d, d, dtype=dtype), characterising(batch, d, dtype))


@pytest.mark.parametrize("n,d", SHAPES)
def test_float64_equals_attention(seed, n, d):
    op = usim.SimulatedInverseAttention(n, d)
    args = inputs(4, n, d, torch.float64)
    ours, stream = final_stream(op, *args)
    assert torch.isfinite(stream).all(), seed
    ref = direct(*(t.to(torch.float64) for t in args[:3]))
    # torch's own error for the same transformed expression sets the scale (plus a few ulps)
    torch_err = (transformed(*args) - ref).abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 10 * torch_err + 8 * ulp_floor(ref, torch.float64), (seed, err, torch_err)


@pytest.mark.parametrize("n,d", SHAPES)
def test_float32_within_10x_of_torch(seed, n, d):
    op = usim.SimulatedInverseAttention(n, d)
    args = inputs(6, n, d, torch.float32)
    ref = direct(*(t.double() for t in args[:3]))
    ours = op(*args)
    assert ours.dtype == torch.float32 and ours.shape == (6, n, d), seed
    torch_err = max((direct(*args[:3]).double() - ref).abs().max().item(),
                    (transformed(*args).double() - ref).abs().max().item())
    err = (ours.double() - ref).abs().max().item()
    assert err <= 10 * torch_err + 8 * ulp_floor(ref, torch.float32), (seed, err, torch_err)


def test_result_does_not_depend_on_m(seed):
    op = usim.SimulatedInverseAttention(3, 3)
    x, a, v, m1 = inputs(5, 3, 3, torch.float64)
    m2 = characterising(5, 3, torch.float64)[:, [2, 0, 1]]  # a row permutation too: pivoting
    y1, y2 = op(x, a, v, m1), op(x, a, v, m2)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-13, msg=f"seed {seed}")
    # and the transform is really used: a wrong inverse would change the result
    assert not torch.allclose(direct(x @ m1, a, v), direct(x, a, v)), seed


def test_singular_m_raises(seed):
    op = usim.SimulatedInverseAttention(2, 3)
    x, a, v, m = inputs(3, 2, 3, torch.float64)
    m[1, :, 2] = 0  # a zero column in one batch item
    with pytest.raises(ValueError, match="singular"):
        op(x, a, v, m)


def test_checkpoint_and_bare_encoder(seed, tmp_path):
    op = usim.SimulatedInverseAttention(2, 3)
    args = inputs(3, 2, 3, torch.float64)
    path = tmp_path / "inv_att.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert torch.equal(loaded(*args), op(*args)), seed
    encoder = usim.Encoder.load(path)
    y, zeros = op.layout.unpack(encoder(op.layout.pack(*args)), op.layout.batch_shape(*args))
    assert torch.equal(y, op(*args)) and (zeros == 0).all(), seed


def test_depth_width_and_bad_input():
    op = usim.SimulatedInverseAttention(5, 2)
    assert op.depth == 5 * 2 + 10 and op.width == max(4 * 2 + 1, 2 * 5)
    assert "SimulatedInverseAttention(n=5, d=2)" in op.describe()
    x, a, v, m = (torch.randn(5, 2), torch.randn(2, 2), torch.randn(2, 2), torch.eye(2))
    with pytest.raises(ValueError, match="m: expected shape"):
        op(x, a, v, torch.eye(3))
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        op(x, [[1.0]], v, m)
    with pytest.raises(ValueError, match="dtype"):
        op(x.int(), a, v, m)
    with pytest.raises(ValueError, match="NaN"):
        op(x, a, v, torch.full((2, 2), float("nan")))
