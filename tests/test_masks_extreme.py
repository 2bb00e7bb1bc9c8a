"""Masked keys at any bias, fully masked rows, dropout p = 1 and huge logits (docs/masking.md).

A key that a mask, a key padding mask or universality by padding removes has weight exactly 0 for
every finite score of the kept keys (the dtype's extremes included), in the drop-in, the HF kernel
and the whole-layer simulators; a row whose every key is masked has weights 0, as torch's
scaled_dot_product_attention gives, with finite gradients.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import usim
from helpers import node_seed
from usim.mha import SimulatedMultiheadAttention

DTYPES = [torch.float32, torch.float64]
# kept keys' biases far below every score: the dtype's minimum, -1e38, and -1e100 / -1e300 in float64
HUGE = {torch.float32: [-1e38, torch.finfo(torch.float32).min],
        torch.float64: [-1e38, -1e100, -1e300, torch.finfo(torch.float64).min]}
CASES = [(dtype, big) for dtype in DTYPES for big in HUGE[dtype]]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture
def seed(request):
    return node_seed(request)


def _masks(dtype, big, length=5):
    """attn_mask (L, L): every kept key of rows 0, 2, 4 biased by big, one key of each row -inf; and a
    key padding mask (1, L) hiding key 1 (whose attn_mask entry is huge and positive)."""
    mask = torch.zeros(length, length, dtype=dtype)
    mask[::2] = big
    mask[torch.arange(length), (torch.arange(length) + 2) % length] = float("-inf")
    mask[:, 1] = torch.finfo(dtype).max / 4  # key 1 is padding: its score would exceed every kept one
    padding = torch.zeros(1, length, dtype=torch.bool)
    padding[0, 1] = True
    return mask, padding


@pytest.mark.parametrize("dtype, big", CASES)
def test_drop_in_masked_keys_take_no_part_at_any_bias(seed, dtype, big, execution="fast", heads=2, length=5):
    mha = nn.MultiheadAttention(4, heads, batch_first=True, dtype=dtype)
    sim = SimulatedMultiheadAttention.from_torch(mha, execution=execution)
    x = torch.randn(1, length, 4, dtype=dtype)
    mask, padding = _masks(dtype, big, length)
    want, want_w = mha(x, x, x, attn_mask=mask, key_padding_mask=padding.to(dtype).masked_fill(padding, float("-inf")),
                       average_attn_weights=False)
    got, got_w = sim(x, x, x, attn_mask=mask, key_padding_mask=padding, average_attn_weights=False)
    masked = (mask == float("-inf")) | padding
    assert torch.equal(got_w[..., masked], torch.zeros_like(got_w[..., masked])), (seed, big)
    assert want.isfinite().all(), seed
    torch.testing.assert_close(got_w, want_w, **TOL[dtype], msg=f"seed {seed} bias {big}")
    torch.testing.assert_close(got, want, **TOL[dtype], msg=f"seed {seed} bias {big}")


def test_dense_execution_masked_keys_take_no_part(seed):
    dtype = torch.float32
    test_drop_in_masked_keys_take_no_part_at_any_bias(seed, dtype, torch.finfo(dtype).min, "dense", heads=1, length=3)


@pytest.mark.parametrize("dtype, big", CASES)
def test_padding_keys_of_a_sized_u_take_no_part(seed, dtype, big):
    # universality by padding: a U built for 8 tokens computes 3; every kept score lies far below 0,
    # the score of the padding keys
    mha = nn.MultiheadAttention(4, 1, batch_first=True, dtype=dtype)
    wq, wk, wv, wo, bo = SimulatedMultiheadAttention.from_torch(mha).folded(dtype)  # on [x, 1]
    u = usim.UniversalSimulator(8, 5, heads=1, head_dim=4)
    x = torch.randn(2, 3, 4, dtype=dtype)
    mask = torch.full((3, 3), big, dtype=dtype) + torch.randn(3, 3, dtype=dtype)
    want, want_w = mha(x, x, x, attn_mask=mask)
    got, got_w = u.attention(torch.cat([x, torch.ones(2, 3, 1, dtype=dtype)], -1), wq, wk, wv, wo, bo=bo,
                             attn_mask=mask)
    torch.testing.assert_close(got_w.sum(-1), torch.ones(2, 1, 3, dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(got_w[:, 0], want_w, **TOL[dtype], msg=f"seed {seed} bias {big}")
    torch.testing.assert_close(got[..., :4], want, **TOL[dtype], msg=f"seed {seed} bias {big}")


@pytest.mark.parametrize("dtype, big", CASES)
def test_padding_keys_of_a_sized_core_take_no_part(seed, dtype, big):
    q, k, v = (torch.randn(2, 2, 3, 4, dtype=dtype) for _ in range(3))
    bias = torch.full((3, 3), big, dtype=dtype)
    out, weights = usim.AttentionCore(8, 8, heads=2, head_dim=4).attention(q, k, v, scaling=0.5, bias=bias)
    probs = torch.softmax(q @ k.mT * 0.5 + bias, -1)
    torch.testing.assert_close(weights, probs, **TOL[dtype], msg=f"seed {seed} bias {big}")
    torch.testing.assert_close(out, probs @ v, **TOL[dtype], msg=f"seed {seed} bias {big}")


@pytest.mark.parametrize("scale", [1e50, 1e100, 1e150])
def test_float64_drop_in_with_huge_logits(seed, scale):
    # projections scaled so that the scores are near +-scale^2 (up to 1e300): a kept maximum far
    # below a masked key's score once let that key into the row
    mha = nn.MultiheadAttention(4, 1, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.mul_(scale)
    sim = SimulatedMultiheadAttention.from_torch(mha)
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    padding = torch.zeros(3, 4, dtype=torch.bool)
    padding[:, 1] = True
    want, want_w = mha(x, x, x, key_padding_mask=padding)
    got, got_w = sim(x, x, x, key_padding_mask=padding)
    torch.testing.assert_close(got_w, want_w, rtol=1e-9, atol=1e-12, msg=f"seed {seed}")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item(), msg=f"seed {seed}")
    bias = torch.randn(4, 4, dtype=torch.float64) * 1e200  # finite score biases near +-1e200
    torch.testing.assert_close(sim(x, x, x, attn_mask=bias)[1], mha(x, x, x, attn_mask=bias)[1], rtol=1e-9,
                               atol=1e-12, msg=f"seed {seed}")


@pytest.mark.parametrize("dtype, big", CASES)
def test_layer_masked_keys_take_no_part_at_any_bias(seed, dtype, big):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=dtype).eval()
    sim = usim.SimulatedTransformerEncoderLayer.from_torch(layer)
    x = torch.randn(1, 5, 8, dtype=dtype)
    mask, padding = _masks(dtype, big)
    mask[:, 1] = 0.0  # nn.TransformerEncoderLayer merges the two masks itself
    with torch.no_grad():
        want = layer.train()(x, src_mask=mask, src_key_padding_mask=padding)  # the math path, no fast path
        got = sim(x, src_mask=mask, src_key_padding_mask=padding)
    torch.testing.assert_close(got, want, **TOL[dtype], msg=f"seed {seed} bias {big}")


@pytest.mark.parametrize("dtype, big", CASES)
def test_hf_kernel_masked_keys_take_no_part_at_any_bias(seed, dtype, big):
    pytest.importorskip("transformers")
    from usim.hf import usim_attention_forward

    q, k, v = (torch.randn(2, 2, 5, 4, dtype=dtype) for _ in range(3))
    mask = _masks(dtype, big)[0][None, None].expand(2, 1, 5, 5).clone()
    mask[..., 1] = float("-inf")  # rows 0, 2, 4: every kept key biased by big, two keys masked
    mask[1, ..., 3] = float("-inf")
    out, weights = usim_attention_forward(nn.Module(), q, k, v, mask, scaling=0.5)
    probs = torch.softmax(q @ k.mT * 0.5 + mask, -1)  # eager's arithmetic
    masked = weights[mask.expand_as(weights) == float("-inf")]
    assert masked.numel() == 44 and torch.equal(masked, torch.zeros_like(masked)), seed
    torch.testing.assert_close(weights, probs, **TOL[dtype], msg=f"seed {seed} bias {big}")
    torch.testing.assert_close(out, (probs @ v).transpose(1, 2), **TOL[dtype], msg=f"seed {seed} bias {big}")


# --- fully masked rows: weights 0, as scaled_dot_product_attention ---------------------------------

def test_drop_in_fully_masked_item_trains_as_sdpa(seed):
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    nn.init.normal_(mha.out_proj.bias)
    sim = SimulatedMultiheadAttention.from_torch(mha).train()
    x = torch.randn(3, 5, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1] = True  # every key of item 1
    padding[2, 3:] = True
    grads = []
    for module in (mha.train(), sim):
        module.zero_grad()
        out, weights = module(x, x, x, key_padding_mask=padding, need_weights=False)
        assert weights is None and out.isfinite().all(), seed
        out.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in module.parameters()])
        torch.testing.assert_close(out[1], mha.out_proj.bias.expand(5, 8), msg=f"seed {seed}")
    for ours, theirs in zip(*grads):
        assert ours.isfinite().all(), seed
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    _, weights = sim(x, x, x, key_padding_mask=padding)
    assert torch.equal(weights[1], torch.zeros(5, 5)), seed


def test_simulate_layers_fully_padded_item(seed):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    sim = usim.simulate_layers(encoder)
    x = torch.randn(3, 5, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0] = True  # item 0: every token is padding
    padding[2, 2:] = True
    want = encoder.train()(x, src_key_padding_mask=padding)  # training mode: the SDPA path, weights 0
    got = sim.train()(x, src_key_padding_mask=padding)  # two simulated layers: the second takes the first's output
    assert want.isfinite().all() and got.isfinite().all(), seed
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    got.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in sim.parameters()), seed


def test_simulate_bert_layers_fully_padded_item(seed):
    transformers = pytest.importorskip("transformers")
    from usim.bert import simulate_bert_layers

    config = transformers.BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=2, intermediate_size=16,
                                     vocab_size=50, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(config).eval()
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])  # item 1: all padding
    ids = torch.randint(1, 50, mask.shape)
    sim = simulate_bert_layers(model).train()
    out = sim(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.isfinite().all(), seed
    with torch.no_grad():  # the padded item: attention weights 0, so the attention output is the dense bias
        h = model.embeddings(input_ids=ids[1:2])
        for layer in model.encoder.layer:
            h = layer.attention.output.LayerNorm(h + layer.attention.output.dense.bias)
            h = layer.output(layer.intermediate(h), h)
        eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[1:2], h, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    keep = mask.bool()
    keep[1] = False
    torch.testing.assert_close(out[keep], eager[keep], rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    out.pow(2).sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in sim.parameters()), seed


def test_hf_kernel_fully_masked_rows_as_sdpa(seed):
    pytest.importorskip("transformers")
    from usim.hf import usim_attention_forward

    q, k, v = (torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attend = torch.rand(2, 1, 4, 4) < 0.6
    attend[0, :, 2] = False  # row 2 of item 0 attends to nothing
    attend[1] = False  # item 1: nothing at all
    attend[0, :, [0, 1, 3], 0] = True
    results = []
    for kernel in ("usim", "sdpa"):
        if kernel == "usim":
            out, weights = usim_attention_forward(nn.Module(), q, k, v, attend, scaling=0.5)
            masked = weights[~attend.expand_as(weights)]
            assert torch.equal(masked, torch.zeros_like(masked)), seed
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=0.5).transpose(1, 2)
        assert out.isfinite().all(), seed
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
        results.append((out, grads))
    assert torch.equal(results[0][0][1], torch.zeros(4, 2, 6, dtype=torch.float64)), seed
    for ours, theirs in zip((results[0][0], *results[0][1]), (results[1][0], *results[1][1])):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")


def test_hf_kernel_dropout_one_gives_zeros(seed):
    pytest.importorskip("transformers")
    from usim.hf import usim_attention_forward

    module = nn.Module().train()
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    out, weights = usim_attention_forward(module, q, k, v, None, dropout=1.0)
    want = F.dropout(torch.softmax(q @ k.mT / 2, -1), p=1.0, training=True)
    assert torch.equal(weights, want) and torch.equal(out, torch.zeros(1, 3, 2, 4)), seed
    with pytest.raises(ValueError, match="dropout probability"):
        usim_attention_forward(module, q, k, v, None, dropout=1.5)
