"""The universal simulator U against a float64 reference."""

import pytest
import torch

import usim
from usim.ops.simulator import UniversalSimulator


def reference(x, a, v, keep=None, w1=None, w2=None, residual=False):
    """sum_h softmax(x a_h x^T, masked) x v_h in float64, then the optional FFN."""
    x, a, v = x.double(), a.double(), v.double()
    if a.dim() == 2:
        a, v = a[None], v[None]
    scores = torch.einsum("...id,hde,...je->...hij", x, a, x)
    if keep is not None:
        scores = scores.masked_fill(~keep[..., None, None, :], float("-inf"))
    y = (torch.softmax(scores, -1) @ (x[..., None, :, :] @ v)).sum(-3)
    if w1 is None:
        return y
    z = torch.relu(y @ w1.double()) @ w2.double()
    return z + y if residual else z


def torch_error(x, a, v, ref):
    """The error of the direct float32 torch computation, our yardstick."""
    direct = reference(x.float(), a.float(), v.float()).float()  # float64 math rounded: a lower bound
    scores = torch.einsum("...id,hde,...je->...hij", x.float(), a.float() if a.dim() == 3 else a.float()[None],
                          x.float())
    vv = v.float() if v.dim() == 3 else v.float()[None]
    f32 = (torch.softmax(scores, -1) @ (x.float()[..., None, :, :] @ vv)).sum(-3)
    return max((f32.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item(), 1e-30)


@pytest.mark.parametrize("n,d,heads", [(1, 1, 1), (2, 3, 1), (3, 2, 1), (3, 3, 2), (4, 3, 1)])
def test_matches_reference_float32(seed, n, d, heads):
    u = UniversalSimulator(n, d, heads=heads)
    x = torch.randn(5, n, d)
    a = torch.randn(heads, d, d) / d
    v = torch.randn(heads, d, d)
    ref = reference(x, a, v)
    ours = u(x, a if heads > 1 else a[0], v if heads > 1 else v[0])
    assert ours.shape == (5, n, d) and ours.dtype == torch.float32
    err = (ours.double() - ref).abs().max().item()
    assert err <= 10 * torch_error(x, a, v, ref) + 1e-6, (seed, err)


def test_matches_reference_float64(seed):
    u = UniversalSimulator(3, 3, heads=2)
    x, a, v = torch.randn(4, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, dtype=torch.float64), \
        torch.randn(2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(u(x, a, v), reference(x, a, v), rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


def test_attention_weights_are_the_softmax(seed):
    u = UniversalSimulator(3, 2, heads=2)
    x, a, v = torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 2, 2, dtype=torch.float64), \
        torch.randn(2, 2, 2, dtype=torch.float64)
    _, weights = u.attention(x, a, v)
    expected = torch.softmax(torch.einsum("bid,hde,bje->bhij", x, a, x), -1)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-14, msg=f"seed {seed}")


@pytest.mark.parametrize("residual", [False, True])
def test_ffn_sublayer(seed, residual):
    u = UniversalSimulator(3, 2, heads=1, ffn_hidden=3)
    x, a, v = torch.randn(4, 3, 2), torch.randn(2, 2), torch.randn(2, 2)
    w1, w2 = torch.randn(2, 3), torch.randn(3, 2)
    ours = u(x, a, v, w1=w1, w2=w2, residual=residual)
    ref = reference(x, a, v, w1=w1, w2=w2, residual=residual)
    assert (ours.double() - ref).abs().max() < 1e-4 * (1 + ref.abs().max()), seed


def test_key_padding_mask(seed):
    u = UniversalSimulator(4, 2)
    x, a, v = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64), \
        torch.randn(2, 2, dtype=torch.float64)
    mask = torch.tensor([[False, True, False, False], [False, False, False, True], [True, True, True, False]])
    torch.testing.assert_close(u(x, a, v, key_padding_mask=mask), reference(x, a, v, keep=~mask),
                               rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    # an item whose every key is masked has weights 0 (as torch's scaled_dot_product_attention): y = 0
    full = mask.clone()
    full[1] = True
    y, p = u.attention(x, a, v, key_padding_mask=full)
    assert torch.equal(y[1], torch.zeros(4, 2, dtype=torch.float64)) and torch.equal(p[1], torch.zeros(1, 4, 4,
                                                                                                       dtype=torch.float64))
    torch.testing.assert_close(y[[0, 2]], reference(x, a, v, keep=~mask)[[0, 2]], rtol=1e-12, atol=1e-12)


def test_universality_by_padding(seed):
    big = UniversalSimulator(4, 3)
    x, a, v = torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64), \
        torch.randn(2, 2, dtype=torch.float64)
    ref = reference(x, a, v)
    torch.testing.assert_close(big(x, a, v), ref, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    # Zero-padding the tokens without masking them adds exp(0)-style terms to every normaliser.
    xp = torch.nn.functional.pad(x, (0, 1, 0, 1))
    ap = torch.nn.functional.pad(a, (0, 1, 0, 1))
    vp = torch.nn.functional.pad(v, (0, 1, 0, 1))
    unmasked = big(xp, ap, vp)[..., :3, :2]
    assert (unmasked - ref).abs().max() > 1e-3, seed
    masked = big(xp, ap, vp, key_padding_mask=torch.tensor([False, False, False, True]).expand(2, 4))
    torch.testing.assert_close(masked[..., :3, :2], ref, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


def test_checkpoint_through_bare_encoder(seed, tmp_path):
    u = UniversalSimulator(2, 2, heads=2)
    path = tmp_path / "u.safetensors"
    usim.save(u, path)
    loaded = usim.load(path)
    x, a, v = torch.randn(3, 2, 2), torch.randn(2, 2, 2), torch.randn(2, 2, 2)
    assert torch.equal(loaded(x, a, v), u(x, a, v)), seed
    encoder = usim.Encoder.load(path)
    ignored = torch.zeros(2)  # key flags: 1 ignores a key
    y, *_ = u.layout.unpack(encoder(u.layout.pack(x, a[0], a[1], v[0], v[1], ignored)))
    assert torch.equal(y, u(x, a, v)), seed


def test_bad_input():
    u = UniversalSimulator(3, 2, heads=2)
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="built for"):
        u(torch.randn(4, 2), torch.randn(2, 2, 2), torch.randn(2, 2, 2))
    with pytest.raises(ValueError, match="heads=2"):
        u(x, torch.randn(2, 2), torch.randn(2, 2, 2))
    with pytest.raises(ValueError, match="without ffn_hidden"):
        u(x, torch.randn(2, 2, 2), torch.randn(2, 2, 2), w1=torch.randn(2, 2), w2=torch.randn(2, 2))
    with pytest.raises(ValueError, match="key_padding_mask"):
        u(x, torch.randn(2, 2, 2), torch.randn(2, 2, 2), key_padding_mask=torch.zeros(3))
    with pytest.raises(ValueError, match="w1"):
        UniversalSimulator(3, 2, ffn_hidden=2)(x, torch.randn(2, 2), torch.randn(2, 2))


# --- The factored form: nn.MultiheadAttention's parameterisation (head_dim) -----------------------

def factored_reference(x, wq, wk, wv, wo, bo=None, keep=None):
    """sum_h softmax((x wq_h)(x wk_h)^T, masked) (x wv_h) wo_h + bo, in float64."""
    x, wq, wk, wv, wo = (t.double() for t in (x, wq, wk, wv, wo))
    q, k, v = (x[..., None, :, :] @ w for w in (wq, wk, wv))
    scores = q @ k.transpose(-1, -2)
    if keep is not None:
        scores = scores.masked_fill(~keep[..., None, None, :], float("-inf"))
    y = (torch.softmax(scores, -1) @ v @ wo).sum(-3)
    return y if bo is None else y + bo.double()


def factored_inputs(n, d, heads, r, dtype=torch.float32, batch=3):
    x = torch.randn(batch, n, d, dtype=dtype)
    wq, wk, wv = (torch.randn(heads, d, r, dtype=dtype) / d ** 0.5 for _ in range(3))
    return x, wq, wk, wv, torch.randn(heads, r, d, dtype=dtype) / r ** 0.5, torch.randn(d, dtype=dtype)


@pytest.mark.parametrize("n,d,heads,r", [(1, 1, 1, 1), (3, 4, 2, 2), (4, 6, 3, 2), (5, 3, 1, 4)])
def test_factored_matches_reference_float32(seed, n, d, heads, r):
    u = UniversalSimulator(n, d, heads=heads, head_dim=r)
    x, wq, wk, wv, wo, bo = factored_inputs(n, d, heads, r)
    ref = factored_reference(x, wq, wk, wv, wo, bo)
    ours = u(x, wq, wk, wv, wo, bo=bo)
    q, k, v = (x[:, None] @ w for w in (wq, wk, wv))
    direct = (torch.softmax(q @ k.mT, -1) @ v @ wo).sum(1) + bo  # torch in float32: the yardstick
    torch_err = max((direct.double() - ref).abs().max().item(), 1e-30)
    err = (ours.double() - ref).abs().max().item()
    assert ours.shape == (3, n, d) and ours.dtype == torch.float32
    assert err <= 10 * torch_err + 1e-6, (seed, err, torch_err)


def test_factored_float64_mask_and_weights(seed):
    u = UniversalSimulator(4, 3, heads=2, head_dim=2)
    x, wq, wk, wv, wo, bo = factored_inputs(4, 3, 2, 2, torch.float64)
    mask = torch.tensor([[False, True, False, False], [False, False, False, True], [True, True, True, False]])
    y, weights = u.attention(x, wq, wk, wv, wo, key_padding_mask=mask, bo=bo)
    torch.testing.assert_close(y, factored_reference(x, wq, wk, wv, wo, bo, keep=~mask), rtol=1e-12, atol=1e-12,
                               msg=f"seed {seed}")
    scores = (x[:, None] @ wq) @ (x[:, None] @ wk).mT
    expected = torch.softmax(scores.masked_fill(mask[:, None, None, :], float("-inf")), -1)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-14, msg=f"seed {seed}")


