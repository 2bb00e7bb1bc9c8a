"""usim.bert: a (tiny, random) Hugging Face BertModel with every self-attention computed by U."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from usim.bert import SimulatedBertAttention, _key_padding_mask, simulate_bert_attention  # noqa: E402
from usim.mha import SimulatedMultiheadAttention  # noqa: E402

MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])  # 1 = token, 0 = padding


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=2, intermediate_size=32,
                                     vocab_size=50, max_position_embeddings=16,
                                     initializer_range=0.5)  # not BERT's 0.02: peaked attention, not uniform
    return transformers.BertModel(config).eval()


def test_simulated_bert_matches_the_original():
    model = tiny_bert()
    ids = torch.randint(1, 50, MASK.shape) * MASK  # padding id 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sim = simulate_bert_attention(model, seq_len=5)
    mhas = [m for m in sim.modules() if isinstance(m, SimulatedMultiheadAttention)]
    assert len(mhas) == 2 and all(isinstance(layer.attention, SimulatedBertAttention) for layer in sim.encoder.layer)
    masks = []
    for m in mhas:
        m.register_forward_hook(lambda mod, args, kwargs, out: masks.append(kwargs["key_padding_mask"]),
                                with_kwargs=True)
    keep = MASK.bool()
    implementations = ["sdpa", "eager"] if hasattr(model, "set_attn_implementation") else [None]
    for impl in implementations:  # sdpa hands the block a bool mask, eager an additive float one
        if impl is not None:
            model.set_attn_implementation(impl)
            sim.set_attn_implementation(impl)
        masks.clear()
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=MASK).last_hidden_state
            got = sim(input_ids=ids, attention_mask=MASK).last_hidden_state
        assert len(masks) == 2 and all(torch.equal(m, ~keep) for m in masks), impl  # U ran, keys masked
        err = (got - want)[keep].abs().max().item()
        assert err <= 1e-4, (impl, err)
    with torch.no_grad():  # no mask at all: the same sequences unpadded
        assert (sim(input_ids=ids).last_hidden_state - model(input_ids=ids).last_hidden_state).abs().max() <= 1e-4
    # the original is untouched (deep copy)
    assert not any(isinstance(m, (SimulatedBertAttention, SimulatedMultiheadAttention)) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_inplace_and_bad_arguments():
    model = tiny_bert(1)
    layers = list(model.encoder.layer)
    assert simulate_bert_attention(model, seq_len=4, inplace=True) is model
    assert list(model.encoder.layer) == layers
    assert all(isinstance(layer.attention, SimulatedBertAttention) for layer in layers)
    assert model(input_ids=torch.ones(1, 5, dtype=torch.long)).last_hidden_state.shape[1] == 5  # any length
    with pytest.raises(ValueError, match="seq_len"):
        simulate_bert_attention(tiny_bert(), seq_len=0)
    with pytest.raises(ValueError, match="no BERT self-attention"):
        simulate_bert_attention(torch.nn.Linear(2, 2), seq_len=4)


def test_mask_formats():
    keep = MASK.bool()
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]  # transformers 4.x
    for mask in (keep, MASK, keep[:, None, None, :].expand(3, 1, 5, 5), additive, additive.expand(3, 1, 5, 5),
                 torch.where(keep, 0.0, float("-inf"))):
        assert torch.equal(_key_padding_mask(mask, 3, 5), ~keep)
    assert _key_padding_mask(None, 3, 5) is None
    with pytest.raises(NotImplementedError, match="causal"):
        _key_padding_mask(torch.ones(5, 5, dtype=torch.bool).tril()[None, None], 1, 5)
    with pytest.raises(NotImplementedError, match="additive"):
        _key_padding_mask(torch.full((1, 1, 1, 5), -1.0), 1, 5)
