"""Whole Hugging Face decoder layers in constructed encoders (usim.decoder): tiny random Llama,
Mistral (sliding window), Qwen2 (q/k/v biases), GPT-2 (Conv1D, GELU-tanh) and GPT-NeoX (partial
rotary, parallel residual) models, batch 2 with left padding."""

import contextlib
import importlib
import threading

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import usim  # noqa: E402
from helpers import left_padded, tiny_decoder, ulp_floor  # noqa: E402
from usim.decoder import SimulatedDecoderLayer, simulate_decoder_layers  # noqa: E402
from usim.ops.base import Construction  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "neox"]
GENERATE = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}


def _layers(model):
    return [m for m in model.modules() if isinstance(m, SimulatedDecoderLayer)]


VARIANTS = {"llama, biases and MQA": ("llama", {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1}),
            "neox, sequential residual": ("neox", {"use_parallel_residual": False, "rotary_pct": 1.0})}


@pytest.mark.parametrize("family", FAMILIES + list(VARIANTS))
def test_logits_within_eager_error_of_float64(family):
    family, options = VARIANTS.get(family, (family, {}))
    ids, mask = left_padded()
    real = mask.bool()
    with torch.no_grad():
        ref = tiny_decoder(family, "sdpa", **options).double()(ids, attention_mask=mask).logits[real]
        eager = tiny_decoder(family, "eager", **options)(ids, attention_mask=mask).logits[real]
        sim = simulate_decoder_layers(tiny_decoder(family, "sdpa", **options))
        ours = sim(ids, attention_mask=mask).logits[real]
    assert len(_layers(sim)) == 2
    err, eager_err = (ours.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item()
    assert err <= 10 * eager_err + ulp_floor(ref, torch.float32), (family, err, eager_err)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_any_mask_form(attn):
    """eager hands additive float masks, sdpa bool masks or None: the same logits either way."""
    ids, mask = left_padded()
    model = tiny_decoder("mistral", attn)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ours = simulate_decoder_layers(model)(ids, attention_mask=mask).logits
        unpadded = simulate_decoder_layers(model)(ids).logits  # no padding: sdpa hands None
    real = mask.bool()
    assert torch.allclose(ours[real], ref[real], atol=1e-5)
    assert torch.allclose(unpadded, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_eager(family):
    """24 greedy tokens with the KV cache (the encoder's new keys and values written into HF's cache,
    the cached ones passed back in), 12 without (every step recomputes the whole sequence); fixed
    seeds (greedy decoding of near ties)."""
    ids, mask = left_padded()
    model = tiny_decoder(family, "eager", layers=1)
    sim = simulate_decoder_layers(model)
    with torch.no_grad():
        for use_cache, tokens in ((True, 24), (False, 12)):
            options = {**GENERATE, "max_new_tokens": tokens, "use_cache": use_cache}
            ours = sim.generate(ids, attention_mask=mask, **options)
            ref = model.generate(ids, attention_mask=mask, **options)
            assert torch.equal(ours, ref), (family, use_cache, ours, ref)


def test_gradients_reach_the_parameters():
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    labels[-1, 3] = -100  # its logit comes from a fully masked pad row: implementations differ there
    grads = {}
    for name, model in (("ref", tiny_decoder("qwen2", "sdpa").double()), ("eager", tiny_decoder("qwen2", "eager")),
                        ("ours", simulate_decoder_layers(tiny_decoder("qwen2", "sdpa")))):
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[name] = {k: p.grad for k, p in model.named_parameters()}
    assert set(grads["ours"]) == set(grads["ref"])
    for key, ref in grads["ref"].items():
        err = (grads["ours"][key].double() - ref).abs().max().item()
        eager_err = (grads["eager"][key].double() - ref).abs().max().item()
        assert err <= 10 * eager_err + ulp_floor(ref, torch.float32), (key, err, eager_err)
    assert grads["ours"]["model.layers.1.mlp.gate_proj.weight"].abs().max() > 0


def test_layers_replaced_in_place_with_hf_keys():
    model = tiny_decoder("llama")
    sim = simulate_decoder_layers(model)
    assert all(isinstance(layer, SimulatedDecoderLayer) for layer in sim.model.layers)
    assert not any(isinstance(layer, SimulatedDecoderLayer) for layer in model.model.layers)  # a copy
    assert list(sim.state_dict()) == list(model.state_dict())
    sim.load_state_dict(model.state_dict(), strict=True)
    assert usim.simulate_layers(model).model.layers[0].kind == "LlamaDecoderLayer"


@pytest.mark.parametrize("config, kind, lacks", [
    ("Gemma2Config", "Gemma2DecoderLayer", "softcapping"),
    ("MixtralConfig", "MixtralDecoderLayer", "mixture-of-experts"),
])
def test_unsupported_layers_are_named(config, kind, lacks):
    cfg = getattr(transformers, config)(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_key_value_heads=1, num_hidden_layers=1, head_dim=8)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=f"{kind} is not supported: .*{lacks}"):
        simulate_decoder_layers(model)


FORBIDDEN = [(F, "linear"), (F, "layer_norm"), (F, "rms_norm"), (torch, "rms_norm"), (F, "softmax"),
             (torch, "softmax"), (torch.Tensor, "softmax"), (F, "scaled_dot_product_attention"), (torch, "matmul"),
             (torch.Tensor, "matmul"), (torch.Tensor, "__matmul__"), (torch, "bmm"), (F, "silu"), (F, "gelu"),
             (torch, "rsqrt"), (torch.Tensor, "pow"), (torch.Tensor, "mean"), (torch, "tanh")]
ROPE = ["llama", "mistral", "qwen2", "gpt_neox"]


@contextlib.contextmanager
def _no_direct_ops(model, calls: list):
    """Inside a simulated layer's forward and outside the encoder's run, the ops of a layer raise."""
    state = threading.local()
    state.layer = state.encoder = False
    patched = list(FORBIDDEN) + [(importlib.import_module(f"transformers.models.{m}.modeling_{m}"), name)
                                 for m in ROPE for name in ("apply_rotary_pos_emb", "rotate_half")]
    originals = [getattr(owner, name) for owner, name in patched]

    def guard(original, what):
        def wrapper(*args, **kwargs):
            if getattr(state, "layer", False) and not getattr(state, "encoder", False):
                raise AssertionError(f"{what} ran on the hidden states outside the encoder")
            return original(*args, **kwargs)
        return wrapper

    run = Construction.run

    def encoder_run(self, *args, **kwargs):
        state.encoder = True
        calls.append(type(self).__name__)
        try:
            return run(self, *args, **kwargs)
        finally:
            state.encoder = False

    hooks = [h for layer in _layers(model) for h in (
        layer.register_forward_pre_hook(lambda *a: setattr(state, "layer", True)),
        layer.register_forward_hook(lambda *a: setattr(state, "layer", False)))]
    try:
        for (owner, name), original in zip(patched, originals):
            setattr(owner, name, guard(original, name))
        Construction.run = encoder_run
        yield state
    finally:
        Construction.run = run
        for (owner, name), original in zip(patched, originals):
            setattr(owner, name, original)
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_no_direct_op_on_the_hidden_states(family):
    ids, mask = left_padded()
    model = tiny_decoder(family, "sdpa", layers=1)
    sim = simulate_decoder_layers(model)
    calls = []
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **{**GENERATE, "max_new_tokens": 3})
        with _no_direct_ops(sim, calls) as state:
            ours = sim.generate(ids, attention_mask=mask, **{**GENERATE, "max_new_tokens": 3})
            state.layer = True  # the guard itself works: a direct op inside a layer raises
            with pytest.raises(AssertionError, match="linear ran on the hidden states"):
                F.linear(torch.ones(2), torch.ones(1, 2))
            state.layer = False
    assert torch.equal(ours, ref) and calls == ["DecoderLayerSimulator"] * 3


def test_changed_weights_are_seen():
    """Folded weights are kept between calls without gradients, and folded again after a change."""
    ids, mask = left_padded()
    model = tiny_decoder("gpt2")
    sim = simulate_decoder_layers(model, inplace=True)
    with torch.no_grad():
        before = sim(ids, attention_mask=mask).logits
        sim.transformer.h[0].mlp.c_proj.weight.mul_(2)
        after = sim(ids, attention_mask=mask).logits
        eager = tiny_decoder("gpt2")
        eager.transformer.h[0].mlp.c_proj.weight.mul_(2)
        ref = eager(ids, attention_mask=mask).logits
    real = mask.bool()
    assert not torch.allclose(before[real], after[real]) and torch.allclose(after[real], ref[real], atol=1e-5)

