"""The generic encoder on hand-built weights."""

import pytest
import torch

from usim.construct import FFN, Builder, Head, Unit, match, maximize, everywhere
from usim.engine import FFN as FFNModule, Encoder, EncoderLayer, HardAttention
from usim.layout import Layout


def sequence_builder(length):
    b = Builder(Layout.of(inputs={"x": (length,)}, outputs={}))
    b.positional("pos", torch.arange(length), square=True)
    return b


def run(b, readout_slot, seq):
    encoder = b.build()
    encoder.readout[:] = encoder.slots.index(readout_slot)
    return encoder(seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_copy_previous_token(seed, dtype):
    b = sequence_builder(7)
    b.slot("prev")
    b.layer([Head([match({"pos": {"pos": 1, "one": -1}})], [("value", "prev")])])
    seq = torch.randn(5, 7, dtype=dtype)
    out = run(b, "prev", seq)
    assert torch.equal(out[:, 1:], seq[:, :-1]), seed
    assert torch.equal(out[:, 0], seq[:, 0]), seed  # target -1: the nearest key, position 0


def test_ties_are_averaged(seed):
    b = sequence_builder(6)
    b.slot("mean")
    b.layer([Head([everywhere()], [("value", "mean")], average=True)])
    seq = torch.randn(3, 6, dtype=torch.float64)
    out = run(b, "mean", seq)
    # Every position gets the same value, the mean up to summation order.
    assert torch.equal(out, out[:, :1].expand(-1, 6)), seed
    torch.testing.assert_close(out[:, 0], seq.mean(-1), rtol=1e-14, atol=0, msg=f"seed {seed}")


def test_ties_on_content_keep_one_key(seed):
    # Every query takes the maximum; two keys hold it; the position tie-break keeps one: no overflow.
    b = sequence_builder(5)
    b.slot("max")
    b.layer([Head([maximize("value")], [("value", "max")])])
    seq = torch.randn(4, 5)
    seq[:, 3] = seq[:, 1] = seq.abs().amax(-1) + 1
    out = run(b, "max", seq)
    assert torch.equal(out, seq.amax(-1, keepdim=True).expand(-1, 5)), seed
    huge = torch.full((1, 5), torch.finfo(torch.float32).max)
    assert torch.equal(run(b, "max", huge), huge)


def test_tiers_are_lexicographic(seed):
    # Tier 0 keeps keys with the same parity as the query; tier 1 takes the largest value among them.
    b = sequence_builder(8)
    b.positional("parity", torch.arange(8) % 2, square=True)
    b.slot("best")
    b.layer([Head([match({"parity": "parity"}), maximize("value")], [("value", "best")])])
    seq = torch.randn(3, 8)
    out = run(b, "best", seq)
    even, odd = seq[:, 0::2].amax(-1), seq[:, 1::2].amax(-1)
    assert torch.equal(out[:, 0::2], even[:, None].expand(-1, 4)), seed
    assert torch.equal(out[:, 1::2], odd[:, None].expand(-1, 4)), seed


def test_bilinear_ffn_product_is_exact(seed):
    b = sequence_builder(4)
    b.slot("square")
    b.slot("prev")
    b.layer([Head([match({"pos": {"pos": 1, "one": -1}})], [("value", "prev")])])
    b.layer(ffn=FFN("bilinear", [Unit("value", "square", gate="prev")]))
    seq = torch.randn(6, 4)
    out = run(b, "square", seq)
    assert torch.equal(out[:, 1:], seq[:, 1:] * seq[:, :-1]), seed


@pytest.mark.parametrize("activation,reference", [
    ("identity", lambda t: 3 * t),
    ("relu", lambda t: torch.relu(3 * t)),
    ("exp", lambda t: torch.exp(3 * t)),
    ("reciprocal", lambda t: torch.reciprocal(3 * t)),
    ("gelu", lambda t: torch.nn.functional.gelu(3 * t)),
    ("gelu_tanh", lambda t: torch.nn.functional.gelu(3 * t, approximate="tanh")),
    ("rsqrt", lambda t: torch.rsqrt(3 * t)),  # NaN where 3 t < 0, as torch's
])
def test_each_activation(seed, activation, reference):
    b = sequence_builder(5)
    b.slot("out")
    b.layer(ffn=FFN(activation, [Unit({"value": 3.0}, "out")]))
    seq = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(run(b, "out", seq), reference(seq), rtol=0, atol=0, equal_nan=True, msg=f"seed {seed}")


def test_residual_adds_and_layers_record_activation():
    b = sequence_builder(3)
    b.slot("acc")
    b.layer(ffn=FFN("identity", [Unit("value", "acc")]))
    b.layer(ffn=FFN("identity", [Unit("value", "acc")], bias_out={"acc": 1.0}))
    encoder = b.build()
    assert [layer.ffn.activation for layer in encoder.layers] == ["identity", "identity"]
    encoder.readout[:] = encoder.slots.index("acc")
    seq = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(encoder(seq), 2 * seq + 1)


def test_hooks_expose_pattern_and_stream():
    b = sequence_builder(4)
    b.slot("prev")
    b.layer([Head([match({"pos": {"pos": 1, "one": -1}})], [("value", "prev")])])
    encoder = b.build()
    seen = {}
    encoder.layers[0].attn.hook_pattern.register_forward_hook(lambda m, i, o: seen.setdefault("pattern", o))
    encoder.layers[0].hook_resid.register_forward_hook(lambda m, i, o: seen.setdefault("resid", o))
    encoder(torch.randn(2, 4))
    pattern = seen["pattern"][0, 0]
    assert torch.equal(pattern[1:].argmax(-1), torch.arange(3))
    assert torch.equal(pattern.sum(-1), torch.ones(4))
    assert seen["resid"].shape == (2, 4, encoder.stream_width)


def test_bad_construction_and_input_raise():
    with pytest.raises(ValueError, match="activation"):
        FFNModule("swish", torch.zeros(1, 2), torch.zeros(1), torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="key shape"):
        HardAttention(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2), torch.zeros(1, 2, 1))
    with pytest.raises(ValueError, match="width"):
        Encoder(["value"], torch.zeros(3, 2), torch.zeros(3), [])
    b = sequence_builder(3)
    with pytest.raises(ValueError, match="unknown slot"):
        b.layer(ffn=FFN("relu", [Unit("nope", "value")]))
        b.build()
    encoder = Encoder(["value"], torch.zeros(3, 1), torch.zeros(3), [EncoderLayer()])
    with pytest.raises(ValueError, match="length"):
        encoder(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="floating"):
        encoder(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(seed):
    b = sequence_builder(6)
    b.slot("prev")
    b.layer([Head([match({"pos": {"pos": 1, "one": -1}})], [("value", "prev")])])
    encoder = b.build()
    encoder.readout[:] = encoder.slots.index("prev")
    seq = torch.randn(3, 6)
    assert torch.equal(encoder.cuda()(seq.cuda()).cpu(), encoder.cpu()(seq)), seed


def test_parallel_branches_merge_layers(seed):
    b = sequence_builder(5)
    for name in ("prev", "sq", "r"):
        b.slot(name)

    def previous():
        b.layer([Head([match({"pos": {"pos": 1, "one": -1}})], [("value", "prev")])],
                FFN("bilinear", [Unit("prev", "sq", gate="prev")]))

    def rectify():
        b.layer(ffn=FFN("relu", [Unit("value", "r")]))
        b.layer(ffn=FFN("identity", [Unit("r", "r")]))  # r doubled

    b.parallel(previous, rectify)
    encoder = b.build()
    # layer 0: the head + bilinear FFN, then relu as its own FFN-only layer; layer 1: identity.
    assert [(l.attn is not None, l.ffn.activation) for l in encoder.layers] == [
        (True, "bilinear"), (False, "relu"), (False, "identity")]
    seq = torch.randn(3, 5)
    for slot, expected in (("sq", seq[:, :-1] ** 2), ("r", 2 * torch.relu(seq[:, 1:]))):
        encoder.readout[:] = encoder.slots.index(slot)
        assert torch.equal(encoder(seq)[:, 1:], expected), seed
