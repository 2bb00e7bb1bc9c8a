"""What users trip on (issue 20): each class of problem, checked against nn.MultiheadAttention or torch.

1. Training after inference: a module called under ``torch.inference_mode()`` trains afterwards, as
   ``nn.MultiheadAttention`` does; so does another drop-in sharing its U, every op, and a simulated
   ``nn.TransformerEncoder`` evaluated first and fine-tuned then.
2. ``simulate_attention`` on real model graphs: a module reached under two names or from two
   parents stays one (shared) drop-in, weights tied between modules stay tied, frozen ones frozen;
   an ``nn.MultiheadAttention`` subclass with its own forward is a ValueError naming it; TorchScript
   modules a TypeError.
3. Numerics at the edges: a masked (or padding) key takes no part in its row whatever its score;
   NaN and inf in the drop-in's inputs reach the same outputs as in nn.MultiheadAttention (no
   ValueError); no keys, or dropout 1.0, give the output bias; an integer key_padding_mask is a
   TypeError naming its dtype.
4. Checkpoints: a float64 drop-in comes back float64; saving to a folder or into a missing one is an
   OSError naming the path; ``verify=False`` still checks sizes against the tensors before it
   allocates; the same module always writes the same bytes (the shipped files are what export writes).
5. The command line answers bad options and unusual files with one line and a nonzero status, never
   a traceback, and names the file it really wrote.
6. Documented claims: moves keep every bit but -0.0's sign; a masked key of any score takes no part.
   (Every Python block of README and docs/ runs in tests/test_docs_blocks.py.)
"""

import warnings

import pytest
import torch
from torch import nn

import usim
from usim import SimulatedMultiheadAttention


def _grads(module, loss):
    module.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in module.named_parameters()}


# --- 1. training after inference ------------------------------------------------------------------

def test_drop_in_trains_after_inference_mode_as_mha(seed):
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    sim = SimulatedMultiheadAttention.from_torch(mha, seq_len=4)
    other = SimulatedMultiheadAttention(8, 2, seq_len=4, batch_first=True)  # shares sim's U
    assert other.simulator is sim.simulator
    x = torch.randn(3, 4, 8)
    with torch.inference_mode():
        for module in (mha, sim):
            module(x, x, x)
    for module in (sim, other):  # weight-only gradients: x does not require grad
        loss = module(x, x, x)[0].square().sum()
        grads = _grads(module, loss)
        if module is sim:
            expected = _grads(mha, mha(x, x, x)[0].square().sum())
            for name, g in expected.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=f"{name} seed={seed}")
        assert all(g.abs().sum() > 0 for g in grads.values()), seed


def test_ops_train_after_inference_mode(seed):
    x, y = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, 2, dtype=torch.float64)
    cases = [(usim.Softmax(3, 4), (x,), lambda a: torch.softmax(a, -1)),
             (usim.MatMul(3, 4, 2), (x, y), torch.matmul),
             (usim.ReLU(3, 4), (x,), torch.relu)]
    for op, args, reference in cases:
        with torch.inference_mode():
            op(*args)
        leaves = [a.clone().requires_grad_() for a in args]
        ours = torch.autograd.grad(op(*leaves).sin().sum(), leaves)
        theirs = torch.autograd.grad(reference(*leaves).sin().sum(), leaves)
        for g, h in zip(ours, theirs):
            torch.testing.assert_close(g, h, msg=f"{op.kind} seed={seed}")
    encoder = usim.Softmax(3, 4, execution="dense").encoder  # the bare engine's own caches too
    seq = usim.Softmax(3, 4).layout.pack(x)
    with torch.inference_mode():
        encoder(seq)
    assert torch.autograd.grad(encoder(seq.requires_grad_()).sum(), seq)[0].isfinite().all(), seed


def test_transformer_encoder_evaluated_then_fine_tuned(seed):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    simulated = usim.simulate_attention(model, seq_len=5)
    x, target = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    losses = []
    for m in (model, simulated):
        with torch.inference_mode():
            m(x)
        m.train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            loss = (m(x) - target).square().mean()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4), (losses, seed)


# --- 2. simulate_attention on real model graphs -----------------------------------------------------

class _Graph(nn.Module):
    """One MHA under two names and in two parents; a second MHA whose input projection and out_proj
    are tied to the first's; a frozen third."""

    def __init__(self):
        super().__init__()
        self.first = nn.MultiheadAttention(8, 2, batch_first=True)
        self.alias = self.first
        self.parents = nn.ModuleList([nn.ModuleDict({"attn": self.first}), nn.ModuleDict({"attn": self.first})])
        self.tied = nn.MultiheadAttention(8, 2, batch_first=True)
        self.tied.in_proj_weight = self.first.in_proj_weight
        self.tied.out_proj = self.first.out_proj
        self.frozen = nn.MultiheadAttention(8, 2, batch_first=True)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        for attn in (self.first, self.alias, self.parents[0]["attn"], self.parents[1]["attn"], self.tied, self.frozen):
            x = x + attn(x, x, x)[0]
        return x


