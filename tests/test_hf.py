"""attn_implementation="usim": tiny random Hugging Face models (built from configs, nothing downloaded)
with every attention core computed by U, against the same models with attn_implementation="eager"."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import usim.hf  # noqa: E402  (registers "usim")
from usim.hf import usim_attention_forward  # noqa: E402

VOCAB = 100


def tiny(kind: str, **extra):
    """A tiny random model of one family; large initial weights, so attention is peaked, not uniform."""
    common = dict(vocab_size=VOCAB, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    elif kind == "llama":  # grouped-query heads (4 query, 2 key/value), RoPE, head_dim 32
        config = transformers.LlamaConfig(hidden_size=64, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                                          num_hidden_layers=2, intermediate_size=64, **common)
    elif kind == "mistral":  # multi-query (4 query heads, 1 key/value head), a sliding window of 3
        config = transformers.MistralConfig(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=1,
                                            num_hidden_layers=2, intermediate_size=64, sliding_window=3, **common)
    else:
        config = transformers.BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                         intermediate_size=64, max_position_embeddings=64, **common)
    for key, value in extra.items():
        setattr(config, key, value)
    auto = transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM
    return auto.from_config(config, attn_implementation="usim").eval()


def padded_batch(length=7, batch=3, left=True):
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):  # item b has 2b padding tokens
        mask[b, :2 * b] = 0 if left else mask[b, :2 * b]
        if not left:
            mask[b, length - 2 * b:] = 0
    return torch.randint(3, VOCAB, (batch, length)) * mask, mask


def run(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=impl != "sdpa")
    return getattr(out, "logits", getattr(out, "last_hidden_state", None)), out.attentions


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "bert"])
def test_padded_batch_equals_eager(seed, kind):
    model = tiny(kind)
    ids, mask = padded_batch(left=kind != "bert")
    usim.hf.clear_cache()
    ours, weights = run(model, "usim", ids, mask)
    assert len(usim.hf.simulators()) == 1, seed  # U ran, one universal core for every layer
    eager, eager_weights = run(model, "eager", ids, mask)
    # the truth: float64 sdpa (Llama's eager takes its softmax in float32), at the real tokens (eager
    # and sdpa treat the rows of padding queries differently; real tokens never read them)
    reference, _ = run(model.double(), "sdpa", ids, mask)
    model.float()
    real = mask.bool()
    err, eager_err = ((t.double() - reference)[real].abs().max().item() for t in (ours, eager))
    assert err <= 10 * eager_err + 1e-6, (seed, err, eager_err)
    # output_attentions: the simulated weights, as eager's (rows of padding queries included)
    assert len(weights) == 2 and all(w.shape == e.shape for w, e in zip(weights, eager_weights))
    for w, e in zip(weights, eager_weights):
        torch.testing.assert_close(w, e, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_generate_with_cache_and_left_padding_equals_eager(seed, kind):
    model = tiny(kind)
    ids, mask = padded_batch(length=9)
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0,
                    eos_token_id=None)
    usim.hf.clear_cache()
    model.set_attn_implementation("usim")
    ours = model.generate(ids, **settings)
    # one core; its call shapes: the prompt (9 queries and keys), then one query over 10..20 keys
    assert list(usim.hf.simulators()) == ["core"], seed
    shapes = sorted(key[:2] for key in usim.hf.core().frames)
    assert shapes == sorted([(9, 9)] + [(1, m) for m in range(10, 21)]), seed
    model.set_attn_implementation("eager")
    assert torch.equal(ours, model.generate(ids, **settings)), seed


def test_unsupported_option_names_it():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       attn_logit_softcapping=50.0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="usim").eval()
    with torch.no_grad(), pytest.raises(ValueError, match="'softcap'"):
        model(input_ids=torch.randint(0, VOCAB, (1, 4)))
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="'s_aux'"):
        usim_attention_forward(nn.Module(), q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match="float16"):
        usim_attention_forward(nn.Module(), q.half(), q.half(), q.half(), None)


def test_dropout_in_training_mode(seed):
    module = nn.Module()
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, ..., :2] = torch.finfo(torch.float32).min
    _, kept = usim_attention_forward(module.eval(), q, k, v, mask, scaling=0.3, dropout=0.25)  # eval: no dropout
    out, dropped = usim_attention_forward(module.train(), q, k, v, mask, scaling=0.3, dropout=0.25)
    zero = dropped == 0
    assert 0 < (zero & (kept > 0)).sum() < kept.numel(), seed  # some weights dropped, not all
    torch.testing.assert_close(dropped[~zero], kept[~zero] / 0.75, msg=f"seed {seed}")  # the rest scaled
    want = dropped @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, want.transpose(1, 2), msg=f"seed {seed}")  # the values weighted by them
    model = tiny("llama", attention_dropout=0.5).train()  # and a whole model trains through it
    ids = torch.randint(3, VOCAB, (2, 6))
    logits = model(input_ids=ids).logits
    logits.sum().backward()
    assert torch.isfinite(logits).all() and model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_masks_without_transformers_builder(seed):
    """No mask with a causal module (is_causal), bool masks, and rows masked by -inf, as sdpa / eager."""
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    causal = torch.ones(4, 6, dtype=torch.bool).tril(2)  # the 4 queries are the last of 6 positions
    module = nn.Module()
    module.is_causal = True
    out, weights = usim_attention_forward(module, q, k, v, None, scaling=0.5)
    probs = torch.softmax((q @ k.mT * 0.5).masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(weights, probs, msg=f"seed {seed}")
    torch.testing.assert_close(out, (probs @ v).transpose(1, 2), msg=f"seed {seed}")
    assert torch.equal(usim_attention_forward(module, q, k, v, causal[None, None], scaling=0.5)[1], weights)
    additive = torch.zeros(1, 1, 4, 6).masked_fill(~causal, float("-inf"))
    additive[..., 0, :] = float("-inf")  # a row masked by -inf: weights 0, as sdpa (eager: NaN)
    out, weights = usim_attention_forward(nn.Module(), q, k, v, additive, scaling=0.5)
    assert torch.equal(out[:, 0], torch.zeros(1, 2, 8)) and torch.equal(weights[:, :, 0], torch.zeros(1, 2, 6)), seed
    assert torch.isfinite(out).all(), seed


def test_gradients_equal_eager(seed):
    model = tiny("llama")
    ids, mask = padded_batch()
    grads = []
    for impl in ("usim", "eager"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        model(input_ids=ids, attention_mask=mask).logits[mask.bool()].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert len(grads[0]) == len(grads[1]) and (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max(), seed


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_no_torch_attention_kernel_on_the_simulated_path(seed, monkeypatch, kind):
    # The kernel is the constructed encoder: while U computes an attention core, no softmax, no
    # scaled_dot_product_attention and no matmul runs (the structured program runs views and
    # elementwise products; a torch kernel here would be a silent fallback). The fused execution's
    # contractions are einsums over planned views of the stream (their operands: tests/test_fused.py).
    model = tiny(kind)
    ids, mask = padded_batch()
    want, _ = run(model, "usim", ids, mask)
    original = usim.AttentionCore.attention

    def forbidden(*args, **kwargs):
        raise AssertionError("a torch attention kernel ran inside the simulated attention core")

    def guarded(self, *args, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            for owner, name in [(torch, "softmax"), (torch.nn.functional, "softmax"), (torch.Tensor, "softmax"),
                                (torch.nn.functional, "scaled_dot_product_attention"), (torch, "matmul"),
                                (torch.Tensor, "__matmul__"), (torch, "bmm")]:
                patch.setattr(owner, name, forbidden)
            return original(self, *args, **kwargs)

    monkeypatch.setattr(usim.AttentionCore, "attention", guarded)
    got, _ = run(model, "usim", ids, mask)
    assert torch.equal(got, want), seed
