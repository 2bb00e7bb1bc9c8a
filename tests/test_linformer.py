from decimal import Decimal, localcontext

import pytest
import torch

import usim
from usim.construct import Builder
from usim.layout import Layout
from usim.ops.linformer import SimulatedLinformer, linformer_layers
from usim.ops.simulator import UniversalSimulator
from helpers import generator, within_torch

SCALES = (1e-3, 1.0, 1e3)


def shapes():
    """(n, d, k): 1x1, 1xd, nx1, non-square, k < n and k > n, one random."""
    g = generator(f"{__name__}.shapes")
    fixed = [(1, 1, 1), (1, 3, 2), (4, 1, 2), (3, 2, 4), (4, 4, 3), (2, 3, 1)]
    return fixed + [tuple(torch.randint(1, 5, (3,), generator=g).tolist())]


def direct(x, a, v, e, f):
    """The torch evaluation, associated as in the construction."""
    return torch.softmax(x @ a @ (e @ x).transpose(-1, -2), -1) @ ((f @ x) @ v)


def decimal_reference(x, a, v, e, f):
    """The same formula in 50-digit decimals (inputs (B, ...) float64), rounded to float64."""
    def mm(p, q):
        return [[sum(p[i][j] * q[j][k] for j in range(len(q))) for k in range(len(q[0]))] for i in range(len(p))]

    def dec(t):
        return [[Decimal(v) for v in row] for row in t.tolist()]

    out = []
    with localcontext() as ctx:
        ctx.prec = 50
        for xb, ab, vb, eb, fb in zip(*(map(dec, t) for t in (x, a, v, e, f))):
            ex = mm(eb, xb)
            s = mm(mm(xb, ab), [list(col) for col in zip(*ex)])
            p = []
            for row in s:
                w = [(c - max(row)).exp() for c in row]
                p.append([c / sum(w) for c in w])
            out.append([[float(c) for c in row] for row in mm(p, mm(mm(fb, xb), vb))])
    return torch.tensor(out, dtype=torch.float64)


def random_inputs(n, d, k, batch, scale, dtype=torch.float32):
    x = torch.randn(batch, n, d, dtype=dtype) * scale
    a = torch.randn(batch, d, d, dtype=dtype) / d
    v, e, f = torch.randn(batch, d, d, dtype=dtype), torch.randn(batch, k, n, dtype=dtype), \
        torch.randn(batch, k, n, dtype=dtype)
    return x, a, v, e, f


@pytest.mark.parametrize("n,d,k", shapes())
def test_float32_within_10x_of_torch(seed, n, d, k):
    op = SimulatedLinformer(n, d, k)
    for scale in SCALES:
        args = random_inputs(n, d, k, 8, scale)
        ref = direct(*(t.double() for t in args))
        ours = within_torch(op, args, ref, direct(*args), torch.float32, (seed, scale))
        assert ours.shape == (8, n, d) and ours.dtype == torch.float32, seed


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (3, 2, 2), (2, 3, 4)])
def test_float64_within_10x_of_torch(seed, n, d, k):
    op = SimulatedLinformer(n, d, k)
    for scale in SCALES:
        args = random_inputs(n, d, k, 3, scale, torch.float64)
        within_torch(op, args, decimal_reference(*args), direct(*args), torch.float64, (seed, scale))


