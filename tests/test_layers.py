"""Whole transformer encoder layers computed by one constructed encoder (usim.ops.layer).

The construction through the bare usim.Encoder; the drop-in for nn.TransformerEncoderLayer against
torch's own float32 error; inside nn.TransformerEncoder; state_dict, gradients, dropout and bad
options; no torch attention / linear / layer_norm kernel on the simulated path; Hugging Face BERT
layers (usim.bert.simulate_bert_layers).
"""

import copy
from contextlib import ExitStack
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import usim
from usim.ops.layer import EncoderLayerSimulator
from usim.ops.pipeline import FORMS, Operand, Pipeline, Product, Segment, matrix

from helpers import ulp_floor

_ALIVE = []  # drop-ins kept alive, so that tests of the same sizes share one encoder and its program

PADDING = torch.tensor([[False] * 6, [False] * 3 + [True] * 3, [False] * 5 + [True]])


def drop_in(layer, seq_len, **kw):
    sim = usim.SimulatedTransformerEncoderLayer.from_torch(layer, seq_len, **kw)
    _ALIVE.append(sim)
    return sim


def random_layer(d_model, heads, hidden, activation="relu", norm_first=False, batch_first=True, **kw):
    """An nn.TransformerEncoderLayer in eval mode whose biases and LayerNorm weights are random too."""
    layer = nn.TransformerEncoderLayer(d_model, heads, hidden, activation=activation, norm_first=norm_first,
                                       batch_first=batch_first, **kw).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "bias" in name or "norm" in name:
                p.copy_(torch.randn_like(p) * (0.5 if "bias" in name else 0.3) + (1.0 if "norm" in name and
                                                                                   "weight" in name else 0.0))
    return layer


def float64_copy(layer):
    return copy.deepcopy(layer).double()


# --- the construction ------------------------------------------------------------------------

def test_layernorm_stage_is_torch_layer_norm(seed):
    pipe = Pipeline({"x": (3, 5), "gamma": (5,), "beta": (5,), "eps": (1,)}, {"y": (3, 5)})
    pipe.layernorm("ln.", "x", "y", "gamma", "beta", eps="eps")
    b, layout = pipe.build()
    b.result("y", pipe.home["y"])
    encoder = b.build()
    x, gamma, beta = torch.randn(4, 3, 5, dtype=torch.float64) * 3 + 1, torch.randn(5, dtype=torch.float64), \
        torch.randn(5, dtype=torch.float64)
    y = layout.unpack(encoder(layout.pack(x, gamma, beta, torch.tensor([1e-5], dtype=torch.float64))))
    torch.testing.assert_close(y, F.layer_norm(x, (5,), gamma, beta, 1e-5), rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    assert [layer.ffn.activation for layer in encoder.layers] == ["bilinear", "rsqrt", "bilinear"]


def test_a_fetch_never_mixes_two_matmul_outputs():
    # two matmul output slots are both nonzero at matmul output tokens: summing their fetches would be wrong
    pipe = Pipeline({"a": (2, 2), "b": (2, 2)}, {"y": (2, 2)})
    pipe.block("p", (2, 2)), pipe.block("q", (2, 2))
    pipe.matmul("m1.", [Product("p", 2, matrix("a", "i", "t"), matrix("b", "t", "k"))])
    pipe.matmul("m2.", [Product("q", 2, matrix("a", "i", "t"), matrix("b", "t", "k"))])
    p_then_q = Operand((Segment(0, 1, "p", FORMS["i"], FORMS["t"]), Segment(1, 2, "q", FORMS["i"], FORMS["t"])))
    pipe.matmul("m3.", [Product("y", 2, p_then_q, matrix("b", "t", "k"))])
    with pytest.raises(ValueError, match="one matmul output"):
        pipe.build()


def test_construction_runs_in_the_bare_encoder(seed, tmp_path):
    op = EncoderLayerSimulator(3, 4, 2, 6, activation="gelu_tanh", norm_first=True, eps=1e-6)
    assert op.depth == 25 and op.width <= 5
    assert {"rsqrt", "gelu_tanh", "bilinear"} <= {layer.ffn.activation for layer in op.encoder.layers if layer.ffn}
    shapes = {"wq": (2, 4, 2), "wk": (2, 4, 2), "wv": (2, 4, 2), "bq": (2, 2), "bk": (2, 2), "bv": (2, 2),
              "wo": (2, 2, 4), "bo": (4,), "gamma1": (4,), "beta1": (4,), "w1": (4, 6), "b1": (6,), "w2": (6, 4),
              "b2": (4,), "gamma2": (4,), "beta2": (4,)}
    w = {name: torch.randn(shape, dtype=torch.float64) for name, shape in shapes.items()}
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    u = F.layer_norm(x, (4,), w["gamma1"], w["beta1"], 1e-6)
    q, k, v = ((u[:, None] @ w[f"w{c}"] + w[f"b{c}"][:, None]) for c in "qkv")  # (2, heads, 3, 2)
    a = x + ((q @ k.mT).softmax(-1) @ v @ w["wo"]).sum(1) + w["bo"]
    h = F.layer_norm(a, (4,), w["gamma2"], w["beta2"], 1e-6)
    want = a + F.gelu(h @ w["w1"] + w["b1"], approximate="tanh") @ w["w2"] + w["b2"]
    arrays = []  # what the op hands its encoder, packed below into the token sequence
    run = op.run
    op.run = lambda *args, **kwargs: arrays.append(args) or run(*args, **kwargs)
    got = op(x, *w.values())
    del op.run
    packed = [op.layout.pack(*arrays[0])]
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11, msg=f"seed {seed}")
    usim.save(op, tmp_path / "layer.safetensors")
    assert type(usim.load(tmp_path / "layer.safetensors")).__name__ == "EncoderLayerSimulator"
    encoder = usim.Encoder.load(tmp_path / "layer.safetensors")  # the checkpoint alone computes the layer
    assert torch.equal(op.layout.unpack(encoder(packed[0])), got)
    with pytest.raises(ValueError, match="w1 must be"):
        op(x, *[t if name != "w1" else t.mT for name, t in w.items()])
    with pytest.raises(ValueError, match="activation"):
        EncoderLayerSimulator(3, 4, 2, 6, activation="exp")


