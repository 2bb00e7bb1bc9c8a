"""One U for every size: the weights of a form are the same for every size, sizes reach the encoder
as positional features and inputs, and one encoder per form serves every call shape."""

import random
from pathlib import Path

import pytest
import torch
from torch import nn

import usim
from usim.ops.attention_core import AttentionCore
from usim.ops.layer import LAYER_ACTIVATIONS, EncoderLayerSimulator
from usim.ops.simulator import UniversalSimulator

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float64 tensor (so -0.0 and +0.0 differ)."""
    return t.contiguous().view(torch.int64)


def assert_same_weights(a: nn.Module, b: nn.Module, context) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), context
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, (context, key)
        assert torch.equal(bits(sa[key]), bits(sb[key])), (context, key)


def sizes(rng: random.Random, count: int = 8) -> list:
    return [dict(n=rng.randint(1, 7), d=rng.randint(1, 6), heads=rng.randint(1, 3)) for _ in range(count)]


# --- the weights: one set per form ------------------------------------------------------------

def test_u_weights_are_the_same_for_every_size(seed):
    rng = random.Random(seed)
    forms = {"av": UniversalSimulator(), "av_ffn": UniversalSimulator(form="av_ffn"),
             "factored": UniversalSimulator(form="factored")}
    for s in sizes(rng):
        assert_same_weights(forms["av"], UniversalSimulator(s["n"], s["d"], s["heads"]), (seed, s))
        assert_same_weights(forms["av_ffn"], UniversalSimulator(s["n"], s["d"], s["heads"], rng.randint(1, 5)),
                            (seed, s))
        cross = dict(head_dim=rng.randint(1, 4), kv_len=rng.randint(1, 6), kdim=rng.randint(1, 5),
                     vdim=rng.randint(1, 5))
        assert_same_weights(forms["factored"], UniversalSimulator(s["n"], s["d"], s["heads"], **cross), (seed, s))


def test_core_and_layer_weights_are_the_same_for_every_size(seed):
    rng = random.Random(seed)
    core = AttentionCore()
    for s in sizes(rng):
        kv = rng.choice([g for g in range(1, s["heads"] + 1) if s["heads"] % g == 0])
        assert_same_weights(core, AttentionCore(s["n"], rng.randint(1, 6), s["heads"], rng.randint(1, 4), kv),
                            (seed, s))
    for activation in LAYER_ACTIVATIONS:
        for norm_first in (False, True):
            form = EncoderLayerSimulator(activation=activation, norm_first=norm_first)
            for s in sizes(rng, 3):
                layer = EncoderLayerSimulator(s["n"], s["heads"] * rng.randint(1, 3), s["heads"], rng.randint(1, 6),
                                              activation, norm_first, eps=rng.choice([1e-5, 1e-6, 0.1]))
                assert_same_weights(form, layer, (seed, s, activation, norm_first))


def test_no_size_lives_in_the_state_dict():
    u = UniversalSimulator(5, 4, 2)
    assert not any("readout" in key or "positional" in key for key in u.state_dict())
    assert all(key.startswith("encoder.layers.") for key in u.state_dict())


def test_sizes_come_from_the_inputs_or_raise():
    with pytest.raises(ValueError, match="reads its sizes off the inputs"):
        UniversalSimulator(heads=2)
    with pytest.raises(ValueError, match="both n and d"):
        UniversalSimulator(3)
    with pytest.raises(ValueError, match="form"):
        UniversalSimulator(form="nope")
    with pytest.raises(ValueError, match="form='av'"):
        UniversalSimulator(3, 3, head_dim=2, form="av")
    u = UniversalSimulator(form="av_ffn")
    with pytest.raises(ValueError, match="FFN sublayer"):
        u(torch.randn(3, 2), torch.randn(2, 2), torch.randn(2, 2))
    assert "tokens=any" in repr(u) and "form=av_ffn" in repr(u)


# --- one file runs every size -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_shipped_file_simulates_attention_at_random_sizes(seed, dtype):
    rng = random.Random(seed)
    u = usim.load(CHECKPOINTS / "universal_av.safetensors")
    assert u.universal
    for i in range(10):
        n, d, heads = rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 3)
        x = torch.randn(2, n, d, dtype=torch.float64)
        a, v = torch.randn(heads, d, d, dtype=torch.float64) / d, torch.randn(heads, d, d, dtype=torch.float64)
        scores = torch.einsum("bid,hde,bje->bhij", x, a, x)
        reference = torch.einsum("bhij,bjk,hkl->bil", torch.softmax(scores, -1), x, v)
        direct = torch.einsum("bhij,bjk,hkl->bil", torch.softmax(torch.einsum(
            "bid,hde,bje->bhij", x.to(dtype), a.to(dtype), x.to(dtype)), -1), x.to(dtype), v.to(dtype))
        torch_err = (direct.double() - reference).abs().max().item()
        execution = "dense" if i % 3 == 0 else "fast"
        y = u.attention(x.to(dtype), a.to(dtype), v.to(dtype), execution=execution)[0]
        err = (y.double() - reference).abs().max().item()
        # float64: the reference is torch's own float64 result, so allow a few ulps of its scale
        allowed = 10 * torch_err + 8 * torch.finfo(dtype).eps * max(reference.abs().max().item(), 1.0)
        assert err <= allowed, (seed, n, d, heads, err)


def test_fast_equals_dense_bitwise_at_every_size(seed):
    rng = random.Random(seed)
    core = AttentionCore()
    for _ in range(3):
        heads, kv = rng.choice([(2, 1), (2, 2), (3, 1)])
        n, m, r = rng.randint(1, 4), rng.randint(1, 5), rng.randint(1, 3)
        q, k, v = torch.randn(2, heads, n, r), torch.randn(2, kv, m, r), torch.randn(2, kv, m, r)
        fast = core.attention(q, k, v, execution="fast")
        dense = core.attention(q, k, v, execution="dense")
        assert all(torch.equal(a, b) for a, b in zip(fast, dense)), (seed, heads, kv, n, m, r)


def test_a_layer_takes_eps_as_an_input(seed):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, layer_norm_eps=0.25).eval()
    sim = usim.SimulatedTransformerEncoderLayer.from_torch(layer)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(sim(x), layer(x), rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    other = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, layer_norm_eps=1e-5).eval()
    assert usim.SimulatedTransformerEncoderLayer.from_torch(other).simulator is sim.simulator  # one encoder


# --- one encoder per form -----------------------------------------------------------------------

def test_every_drop_in_of_every_size_shares_its_form_encoder(seed):
    sims = [usim.SimulatedMultiheadAttention(e, h, batch_first=True) for e, h in ((4, 2), (6, 3), (8, 1))]
    assert all(s.simulator is sims[0].simulator for s in sims)
    for s in sims:
        for length in (1, 3, 6):  # any length: no seq_len needed
            x = torch.randn(2, length, s.embed_dim)
            mha = nn.MultiheadAttention(s.embed_dim, s.num_heads, batch_first=True)
            mha.load_state_dict(s.state_dict())
            torch.testing.assert_close(s(x, x, x)[0], mha(x, x, x)[0], rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    planned = usim.SimulatedMultiheadAttention(4, 2, seq_len=7)  # seq_len plans a length ahead
    assert any(key[0] == 7 for key in planned.simulator.frames)


def test_generate_plans_each_length_without_a_new_encoder(seed, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import usim.hf  # noqa: F401  (registers attn_implementation="usim")

    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=96)
    model = transformers.GPT2LMHeadModel(config).eval()
    usim.hf.clear_cache()
    model.set_attn_implementation("usim")
    ids = torch.randint(0, 50, (1, 4))
    built = []
    init = usim.Encoder.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(usim.Encoder, "__init__", counted)
    out = model.generate(ids, max_new_tokens=64, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape == (1, 68)
    assert len(built) == 1, seed  # the universal core, built once
    core = usim.hf.core()
    assert sorted(key[1] for key in core.frames if key[0] == 1) == list(range(5, 68))  # one per new length
    model.set_attn_implementation("eager")
    assert torch.equal(out, model.generate(ids, max_new_tokens=64, do_sample=False, use_cache=True,
                                           pad_token_id=0)), seed
