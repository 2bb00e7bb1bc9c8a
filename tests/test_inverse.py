from fractions import Fraction

import pytest
import torch

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.inverse import Inverse, gauss_jordan_layers
from helpers import final_stream, well_conditioned

K = 10  # allowed error, as a multiple of torch's own error against an exact/float64 reference


def exact_inverse(a: list) -> list:
    """Gauss-Jordan in rationals: the exact inverse of a (nested lists of floats)."""
    n = len(a)
    w = [[Fraction(x) for x in row] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(a)]
    for k in range(n):
        p = next(i for i in range(k, n) if w[i][k] != 0)
        w[k], w[p] = w[p], w[k]
        w[k] = [x / w[k][k] for x in w[k]]
        for i in range(n):
            if i != k and w[i][k] != 0:
                w[i] = [x - w[i][k] * y for x, y in zip(w[i], w[k])]
    return [row[n:] for row in w]


def exact_error(result: torch.Tensor, a: torch.Tensor) -> float:
    """Max |result - a^-1| over a batch, a^-1 exact."""
    worst = Fraction(0)
    for r, m in zip(result.tolist(), a.tolist()):
        for rr, er in zip(r, exact_inverse(m)):
            worst = max(worst, *(abs(Fraction(x) - e) for x, e in zip(rr, er)))
    return float(worst)


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3])
def test_float32_vs_torch(seed, n, scale):
    op = Inverse(n)
    assert (op.depth, op.width) == (5 * n + 2, 2)
    for kind in ("shift", "orth"):
        a = well_conditioned(kind, 16, n, torch.float32, scale)
        ref = torch.linalg.inv(a.double())
        ours, stream = final_stream(op, a)
        assert torch.isfinite(stream).all(), (seed, kind)
        err = (ours.double() - ref).abs().max().item()
        torch_err = (torch.linalg.inv(a).double() - ref).abs().max().item()
        assert err <= K * torch_err + 1e-30, (seed, kind, scale, err, torch_err)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_float64_vs_exact(seed, n):
    op = Inverse(n)
    for kind, scale in (("shift", 1.0), ("orth", 1e-3), ("shift", 1e3)):
        a = well_conditioned(kind, 3, n, torch.float64, scale)
        err, torch_err = exact_error(op(a), a), exact_error(torch.linalg.inv(a), a)
        assert err <= K * torch_err + 1e-300, (seed, kind, scale, err, torch_err)


def test_batch_shapes(seed):
    op = Inverse(3)
    a = well_conditioned("shift", 6, 3, torch.float64).reshape(2, 3, 3, 3)
    ours = op(a)
    assert ours.shape == (2, 3, 3, 3), seed
    assert torch.allclose(ours, torch.linalg.inv(a), rtol=1e-12, atol=1e-14), seed
    assert torch.equal(op(a[1, 2]), ours[1, 2]), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_pivoting_permutations(seed, dtype, n):
    """Anti-diagonal and permutation matrices (zero diagonal) need row swaps; their inverse is exact."""
    op = Inverse(n)
    anti = torch.eye(n, dtype=dtype).flip(0)
    perms = torch.stack([torch.eye(n, dtype=dtype)[torch.randperm(n)] for _ in range(4)])
    signs = torch.randint(0, 2, (4, 1, n)).to(dtype) * 2 - 1
    for p in (anti, perms, perms * signs * 4):  # 4 and its inverse 1/4 are exact
        assert torch.equal(op(p), torch.linalg.inv(p)), (seed, p)


@pytest.mark.parametrize("n", [2, 4, 7])
def test_zero_corner(seed, n):
    a = well_conditioned("shift", 16, n, torch.float32)
    a[:, 0, 0] = 0
    ref = torch.linalg.inv(a.double())
    err = (Inverse(n)(a).double() - ref).abs().max().item()
    torch_err = (torch.linalg.inv(a).double() - ref).abs().max().item()
    assert err <= K * torch_err + 1e-30, (seed, err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_raises(seed, dtype):
    singular = [
        torch.zeros(3, 3),
        torch.tensor([[1.0, 2, 3], [2, 4, 6], [0, 1, 1]]),  # dependent rows, exact elimination
        torch.tensor([[1.0, 0, 2], [3, 0, 4], [5, 0, 6]]),  # a zero column
        torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]]) * 0,
    ]
    op = Inverse(3)
    for a in singular:
        a = a.to(dtype)
        with pytest.raises(ValueError, match="singular"):
            op(a)
        # the guard keeps every slot finite even then
        seen = []
        handle = op.encoder.layers[-1].hook_resid.register_forward_hook(lambda m, i, o: seen.append(o))
        with pytest.raises(ValueError, match="singular"):
            op(a)
        handle.remove()
        assert torch.isfinite(seen[0]).all(), (seed, a)
        # the exposed count of zero pivots
        _, zero_pivots = op.run(a)
        assert zero_pivots.item() >= 1, (seed, a)
    # one singular item in a batch
    batch = well_conditioned("shift", 4, 3, dtype)
    batch[2] = 0
    with pytest.raises(ValueError, match="singular"):
        op(batch)