def test_shared_tied_and_frozen_modules_stay_so(seed):
    model = _Graph()
    simulated = usim.simulate_attention(model, seq_len=4)
    assert sum(isinstance(m, nn.MultiheadAttention) for m in simulated.modules()) == 0, seed
    assert simulated.first is simulated.alias is simulated.parents[0]["attn"] is simulated.parents[1]["attn"]
    assert simulated.tied.in_proj_weight is simulated.first.in_proj_weight
    assert [n for n, _ in simulated.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [p.requires_grad for p in simulated.parameters()] == [p.requires_grad for p in model.parameters()]
    copied = SimulatedMultiheadAttention.from_torch(model.frozen, seq_len=4)  # a copy keeps requires_grad too
    assert not any(p.requires_grad for p in copied.parameters()), seed
    frozen = {k: v.clone() for k, v in simulated.frozen.state_dict().items()}
    x, target = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    outputs = []
    for m in (model, simulated):
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.02)
        for _ in range(2):
            optimizer.zero_grad()
            (m(x) - target).square().mean().backward()
            optimizer.step()
        outputs.append(m(x).detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4, msg=f"seed={seed}")
    assert all(torch.equal(v, simulated.frozen.state_dict()[k]) for k, v in frozen.items()), seed


def test_modules_simulate_attention_refuses(seed):
    class OwnForward(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            return super().forward(query, key, value, **kwargs)

    class SameForward(nn.MultiheadAttention):
        pass

    model = nn.ModuleDict({"plain": SameForward(8, 2), "custom": OwnForward(8, 2)})
    with pytest.raises(ValueError, match="custom is a .*OwnForward"):
        usim.simulate_attention(model, seq_len=3)
    assert isinstance(model["custom"], OwnForward)  # nothing replaced
    assert isinstance(usim.simulate_attention(model["plain"], seq_len=3), SimulatedMultiheadAttention)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    x = torch.randn(3, 1, 8)
    with warnings.catch_warnings():  # TorchScript's deprecation notices
        warnings.simplefilter("ignore")
        scripted, traced = torch.jit.script(Wrapper()), torch.jit.trace(Wrapper(), x)
    for compiled, path in ((scripted, "the model"), (traced, "the model"), (nn.Sequential(traced), "0")):
        with pytest.raises(TypeError, match=f"{path} is a TorchScript module"):
            usim.simulate_attention(compiled, seq_len=3)


# --- 3. numerics at the edges ---------------------------------------------------------------------

def _pair(dtype=torch.float32, embed_dim=8, heads=2, seq_len=6, **kwargs):
    mha = nn.MultiheadAttention(embed_dim, heads, batch_first=True, dtype=dtype, **kwargs).eval()
    return mha, SimulatedMultiheadAttention.from_torch(mha, seq_len=seq_len)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_keys_take_no_part_whatever_their_score(seed, dtype):
    mha, sim = _pair(dtype)
    x, key, value = (torch.randn(2, 5, 8, dtype=dtype) for _ in range(3))
    key[:, 2] *= 1e32  # masked keys whose scores exceed the kept maximum by far more than 1e30
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 2] = True
    bias = torch.full((3, 3), -1e32, dtype=dtype)  # the U's padding keys (score 0) far above the kept ones
    for args, kwargs in [((x, key, value), {"key_padding_mask": mask}), ((x[:, :3],) * 3, {"attn_mask": bias})]:
        want, want_w = mha(*args, **kwargs)
        got, got_w = sim(*args, **kwargs)
        assert want.isfinite().all() and got.isfinite().all(), seed
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"seed={seed}")
        torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-5, msg=f"seed={seed}")


def _same_nan(got, want, context):
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), context
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5, msg=str(context))


