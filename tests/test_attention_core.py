"""usim.AttentionCore: softmax(scaling * Q K^T + bias, ignored scores left out) V from per-head Q, K, V."""

import pytest
import torch

import usim
from usim.ops.attention_core import AttentionCore


def reference(q, k, v, scaling, ignore=None, bias=0.0, weight_scale=1.0):
    """Eager attention (repeat_kv for grouped heads), in the inputs' dtype."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    scores = (q @ k.mT) * scaling + bias
    if ignore is not None:
        scores = scores.masked_fill(ignore, float("-inf"))
    p = torch.softmax(scores, -1) * weight_scale
    return p @ v, p


def inputs(batch, heads, kv_heads, n, m, r, dtype):
    q = torch.randn(batch, heads, n, r, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, m, r, dtype=dtype) for _ in range(2))
    ignore = torch.rand(batch, 1, n, m) < 0.3
    ignore[..., 0] = False  # every row keeps a key
    return q, k, v, ignore, torch.randn(batch, 1, n, m, dtype=dtype)


@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (4, 2), (3, 1)])  # multi-head, grouped-query, multi-query
def test_matches_eager_attention(seed, heads, kv_heads):
    core = AttentionCore(4, 8, heads=heads, head_dim=4, kv_heads=kv_heads)
    q, k, v, ignore, bias = inputs(3, heads, kv_heads, 3, 7, 3, torch.float64)  # smaller: padded
    out, weights = core.attention(q, k, v, scaling=0.3, ignore=ignore, bias=bias)
    want, want_weights = reference(q, k, v, 0.3, ignore, bias)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    torch.testing.assert_close(weights, want_weights, rtol=1e-12, atol=1e-14, msg=f"seed {seed}")
    # float32: within 10x torch's own float32 error against float64
    q32, k32, v32, bias32 = (t.float() for t in (q, k, v, bias))
    ours = core.attention(q32, k32, v32, scaling=0.3, ignore=ignore, bias=bias32)[0]
    torch_err = (reference(q32, k32, v32, 0.3, ignore, bias32)[0].double() - want).abs().max().item()
    assert (ours.double() - want).abs().max().item() <= 10 * torch_err + 1e-7, seed
    # grouped heads read their group's K and V by address: one block per key/value head, no copies
    assert [b.name for b in core.layout.inputs if b.name[0] in "kv"] == \
        [f"k{g}" for g in range(kv_heads)] + [f"v{g}" for g in range(kv_heads)]


def test_scaling_per_row_and_weight_scale(seed):
    core = AttentionCore(4, 4, heads=2, head_dim=3)
    q, k, v, _, bias = inputs(2, 2, 2, 4, 4, 3, torch.float64)
    scaling = torch.rand(2, 2, 4, 1, dtype=torch.float64)
    scaling[0, 1, 2] = 0.0  # a row of zero scores: uniform weights
    keep = (torch.rand(2, 2, 4, 4) > 0.5).double() / 0.5  # dropout's multiplier
    out, weights = core.attention(q, k, v, scaling=scaling, bias=bias, weight_scale=keep)
    want, want_weights = reference(q, k, v, scaling, None, bias, keep)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    torch.testing.assert_close(weights, want_weights, rtol=1e-12, atol=1e-14, msg=f"seed {seed}")


def test_non_finite_inputs_propagate_as_in_eager(seed):
    core = AttentionCore(4, 8, heads=2, head_dim=4)
    q, k, v, ignore, bias = inputs(2, 2, 2, 4, 8, 4, torch.float32)
    q[0, 1, 2, 3] = float("nan")  # one query row's scores are NaN
    v[1, 0, 5, 0] = float("inf")  # an infinite value
    ignore[1, :, :, 5] = False
    out = core.attention(q, k, v, scaling=0.5, ignore=ignore, bias=bias)[0]  # no error, no check
    want = reference(q, k, v, 0.5, ignore, bias)[0]
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.isnan(out[0, 1, 2]).all(), seed
    assert torch.equal(torch.isinf(out), torch.isinf(want)) and torch.isinf(out[1, 0, :, 0]).all(), seed
    finite = torch.isfinite(want)
    torch.testing.assert_close(out[finite], want[finite], msg=f"seed {seed}")


def test_checkpoint_through_bare_encoder(seed, tmp_path):
    core = AttentionCore(2, 4, heads=2, head_dim=2, kv_heads=1)
    usim.save(core, tmp_path / "core.safetensors")
    loaded = usim.load(tmp_path / "core.safetensors")
    assert isinstance(loaded, AttentionCore) and loaded.args == core.args
    q, k, v = torch.randn(3, 2, 2, 2), torch.randn(3, 1, 4, 2), torch.randn(3, 1, 4, 2)
    out, weights = core.attention(q, k, v, scaling=0.7)
    encoder = usim.Encoder.load(tmp_path / "core.safetensors")
    per_head = {"scaling": torch.full((2, 1), 0.7), "ignore": torch.zeros(2, 4), "bias": torch.zeros(2, 4),
                "scale": torch.ones(2, 4)}
    arrays = {"q0": q[:, 0], "q1": q[:, 1], "k0": k[:, 0], "v0": v[:, 0],
              **{f"{name}{h}": t for name, t in per_head.items() for h in range(2)}}
    o0, o1, w0, w1 = core.layout.unpack(encoder(core.layout.pack(*(arrays[b.name] for b in core.layout.inputs))))
    assert torch.equal(torch.stack([o0, o1], 1), out) and torch.equal(torch.stack([w0, w1], 1), weights), seed
    torch.testing.assert_close(out, reference(q, k, v, 0.7)[0], msg=f"seed {seed}")


def test_dense_execution_agrees(seed):
    fast = AttentionCore(2, 4, heads=2, head_dim=2, kv_heads=1)
    dense = AttentionCore(2, 4, heads=2, head_dim=2, kv_heads=1, execution="dense")
    q, k, v, ignore, bias = inputs(2, 2, 1, 2, 3, 2, torch.float64)
    for a, b in zip(fast.attention(q, k, v, 0.5, ignore, bias), dense.attention(q, k, v, 0.5, ignore, bias)):
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(torch.float64).eps, atol=1e-15, msg=f"seed {seed}")


def test_bad_input():
    core = AttentionCore(4, 4, heads=2, head_dim=2)
    q, k = torch.randn(1, 2, 4, 2), torch.randn(1, 2, 4, 2)
    with pytest.raises(ValueError, match="exceed"):
        core.attention(torch.randn(1, 2, 5, 2), k, k)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, m, r\)"):
        core.attention(q, torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2))
    with pytest.raises(ValueError, match="broadcast"):
        core.attention(q, k, k, bias=torch.zeros(3, 4))
    with pytest.raises(TypeError, match="query"):
        core.attention(None, k, k)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        AttentionCore(4, 4, heads=3, head_dim=2, kv_heads=2)
