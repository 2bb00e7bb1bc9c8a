"""SimulatedMultiheadAttention as a drop-in for nn.MultiheadAttention (self-attention)."""

import pytest
import torch
from torch import nn

from usim.mha import SimulatedMultiheadAttention


def errors(mha, sim, x, mask):
    ref_mha = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None,
                                    batch_first=mha.batch_first, dtype=torch.float64)
    ref_mha.load_state_dict({k: v.double() for k, v in mha.state_dict().items()})
    ref, ref_w = ref_mha(x.double(), x.double(), x.double(), key_padding_mask=mask)
    out, w = mha(x, x, x, key_padding_mask=mask)
    ours, ours_w = sim(x, x, x, key_padding_mask=mask)
    return ((out.double() - ref).abs().max().item(), (ours.double() - ref).abs().max().item(),
            (ours_w.double() - ref_w).abs().max().item(), ours.shape == out.shape, ours_w.shape == w.shape)


@pytest.mark.parametrize("embed_dim,num_heads,bias,batch_first", [
    (4, 1, True, False), (4, 2, False, True), (6, 3, True, True), (6, 2, True, False)])
def test_matches_nn_multihead_attention(seed, embed_dim, num_heads, bias, batch_first):
    mha = nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=batch_first)
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    sim = SimulatedMultiheadAttention.from_torch(mha, seq_len=4)
    x = torch.randn(2, 4, embed_dim) if batch_first else torch.randn(4, 2, embed_dim)
    for mask in (None, torch.tensor([[False, False, True, False], [False, False, False, True]])):
        torch_err, our_err, weight_err, same_shape, same_w_shape = errors(mha, sim, x, mask)
        assert same_shape and same_w_shape
        assert our_err <= 10 * torch_err + 1e-6, (seed, our_err, torch_err)
        assert weight_err < 1e-5, (seed, weight_err)


def test_shorter_sequence_unbatched_and_per_head_weights(seed):
    mha = nn.MultiheadAttention(4, 2)
    sim = SimulatedMultiheadAttention.from_torch(mha, seq_len=5)
    x = torch.randn(3, 4)
    out, w = sim(x, x, x, average_attn_weights=False)
    ref, ref_w = mha(x, x, x, average_attn_weights=False)
    assert out.shape == ref.shape == (3, 4) and w.shape == ref_w.shape == (2, 3, 3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(w, ref_w, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    assert sim(x, x, x, need_weights=False)[1] is None


def test_bad_input():
    sim = SimulatedMultiheadAttention(4, 2, seq_len=3)
    x = torch.randn(3, 1, 4)
    with pytest.raises(RuntimeError, match="is_causal"):
        sim(x, x, x, is_causal=True)  # as nn.MultiheadAttention: the hint needs its mask
    with pytest.raises(ValueError, match="attn_mask must be"):
        sim(x, x, x, attn_mask=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        sim(x, x, x, key_padding_mask=[[False, False, True]])
    with pytest.raises(ValueError, match="key"):
        sim(x, torch.randn(3, 2, 4), x)
    with pytest.raises(ValueError, match="divisible"):
        SimulatedMultiheadAttention(5, 2, seq_len=3)