# --- the drop-in -----------------------------------------------------------------------------

@pytest.mark.parametrize("d_model,heads,hidden,seq_len,length,activation,norm_first", [
    (8, 2, 16, 4, 4, "relu", False),
    (8, 2, 16, 4, 3, "gelu", True),  # a shorter sequence: padded and masked
    (16, 4, 24, 6, 6, "gelu", False),
    (16, 4, 24, 6, 5, "relu", True),
])
def test_layer_within_torchs_own_error(seed, d_model, heads, hidden, seq_len, length, activation, norm_first):
    layer = random_layer(d_model, heads, hidden, activation, norm_first)
    sim, ref_layer = drop_in(layer, seq_len), float64_copy(layer)
    x = torch.randn(3, length, d_model)
    mask = PADDING[:, :length]
    with torch.no_grad():
        ref = ref_layer(x.double(), src_key_padding_mask=mask)
        torch_err = (layer(x, src_key_padding_mask=mask).double() - ref).abs().max().item()
        ours = sim(x, src_key_padding_mask=mask)
        exact = sim(x.double(), src_key_padding_mask=mask)  # the same weights, computed in float64
    err = (ours.double() - ref).abs().max().item()
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert err <= 10 * torch_err + ulp_floor(ref, torch.float32), (seed, err, torch_err)
    assert (exact - ref).abs().max().item() <= 1e-12, seed


