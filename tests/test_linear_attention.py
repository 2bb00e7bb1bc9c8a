from decimal import Decimal, localcontext

import pytest
import torch
import torch.nn.functional as F

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.linear_attention import SimulatedLinearAttention, linear_attention_layers, scratch_blocks
from helpers import generator, within_torch

SCALES = (1e-3, 1.0, 1e3)


def shapes():
    """(n, d): 1x1, 1xd, nx1, non-square, square, one random."""
    g = generator(f"{__name__}.shapes")
    return [(1, 1), (1, 3), (4, 1), (3, 2), (2, 4), (4, 4)] + [tuple(torch.randint(1, 5, (2,), generator=g).tolist())]


def direct(x, w_q, w_k, w_v):
    """Katharopoulos et al.'s formula in torch: phi = elu + 1."""
    q, k, v = F.elu(x @ w_q) + 1, F.elu(x @ w_k) + 1, x @ w_v
    return (q @ (k.transpose(-1, -2) @ v)) / (q @ k.sum(-2)[..., None])


def decimal_reference(x, w_q, w_k, w_v):
    """The same formula in 50-digit decimals (inputs (B, ...) float64), rounded to float64."""
    def mm(p, q):
        return [[sum(p[i][j] * q[j][k] for j in range(len(q))) for k in range(len(q[0]))] for i in range(len(p))]

    def phi(m):
        return [[c + 1 if c > 0 else c.exp() for c in row] for row in m]

    out = []
    with localcontext() as ctx:
        ctx.prec = 50
        for xb, qb, kb, vb in zip(*([[[Decimal(c) for c in row] for row in m] for m in t.tolist()]
                                    for t in (x, w_q, w_k, w_v))):
            q, k, v = phi(mm(xb, qb)), phi(mm(xb, kb)), mm(xb, vb)
            num = mm(q, mm([list(col) for col in zip(*k)], v))
            ksum = [sum(col) for col in zip(*k)]
            out.append([[float(c / sum(a * b for a, b in zip(qi, ksum))) for c in row] for qi, row in zip(q, num)])
    return torch.tensor(out, dtype=torch.float64)


def random_inputs(n, d, batch, scale, dtype=torch.float32):
    """x at the given scale; w_q, w_k scaled by 1 / scale for large x so that phi sees O(1) arguments
    (at x ~ 1e3 with O(1) weights, exp underflows and torch's own result is 0 / 0)."""
    x = torch.randn(batch, n, d, dtype=dtype) * scale
    shrink = 1 / scale if scale > 1 else 1.0
    w_q, w_k = (torch.randn(batch, d, d, dtype=dtype) * shrink for _ in range(2))
    return x, w_q, w_k, torch.randn(batch, d, d, dtype=dtype)


@pytest.mark.parametrize("n,d", shapes())
def test_float32_within_10x_of_torch(seed, n, d):
    op = SimulatedLinearAttention(n, d)
    for scale in SCALES:
        args = random_inputs(n, d, 8, scale)
        ref = direct(*(t.double() for t in args))
        ours = within_torch(op, args, ref, direct(*args), torch.float32, (seed, scale))
        assert ours.shape == (8, n, d) and ours.dtype == torch.float32, seed


@pytest.mark.parametrize("n,d", [(1, 1), (3, 2), (2, 3)])
def test_float64_within_10x_of_torch(seed, n, d):
    op = SimulatedLinearAttention(n, d)
    for scale in SCALES:
        args = random_inputs(n, d, 3, scale, torch.float64)
        within_torch(op, args, decimal_reference(*args), direct(*args), torch.float64, (seed, scale))


def test_both_branches_of_phi(seed):
    # Strongly negative and positive projections: phi = exp(t) down to ~e^-60, and t + 1 up to ~60.
    x = torch.randn(4, 3, 2, dtype=torch.float64) * 20
    w = torch.randn(3, 2, 2, dtype=torch.float64)
    ours = SimulatedLinearAttention(3, 2)(x, *w)
    torch.testing.assert_close(ours, decimal_reference(x, *(t.expand(4, 2, 2) for t in w)), rtol=1e-11, atol=0,
                               msg=f"seed {seed}")