def test_factored_one_head_and_universality_by_padding(seed):
    big = UniversalSimulator(5, 4, heads=1, head_dim=3)
    x, wq, wk, wv, wo, bo = factored_inputs(3, 2, 1, 2, torch.float64)
    ref = factored_reference(x, wq, wk, wv, wo, bo)
    # one head: (d, r) weights without the head axis; smaller n, d and head_dim are padded and masked
    torch.testing.assert_close(big(x, wq[0], wk[0], wv[0], wo[0], bo=bo), ref, rtol=1e-12, atol=1e-12,
                               msg=f"seed {seed}")
    torch.testing.assert_close(big(x, wq, wk, wv, wo), factored_reference(x, wq, wk, wv, wo), rtol=1e-12,
                               atol=1e-12, msg=f"seed {seed}")


def test_factored_checkpoint_through_bare_encoder(seed, tmp_path):
    u = UniversalSimulator(3, 2, heads=2, head_dim=2)
    usim.save(u, tmp_path / "f.safetensors")
    loaded = usim.load(tmp_path / "f.safetensors")
    x, wq, wk, wv, wo, bo = factored_inputs(3, 2, 2, 2)
    assert loaded.head_dim == 2 and torch.equal(loaded(x, wq, wk, wv, wo, bo=bo), u(x, wq, wk, wv, wo, bo=bo)), seed
    encoder = usim.Encoder.load(tmp_path / "f.safetensors")
    none_ignored, no_bias, unit = torch.zeros(3, 3), torch.zeros(3, 3), torch.ones(3, 3)  # per head
    arrays = [x, x, x, *wq.unbind(-3), *wk.unbind(-3), *wv.unbind(-3), *wo.unbind(-3), bo, torch.ones(1),
              none_ignored, none_ignored, no_bias, no_bias, unit, unit]
    y, *_ = u.layout.unpack(encoder(u.layout.pack(*arrays)))
    assert torch.equal(y, u(x, wq, wk, wv, wo, bo=bo)), seed


