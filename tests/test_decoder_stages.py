"""The decoder's new stages against torch: RMSNorm / LayerNorm with eps as an input, RoPE (full and
partial, with cached rows copied), and the SiLU activation."""

import pytest
import torch
import torch.nn.functional as F

from usim.activations import ACTIVATIONS, ZERO_AT_ZERO, activate
from usim.ops.base import Construction
from usim.ops.decoder_stages import DecoderPipeline, Rows


def _run(pipe, arrays, mode):
    b, layout = pipe.build()
    for blk in layout.outputs:
        b.result(blk.name, pipe.home[blk.name])
    op = Construction(b.build(), layout, {}, execution=mode)
    return op, op.run(*(arrays[blk.name] for blk in layout.inputs))


def test_silu_and_sigmoid_are_declared():
    t = torch.randn(100, dtype=torch.float64)
    assert "silu" in ACTIVATIONS and "silu" in ZERO_AT_ZERO and "sigmoid" in ACTIVATIONS
    assert torch.equal(activate("silu", t), F.silu(t)) and torch.equal(activate("sigmoid", t), torch.sigmoid(t))


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("layer", [False, True])
def test_norm_matches_torch(seed, mode, layer):
    n, e, eps = 5, 12, 1e-6
    inputs = {"x": (n, e), "w": (e,), "eps": (1,), **({"b": (e,)} if layer else {})}
    pipe = DecoderPipeline(inputs, {"y": (n, e)})
    pipe.norm("n.", "x", "y", "w", "eps", "b" if layer else None)
    arrays = {"x": torch.randn(3, n, e) * 4 + 1, "w": torch.randn(e), "b": torch.randn(e), "eps": torch.tensor([eps])}
    op, y = _run(pipe, arrays, mode)
    ref = F.layer_norm(arrays["x"].double(), (e,), arrays["w"].double(), arrays["b"].double(), eps) if layer else \
        F.rms_norm(arrays["x"].double(), (e,), arrays["w"].double(), eps)
    mine = F.layer_norm(arrays["x"], (e,), arrays["w"], arrays["b"], eps) if layer else \
        F.rms_norm(arrays["x"], (e,), arrays["w"], eps)
    err, torch_err = (y.double() - ref).abs().max().item(), (mine.double() - ref).abs().max().item()
    assert err <= 10 * torch_err + 1e-6 * ref.abs().max().item(), (seed, err, torch_err)
    assert op.depth == 3
    # eps is an input, not a weight: another eps changes the result as torch says
    arrays["eps"] = torch.tensor([0.5])
    _, y = _run(pipe, arrays, mode)
    ref = F.layer_norm(arrays["x"], (e,), arrays["w"], arrays["b"], 0.5) if layer else \
        F.rms_norm(arrays["x"], (e,), arrays["w"], 0.5)
    assert torch.allclose(y, ref, atol=1e-5), seed


def test_norm_eps_must_be_an_input_scalar():
    pipe = DecoderPipeline({"x": (2, 3), "w": (3,), "eps": (2,)}, {"y": (2, 3)})
    with pytest.raises(ValueError, match="eps 'eps' must be an input block"):
        pipe.norm("n.", "x", "y", "w", "eps")


@pytest.mark.parametrize("mode", ["dense", "fast"])
@pytest.mark.parametrize("rot", [6, 4, 0])
def test_rope_is_hf_bitwise_and_cached_rows_are_copied(seed, mode, rot):
    neox = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")  # partial rotary as NeoX
    apply_rotary_pos_emb = neox.apply_rotary_pos_emb

    n, r, past = 4, 6, 3
    inputs = {"q": (n, r), "pk": (past, r), **({"cos": (n, rot), "sin": (n, rot)} if rot else {})}
    pipe = DecoderPipeline(inputs, {"qr": (n, r), "kall": (past + n, r)})
    pipe.rope("rp.", {"qr": [Rows(0, n, "q", rot > 0)],
                      "kall": [Rows(0, past, "pk", False), Rows(past, past + n, "q", rot > 0)]}, rot=rot)
    angle = torch.randn(2, n, rot // 2) * 3
    angle = torch.cat([angle, angle], -1)
    arrays = {"q": torch.randn(2, n, r), "pk": torch.randn(2, past, r), "cos": angle.cos(), "sin": angle.sin()}
    op, (qr, kall) = _run(pipe, arrays, mode)
    ref = apply_rotary_pos_emb(arrays["q"][:, None], arrays["q"][:, None], arrays["cos"], arrays["sin"])[0][:, 0] \
        if rot else arrays["q"]
    assert torch.equal(qr, ref) and torch.equal(kall[:, past:], ref), seed
    assert torch.equal(kall[:, :past], arrays["pk"]) and op.depth == 2


def test_rope_rows_must_cover_the_block():
    pipe = DecoderPipeline({"q": (4, 2)}, {"k": (5, 2)})
    with pytest.raises(ValueError, match="must cover 'k'"):
        pipe.rope("rp.", {"k": [Rows(0, 4, "q", False)]})


def test_decoder_layer_saves_and_loads(tmp_path):
    import usim
    from usim.ops.decoder_layer import DecoderLayerSimulator

    op = DecoderLayerSimulator(2, 8, d=8, heads=2, kv_heads=1, head_dim=4, hidden=8, rot=4)
    usim.save(op, tmp_path / "layer.safetensors")
    back = usim.load(tmp_path / "layer.safetensors")
    assert type(back) is DecoderLayerSimulator and back.form == op.form and back.depth == op.depth == 30
