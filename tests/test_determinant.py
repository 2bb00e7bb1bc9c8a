"""Determinant: Gauss elimination with partial pivoting in the encoder, against torch.linalg.det."""

from fractions import Fraction

import pytest
import torch

import usim
from helpers import final_stream, well_conditioned

K = 10  # allowed error, as a multiple of torch's own error against an exact/float64 reference


def exact_det(a: list) -> Fraction:
    """Gaussian elimination in rationals."""
    w = [[Fraction(x) for x in row] for row in a]
    n, det = len(w), Fraction(1)
    for k in range(n):
        p = next((i for i in range(k, n) if w[i][k] != 0), None)
        if p is None:
            return Fraction(0)
        if p != k:
            w[k], w[p] = w[p], w[k]
            det = -det
        det *= w[k][k]
        for i in range(k + 1, n):
            f = w[i][k] / w[k][k]
            w[i] = [x - f * y for x, y in zip(w[i], w[k])]
    return det


def relative_error(result: torch.Tensor, exact: list) -> float:
    return max(float(abs(Fraction(r) - e) / abs(e)) for r, e in zip(result.tolist(), exact))


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3])
def test_float32_vs_torch(seed, n, scale):
    op = usim.Determinant(n)
    assert (op.depth, op.width) == (5 * n + 1, 2)
    for kind in ("shift", "orth"):
        a = well_conditioned(kind, 16, n, torch.float32, scale)
        ref = torch.linalg.det(a.double())
        ours, stream = final_stream(op, a)
        assert ours.shape == (16,) and ours.dtype == torch.float32, seed
        assert torch.isfinite(stream).all(), (seed, kind)
        err = ((ours.double() - ref) / ref).abs().max().item()
        torch_err = ((torch.linalg.det(a).double() - ref) / ref).abs().max().item()
        assert err <= K * torch_err + 2 * torch.finfo(torch.float32).eps, (seed, kind, scale, err, torch_err)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_float64_vs_exact(seed, n):
    op = usim.Determinant(n)
    for kind, scale in (("shift", 1.0), ("orth", 1e-3), ("shift", 1e3)):
        a = well_conditioned(kind, 3, n, torch.float64, scale)
        exact = [exact_det(m) for m in a.tolist()]
        err, torch_err = relative_error(op(a), exact), relative_error(torch.linalg.det(a), exact)
        assert err <= K * torch_err + 2 * torch.finfo(torch.float64).eps, (seed, kind, scale, err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_pivoting_signs(seed, dtype, n):
    """Permutation matrices (zero diagonals, row swaps needed): exactly their sign."""
    op = usim.Determinant(n)
    perms = torch.stack([torch.eye(n, dtype=dtype)[torch.randperm(n)] for _ in range(6)])
    perms = torch.cat([perms, torch.eye(n, dtype=dtype).flip(0)[None]])
    assert torch.equal(op(perms), torch.linalg.det(perms.double()).round().to(dtype)), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_is_exactly_zero(seed, dtype):
    singular = torch.tensor([
        [[0.0, 0, 0], [0, 0, 0], [0, 0, 0]],
        [[1.0, 2, 3], [2, 4, 6], [0, 1, 1]],  # dependent rows
        [[1.0, 0, 2], [3, 0, 4], [5, 0, 6]],  # a zero column
    ], dtype=dtype)
    assert torch.equal(usim.Determinant(3)(singular), torch.zeros(3, dtype=dtype)), seed


def test_batch_shapes(seed):
    op = usim.Determinant(3)
    a = well_conditioned("shift", 6, 3, torch.float64).reshape(2, 3, 3, 3)
    ours = op(a)
    assert ours.shape == (2, 3), seed
    torch.testing.assert_close(ours, torch.linalg.det(a), rtol=1e-12, atol=0)
    assert torch.equal(op(a[1, 2]), ours[1, 2]), seed


def test_checkpoint_and_bare_encoder(seed, tmp_path):
    op = usim.Determinant(4)
    a = well_conditioned("orth", 5, 4, torch.float64)
    path = tmp_path / "det.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert torch.equal(loaded(a), op(a)), seed
    encoder = usim.Encoder.load(path)
    det = op.layout.unpack(encoder(op.layout.pack(a)), op.layout.batch_shape(a))
    det = det[0] if isinstance(det, tuple) else det
    assert torch.equal(det[..., 0], op(a)), seed


def test_bad_input():
    op = usim.Determinant(3)
    with pytest.raises(ValueError, match="shape"):
        op(torch.randn(3, 4))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        op(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError):
        usim.Determinant(0)