def test_width_and_heads_do_not_grow_with_the_sizes():
    # One token per product term: only the sequence grows with n, d, heads and head_dim.
    small, large = UniversalSimulator(2, 2, heads=1, head_dim=1), UniversalSimulator(6, 8, heads=3, head_dim=4)
    assert small.encoder.stream_width == large.encoder.stream_width
    assert small.width == large.width and small.depth == large.depth == 14
    assert large.encoder.length > 10 * small.encoder.length
    av_small, av_large = UniversalSimulator(2, 2), UniversalSimulator(8, 6, heads=3)
    assert av_small.encoder.stream_width == av_large.encoder.stream_width and av_small.width == av_large.width


def test_factored_bad_input():
    u = UniversalSimulator(3, 2, heads=2, head_dim=2)
    x, wq, wk, wv, wo, bo = factored_inputs(3, 2, 2, 2)
    with pytest.raises(TypeError, match="wq, wk, wv, wo"):
        u(x, wq, wk)
    with pytest.raises(ValueError, match="head_dim 3 exceeds"):
        u(x, torch.randn(2, 2, 3), wk, wv, wo)
    with pytest.raises(ValueError, match="heads=2"):
        u(x, wq[0], wk, wv, wo)
    with pytest.raises(ValueError, match="bo"):
        u(x, wq, wk, wv, wo, bo=torch.zeros(5))
    with pytest.raises(ValueError, match="ffn_hidden"):
        UniversalSimulator(3, 2, ffn_hidden=2, head_dim=2)


