from decimal import Decimal, localcontext

import pytest
import torch

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.matmul import matmul_layers
from usim.ops.softmax import Softmax, softmax_layers
from helpers import final_stream, generator

SCALES = (1e-3, 1.0, 10.0, 1e3, 1e4)


def shapes():
    g = generator(f"{__name__}.shapes")
    fixed = [(1, 1), (1, 2), (1, 6), (5, 1), (3, 4), (4, 3)]
    return fixed + [tuple(torch.randint(1, 9, (2,), generator=g).tolist()) for _ in range(2)]


def exact_softmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax in 60-digit decimals, rounded to float64 (a reference for float64 inputs)."""
    rows = []
    with localcontext() as ctx:
        ctx.prec = 60
        for row in x.reshape(-1, x.shape[-1]).tolist():
            d = [Decimal(v) for v in row]
            e = [(v - max(d)).exp() for v in d]
            rows.append([float(v / sum(e)) for v in e])
    return torch.tensor(rows, dtype=torch.float64).reshape(x.shape)


def floor(dtype) -> float:
    """A quarter ulp of 1, the largest output: where torch's own error is 0 or tiny (outputs that are
    exactly 0 or 1 and a few small ones), one rounding more on a small entry must not fail the test."""
    return torch.finfo(dtype).eps / 4


def errors(ours, theirs, reference):
    return (ours.double() - reference).abs().max().item(), (theirs.double() - reference).abs().max().item()


@pytest.mark.parametrize("n,m", shapes())
def test_float32_within_4x_of_torch(seed, n, m):
    op = Softmax(n, m)
    for scale in SCALES:
        x = torch.randn(16, n, m) * scale
        ours, stream = final_stream(op, x)
        assert ours.dtype == torch.float32 and torch.isfinite(stream).all(), (seed, scale)
        err, torch_err = errors(ours, torch.softmax(x, -1), torch.softmax(x.double(), -1))
        assert err <= 4 * torch_err + floor(x.dtype), (seed, scale, err, torch_err)


@pytest.mark.parametrize("n,m", [(1, 1), (1, 5), (4, 1), (3, 4), (5, 7)])
def test_float64_within_4x_of_torch(seed, n, m):
    op = Softmax(n, m)
    for scale in SCALES:
        x = torch.randn(8, n, m, dtype=torch.float64) * scale
        ours, stream = final_stream(op, x)
        assert torch.isfinite(stream).all(), (seed, scale)
        err, torch_err = errors(ours, torch.softmax(x, -1), exact_softmax(x))
        assert err <= 4 * torch_err + floor(x.dtype), (seed, scale, err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_one_by_one_and_batching(seed, dtype):
    scale = torch.tensor([1e-3, 1.0, 1e4], dtype=dtype).repeat(2)[:, None, None]
    ties = torch.randint(-2, 3, (6, 3, 5)).to(dtype) * scale
    ties[0, 0] = 7.0  # a whole row of equal values
    ours = Softmax(3, 5)(ties)
    reference = torch.softmax(ties.double(), -1) if dtype == torch.float32 else exact_softmax(ties)
    err, torch_err = errors(ours, torch.softmax(ties, -1), reference)
    assert err <= 4 * torch_err + floor(dtype), (seed, err, torch_err)
    assert torch.equal(ours[0, 0], torch.full((5,), 0.2, dtype=dtype)), seed
    one = Softmax(1, 1)
    x = torch.randn(4, 1, 1, dtype=dtype) * 1e4
    assert torch.equal(one(x), torch.ones_like(x)), seed
    assert torch.equal(Softmax(4, 1)(x.reshape(4, 1)), torch.ones(4, 1, dtype=dtype)), seed
    op = Softmax(2, 3)
    x = torch.randn(2, 3, 2, 3, dtype=dtype)
    assert torch.equal(op(x[1, 2]), op(x)[1, 2]), seed
    torch.testing.assert_close(op(x), torch.softmax(x, -1), msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits(dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big, 0.0, big], [-big, -big, -big, -big], [1e-30, -0.0, 0.0, -1e-30]], dtype=dtype)
    ours, stream = final_stream(Softmax(3, 4), x)
    assert torch.isfinite(stream).all()
    torch.testing.assert_close(ours, torch.softmax(x, -1), rtol=2e-7 if dtype == torch.float32 else 1e-15, atol=0)


def test_properties_and_describe():
    op = Softmax(3, 4)
    assert (op.depth, op.width) == (3, 4)
    assert (Softmax(2, 1).depth, Softmax(2, 1).width) == (3, 2)
    assert [layer.ffn.activation for layer in op.encoder.layers] == ["exp", "reciprocal", "bilinear"]
    text = op.describe()
    assert "Softmax(n=3, m=4)" in text and "reciprocal" in text


def test_chained_in_one_builder(seed):
    # softmax(softmax(A) @ B): a softmax into a scratch block, a matmul, a softmax in place; two tags.
    layout = Layout.of(inputs={"a": (3, 4), "b": (4, 2)}, outputs={"y": (3, 2)}, scratch={"p": (3, 4)})
    b = Builder(layout)
    b.standard_positions()
    softmax_layers(b, ("a", "value"), ("p", b.slot("p")), tag="first.")
    matmul_layers(b, ("p", "p"), ("b", "value"), ("y", b.slot("s")), tag="mm.")
    softmax_layers(b, ("y", "s"), ("y", b.slot("out")), tag="second.")
    b.result("y", "out")
    encoder = b.build()
    assert encoder.depth == 7
    a, bb = torch.randn(5, 3, 4, dtype=torch.float64) * 3, torch.randn(5, 4, 2, dtype=torch.float64) * 3
    torch.testing.assert_close(layout.unpack(encoder(layout.pack(a, bb))),
                               torch.softmax(torch.softmax(a, -1) @ bb, -1), rtol=1e-13, atol=1e-15,
                               msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_key_mask(seed, dtype):
    # key_valid flags per column; masked logits may be huge: they must not win the max or leak.
    n, m = 3, 5
    layout = Layout.of(inputs={"x": (n, m), "keep": (m,)}, outputs={"y": (n, m)})
    b = Builder(layout)
    b.standard_positions()
    softmax_layers(b, ("x", "value"), ("y", b.slot("out")), tag="masked.", key_valid=("keep", "value"))
    b.result("y", "out")
    encoder = b.build()
    assert encoder.depth == 5
    keep = torch.rand(6, m) < 0.6
    keep[torch.arange(6), torch.randint(0, m, (6,))] = True
    keep[0] = torch.tensor([False, False, True, False, False])
    x = torch.randn(6, n, m, dtype=dtype) * 10
    x[1] = x[1].masked_fill(~keep[1], torch.finfo(dtype).max)
    x[2] = x[2].masked_fill(~keep[2], -torch.finfo(dtype).max)
    x[3] = x[3].masked_fill(keep[3], -torch.finfo(dtype).max)  # every kept logit the dtype's minimum
    seen = []
    encoder.layers[-1].hook_resid.register_forward_hook(lambda mod, i, out: seen.append(out))
    ours = layout.unpack(encoder(layout.pack(x, keep.to(dtype))))
    assert torch.isfinite(seen[0]).all(), seed
    expected = torch.softmax(x.masked_fill(~keep[:, None, :], float("-inf")), -1)
    torch.testing.assert_close(ours, expected, msg=f"seed {seed}")
    assert torch.equal(ours.masked_select(~keep[:, None, :].expand(-1, n, -1)),
                       torch.zeros(int((~keep).sum()) * n, dtype=dtype)), seed


def test_checkpoint_round_trip(seed, tmp_path):
    op = Softmax(3, 4)
    path = tmp_path / "softmax.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, Softmax) and loaded.args == {"n": 3, "m": 4}
    x = torch.randn(5, 3, 4) * 10
    assert torch.equal(loaded(x), op(x)), seed
    encoder = usim.Encoder.load(path)
    assert torch.equal(op.layout.unpack(encoder(op.layout.pack(x))), op(x)), seed
    torch.testing.assert_close(op.layout.unpack(encoder(op.layout.pack(x))), torch.softmax(x, -1),
                               msg=f"seed {seed}")


def test_bad_input():
    op = Softmax(2, 3)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 2, 3\)"):
        op(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"expected shape"):
        op(torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="NaN"):
        op(torch.tensor([[0.0, float("nan"), 1.0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="infinite"):
        op(torch.tensor([[0.0, float("-inf"), 1.0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=">= 1"):
        Softmax(2, 0)
    with pytest.raises(TypeError, match="int"):
        Softmax("2", 3)
    b = Builder(Layout.of(inputs={"x": (2, 3), "k": (2,)}, outputs={"y": (3, 2)}, scratch={"z": (2, 3)}))
    b.standard_positions()
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        softmax_layers(b, ("x", "value"), ("y", b.slot("s")), tag="s.")
    with pytest.raises(ValueError, match=r"key_valid block 'k' must have shape \(3,\)"):
        softmax_layers(b, ("x", "value"), ("z", "s"), tag="t.", key_valid=("k", "value"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    op = Softmax(4, 5).cuda()
    x = torch.randn(8, 4, 5, dtype=dtype) * 100
    ours, stream = final_stream(op, x.cuda())
    assert ours.device.type == "cuda" and torch.isfinite(stream).all(), seed
    err, torch_err = errors(ours.cpu(), torch.softmax(x.cuda(), -1).cpu(), torch.softmax(x.double(), -1))
    assert err <= 4 * torch_err + floor(dtype) if dtype == torch.float32 else err < 1e-15, (seed, err, torch_err)
