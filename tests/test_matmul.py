from fractions import Fraction

import pytest
import torch

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.matmul import MatMul, matmul_layers
from helpers import final_stream, generator

SCALES = (1e-3, 1.0, 1e3)


def shapes():
    g = generator(f"{__name__}.shapes")
    fixed = [(1, 1, 1), (1, 4, 1), (1, 3, 5), (5, 3, 1), (4, 1, 3), (3, 4, 2), (2, 5, 3)]
    return fixed + [tuple(torch.randint(1, 8, (3,), generator=g).tolist()) for _ in range(2)]


def exact_error(result, a, b):
    """Max |result - a @ b| with a @ b computed exactly in rationals (a, b, result float64)."""
    worst = Fraction(0)
    a, b, result = a.tolist(), b.tolist(), result.tolist()
    for ai, bi, ri in zip(a, b, result):
        for i, row in enumerate(ai):
            for k in range(len(bi[0])):
                exact = sum(Fraction(row[j]) * Fraction(bi[j][k]) for j in range(len(row)))
                worst = max(worst, abs(Fraction(ri[i][k]) - exact))
    return float(worst)


@pytest.mark.parametrize("n,m,p", shapes())
def test_float32_within_4x_of_torch(seed, n, m, p):
    op = MatMul(n, m, p)
    for scale in SCALES:
        a, b = torch.randn(16, n, m) * scale, torch.randn(16, m, p) * scale
        reference = a.double() @ b.double()  # float32 products are exact in float64
        ours, stream = final_stream(op, a, b)
        assert ours.dtype == torch.float32 and ours.shape == (16, n, p)
        assert torch.isfinite(stream).all(), seed
        err = (ours.double() - reference).abs().max().item()
        torch_err = (torch.matmul(a, b).double() - reference).abs().max().item()
        assert err <= 4 * torch_err + 1e-30, (seed, scale, err, torch_err)