def test_factored_cross_attention_and_attention_masks(seed):
    # queries of length 3 and width 4; keys (width 5) and values (width 2) of length 5
    u = UniversalSimulator(3, 4, heads=2, head_dim=2, kv_len=5, kdim=5, vdim=2)
    dt = torch.float64
    x, key, value = torch.randn(2, 3, 4, dtype=dt), torch.randn(2, 5, 5, dtype=dt), torch.randn(2, 5, 2, dtype=dt)
    wq, wk, wv = torch.randn(2, 4, 2, dtype=dt), torch.randn(2, 5, 2, dtype=dt), torch.randn(2, 2, 2, dtype=dt)
    wo, bo = torch.randn(2, 2, 4, dtype=dt), torch.randn(4, dtype=dt)
    causal = torch.ones(3, 5, dtype=torch.bool).triu(1)  # True = left out
    additive = torch.randn(2, 2, 3, 5, dtype=dt).masked_fill(torch.rand(2, 2, 3, 5) < 0.3, float("-inf"))
    additive[..., 0] = 0.0  # every row keeps key 0
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    q, k, v = x[:, None] @ wq, key[:, None] @ wk, value[:, None] @ wv
    for mask in (causal, additive):
        scores = q @ k.mT
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores.masked_fill(padding[:, None, None, :], float("-inf")), -1)
        y, p = u.attention(x, wq, wk, wv, wo, key=key, value=value, key_padding_mask=padding, attn_mask=mask, bo=bo)
        torch.testing.assert_close(y, (weights @ v @ wo).sum(1) + bo, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
        torch.testing.assert_close(p, weights, rtol=1e-12, atol=1e-14, msg=f"seed {seed}")
    # a row whose every score is left out has weights 0 (as scaled_dot_product_attention): y = b_O there
    full = torch.zeros(3, 5, dtype=torch.bool)
    full[1] = True
    y, p = u.attention(x, wq, wk, wv, wo, key=key, value=value, attn_mask=full, bo=bo)
    assert torch.equal(p[:, :, 1], torch.zeros(2, 2, 5, dtype=dt)), seed
    torch.testing.assert_close(y[:, 1], bo.expand(2, 4), rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    assert torch.isfinite(y).all(), seed
    with pytest.raises(ValueError, match="attn_mask must be"):
        u(x, wq, wk, wv, wo, key=key, value=value, attn_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same length"):
        u(x, wq, wk, wv, wo, key=key, value=value[:, :4])
    with pytest.raises(ValueError, match="factored form"):
        UniversalSimulator(3, 2)(x[..., :2], torch.randn(2, 2), torch.randn(2, 2), attn_mask=causal)