def test_masks_batch_layouts_and_unbatched(seed):
    layer = random_layer(8, 2, 16, "gelu", False, batch_first=False)
    sim = drop_in(layer, 4)
    x = torch.randn(4, 3, 8)  # (L, N, E)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    per_head = torch.rand(3 * 2, 4, 4) < 0.3
    per_head[..., 0] = False  # every query keeps a key
    with torch.no_grad():
        for kwargs in ({"src_mask": causal, "is_causal": True}, {"src_mask": per_head},
                       {"src_mask": causal == float("-inf"), "src_key_padding_mask": PADDING[:, 2:]}):
            torch.testing.assert_close(sim(x, **kwargs), layer(x, **kwargs), rtol=1e-4, atol=1e-5,
                                       msg=f"seed {seed}, {list(kwargs)}")
        torch.testing.assert_close(sim(x[:, 0]), layer(x[:, 0]), rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


def test_no_torch_kernels_on_the_simulated_path(seed):
    layer = random_layer(8, 2, 16, "gelu", True)
    sim = drop_in(layer, 4)
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        want = layer(x, src_key_padding_mask=PADDING[:2, 2:])

    def forbidden(*args, **kwargs):
        raise AssertionError("a torch kernel ran inside the simulated layer")

    with ExitStack() as stack, torch.no_grad():
        for owner, name in ((F, "linear"), (F, "layer_norm"), (torch, "layer_norm"), (F, "softmax"),
                            (torch, "softmax"), (torch.Tensor, "softmax"), (F, "scaled_dot_product_attention"),
                            (F, "multi_head_attention_forward"), (torch, "_transformer_encoder_layer_fwd"),
                            (torch, "_native_multi_head_attention"), (nn.Linear, "forward"), (nn.LayerNorm, "forward"),
                            (nn.MultiheadAttention, "forward")):
            stack.enter_context(mock.patch.object(owner, name, forbidden))
        got = sim(x, src_key_padding_mask=PADDING[:2, 2:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the original's run
def test_inside_nn_transformer_encoder(seed):
    encoder = nn.TransformerEncoder(random_layer(8, 2, 16), num_layers=2).eval()  # nested tensors enabled
    sim = usim.simulate_layers(encoder, seq_len=6)
    _ALIVE.append(sim)
    layers = list(sim.layers)
    assert all(isinstance(layer, usim.SimulatedTransformerEncoderLayer) for layer in layers)
    assert layers[0].simulator is layers[1].simulator  # one encoder for layers of the same sizes
    assert not sim.use_nested_tensor and isinstance(encoder.layers[0], nn.TransformerEncoderLayer)  # a deep copy
    x = torch.randn(3, 6, 8)
    with torch.no_grad():
        ref, out = float64_copy(encoder)(x.double(), src_key_padding_mask=PADDING), sim(x, src_key_padding_mask=PADDING)
        torch_err = (encoder(x, src_key_padding_mask=PADDING).double() - ref)[~PADDING].abs().max().item()
    err = (out.double() - ref)[~PADDING].abs().max().item()  # torch's nested tensors zero the padded rows
    assert err <= 10 * torch_err + ulp_floor(ref, torch.float32), (seed, err, torch_err)
    assert usim.simulate_layers(encoder, seq_len=6, inplace=True) is encoder
    with pytest.raises(ValueError, match="no nn.TransformerEncoderLayer"):
        usim.simulate_layers(nn.Linear(2, 2), seq_len=4)


def test_state_dict_and_gradients_are_the_torch_layers(seed):
    layer = random_layer(8, 2, 16, "gelu", False, dropout=0.0).double().train()
    sim = drop_in(layer, 4)
    assert list(sim.state_dict()) == list(layer.state_dict())
    fresh = usim.SimulatedTransformerEncoderLayer(8, 2, 4, 16, activation="gelu", batch_first=True)
    _ALIVE.append(fresh)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).load_state_dict(fresh.state_dict(), strict=True)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    layer(x).square().sum().backward()
    sim(x).square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), sim.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-10, msg=f"seed {seed}, {name}")


def test_dropout_and_unsupported_options():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)  # training mode
    sim = drop_in(layer, 4)
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="dropout"):
        sim(x)
    sim.eval()
    assert sim(x).shape == x.shape
    with pytest.raises(ValueError, match="activation"):
        usim.SimulatedTransformerEncoderLayer.from_torch(nn.TransformerEncoderLayer(8, 2, 16, activation=F.silu), 4)
    odd = nn.TransformerEncoderLayer(8, 2, 16)
    odd.norm2.eps = 1e-6
    with pytest.raises(ValueError, match="norm1.eps != norm2.eps"):
        usim.SimulatedTransformerEncoderLayer.from_torch(odd, 4)
    assert sim(torch.randn(2, 5, 8)).shape == (2, 5, 8)  # longer than seq_len: any length runs
    with pytest.raises(RuntimeError, match="is_causal"):
        sim(x, is_causal=True)
    with pytest.raises(ValueError, match="float32 or float64"):
        sim(x.half())
    with pytest.raises(ValueError, match="src_key_padding_mask must be"):
        sim(x, src_key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="nn.TransformerEncoderLayer"):
        usim.SimulatedTransformerEncoderLayer.from_torch(nn.Linear(8, 8), 4)


