"""The fast execution (planned gathers, content tiers over candidates) equals the dense reference."""

import pytest
import torch

import usim
from usim.construct import Builder, Head, match, maximize
from usim.engine import EXECUTIONS
from usim.plan import plan_encoder
from usim.program import compile_encoder
from usim.layout import Layout

DTYPES = [torch.float32, torch.float64]


def well_conditioned(batch, n, dtype):
    return torch.randn(batch, n, n, dtype=dtype) + 3 * n ** 0.5 * torch.eye(n, dtype=dtype)


def cases():
    """(name, constructor, input maker (batch, dtype) -> args)."""
    rand = torch.randn
    return [
        ("transpose", lambda: usim.Transpose(3, 5), lambda b, t: (rand(b, 3, 5, dtype=t),)),
        ("matmul", lambda: usim.MatMul(3, 4, 2), lambda b, t: (rand(b, 3, 4, dtype=t), rand(b, 4, 2, dtype=t))),
        ("softmax", lambda: usim.Softmax(3, 4), lambda b, t: (rand(b, 3, 4, dtype=t) * 10,)),
        ("relu", lambda: usim.ReLU(2, 3), lambda b, t: (rand(b, 2, 3, dtype=t),)),
        ("maxmin", lambda: usim.MaxMin(3, 4), lambda b, t: (rand(b, 3, 4, dtype=t).round(),)),
        ("groupsort", lambda: usim.GroupSort(2, 6, 3), lambda b, t: (rand(b, 2, 6, dtype=t).round(),)),
        ("inverse", lambda: usim.Inverse(3), lambda b, t: (well_conditioned(b, 3, t),)),
        ("determinant", lambda: usim.Determinant(4), lambda b, t: (well_conditioned(b, 4, t)[:, [2, 0, 3, 1]],)),
        ("linformer", lambda: usim.SimulatedLinformer(4, 3, 2),
         lambda b, t: (rand(b, 4, 3, dtype=t), rand(3, 3, dtype=t) / 3, rand(3, 3, dtype=t),
                       rand(2, 4, dtype=t), rand(2, 4, dtype=t))),
        ("linear attention", lambda: usim.SimulatedLinearAttention(3, 2),
         lambda b, t: (rand(b, 3, 2, dtype=t), rand(2, 2, dtype=t), rand(2, 2, dtype=t), rand(2, 2, dtype=t))),
        ("groupsort network", lambda: usim.SimulatedGroupSortNetwork([3, 4, 2], 2),
         lambda b, t: (rand(b, 3, dtype=t), [rand(4, 3, dtype=t), rand(2, 4, dtype=t)],
                       [rand(4, dtype=t), rand(2, dtype=t)])),
        ("parity", lambda: usim.SimulatedParity(6), lambda b, t: (torch.randint(0, 2, (b, 6)).to(t),)),
        ("inverse attention", lambda: usim.SimulatedInverseAttention(2, 3),
         lambda b, t: (rand(b, 2, 3, dtype=t), rand(3, 3, dtype=t) / 3, rand(3, 3, dtype=t),
                       well_conditioned(b, 3, t))),
        ("U two heads", lambda: usim.UniversalSimulator(3, 4, heads=2),
         lambda b, t: (rand(b, 3, 4, dtype=t), rand(2, 4, 4, dtype=t) / 2, rand(2, 4, 4, dtype=t),
                       torch.tensor([False, True, False]))),
        ("U with FFN", lambda: usim.UniversalSimulator(3, 2, ffn_hidden=3),
         lambda b, t: (rand(b, 3, 2, dtype=t), rand(2, 2, dtype=t), rand(2, 2, dtype=t), None,
                       rand(2, 3, dtype=t), rand(3, 2, dtype=t), True)),
    ]


def run_both(module, args):
    """(fast output, dense output, fast stream, dense stream): outputs without hooks (fast runs the
    compiled program of live entries), streams with a hook on the last layer (fast then runs the
    planned heads over the whole stream)."""
    outputs, streams = [], []
    for mode in ("fast", "dense"):
        module.execution = mode
        outputs.append(module(*args))
        seen = []
        handle = module.encoder.layers[-1].hook_resid.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            module(*args)
        finally:
            handle.remove()
        streams.append(seen[-1])
    return (*outputs, *streams)