@pytest.mark.parametrize("n,m,p", [(1, 1, 1), (1, 3, 4), (3, 5, 1), (4, 3, 2)])
def test_float64_within_4x_of_torch(seed, n, m, p):
    op = MatMul(n, m, p)
    for scale in SCALES:
        a = torch.randn(16, n, m, dtype=torch.float64) * scale
        b = torch.randn(16, m, p, dtype=torch.float64) * scale
        err, torch_err = exact_error(op(a, b), a, b), exact_error(a @ b, a, b)
        assert err <= 4 * torch_err + 1e-300, (seed, scale, err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_integers_exact_and_batching(seed, dtype):
    # Products and sums of small integers are exact in both dtypes: bitwise equal to torch.
    op = MatMul(3, 4, 2)
    a = torch.randint(-3, 4, (2, 3, 3, 4)).to(dtype)
    b = torch.randint(-3, 4, (3, 4, 2)).to(dtype)
    assert torch.equal(op(a, b), a @ b), seed  # batch shapes broadcast
    assert torch.equal(op(a[0, 0], b[0]), a[0, 0] @ b[0]), seed


def test_extreme_values_stay_finite():
    # Tokens outside the output block compute some entry of a @ b: finite when the product is.
    big = torch.finfo(torch.float32).max ** 0.5 / 4
    a = torch.tensor([[big, -big], [1e-30, 0.0]])
    b = torch.tensor([[big, 1.0, 0.0], [big, -big, 1e-30]])
    ours, stream = final_stream(MatMul(2, 2, 3), a, b)
    assert torch.isfinite(stream).all()
    reference = a.double() @ b.double()
    assert (ours.double() - reference).abs().max() <= 1e-7 * reference.abs().max()


def test_properties_and_describe():
    op = MatMul(3, 4, 2)
    assert (op.depth, op.width) == (1, 8)
    assert op.encoder.layers[0].ffn.activation == "bilinear" and op.encoder.layers[0].ffn.hidden == 4
    text = op.describe()
    assert "MatMul(n=3, m=4, p=2)" in text and "bilinear" in text


def test_chained_in_one_builder(seed):
    # (A @ B) @ C: the first product into a scratch block, the second into the output, two tags.
    layout = Layout.of(inputs={"a": (2, 3), "b": (3, 4), "c": (4, 2)}, outputs={"y": (2, 2)},
                       scratch={"ab": (2, 4)})
    b = Builder(layout)
    b.standard_positions()
    matmul_layers(b, ("a", "value"), ("b", "value"), ("ab", b.slot("ab")), tag="first.")
    matmul_layers(b, ("ab", "ab"), ("c", "value"), ("y", b.slot("out")), tag="second.")
    b.result("y", "out")
    encoder = b.build()
    assert encoder.depth == 2 and encoder.width == 8
    a, bb, c = (torch.randn(5, *s, dtype=torch.float64) for s in ((2, 3), (3, 4), (4, 2)))
    torch.testing.assert_close(layout.unpack(encoder(layout.pack(a, bb, c))), (a @ bb) @ c,
                               rtol=1e-13, atol=1e-14, msg=f"seed {seed}")


def test_checkpoint_round_trip(seed, tmp_path):
    op = MatMul(3, 2, 4)
    path = tmp_path / "matmul.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, MatMul) and loaded.args == {"n": 3, "m": 2, "p": 4}
    a, b = torch.randn(5, 3, 2), torch.randn(5, 2, 4)
    assert torch.equal(loaded(a, b), op(a, b)), seed
    encoder = usim.Encoder.load(path)
    assert torch.equal(op.layout.unpack(encoder(op.layout.pack(a, b))), op(a, b)), seed
    torch.testing.assert_close(op.layout.unpack(encoder(op.layout.pack(a, b))), a @ b, msg=f"seed {seed}")


def test_bad_input():
    op = MatMul(2, 3, 4)
    a, b = torch.zeros(2, 3), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="inner sizes differ: a has 3 columns, b has 2 rows"):
        op(a, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"b: expected shape \(\.\.\., 3, 4\)"):
        op(a, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"a: expected shape \(\.\.\., 2, 3\)"):
        op(torch.zeros(5, 3), b)
    with pytest.raises(ValueError, match="at least 2 axes"):
        op(torch.zeros(3), b)
    with pytest.raises(ValueError, match="at least 2 axes"):
        op(a, torch.zeros(3))
    with pytest.raises(TypeError, match="Tensor"):
        op(a.tolist(), b)
    with pytest.raises(ValueError, match="dtype"):
        op(a.long(), b.long())
    with pytest.raises(ValueError, match="one dtype"):
        op(a, b.double())
    with pytest.raises(ValueError, match="NaN"):
        op(a, b.index_fill(0, torch.tensor([1]), float("nan")))
    with pytest.raises(ValueError, match="infinite"):
        op(a.index_fill(0, torch.tensor([1]), float("inf")), b)
    with pytest.raises(ValueError, match="broadcast"):
        op(torch.zeros(2, 2, 3), torch.zeros(3, 3, 4))
    with pytest.raises(ValueError, match=">= 1"):
        MatMul(2, 0, 4)
    with pytest.raises(TypeError, match="int"):
        MatMul(2, 3, 4.0)
    builder = Builder(Layout.of(inputs={"a": (2, 3), "b": (2, 4), "c": (3, 4), "v": (3,)}, outputs={"y": (2, 4)}))
    builder.standard_positions()
    with pytest.raises(ValueError, match=r"inner sizes differ: left is \(2, 3\), right is \(2, 4\)"):
        matmul_layers(builder, ("a", "value"), ("b", "value"), ("y", "value"), tag="t.")
    with pytest.raises(ValueError, match=r"out block must have shape \(2, 4\), got \(2, 3\)"):
        matmul_layers(builder, ("a", "value"), ("c", "value"), ("a", "value"), tag="t.")
    with pytest.raises(ValueError, match="2 axes"):
        matmul_layers(builder, ("v", "value"), ("b", "value"), ("y", "value"), tag="t.")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    op = MatMul(4, 3, 5).cuda()
    a, b = torch.randn(8, 4, 3, dtype=dtype), torch.randn(8, 3, 5, dtype=dtype)
    ours, stream = final_stream(op, a.cuda(), b.cuda())
    assert ours.device.type == "cuda" and torch.isfinite(stream).all(), seed
    torch.testing.assert_close(ours.cpu(), a @ b, msg=f"seed {seed}")
