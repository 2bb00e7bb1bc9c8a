"""The structured program: selections planned as affine maps of block coordinates, run as views.

What it must keep: the dense reference's results on any weights (edited ones too), no per-token
index arrays, and the averaging heads' tree order (``usim.average``)."""

import pytest
import torch

import usim
from usim.average import dense_ordered_sum, ordered_sum, tree_sum
from usim.positions import Piece, Positions
from usim.structured import Program as StructuredProgram, compile_structured

from helpers import factored_masked_inputs

DTYPES = [torch.float32, torch.float64]


def both(module, *args):
    """(fast output, dense output) of a construction."""
    module.execution = "fast"
    fast = module(*args)
    module.execution = "dense"
    dense = module(*args)
    module.execution = "fast"
    return fast, dense


def close(fast, dense, dtype):
    eps = torch.finfo(dtype).eps
    fast, dense = (torch.cat([t.flatten() for t in r]) if isinstance(r, tuple) else r for r in (fast, dense))
    torch.testing.assert_close(fast, dense, rtol=4 * eps, atol=4 * eps * dense.abs().max().item())


def u_inputs(n, d, heads, dtype, batch=2):
    return (torch.randn(batch, n, d, dtype=dtype), torch.randn(heads, d, d, dtype=dtype) / d,
            torch.randn(heads, d, d, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_u_runs_structured_and_equals_dense(seed, dtype):
    u = usim.UniversalSimulator(4, 3, heads=2)
    args = u_inputs(4, 3, 2, dtype)
    fast, dense = both(u, *args)
    assert isinstance(u.encoder.program(dtype), StructuredProgram)
    close(fast, dense, dtype)


def test_factored_u_with_masks_equals_dense(seed):
    u = usim.UniversalSimulator(4, 6, heads=2, head_dim=3, kv_len=5)
    x, w, kwargs = factored_masked_inputs(3, 4, 5, 6, 2, 3)
    u.execution = "fast"
    fast = u.attention(x, *w, **kwargs)
    u.execution = "dense"
    dense = u.attention(x, *w, **kwargs)
    assert isinstance(u.encoder.program(torch.float64), StructuredProgram)
    for f, d in zip(fast, dense):
        close(f, d, torch.float64)


def test_batches_run_in_chunks_within_the_budget(monkeypatch, seed):
    import usim.engine

    u = usim.UniversalSimulator(3, 4, heads=2)
    args = u_inputs(3, 4, 2, torch.float64, batch=7)
    whole = u(*args)
    monkeypatch.setattr(usim.engine, "CHUNK", 1)  # one sequence per chunk
    assert torch.equal(u(*args), whole), seed


def test_an_empty_batch_gives_empty_outputs():
    u = usim.UniversalSimulator(3, 4, heads=2)
    assert u(*u_inputs(3, 4, 2, torch.float32, batch=0)).shape == (0, 3, 4)
    mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(0, 3, 4)
    out, weights = usim.SimulatedMultiheadAttention.from_torch(mha, seq_len=3)(x, x, x)
    assert out.shape == mha(x, x, x)[0].shape and weights.shape == (0, 3, 3)


def test_no_index_arrays_in_the_program():
    # A structured plan is a few integers per (head, query cell): no tensor as long as the sequence.
    u = usim.UniversalSimulator(6, 4, heads=2, head_dim=2)
    program = compile_structured(u.encoder)
    cells = [cell for heads, _ in program.layers for step in heads for cell, _ in step.cells]
    assert len(cells) < u.encoder.length / 10

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                yield from tensors(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                yield from tensors(o)
        elif hasattr(obj, "__dataclass_fields__"):
            for name in obj.__dataclass_fields__:
                yield from tensors(getattr(obj, name))
    assert all(t.numel() < 16 for t in tensors(program))


@pytest.mark.parametrize("edit", ["target +1", "target -1", "transposed read", "ffn weight x1.5", "value x2"])
def test_fast_follows_edited_weights(seed, edit):
    # A fast path that computed the intended operation directly could not pass this: edit the
    # constructed weights and the fast execution must still give what the dense one gives.
    u = usim.UniversalSimulator(3, 3, heads=1)
    args = u_inputs(3, 3, 1, torch.float64)
    before = u(*args)
    slots = u.encoder.slots
    row, col, one = slots.index("fa.row"), slots.index("fa.col"), slots.index("one")
    fetch = u.encoder.layers[0].attn  # its head 0 fetches the left operands x[i, t] of X A
    with torch.no_grad():
        q = fetch.query[0, 0]  # the match tier: rows 2 * target, then -1 * one
        reads_col = (q[:, col] != 0).nonzero()[0, 0]
        if edit.startswith("target"):  # the column read moves by one (past the edge: the nearest key)
            q[reads_col, one] += 2.0 if edit == "target +1" else -2.0
        elif edit == "transposed read":  # x[t, i] instead of x[i, t]: still affine
            q[:, [row, col]] = q[:, [col, row]]
        elif edit.startswith("ffn"):
            u.encoder.layers[0].ffn.w_out.mul_(1.5)
        else:
            u.encoder.layers[1].attn.value.mul_(2.0)
    fast, dense = both(u, *args)
    close(fast, dense, torch.float64)
    assert not torch.allclose(fast, before), edit  # the edit changed the result
    if edit != "target +1" and edit != "target -1":  # these leave affine maps: still structured
        assert isinstance(u.encoder.program(torch.float64), StructuredProgram), edit


def test_tree_sum_ignores_padding_and_matches_dense_order(seed):
    values = torch.randn(4, 13, dtype=torch.float64)
    padded = torch.cat([values, torch.zeros(4, 19, dtype=torch.float64)], dim=1)
    assert torch.equal(tree_sum(values), tree_sum(padded))
    keep = (torch.rand(2, 3, 9) < 0.5).double()
    keep[..., 0] = 1
    v = torch.randn(2, 9, 5, dtype=torch.float64)
    dense = dense_ordered_sum(keep, v)
    sparse = ordered_sum(keep, v[:, None].expand(2, 3, 9, 5))
    assert torch.equal(dense, sparse)
    torch.testing.assert_close(dense, keep @ v, rtol=1e-14, atol=1e-14)


def test_positions_closed_form_materialise_on_demand():
    pieces = {0: [Piece(0, (0, 0), (2, 3), 5, (1, 2))], 1: [Piece(1, (1,), (4,), -1, (3,), square=True)]}
    pos = Positions([(2, 3), (4,)], pieces)
    assert pos.closed_form and pos.length == 10
    i, j = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    assert torch.equal(pos.row(0)[:6], (5 + i + 2 * j).reshape(-1))
    assert torch.equal(pos.row(1)[6:], torch.tensor([0, 4, 25, 64]))
    assert torch.equal(pos.values(1, torch.tensor([9, 0, 7])), torch.tensor([64, 0, 4]))
    with pytest.raises(ValueError, match="not inside block"):
        Positions([(2, 3)], {0: [Piece(0, (0, 0), (3, 3), 0, (0, 0))]})


def test_long_sequences_stay_small():
    # U for 64 x 64 with 8 heads of width 8 has ~0.6 M tokens: the build keeps no per-token table.
    u = usim.UniversalSimulator(64, 64, heads=8, head_dim=8)
    assert u.encoder.length > 500_000
    assert "_table_cache" not in u.encoder.__dict__
    x = torch.randn(1, 64, 64)
    w = [torch.randn(8, 64, 8) / 8 for _ in range(3)] + [torch.randn(8, 8, 64) / 8]
    y = u(x, *w)
    assert "_table_cache" not in u.encoder.__dict__  # the fast run never materialised the positions
    q, k, v = (torch.einsum("bnd,hdr->bhnr", x.double(), wi.double()) for wi in w[:3])
    ref = torch.einsum("bhnm,bhmr,hrd->bnd", torch.softmax(q @ k.mT, -1), v, w[3].double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)


def test_the_drop_in_program_traces_whole(seed):
    # No host syncs in a warm call (the CPU proxy): the structured program of a drop-in's U traces
    # under torch.compile(fullgraph=True): no .item(), no data-dependent shapes.
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    sim = usim.SimulatedMultiheadAttention.from_torch(mha, seq_len=4)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[False, False, True, False], [False] * 4])
    with torch.no_grad():
        want = sim(x, x, x, key_padding_mask=mask)[0]
        seen = {}
        original = StructuredProgram.forward

        def record(self, inputs, blocks):  # the program the drop-in runs (fused: a subclass), its inputs
            seen["args"] = (self, inputs, blocks)
            return original(self, inputs, blocks)

        StructuredProgram.forward = record
        try:
            sim(x, x, x, key_padding_mask=mask)
        finally:
            StructuredProgram.forward = original
        program, inputs, blocks = seen["args"]
        assert isinstance(program, StructuredProgram)
        compiled = torch.compile(program.forward, fullgraph=True, backend="eager")
        got, again = compiled(inputs, blocks), program.forward(inputs, blocks)
    assert all(torch.equal(got[b], again[b]) for b in blocks), seed
    torch.testing.assert_close(want, mha(x, x, x, key_padding_mask=mask)[0], rtol=1e-4, atol=1e-5)