def test_nan_and_inf_reach_the_outputs_they_reach_in_mha(seed):
    mha, sim = _pair()
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = True
    for bad in (float("nan"), float("inf"), float("-inf")):
        poisoned = x.clone()
        poisoned[0, 1, 3] = bad  # token 1 of the first sequence
        cases = {"self-attention": (poisoned,) * 3, "query only": (poisoned, x, x), "key only": (x, poisoned, x),
                 "value only": (x, x, poisoned), "padded": (poisoned[:, :4],) * 3}
        for name, args in cases.items():
            for kwargs in ({}, {"key_padding_mask": mask[:, : args[1].shape[1]]}):
                want, want_w = mha(*args, **kwargs)
                got, got_w = sim(*args, **kwargs)
                if kwargs and args[1] is not x:  # a masked poisoned key: a score of +-inf takes no part, a
                    #  NaN score (inf - inf in its projection) makes its row NaN, as in MHA (which makes every
                    #  row NaN here); wherever MHA's result is finite, ours equals it
                    finite = want.isfinite()
                    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5,
                                               msg=str((name, bad, seed)))
                    continue
                _same_nan(got, want, (name, bad, kwargs, seed))
                _same_nan(got_w, want_w, (name, bad, kwargs, seed))
        scores = torch.zeros(5, 5)
        scores[2, 3] = bad  # in a float attn_mask
        _same_nan(sim(x, x, x, attn_mask=scores)[0], mha(x, x, x, attn_mask=scores)[0], (bad, seed))


def test_nan_through_simulate_attention_and_the_bert_adapter(seed):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    x = torch.randn(3, 4, 8)
    x[1, 2, 0] = float("nan")
    with torch.no_grad():
        _same_nan(usim.simulate_attention(layer, seq_len=4)(x), layer(x), seed)
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16,
                                     vocab_size=20, max_position_embeddings=8)
    block = transformers.BertModel(config).eval().encoder.layer[0].attention
    from usim.bert import SimulatedBertAttention

    with torch.no_grad():
        _same_nan(SimulatedBertAttention(block, seq_len=4)(x)[0], block(x)[0], seed)


def test_no_keys_and_full_dropout_give_the_output_bias(seed):
    mha, sim = _pair()
    nn.init.normal_(mha.out_proj.bias)
    sim.load_state_dict(mha.state_dict())
    x = torch.randn(2, 5, 8)
    for module in (mha, sim):
        out, weights = module(x, x[:, :0], x[:, :0])
        assert weights.shape == (2, 5, 0), seed
        torch.testing.assert_close(out, mha.out_proj.bias.expand(2, 5, 8), msg=f"seed={seed}")
        module.train()
        module.dropout = 1.0
        out, weights = module(x, x, x)
        torch.testing.assert_close(out, mha.out_proj.bias.expand(2, 5, 8), msg=f"seed={seed}")
        assert torch.equal(weights, torch.zeros(2, 5, 5)), seed
    empty = sim(x[:, :0], x, x)  # no queries: empty outputs, as MHA
    assert empty[0].shape == (2, 0, 8) and empty[1].shape == (2, 0, 5)