# Only moves and selections: fast must equal dense bitwise.
EXACT = {"transpose", "relu", "maxmin", "groupsort", "parity"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,build,inputs", cases(), ids=[c[0] for c in cases()])
def test_fast_equals_dense(seed, name, build, inputs, dtype):
    module = build()
    fast, dense, fast_stream, dense_stream = run_both(module, inputs(3, dtype))
    fast, dense = (torch.cat([t.flatten() for t in r]) if isinstance(r, tuple) else r for r in (fast, dense))
    if name in EXACT:
        assert torch.equal(fast, dense), (seed, name)
    else:
        # The same products, sums and maps on the same values; a sum of several terms may round
        # differently in the last bit, because BLAS orders a dot product by the matrix shapes.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(fast, dense, rtol=4 * eps, atol=4 * eps * dense.abs().max().item(),
                                   msg=f"seed {seed}, {name}")
    # With a hook the fast execution computes the whole stream: every slot at every position.
    assert torch.equal(fast_stream, dense_stream), (seed, name)


def test_drop_in_fast_equals_dense(seed):
    mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
    sim = usim.SimulatedMultiheadAttention.from_torch(mha, seq_len=3)
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[False, False, True], [False, False, False]])
    fast = sim(x, x, x, key_padding_mask=mask)
    sim.execution = "dense"
    dense = sim(x, x, x, key_padding_mask=mask)
    for f, d in zip(fast, dense):
        torch.testing.assert_close(f, d, rtol=4e-7, atol=1e-7, msg=f"seed {seed}")


def test_patterns_equal(seed):
    u = usim.UniversalSimulator(3, 3)
    x, a, v = torch.randn(2, 3, 3), torch.randn(3, 3), torch.randn(3, 3)
    patterns = {}
    for mode in EXECUTIONS:
        u.execution = mode
        seen = []
        hooks = [layer.attn.hook_pattern.register_forward_hook(lambda m, i, o: seen.append(o))
                 for layer in u.encoder.layers if layer.attn is not None]
        u(x, a, v)
        for h in hooks:
            h.remove()
        patterns[mode] = seen
    assert len(patterns["fast"]) == len(patterns["dense"]) > 0
    for f, d in zip(patterns["fast"], patterns["dense"]):
        assert torch.equal(f, d), seed
        torch.testing.assert_close(f.sum(-1), torch.ones_like(f.sum(-1)))  # each query's weights sum to 1


def test_simulator_heads_are_planned():
    # Every head of U is a gather (operand fetches) or a few candidates (a row for the softmax, the
    # terms of one output entry for a sum): none falls back to the dense L x L scores, neither where
    # the result needs it (the compiled program) nor over the whole stream (the plans).
    u = usim.UniversalSimulator(4, 4, heads=2)
    kinds = [p.kind for layer in plan_encoder(u.encoder) if layer is not None for p in layer]
    assert "dense" not in kinds and kinds.count("gather") >= len(kinds) // 2
    steps = [h for step in compile_encoder(u.encoder).steps for h in getattr(step, "heads", [])]
    assert steps and all(h.kind != "dense" for h in steps)  # most gathers are plain moves, not in steps
    assert max(h.valid.shape[1] for h in steps if h.kind == "candidates") <= 2 * 4  # 2 heads x 4 terms