def test_batched_unbatched_and_broadcast(seed):
    op = SimulatedLinearAttention(3, 2)
    args = random_inputs(3, 2, 4, 1.0, torch.float64)
    batched = op(*args)
    assert torch.equal(op(*(t[2] for t in args)), batched[2]), seed
    xs = args[0].reshape(2, 2, 3, 2)
    shared = op(xs, args[1][0], args[2][0], args[3][0])
    assert shared.shape == (2, 2, 3, 2), seed
    torch.testing.assert_close(shared, direct(xs, args[1][0], args[2][0], args[3][0]), rtol=1e-12, atol=1e-12,
                               msg=f"seed {seed}")


@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (4, 2), (3, 3)])
def test_depth_width(n, d):
    op = SimulatedLinearAttention(n, d)
    assert (op.depth, op.width) == (7, max(6 * d, 4 * n))
    assert f"SimulatedLinearAttention(n={n}, d={d}): depth 7" in op.describe()


def test_checkpoint_round_trip(seed, tmp_path):
    op = SimulatedLinearAttention(3, 2)
    path = tmp_path / "linear_attention.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, SimulatedLinearAttention) and loaded.args == {"n": 3, "d": 2}
    args = random_inputs(3, 2, 4, 1.0)
    assert torch.equal(loaded(*args), op(*args)), seed
    encoder = usim.Encoder.load(path)
    assert torch.equal(op.layout.unpack(encoder(op.layout.pack(*args))), op(*args)), seed


def test_underflowing_denominator_raises():
    # q = -1000 everywhere: phi(q) = exp(-1000) = 0 and the denominator is 0 (torch gives NaN too).
    x = torch.full((2, 2), 1000.0)
    w_q, w_k, w_v = -torch.eye(2), torch.eye(2), torch.eye(2)
    assert torch.isnan(direct(x, w_q, w_k, w_v)).all()
    with pytest.raises(ValueError, match="denominator"):
        SimulatedLinearAttention(2, 2)(x, w_q, w_k, w_v)


def test_layer_builder_checks_blocks():
    layout = Layout.of(inputs={"x": (3, 2), "w_q": (2, 2), "w_k": (2, 2), "w_v": (2, 3)},
                       outputs={"y": (3, 2)}, scratch=scratch_blocks(3, 2, "t."))
    b = Builder(layout)
    with pytest.raises(ValueError, match=r"block 'w_v' must have shape \(2, 2\)"):
        linear_attention_layers(b, "x", "w_q", "w_k", "w_v", ("y", b.slot("r")), tag="t.")


def test_bad_input():
    op = SimulatedLinearAttention(3, 2)
    x, w_q, w_k, w_v = (t[0] for t in random_inputs(3, 2, 1, 1.0))
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 3, 2\), got \(2, 3\)"):
        op(x.T, w_q, w_k, w_v)
    with pytest.raises(ValueError, match=r"w_k: expected shape \(\.\.\., 2, 2\), got \(3, 2\)"):
        op(x, w_q, torch.randn(3, 2), w_v)
    with pytest.raises(ValueError, match=r"w_v: expected shape"):
        op(x, w_q, w_k, torch.randn(2))
    with pytest.raises(TypeError, match="w_q must be a torch.Tensor"):
        op(x, 1.0, w_k, w_v)
    with pytest.raises(ValueError, match="dtype"):
        op(x.to(torch.bfloat16), w_q.to(torch.bfloat16), w_k.to(torch.bfloat16), w_v.to(torch.bfloat16))
    with pytest.raises(ValueError, match="infinite"):
        op(x, w_q, w_k, torch.full((2, 2), float("inf")))
    with pytest.raises(ValueError, match="d must be >= 1"):
        SimulatedLinearAttention(3, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        SimulatedLinearAttention("3", 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    op = SimulatedLinearAttention(3, 2).cuda()
    args = [t.cuda() for t in random_inputs(3, 2, 4, 1.0, dtype)]
    ours = within_torch(op, args, direct(*(t.double() for t in args)), direct(*args), dtype, (seed,))
    assert ours.device.type == "cuda", seed
