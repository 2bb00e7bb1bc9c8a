"""simulate_layers and simulate_bert_layers on real module graphs: the rules simulate_attention keeps.

A layer reached twice becomes one drop-in; the drop-ins hold the model's own Parameters (frozen ones
stay frozen; with inplace=True an optimizer built before still trains the model); an activation or
layer subclass with its own forward is refused before anything is replaced; a model that is not a
module is a TypeError naming the argument.
"""

import pytest
import torch
from torch import nn

import usim
from helpers import node_seed
from usim.transformer import SimulatedTransformerEncoderLayer


@pytest.fixture
def seed(request):
    return node_seed(request)


class TanhGELU(nn.GELU):
    def forward(self, x):  # not what nn.GELU computes
        return torch.tanh(x)


class LeakyReLU(nn.ReLU):
    def forward(self, x):
        return torch.where(x > 0, x, 0.1 * x)


class ScaledLayer(nn.TransformerEncoderLayer):
    def forward(self, src, *args, **kwargs):
        return 2 * super().forward(src, *args, **kwargs)


def layer(activation="relu", **options):
    return nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, activation=activation,
                                      **options).eval()


def tiny_bert(layers=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=layers,
                                     intermediate_size=16, vocab_size=50, max_position_embeddings=16,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config).eval()


def test_a_layer_listed_twice_is_one_drop_in(seed):
    shared = layer()
    model = nn.Sequential(shared, nn.Linear(8, 8), shared)
    sim = usim.simulate_layers(model)
    assert isinstance(sim[0], SimulatedTransformerEncoderLayer) and sim[0] is sim[2], seed
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(sim(x), model(x), rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


def test_frozen_parameters_stay_frozen(seed):
    encoder = nn.TransformerEncoder(layer(), num_layers=2, enable_nested_tensor=False)
    encoder.layers[0].linear1.weight.requires_grad_(False)
    encoder.layers[1].self_attn.in_proj_weight.requires_grad_(False)
    sim = usim.simulate_layers(encoder)
    assert [p.requires_grad for p in sim.parameters()] == [p.requires_grad for p in encoder.parameters()], seed
    sim(torch.randn(2, 4, 8)).sum().backward()
    assert sim.layers[0].linear1.weight.grad is None and sim.layers[1].self_attn.in_proj_weight.grad is None
    assert sim.layers[0].linear2.weight.grad is not None, seed


def test_inplace_keeps_the_parameters_an_optimizer_holds(seed):
    encoder = nn.TransformerEncoder(layer(), num_layers=2, enable_nested_tensor=False)
    params = list(encoder.parameters())
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    sim = usim.simulate_layers(encoder, inplace=True)
    assert sim is encoder and all(isinstance(m, SimulatedTransformerEncoderLayer) for m in encoder.layers)
    assert [id(p) for p in sim.parameters()] == [id(p) for p in params], seed
    x = torch.randn(2, 4, 8)
    before = sim(x).detach()
    sim(x).pow(2).sum().backward()
    optimizer.step()
    assert not torch.allclose(sim(x), before), seed  # the optimizer trained the simulated model


def test_a_deep_copy_is_trained_apart_from_the_model(seed):
    encoder = nn.TransformerEncoder(layer(), num_layers=1, enable_nested_tensor=False)
    sim = usim.simulate_layers(encoder)
    assert not {id(p) for p in sim.parameters()} & {id(p) for p in encoder.parameters()}, seed


@pytest.mark.parametrize("activation", [TanhGELU(), LeakyReLU(), TanhGELU(approximate="tanh")])
def test_an_activation_subclass_with_its_own_forward_is_refused(seed, activation):
    model = nn.Sequential(layer(), layer(activation))
    with pytest.raises(ValueError, match=f"1: activation {type(activation).__name__} .*own forward"):
        usim.simulate_layers(model, inplace=True)
    assert not any(isinstance(m, SimulatedTransformerEncoderLayer) for m in model), seed  # nothing replaced
    with pytest.raises(ValueError, match=type(activation).__name__):
        SimulatedTransformerEncoderLayer.from_torch(model[1])


def test_a_layer_subclass_with_its_own_forward_is_refused():
    model = nn.Sequential(layer(), ScaledLayer(8, 2, dim_feedforward=16, batch_first=True))
    with pytest.raises(ValueError, match="1: ScaledLayer is a subclass"):
        usim.simulate_layers(model, inplace=True)
    assert not isinstance(model[0], SimulatedTransformerEncoderLayer)
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        usim.simulate_layers("encoder")


def test_bert_layers_on_real_graphs(seed):
    from usim.bert import SimulatedBertLayer, simulate_bert_layers

    model = tiny_bert()
    model.encoder.layer[1] = model.encoder.layer[0]  # one layer listed twice
    model.encoder.layer[0].intermediate.dense.weight.requires_grad_(False)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(1, 50, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    sim = simulate_bert_layers(model, inplace=True)
    first, second = sim.encoder.layer
    assert isinstance(first, SimulatedBertLayer) and first is second, seed
    assert [id(p) for p in sim.parameters()] == [id(p) for p in params], seed
    out = sim(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    out.pow(2).sum().backward()
    assert first.intermediate.dense.weight.grad is None and first.output.dense.weight.grad is not None
    optimizer.step()
    assert not torch.allclose(sim(input_ids=ids).last_hidden_state, out), seed


def test_bert_bad_models_and_activations(seed):
    from usim.bert import simulate_bert_attention, simulate_bert_layers

    for bad in ("bert-base-uncased", [tiny_bert(1)]):
        for simulate in (simulate_bert_layers, simulate_bert_attention):
            with pytest.raises(TypeError, match=f"model must be an nn.Module .*got {type(bad).__name__}"):
                simulate(bad)
    model = tiny_bert(1)
    model.encoder.layer[0].intermediate.intermediate_act_fn = TanhGELU()
    with pytest.raises(ValueError, match="TanhGELU is a subclass of nn.GELU with its own forward"):
        simulate_bert_layers(model, inplace=True)
    assert type(model.encoder.layer[0]).__name__ == "BertLayer", seed  # nothing replaced