def test_content_tier_over_candidates_and_averaging(seed):
    # Tier 0 (static) keeps the keys of the same parity; tier 1 (content) the largest value among
    # them; a second head averages its parity class. Fast plans both and matches dense.
    layout = Layout.of(inputs={"x": (8,)}, outputs={"y": (8,), "z": (8,)})
    b = Builder(layout)
    parity = b.positional("parity", torch.arange(layout.length) % 2, square=True)
    y, z = b.slot("y"), b.slot("z")
    in_x = torch.zeros(layout.length, dtype=torch.long)
    in_x[:8] = 1
    b.positional("in_x", in_x, square=True)
    best = Head([match({"in_x": 1, parity: parity}), maximize("value")], [("value", y)], name="max of class")
    mean = Head([match({"in_x": 1, parity: parity})], [("value", z)], name="mean of class", average=True)
    b.layer([best, mean])
    b.result("y", y)
    b.result("z", z)
    encoder = b.build()
    kinds = [p.kind for p in encoder.plans()[0]]
    assert kinds == ["candidates", "candidates"]
    x = torch.randn(5, 8, dtype=torch.float64).round()  # small integers: ties in the content tier
    seq = layout.pack(x)
    fast = encoder(seq)
    encoder.execution = "dense"
    dense = encoder(seq)
    assert torch.equal(fast, dense), seed
    y_out, z_out = layout.unpack(dense, (5,))
    even, odd = x[:, 0::2], x[:, 1::2]
    assert torch.equal(y_out[:, 0], even.amax(-1)) and torch.equal(y_out[:, 1], odd.amax(-1)), seed
    torch.testing.assert_close(z_out[:, 1], odd.mean(-1))


def test_execution_argument(tmp_path):
    op = usim.Transpose(2, 3, execution="dense")
    assert op.execution == "dense" and op.encoder.execution == "dense"
    op.execution = "fast"
    assert op.encoder.execution == "fast"
    with pytest.raises(ValueError, match="execution must be one of"):
        op.execution = "quick"
    with pytest.raises(ValueError, match="execution must be one of"):
        usim.MatMul(2, 2, 2, execution="sparse")
    usim.save(op, tmp_path / "t.safetensors")
    assert usim.load(tmp_path / "t.safetensors").execution == "fast"
    loaded = usim.load(tmp_path / "t.safetensors", execution="dense")
    assert loaded.execution == "dense"
    x = torch.randn(4, 2, 3)
    assert torch.equal(loaded(x), x.transpose(-1, -2))


def test_plans_cached():
    encoder = usim.Softmax(2, 3).encoder
    assert encoder.plans() is encoder.plans()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fast_equals_dense(seed, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    u = usim.UniversalSimulator(4, 4, heads=2).cuda()
    x = torch.randn(3, 4, 4, dtype=dtype, device="cuda")
    a, v = torch.randn(2, 4, 4, dtype=dtype, device="cuda") / 2, torch.randn(2, 4, 4, dtype=dtype, device="cuda")
    fast, dense, fast_stream, dense_stream = run_both(u, (x, a, v))
    assert torch.equal(fast_stream, dense_stream), seed
    ref = (torch.softmax(torch.einsum("bid,hde,bje->bhij", x.double(), a.double(), x.double()), -1)
           @ (x.double()[:, None] @ v.double())).sum(1)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-5)


def test_program_skips_dead_entries_and_is_finite(seed):
    # The compiled program stores only the entries the result depends on, far fewer than L x W.
    u = usim.UniversalSimulator(4, 4)
    program = compile_encoder(u.encoder)  # the per-token program (U itself runs the structured one)
    assert program.size < 0.5 * u.encoder.length * u.encoder.stream_width
    x, a, v = torch.randn(5, 4, 4), torch.randn(4, 4) / 2, torch.randn(4, 4)
    y = u(x, a, v)
    assert torch.isfinite(y).all(), seed
    ref = torch.softmax(x.double() @ a.double() @ x.double().transpose(-1, -2), -1) @ (x.double() @ v.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def test_large_batches_run_in_chunks(monkeypatch, seed):
    import usim.engine

    u = usim.MatMul(3, 4, 2)
    a, b = torch.randn(37, 3, 4, dtype=torch.float64), torch.randn(37, 4, 2, dtype=torch.float64)
    whole = u(a, b)
    monkeypatch.setattr(usim.engine, "CHUNK", 1)  # one sequence per chunk
    assert torch.equal(u(a, b), whole), seed
    u.execution = "dense"
    dense_chunked = u(a, b)
    torch.testing.assert_close(dense_chunked, whole, rtol=1e-15, atol=1e-15)


def test_caches_follow_weight_changes(seed):
    op = usim.MatMul(2, 3, 2)
    a, b = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    before = op(a, b)
    with torch.no_grad():
        op.encoder.layers[-1].ffn.w_out.mul_(2)  # in place: plans, programs and casts are rebuilt
    assert torch.equal(op(a, b), 2 * before), seed
