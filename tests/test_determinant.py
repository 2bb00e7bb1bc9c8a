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
    assert (op.depth, op.width) == (5 * n + 4, 2)
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


FLOAT32_SCALES = [1e-12, 1e-9, 1e-6, 1e-3, 1.0, 1e3, 1e6, 1e9, 1e12]


def check_against_torch(ours, a, dtype, context):
    """Where torch's determinant is +-inf or 0, ours is the same; elsewhere within 10x of torch's
    relative error (plus two ulps, and a few of the smallest subnormals for tiny results)."""
    theirs, ref = torch.linalg.det(a), torch.linalg.det(a.double())
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    special = torch.isinf(theirs) | (theirs == 0)
    assert torch.equal(ours[special], theirs[special]), (*context, ours[special], theirs[special])
    finite = ~special
    err = (ours.double() - ref).abs()[finite]
    torch_err = (theirs.double() - ref).abs()[finite]
    bound = K * torch_err + 2 * torch.finfo(dtype).eps * ref.abs()[finite] + 4 * tiny
    assert (err <= bound).all(), (*context, err, torch_err)
    return finite


@pytest.mark.parametrize("n", [3, 8, 16])
def test_scaled_float32_vs_torch(seed, n):
    """Scales 1e-12 .. 1e12 (signs mixed): where torch's float32 determinant overflows to +-inf or
    underflows to 0 ours does the same, elsewhere it is within 10x of torch's error; every slot is
    finite where the determinant is."""
    op = usim.Determinant(n)
    a = torch.cat([well_conditioned(kind, 1, n, torch.float64, scale)
                   for scale in FLOAT32_SCALES for kind in ("shift", "orth")]).float()
    a[::3, 0] *= -1
    if n < 16:
        ours, stream = final_stream(op, a)
    else:
        ours, stream = op(a), None
    finite = check_against_torch(ours, a, torch.float32, (seed, n))
    if stream is not None:
        assert torch.isfinite(stream[torch.isfinite(ours)]).all(), seed
    if n == 16:
        assert torch.isinf(ours).any() and (ours == 0).any() and finite.any(), seed  # all three regimes met


@pytest.mark.parametrize("n", [3, 8, 16])
def test_scaled_float64(seed, n):
    """float64: against exact rationals at 1e-12 and 1e12; overflow and underflow like torch at 1e40."""
    op = usim.Determinant(n)
    a = torch.cat([well_conditioned("shift", 1, n, torch.float64, scale) for scale in (1e-12, 1e12)])
    exact = [exact_det(m) for m in a.tolist()]
    err, torch_err = relative_error(op(a), exact), relative_error(torch.linalg.det(a), exact)
    assert err <= K * torch_err + 2 * torch.finfo(torch.float64).eps, (seed, n, err, torch_err)
    if n == 16:
        a = torch.cat([well_conditioned("orth", 2, n, torch.float64, scale) for scale in (1e-40, 1e40)])
        ours = op(a)
        check_against_torch(ours, a, torch.float64, (seed, n))
        assert torch.equal(ours.abs(), torch.tensor([0.0, 0.0, float("inf"), float("inf")], dtype=torch.float64))


@pytest.mark.parametrize("execution", ["fast", "dense"])
def test_overflow_like_torch(execution):
    """The running product of the pivots, in LU order, decides: once it overflows the result is
    +-inf (as torch's, even if later pivots are small), once it underflows it is 0."""
    op = usim.Determinant(3, execution=execution)
    diag = torch.tensor([[1e30, 1e30, 1e-30], [-1e30, 1e30, 1e-30], [1e-30, 1e-30, 1e30],
                         [2.0 ** 127, 1.5, 1.0], [2.0 ** 127, 2.5, 1.0], [-(2.0 ** 127), 1.5, 1.0],
                         [7e12, 7e12, 7e12], [3.0, 0.5, -5.0]])
    a = torch.diag_embed(diag)
    expected = torch.tensor([float("inf"), float("-inf"), 0.0, 1.5 * 2.0 ** 127, float("inf"),
                             -1.5 * 2.0 ** 127, float("inf"), -7.5])
    ours = op(a)
    assert torch.equal(torch.linalg.det(a)[:-1], expected[:-1])
    assert torch.equal(ours[:-1], expected[:-1]), ours
    torch.testing.assert_close(ours[-1], expected[-1], rtol=2e-7, atol=0)
    # float64 holds them all
    assert torch.allclose(op(a.double())[:3], torch.tensor([1e30, -1e30, 1e-30], dtype=torch.float64), rtol=1e-6)
    # a permutation with row swaps, at 1e20: -1e60 overflows float32
    p = torch.tensor([[0.0, 1e20, 0], [1e20, 0, 0], [0, 0, 1e20]])
    assert torch.equal(op(p), torch.tensor(float("-inf")))
    # a zero pivot after the product overflowed: exactly 0 (torch gives inf * 0 = nan)
    assert torch.equal(op(torch.diag(torch.tensor([1e30, 1e30, 0.0]))), torch.tensor(0.0))
    # exactly singular at a large scale
    singular = torch.tensor([[1.0, 2, 3], [2, 4, 6], [0, 1, 1]]) * 1e20
    assert torch.equal(op(singular), torch.tensor(0.0))


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