def test_batched_unbatched_and_broadcast(seed):
    op = SimulatedLinformer(3, 2, 2)
    x, a, v, e, f = random_inputs(3, 2, 2, 4, 1.0, torch.float64)
    batched = op(x, a, v, e, f)
    assert torch.equal(op(x[1], a[1], v[1], e[1], f[1]), batched[1]), seed
    # One set of weights for a (2, 2) batch of x.
    xs = x.reshape(2, 2, 3, 2)
    shared = op(xs, a[0], v[0], e[0], f[0])
    assert shared.shape == (2, 2, 3, 2), seed
    torch.testing.assert_close(shared, direct(xs, a[0], v[0], e[0], f[0]), rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


def test_identity_projections_are_standard_attention(seed):
    # e = f = I (k = n): softmax(x a x^T) x v, the universal simulator's result.
    n, d = 3, 2
    x, a, v = torch.randn(2, n, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64), \
        torch.randn(d, d, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    ours = SimulatedLinformer(n, d, n)(x, a, v, eye, eye)
    torch.testing.assert_close(ours, UniversalSimulator(n, d)(x, a, v), rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (2, 3, 5), (4, 2, 3), (3, 3, 9)])
def test_depth_width(n, d, k):
    op = SimulatedLinformer(n, d, k)
    assert (op.depth, op.width) == (7, max(2 * n + 2 * d + 2, 2 * k))
    assert f"SimulatedLinformer(n={n}, d={d}, k={k}): depth 7" in op.describe()


def test_checkpoint_round_trip(seed, tmp_path):
    op = SimulatedLinformer(3, 2, 2)
    path = tmp_path / "linformer.safetensors"
    usim.save(op, path)
    loaded = usim.load(path)
    assert isinstance(loaded, SimulatedLinformer) and loaded.args == {"n": 3, "d": 2, "k": 2}
    args = random_inputs(3, 2, 2, 4, 1.0)
    assert torch.equal(loaded(*args), op(*args)), seed
    encoder = usim.Encoder.load(path)
    assert torch.equal(op.layout.unpack(encoder(op.layout.pack(*args))), op(*args)), seed


def test_layer_builder_checks_blocks():
    layout = Layout.of(inputs={"x": (3, 2), "a": (2, 2), "v": (2, 2), "e": (2, 3), "f": (2, 3)},
                       outputs={"y": (3, 2)}, scratch={"t.xt": (2, 3)})
    b = Builder(layout)
    b.standard_positions()
    with pytest.raises(KeyError, match="t.et"):
        linformer_layers(b, "x", "a", "v", "e", "f", ("y", b.slot("r")), tag="t.")
    layout = Layout.of(inputs={"x": (3, 2), "a": (2, 2), "v": (2, 2), "e": (2, 3), "f": (3, 3)},
                       outputs={"y": (3, 2)})
    b = Builder(layout)
    with pytest.raises(ValueError, match=r"block 'f' must have shape \(2, 3\)"):
        linformer_layers(b, "x", "a", "v", "e", "f", ("y", b.slot("r")), tag="t.")


def test_bad_input():
    op = SimulatedLinformer(3, 2, 2)
    x, a, v, e, f = random_inputs(3, 2, 2, 1, 1.0)
    x, a, v, e, f = x[0], a[0], v[0], e[0], f[0]
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 3, 2\), got \(2, 3\)"):
        op(x.T, a, v, e, f)
    with pytest.raises(ValueError, match=r"e: expected shape \(\.\.\., 2, 3\), got \(3, 3\)"):
        op(x, a, v, torch.randn(3, 3), f)
    with pytest.raises(ValueError, match=r"f: expected shape"):
        op(x, a, v, e, torch.randn(3))
    with pytest.raises(ValueError, match=r"v: expected shape"):
        op(x, a, torch.randn(3, 3), e, f)
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        op(x, [[1.0, 0.0], [0.0, 1.0]], v, e, f)
    with pytest.raises(ValueError, match="dtype"):
        op(x.half(), a.half(), v.half(), e.half(), f.half())
    with pytest.raises(ValueError, match="share one dtype"):
        op(x.double(), a, v, e, f)
    with pytest.raises(ValueError, match="NaN"):
        op(x, a, v, e, torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="batch shapes do not broadcast"):
        op(torch.randn(2, 3, 2), torch.randn(3, 2, 2), v, e, f)
    with pytest.raises(ValueError, match="k must be >= 1"):
        SimulatedLinformer(3, 2, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        SimulatedLinformer(3.0, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(seed, dtype):
    op = SimulatedLinformer(3, 2, 2).cuda()
    args = [t.cuda() for t in random_inputs(3, 2, 2, 4, 1.0, dtype)]
    ours = within_torch(op, args, direct(*(t.double() for t in args)), direct(*args), dtype, (seed,))
    assert ours.device.type == "cuda", seed