def test_key_padding_masks_of_every_dtype(seed):
    mha, sim = _pair()
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match="torch.int64"):
        sim(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    additive = torch.randn(2, 5)  # a float mask is added to the scores, as MHA adds it
    additive[0, 3] = float("-inf")
    for attn_mask in (None, torch.rand(5, 5) < 0.3, torch.randn(5, 5)):
        want, _ = mha(x, x, x, key_padding_mask=additive, attn_mask=attn_mask)
        got, _ = sim(x, x, x, key_padding_mask=additive, attn_mask=attn_mask)
        _same_nan(got, want, seed)


# --- 4. checkpoints -------------------------------------------------------------------------------

def test_drop_in_checkpoint_keeps_its_dtype_and_bad_paths_are_named(seed, tmp_path):
    sim = SimulatedMultiheadAttention(8, 2, seq_len=3, dtype=torch.float64)
    usim.save(sim, tmp_path / "d.safetensors")
    back = usim.load(tmp_path / "d.safetensors")
    x = torch.randn(3, 1, 8, dtype=torch.float64)
    assert back.in_proj_weight.dtype == torch.float64 and torch.equal(back(x, x, x)[0], sim(x, x, x)[0]), seed
    for module in (sim, usim.Transpose(2, 3)):
        with pytest.raises(OSError, match="is a directory"):
            usim.save(module, tmp_path)
        with pytest.raises(OSError, match="does not exist"):
            usim.save(module, tmp_path / "missing" / "x.safetensors")


def test_verify_false_checks_sizes_before_allocating(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "d.safetensors"
    usim.save(SimulatedMultiheadAttention(8, 2, seq_len=3), path)
    metadata = safe_open(path, "pt").metadata()
    module = json.loads(metadata["usim.module"])
    module["args"]["embed_dim"] = 1 << 20  # 4 TB of weights, were they allocated
    metadata["usim.module"] = json.dumps(module)
    save_file(load_file(path), tmp_path / "lie.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="does not fit"):
        usim.load(tmp_path / "lie.safetensors", verify=False)


def test_export_is_deterministic(tmp_path):
    from pathlib import Path

    from usim.export import shipped

    shipped_dir = Path(__file__).resolve().parents[1] / "checkpoints"
    for stem in ("transpose_4x4", "softmax_4x4", "universal_av"):
        module = shipped()[stem]()
        usim.save(module, tmp_path / "a.safetensors")
        usim.save(shipped()[stem](), tmp_path / "b.safetensors")
        written = (tmp_path / "a.safetensors").read_bytes()
        assert written == (tmp_path / "b.safetensors").read_bytes() == (shipped_dir / f"{stem}.safetensors").read_bytes()


# --- 5. the command line --------------------------------------------------------------------------

def _cli(capfd, *argv):
    from usim.__main__ import main

    try:
        status = main(list(argv))
    except SystemExit as done:  # argparse's own errors
        status = done.code
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, argv
    return status, out + err


def test_cli_answers_without_tracebacks(capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, message in [(["demo", "--heads", "3", "--no-picture"], "--embed-dim 4 must be divisible by --heads 3"),
                          (["demo", "--batch", "0", "--no-picture"], "--batch must be at least 1, got 0"),
                          (["demo", "--batch", "-1", "--no-picture"], "--batch must be at least 1, got -1"),
                          (["export", "taken"], "taken is a file"),
                          (["show", "transpose", "2", "--layers", "3"], "has layers 1..1"),
                          (["bench", "--orders", "0"], "must be at least 1")]:
        (tmp_path / "taken").write_text("")
        status, text = _cli(capfd, *argv)
        assert status != 0 and message in text, (argv, text)
    usim.save(SimulatedMultiheadAttention(4, 2, seq_len=2), "drop_in.safetensors")
    status, text = _cli(capfd, "describe", "drop_in.safetensors")
    assert status == 0 and "SimulatedMultiheadAttention" in text and "UniversalSimulator(form=factored)" in text, text


def test_cli_show_names_the_file_it_wrote(capfd, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    for out, written in (("adir", "adir/transpose.png"), ("noext", "noext.png"), ("t.png", "t.png")):
        status, text = _cli(capfd, "show", "transpose", "2", "--out", out)
        assert status == 0 and f"wrote {written} " in text and (tmp_path / written).is_file(), text
    usim.save(SimulatedMultiheadAttention(4, 2, seq_len=2), "drop_in.safetensors")
    status, text = _cli(capfd, "show", "drop_in.safetensors", "--out", "u.png")
    assert status == 0 and "wrote u.png (UniversalSimulator" in text and (tmp_path / "u.png").is_file(), text


# --- 6. documented claims (docs/operations.md, docs/simulator.md) ---------------------------------

def test_negative_zero_is_the_one_exception_to_bitwise_moves(seed):
    # docs/operations.md: moves are bitwise equal to torch except that -0.0 comes out as +0.0 (the stream starts at +0.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    x[0, 0], x[1, 2], x[2, 3] = -0.0, 1e308, -5e-324  # and the largest and a subnormal value
    y = usim.Transpose(3, 4)(x)
    want = x.T
    assert torch.equal(y, want), seed
    moved = want != 0
    assert torch.equal(torch.signbit(y[moved]), torch.signbit(want[moved])), seed
    assert not torch.signbit(y[0, 0]) and torch.signbit(want[0, 0]), seed


@pytest.mark.parametrize("score", [float("-inf"), 1e30, -1e30])
def test_a_masked_key_of_any_score_takes_no_part(seed, score):
    # A masked key whose score is -inf, or far above or below the kept ones, leaves its row finite
    # and equal to the row without it, as in nn.MultiheadAttention (+inf or NaN make the row NaN there).
    mha, sim = _pair(dtype=torch.float64, embed_dim=4, heads=1, seq_len=4)
    with torch.no_grad():
        mha.in_proj_weight.uniform_(0.5, 1.0)  # positive weights: q, k > 0, and no 0 * inf in a projection
        mha.in_proj_bias.zero_()
    sim = SimulatedMultiheadAttention.from_torch(mha, seq_len=4)
    x = torch.rand(1, 4, 4, dtype=torch.float64) + 0.5
    key = x.clone()
    key[0, 2] = score / 16  # q . k of that key: -inf, or about +-1e30, for every query
    mask = torch.tensor([[False, False, True, False]])
    want = mha(x, key, x, key_padding_mask=mask)[0]
    got = sim(x, key, x, key_padding_mask=mask)[0]
    assert want.isfinite().all() and got.isfinite().all(), (score, seed)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{score} {seed}")
