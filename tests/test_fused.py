"""The fused execution: a bilinear FFN's terms and the head averaging them run as one contraction.

What it must keep: the dense reference's results on any weights (edited ones too) within
max(10 x nn.MultiheadAttention's float32 error, 1e-6) against float64; NaN, inf and masked keys as
the other executions; no torch softmax / SDPA / MHA kernel, and einsums over views of the stream
only; a plan that says which averages it contracted and why the others are formed."""

import zlib

import pytest
import torch
from torch import nn

import usim
import usim.fused
from usim.fused import FusedProgram, contract
from usim.mha import SimulatedMultiheadAttention

from helpers import factored_masked_inputs


@pytest.fixture
def seed(request):
    """A seed fixed by the test's node id (the same run after run), seeded into torch."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


def run(module, mode, *args):
    module.execution = mode
    return module(*args)


def error(result, ref) -> float:
    return (result.double() - ref.double()).abs().max().item()


def bound(torch_error: float) -> float:
    return max(10 * torch_error, 1e-6)


def u_inputs(n, d, heads, dtype, batch=3):
    return (torch.randn(batch, n, d, dtype=dtype), torch.randn(heads, d, d, dtype=dtype) / d,
            torch.randn(heads, d, d, dtype=dtype))


def mha_pair(embed_dim, heads, **options):
    """An nn.MultiheadAttention in float32 (eval) and its float64 copy."""
    m = nn.MultiheadAttention(embed_dim, heads, batch_first=True, **options).eval()
    m64 = nn.MultiheadAttention(embed_dim, heads, batch_first=True, **options).double().eval()
    m64.load_state_dict(m.state_dict())
    return m, m64


def test_contract_is_the_sum_of_products_over_the_free_axes(seed):
    x, y = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    a = x[:, :, None, :].expand(2, 3, 4, 5)  # a[b, i, k, t] = x[b, i, t]: stride 0 along k
    b = y.transpose(1, 2)[:, None].expand(2, 3, 4, 5)  # b[b, i, k, t] = y[b, t, k]: stride 0 along i
    torch.testing.assert_close(contract(a, b, 1), (a * b).sum(-1), rtol=1e-12, atol=1e-12)
    c = torch.randn(2, 1, 1, 1, dtype=torch.float64).expand(2, 3, 4, 5)  # still along every axis
    torch.testing.assert_close(contract(a, c, 2), (a * c).sum((-1, -2)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads", [1, 2])
def test_u_fused_equals_dense(seed, heads):
    u = usim.UniversalSimulator(4, 3, heads=heads)
    args = u_inputs(4, 3, heads, torch.float64)
    dense = run(u, "dense", *args)
    fused = run(u, "fused", *args)
    assert isinstance(u.encoder.program(torch.float64), FusedProgram)
    torch.testing.assert_close(fused, dense, rtol=1e-12, atol=1e-12)
    if heads == 1:  # float32: within 10 x torch's own error (direct softmax(x a x^T)(x v)) of float64
        x, a, v = (t.float() for t in args)
        direct = torch.softmax(x @ a[0] @ x.transpose(-1, -2), -1) @ (x @ v[0])
        assert error(run(u, "fused", x, a, v), dense) <= bound(error(direct, dense))


def test_factored_u_with_masks_equals_dense(seed):
    u = usim.UniversalSimulator(3, 4, heads=2, head_dim=2, kv_len=4)
    x, w, kwargs = factored_masked_inputs(2, 3, 4, 4, 2, 2)
    u.execution = "dense"
    dense = u.attention(x, *w, **kwargs)
    u.execution = "fused"
    fused = u.attention(x, *w, **kwargs)
    assert sum(p.fused for p in u.encoder.program().places) >= 4
    for f, d in zip(fused, dense):
        torch.testing.assert_close(f, d, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("embed_dim, heads, length, options", [
    (8, 2, 5, {}), (12, 3, 7, {"bias": False}), (12, 4, 6, {"kdim": 5, "vdim": 7}), (16, 2, 9, {})])
def test_drop_in_within_ten_times_mha_error(seed, embed_dim, heads, length, options):
    m, m64 = mha_pair(embed_dim, heads, **options)
    sim = SimulatedMultiheadAttention.from_torch(m, length).eval()
    assert sim.execution == "fused"
    q = torch.randn(4, length, embed_dim)
    kv = [torch.randn(4, length, options.get(k, embed_dim)) for k in ("kdim", "vdim")]
    mask = torch.rand(4, length) < 0.3
    mask[:, 0] = False
    with torch.inference_mode():
        ref = m64(q.double(), kv[0].double(), kv[1].double(), key_padding_mask=mask, need_weights=False)[0]
        theirs = m(q, *kv, key_padding_mask=mask, need_weights=False)[0]
        ours = sim(q, *kv, key_padding_mask=mask, need_weights=False)[0]
    assert error(ours, ref) <= bound(error(theirs, ref)), (error(ours, ref), error(theirs, ref))


EDITS = ["ffn coefficient x1.5", "pre-activation reads a second slot", "transposed read", "match target +1",
         "value row x2"]


@pytest.mark.parametrize("edit", EDITS)
def test_fused_follows_edited_weights(seed, edit):
    # An execution that computed the intended operation directly could not pass this: edit the
    # constructed weights and fused must still give what dense gives.
    u = usim.UniversalSimulator(3, 3)
    args = u_inputs(3, 3, 1, torch.float64)
    before = run(u, "fused", *args)
    slots = u.encoder.slots
    fetch, ffn = u.encoder.layers[0].attn, u.encoder.layers[0].ffn  # fetch a, b; then term = a * b
    with torch.no_grad():
        q = fetch.query[0, 0]  # head 0's match tier: rows 2 * target, then -1 * one
        row, col, one = slots.index("fa.row"), slots.index("fa.col"), slots.index("one")
        if edit.startswith("ffn"):
            ffn.w_out.mul_(1.5)
        elif edit.startswith("pre-activation"):  # the left factor becomes a + 0.5 b
            ffn.w_in[0, slots.index("xa.b")] = 0.5
        elif edit == "transposed read":
            q[:, [row, col]] = q[:, [col, row]]
        elif edit.startswith("match"):  # the column read moves by one (past the edge: the nearest key)
            q[(q[:, col] != 0).nonzero()[0, 0], one] += 2.0
        else:
            u.encoder.layers[1].attn.value.mul_(2.0)
    fused = run(u, "fused", *args)
    dense = run(u, "dense", *args)
    torch.testing.assert_close(fused, dense, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fused, before), edit  # the edit changed the result
    u.execution = "fused"
    program = u.encoder.program()
    if not edit.startswith("match"):  # the others leave affine maps: still fused
        assert isinstance(program, FusedProgram) and any(p.fused for p in program.places), edit


def test_a_bias_on_the_terms_keeps_them_formed_and_says_why(seed):
    u = usim.UniversalSimulator(3, 3)
    args = u_inputs(3, 3, 1, torch.float64)
    ffn = u.encoder.layers[0].ffn
    with torch.no_grad():
        ffn.b_out[u.encoder.slots.index("xa.term")] = 0.25
    fused, dense = run(u, "fused", *args), run(u, "dense", *args)
    torch.testing.assert_close(fused, dense, rtol=1e-12, atol=1e-12)
    u.execution = "fused"
    text = u.describe()
    assert "xa.term of block" in text and "formed (the FFN adds a bias to it)" in text
    assert "s.term of block" in text and "fused (bilinear FFN, read only here)" in text
    row_mean = [line for line in text.splitlines() if "averages p.e of block" in line]  # the softmax's
    assert row_mean and all(": formed (" in line for line in row_mean)  # exp terms, read again by p = e * r


def test_describe_shows_the_places_only_when_fused():
    u = usim.UniversalSimulator(3, 3)
    assert "fused execution" not in u.describe()
    u.execution = "fused"
    places = u.encoder.program().places
    assert f"{sum(p.fused for p in places)} of {len(places)} averages" in u.describe()


def test_nothing_to_fuse_is_fast_bitwise(seed):
    op = usim.Transpose(3, 4)
    x = torch.randn(5, 3, 4)
    assert torch.equal(run(op, "fused", x), run(op, "dense", x))
    assert torch.equal(run(op, "fast", x), run(op, "dense", x))


def test_an_unstructured_encoder_runs_fused_as_fast(seed):
    op = usim.MatMul(2, 3, 2)  # per-token positional tables: the per-token program
    a, b = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    assert torch.equal(run(op, "fused", a, b), run(op, "fast", a, b))
    op.execution = "fused"
    assert "not structured" in op.describe()


def test_nan_inf_and_masked_keys_as_the_other_executions(seed):
    m, _ = mha_pair(8, 2)
    sim = SimulatedMultiheadAttention.from_torch(m, 6).eval()
    x = torch.randn(4, 6, 8)
    x[0, 2, 1] = float("nan")  # a kept key: its row of outputs is NaN
    x[1, 4, 3] = float("inf")
    x[2, 5, :] = float("nan")  # a masked key (its weight 0 times its NaN value: NaN, as in torch)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[2:, 5] = True  # sequence 3: finite, one key masked
    results = {}
    with torch.inference_mode():
        for mode in ("fused", "fast"):  # fast is dense's (tests/test_structured.py)
            sim.execution = mode
            results[mode] = sim(x, x, x, key_padding_mask=mask, need_weights=False)[0]
    fused = results["fused"]
    other = results["fast"]
    assert torch.equal(fused.isnan(), other.isnan()) and torch.equal(fused.isinf(), other.isinf())
    finite = fused.isfinite()
    torch.testing.assert_close(fused[finite], other[finite], rtol=1e-5, atol=1e-6)
    assert fused[0].isnan().any() and fused[3].isfinite().all()  # the cases are there


def test_no_torch_attention_kernel_and_einsums_read_views_of_the_stream(seed, monkeypatch):
    m, _ = mha_pair(8, 2)
    sim = SimulatedMultiheadAttention.from_torch(m, 5).eval()
    x = torch.randn(2, 5, 8)
    with torch.inference_mode():
        expected = m(x, x, x, need_weights=False)[0]

    def refuse(*args, **kwargs):
        raise AssertionError("a torch attention kernel was called")

    for owner, name in [(torch, "softmax"), (torch.nn.functional, "softmax"), (torch.Tensor, "softmax"),
                        (torch.nn.functional, "scaled_dot_product_attention"),
                        (torch.nn.functional, "multi_head_attention_forward"), (torch, "_native_multi_head_attention")]:
        if hasattr(owner, name):
            monkeypatch.setattr(owner, name, refuse)
    runs, operands = [], []
    contracted = usim.fused._FusedRun.contracted

    def watch(self, *args):
        runs.append(self)
        return contracted(self, *args)

    einsum = torch.einsum

    def checked(equation, *tensors):
        stream = {t.untyped_storage().data_ptr() for parts in runs[-1].fields.values() for _, t in parts
                  if t is not None}
        operands.extend(t.untyped_storage().data_ptr() in stream for t in tensors)
        return einsum(equation, *tensors)

    monkeypatch.setattr(usim.fused._FusedRun, "contracted", watch)
    monkeypatch.setattr(torch, "einsum", checked)
    with torch.inference_mode():
        ours = sim(x, x, x, need_weights=False)[0]
    assert operands and all(operands)  # every einsum operand is a view of a field of the stream
    assert error(ours, expected) <= 1e-5


def test_defaults_fused_for_drop_ins_fast_for_constructions():
    assert SimulatedMultiheadAttention(8, 2, 4).execution == "fused"
    assert usim.SimulatedTransformerEncoderLayer(8, 2, 4, dim_feedforward=16).execution == "fused"
    assert usim.UniversalSimulator(3, 3).execution == "fast"
    assert usim.AttentionCore(2, 2).execution == "fast"
    with pytest.raises(ValueError, match="execution must be one of"):
        SimulatedMultiheadAttention(8, 2, 4, execution="fastest")