def test_overflow_raises():
    op = Inverse(2)
    with pytest.raises(ValueError, match="working precision"):
        op(torch.tensor([[1.0, 1e30], [0.0, 1e-10]]))  # the inverse holds -1e40: overflows float32
    with pytest.raises(ValueError, match="singular to working precision: a pivot of the elimination or the inverse"):
        op(torch.tensor([[3e38, 3e38], [-3e38, 3e38]]))  # the second pivot overflows: 3e38 + 3e38


SCALES = [1e-12, 1e-6, 1.0, 1e6, 1e12]


@pytest.mark.parametrize("n", [3, 8, 16])
def test_scaled_float32_vs_torch(seed, n):
    """Well-conditioned matrices scaled by 1e-12 .. 1e12 (their determinants overflow or underflow
    float32 at n = 8, 16): within 10x of torch's error at every scale, every slot finite."""
    op = Inverse(n)
    kinds = ("shift", "orth")
    a = torch.cat([well_conditioned(kind, 2, n, torch.float64, scale) for scale in SCALES for kind in kinds])
    a = a.float()
    if n < 16:  # the whole final stream (every slot at every position) finite
        ours, stream = final_stream(op, a)
        assert torch.isfinite(stream).all(), seed
    else:
        ours = op(a)
    ref, theirs = torch.linalg.inv(a.double()), torch.linalg.inv(a)
    for i in range(0, len(a), 2):  # per scale and kind
        err = (ours[i:i + 2].double() - ref[i:i + 2]).abs().max().item()
        torch_err = (theirs[i:i + 2].double() - ref[i:i + 2]).abs().max().item()
        eps = torch.finfo(torch.float32).eps * ref[i:i + 2].abs().max().item()
        assert err <= K * torch_err + eps, (seed, n, SCALES[i // 4], err, torch_err)


@pytest.mark.parametrize("n", [3, 8, 16])
def test_scaled_float64_vs_exact(seed, n):
    op = Inverse(n)
    a = torch.cat([well_conditioned("shift", 1, n, torch.float64, scale) for scale in (1e-12, 1e12)])
    for m in a:
        err, torch_err = exact_error(op(m[None]), m[None]), exact_error(torch.linalg.inv(m[None]), m[None])
        assert err <= K * torch_err + 1e-300, (seed, n, err, torch_err)


def test_determinant_overflow_is_not_singular(seed):
    """The determinant of 7e12 I overflows float32 (3.4e38): the inverse is still 1/7e12 I."""
    a = torch.eye(3) * 7e12
    assert torch.equal(Inverse(3)(a), torch.linalg.inv(a))
    a = torch.randn(16, 16) * 100  # determinants around 1e37 .. 1e40
    ours, ref = Inverse(16)(a), torch.linalg.inv(a.double())
    bound = 20 * 16 * torch.linalg.cond(a.double()).item() * torch.finfo(torch.float32).eps
    assert ((ours.double() - ref).abs().max() <= bound * ref.abs().max()).item(), seed


def test_checkpoint_round_trip(seed, tmp_path):
    op = Inverse(4)
    a = well_conditioned("orth", 5, 4, torch.float32)
    path = tmp_path / "inverse.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, Inverse) and loaded.depth == op.depth
    assert torch.equal(loaded(a), op(a)), seed
    encoder = usim.Encoder.load(path)
    inv, zero_pivots = op.layout.unpack(encoder(op.layout.pack(a)))
    assert torch.equal(inv, op(a)), seed
    assert torch.equal(zero_pivots, torch.zeros(5, 1)), seed


def test_shared_builder(seed):
    """Two uses in one builder (different tags): inverse and determinant of a, inverse of c."""
    layout = Layout.of(inputs={"a": (3, 3), "c": (2, 2)},
                       outputs={"ia": (3, 3), "da": (1,), "ic": (2, 2)},
                       scratch={"wa": (3, 6), "wc": (2, 4)})
    b = Builder(layout)
    b.standard_positions()
    inv_a, det_a, inv_c = b.slot("inv_a"), b.slot("det_a"), b.slot("inv_c")
    zeros_a = gauss_jordan_layers(b, ("a", "value"), "wa", inverse_out=("ia", inv_a), det_out=("da", det_a), tag="A.")
    zeros_c = gauss_jordan_layers(b, ("c", "value"), "wc", inverse_out=("ic", inv_c), tag="C.")
    assert zeros_a != zeros_c
    b.result("ia", inv_a)
    b.result("da", det_a)
    b.result("ic", inv_c)
    encoder = b.build()
    a, c = well_conditioned("shift", 4, 3, torch.float64), well_conditioned("orth", 4, 2, torch.float64)
    ia, da, ic = layout.unpack(encoder(layout.pack(a, c)))
    assert torch.allclose(ia, torch.linalg.inv(a), rtol=1e-12, atol=1e-14), seed
    assert torch.allclose(da[:, 0], torch.linalg.det(a), rtol=1e-12), seed
    assert torch.allclose(ic, torch.linalg.inv(c), rtol=1e-12, atol=1e-14), seed


def test_layer_builder_errors():
    layout = Layout.of(inputs={"a": (2, 3)}, outputs={"y": (2, 2)}, scratch={"w": (2, 4)})
    b = Builder(layout)
    with pytest.raises(ValueError, match="standard positional"):
        gauss_jordan_layers(b, ("a", "value"), "w", inverse_out=("y", "value"))
    b.standard_positions()
    with pytest.raises(ValueError, match="square"):
        gauss_jordan_layers(b, ("a", "value"), "w", inverse_out=("y", "value"))
    layout = Layout.of(inputs={"a": (2, 2)}, outputs={"y": (2, 2)}, scratch={"w": (2, 2)})
    b = Builder(layout)
    b.standard_positions()
    with pytest.raises(ValueError, match=r"work block 'w' must have shape \(2, 4\)"):
        gauss_jordan_layers(b, ("a", "value"), "w", inverse_out=("y", "value"))


def test_bad_input():
    op = Inverse(3)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 3, 3\)"):
        op(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 3, 3\)"):
        op(torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.eye(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        op(torch.full((3, 3), float("nan")))
    with pytest.raises(TypeError, match=r"block 'a' must be a torch.Tensor, got list"):
        op([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(TypeError, match="block 'a' must be a torch.Tensor, got numpy.ndarray"):
        op(torch.eye(3).numpy())
    with pytest.raises(ValueError, match="block 'a' must be a tensor with values, got one on the meta device"):
        op(torch.empty(3, 3, device="meta"))
    with pytest.raises(ValueError, match="a must be a tensor with values"):
        op.check_matrices(a=torch.empty(3, 3, device="meta"))
    with pytest.raises(TypeError, match="a must be a torch.Tensor, got numpy.ndarray"):
        op.check_matrices(a=torch.eye(3).numpy())
    with pytest.raises(ValueError, match=">= 1"):
        Inverse(0)
    with pytest.raises(TypeError, match="int"):
        Inverse(2.0)


def test_describe():
    text = Inverse(2).describe()
    assert "Inverse(n=2)" in text and "reciprocal" in text and "bilinear" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    op = Inverse(6).cuda()
    a = well_conditioned("shift", 16, 6, dtype).cuda()
    ref = torch.linalg.inv(a.double().cpu())
    ours, stream = final_stream(op, a)
    assert ours.device.type == "cuda" and torch.isfinite(stream).all(), seed
    err = (ours.double().cpu() - ref).abs().max().item()
    torch_err = (torch.linalg.inv(a).double().cpu() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= K * torch_err + 1e-30, (seed, err, torch_err)
    else:
        assert err < 1e-13, (seed, err)
    p = torch.eye(6, dtype=dtype, device="cuda").flip(0)
    assert torch.equal(op(p), p), seed
    with pytest.raises(ValueError, match="singular"):
        op(torch.zeros(6, 6, dtype=dtype, device="cuda"))