# --- Hugging Face BERT -----------------------------------------------------------------------

def test_bert_layers_within_torchs_own_error(seed):
    transformers = pytest.importorskip("transformers")
    from usim.bert import SimulatedBertLayer, bert_activation, simulate_bert_layers

    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=2, intermediate_size=16,
                                     vocab_size=50, max_position_embeddings=16, initializer_range=0.5)
    model = transformers.BertModel(config).eval()
    mask = (~PADDING[:, :5]).long()
    ids = torch.randint(1, 50, mask.shape) * mask
    sim = simulate_bert_layers(model, seq_len=5)
    layers = list(sim.encoder.layer)
    assert all(isinstance(layer, SimulatedBertLayer) for layer in layers) and layers[0].simulator is layers[1].simulator
    assert list(sim.state_dict()) == list(model.state_dict())
    keep = mask.bool()
    with torch.no_grad():
        ref = float64_copy(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        torch_out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = sim(input_ids=ids, attention_mask=mask).last_hidden_state
    torch_err, err = ((out.double() - ref)[keep].abs().max().item() for out in (torch_out, ours))
    assert err <= 10 * torch_err + ulp_floor(ref, torch.float32), (seed, err, torch_err)
    assert not any(isinstance(m, SimulatedBertLayer) for m in model.modules())  # the original is untouched
    from transformers.activations import ACT2FN
    assert [bert_activation(ACT2FN[name]) for name in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")] == \
        ["gelu", "gelu_tanh", "gelu_tanh", "relu"]
    with pytest.raises(ValueError, match="not supported"):
        bert_activation(ACT2FN["silu"])
    with pytest.raises(ValueError, match="no BERT layer"):
        simulate_bert_layers(nn.Linear(2, 2), seq_len=4)


@pytest.mark.parametrize("norm_first", [False, True])
def test_two_layers_chained_in_one_encoder(seed, norm_first, tmp_path):
    from usim.transformer import fold_weights

    encoder = nn.TransformerEncoder(random_layer(8, 2, 16, "gelu", norm_first), num_layers=2,
                                    enable_nested_tensor=False).eval()
    stack = usim.EncoderStackSimulator(4, 8, 2, 16, layers=2, activation="gelu", norm_first=norm_first)
    assert stack.depth == 50

    def weights(layer, dtype):
        mha = layer.self_attn
        (wq, wk, wv), (bq, bk, bv) = mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)
        return fold_weights(2, (wq, bq), (wk, bk), (wv, bv), mha.out_proj, layer.norm1, layer.linear1, layer.linear2,
                            layer.norm2, dtype)

    x = torch.randn(3, 4, 8)
    mask = PADDING[:, 2:]
    with torch.no_grad():
        ref = float64_copy(encoder)(x.double(), src_key_padding_mask=mask)
        torch_err = (encoder(x, src_key_padding_mask=mask).double() - ref).abs().max().item()
        ours = stack(x, [weights(layer, torch.float32) for layer in encoder.layers], key_padding_mask=mask)
        exact = stack(x.double(), [weights(layer, torch.float64) for layer in encoder.layers], key_padding_mask=mask)
    err = (ours.double() - ref).abs().max().item()
    assert err <= 10 * torch_err + ulp_floor(ref, torch.float32), (seed, err, torch_err)
    assert (exact - ref).abs().max().item() <= 1e-12, seed
    with pytest.raises(ValueError, match="2 layers"):
        stack(x, [weights(encoder.layers[0], torch.float32)])
    usim.save(stack, tmp_path / "stack.safetensors")  # checked against a fresh construction on load
    assert usim.load(tmp_path / "stack.safetensors").args == stack.args
