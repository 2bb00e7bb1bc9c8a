"""The drop-in inside ordinary PyTorch models: usim.simulate_attention, gradients, state_dict, module habits."""

import copy
import pickle

import pytest
import torch
from torch import nn

import usim
from usim.mha import SimulatedMultiheadAttention


def count_calls(model):
    """A list that grows by one at every forward of a simulated attention module in the model."""
    calls = []
    for module in model.modules():
        if isinstance(module, SimulatedMultiheadAttention):
            module.register_forward_hook(lambda *args: calls.append(1))
    return calls


PADDING = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_with_default_arguments(seed, batch_first):
    # dropout 0.1 (a no-op in eval mode); PyTorch's fused fast path must step aside for the simulator
    layer = nn.TransformerEncoderLayer(16, 2, batch_first=batch_first).eval()
    sim = usim.simulate_attention(layer, seq_len=5)
    calls = count_calls(sim)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    with torch.no_grad():
        ref, out = layer(x, src_key_padding_mask=PADDING), sim(x, src_key_padding_mask=PADDING)
        unbatched_ref, unbatched = layer(x[0] if batch_first else x[:, 0]), sim(x[0] if batch_first else x[:, 0])
    assert len(calls) == 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(unbatched, unbatched_ref, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    assert isinstance(layer.self_attn, nn.MultiheadAttention)  # a deep copy: the original is unchanged


def test_transformer_encoder_every_layer_simulated(seed):
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2), num_layers=2, enable_nested_tensor=False).eval()
    sim = usim.simulate_attention(encoder, seq_len=6)
    calls = count_calls(sim)
    x = torch.randn(5, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(sim(x, src_key_padding_mask=PADDING), encoder(x, src_key_padding_mask=PADDING),
                                   rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    assert len(calls) == 2
    # every layer of the same sizes runs on one shared U: one encoder, one compiled program
    sims = [m for m in sim.modules() if isinstance(m, SimulatedMultiheadAttention)]
    assert sims[0].simulator is sims[1].simulator


def test_inplace_and_bad_arguments():
    layer = nn.TransformerEncoderLayer(8, 2).eval()
    assert usim.simulate_attention(layer, seq_len=4, inplace=True) is layer
    assert isinstance(layer.self_attn, SimulatedMultiheadAttention)
    with pytest.raises(TypeError, match="nn.Module"):
        usim.simulate_attention("model", seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        usim.simulate_attention(layer, seq_len=0)


def test_dropout_in_training_mode_as_mha(seed):
    # training mode: the weights are dropped with probability p and the kept ones scaled by 1/(1 - p)
    # (the random draws are not MHA's); eval mode: no dropout
    mha = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True, dtype=torch.float64)
    sim = SimulatedMultiheadAttention.from_torch(mha.eval(), seq_len=6)
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    weights = sim(x, x, x, average_attn_weights=False)[1]
    torch.testing.assert_close(weights, mha(x, x, x, average_attn_weights=False)[1], rtol=1e-10, atol=1e-12)
    sim.train()
    out, dropped = sim(x, x, x, average_attn_weights=False)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], (weights / 0.5)[kept], rtol=1e-12, atol=1e-14)
    assert 0.3 < 1 - kept.double().mean().item() < 0.7, seed
    # the output is the dropped weights applied to the values, then out_proj
    values = (x @ mha.in_proj_weight[16:].T + mha.in_proj_bias[16:]).unflatten(-1, (2, 4)).transpose(1, 2)
    expected = mha.out_proj((dropped @ values).transpose(1, 2).flatten(-2))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")


def test_gradients_reach_the_mha_weights(seed):
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    sim = SimulatedMultiheadAttention.from_torch(mha, seq_len=4)
    x = torch.randn(2, 4, 8)
    grads = []
    for module in (mha, sim):
        module.zero_grad()
        (module(x, x, x, need_weights=False)[0] ** 2).sum().backward()
        grads.append([p.grad for p in module.parameters()])
    for ours, theirs in zip(*reversed(grads)):
        assert ours is not None
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), seed


def test_training_gives_the_same_losses(seed):
    # a tiny model trained for a few SGD steps with MHA and with the drop-in, from the same weights
    model = nn.Sequential(nn.Linear(4, 8))
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    head = nn.Linear(8, 1)
    x, target = torch.randn(6, 3, 4), torch.randn(6, 3, 1)
    losses = []
    for simulated in (False, True):
        modules = copy.deepcopy((model, attention, head))
        if simulated:
            modules = (modules[0], SimulatedMultiheadAttention.from_torch(modules[1], seq_len=3), modules[2])
        optimizer = torch.optim.SGD([p for m in modules for p in m.parameters()], lr=0.1)
        run = []
        for _ in range(3):
            h = modules[0](x)
            loss = ((modules[2](modules[1](h, h, h, need_weights=False)[0]) - target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=0)


def test_state_dict_interchangeable_with_mha_both_ways():
    mha = nn.MultiheadAttention(8, 2)
    sim = SimulatedMultiheadAttention(8, 2, seq_len=4)
    assert sim.state_dict().keys() == mha.state_dict().keys()
    sim.load_state_dict(mha.state_dict(), strict=True)
    mha.load_state_dict(sim.state_dict(), strict=True)
    x = torch.randn(4, 2, 8)
    torch.testing.assert_close(sim(x, x, x)[0], mha(x, x, x)[0], rtol=1e-4, atol=1e-5)


def test_module_habits(seed):
    u = usim.UniversalSimulator(3, 2, heads=2)
    x, a, v = torch.randn(2, 3, 2), torch.randn(2, 2, 2), torch.randn(2, 2, 2)
    y = u(x, a, v)
    for convert in (lambda m: m.float(), lambda m: m.double(), lambda m: m.to(dtype=torch.float32, device="cpu")):
        assert torch.equal(convert(u)(x, a, v), y), seed
    assert torch.equal(copy.deepcopy(u)(x, a, v), y) and torch.equal(pickle.loads(pickle.dumps(u))(x, a, v), y)
    with torch.inference_mode():
        built_in_inference = usim.UniversalSimulator(3, 2, heads=2)
    assert torch.equal(built_in_inference(x, a, v), y), seed
    with pytest.raises(ValueError, match="float32 or float64"):
        u(x.half(), a.half(), v.half())
    assert "\n" not in repr(u) and "depth=11" in repr(u)
    sim = SimulatedMultiheadAttention(8, 2, seq_len=3)
    assert len(repr(sim).splitlines()) == len(repr(nn.MultiheadAttention(8, 2)).splitlines()) + 1
    x = torch.randn(3, 1, 8)
    out = sim(x, x, x)[0]
    assert torch.equal(pickle.loads(pickle.dumps(sim))(x, x, x)[0], out)
    assert torch.equal(copy.deepcopy(sim).double().float()(x, x, x)[0], out)


def test_transformer_encoder_decoder_with_causal_and_padding_masks(seed):
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                           batch_first=True).eval()
    sim = usim.simulate_attention(model, seq_len=5)
    calls = count_calls(sim)
    src, tgt = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    masks = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(4), tgt_is_causal=True,
                 src_key_padding_mask=torch.tensor([[False] * 5, [False] * 3 + [True] * 2]),
                 tgt_key_padding_mask=torch.tensor([[False] * 4, [False] * 3 + [True]]),
                 memory_key_padding_mask=torch.tensor([[False] * 5, [False] * 3 + [True] * 2]))
    with torch.no_grad():
        torch.testing.assert_close(sim(src, tgt, **masks), model(src, tgt, **masks), rtol=1e-4, atol=1e-5,
                                   msg=f"seed {seed}")
    assert len(calls) == 3  # encoder self-attention, decoder self-attention, decoder cross-attention


@pytest.mark.parametrize("mask_kind", ["bool", "float", "per head"])
def test_cross_attention_and_attn_mask_as_mha(seed, mask_kind):
    mha = nn.MultiheadAttention(6, 2, kdim=5, vdim=3, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    sim = SimulatedMultiheadAttention.from_torch(mha, seq_len=5)
    assert sim.state_dict().keys() == mha.state_dict().keys()
    q, k, v = torch.randn(2, 4, 6), torch.randn(2, 5, 5), torch.randn(2, 5, 3)
    if mask_kind == "bool":
        mask = torch.rand(4, 5) < 0.3
        mask[:, 0] = False
    elif mask_kind == "float":
        mask = torch.randn(4, 5).masked_fill(torch.rand(4, 5) < 0.3, float("-inf"))
        mask[:, 0] = 0.0
    else:  # (N * num_heads, L, S)
        mask = torch.rand(4, 4, 5) < 0.3
        mask[..., 1] = False
    padding = torch.tensor([[False] * 5, [False] * 4 + [True]])
    ref = nn.MultiheadAttention(6, 2, kdim=5, vdim=3, batch_first=True, dtype=torch.float64)
    ref.load_state_dict({key: t.double() for key, t in mha.state_dict().items()})
    expected, expected_w = ref(q.double(), k.double(), v.double(), key_padding_mask=padding,
                               attn_mask=mask if mask.dtype == torch.bool else mask.double())
    theirs = mha(q, k, v, key_padding_mask=padding, attn_mask=mask)[0]
    ours, ours_w = sim(q, k, v, key_padding_mask=padding, attn_mask=mask)
    torch_err = (theirs.double() - expected).abs().max().item()
    assert (ours.double() - expected).abs().max().item() <= 10 * torch_err + 1e-6, seed
    torch.testing.assert_close(ours_w.double(), expected_w, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")


def test_fully_masked_row_gives_what_sdpa_gives():
    # nn.MultiheadAttention's need_weights=False path (scaled_dot_product_attention): weights 0, out_proj's bias
    mha = nn.MultiheadAttention(4, 2)
    nn.init.normal_(mha.out_proj.bias)
    sim = SimulatedMultiheadAttention.from_torch(mha, seq_len=3)
    x = torch.randn(3, 1, 4)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1] = True
    theirs = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    ours, weights = sim(x, x, x, attn_mask=mask)
    assert torch.isfinite(theirs).all() and torch.equal(weights[:, 1], torch.zeros(1, 3))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1, 0], mha.out_proj.bias)


def test_torch_compile_threads_and_a_run_path_without_host_syncs(seed):
    import threading

    u = usim.UniversalSimulator(3, 2, heads=2)
    x, a, v = torch.randn(2, 3, 2), torch.randn(2, 2, 2), torch.randn(2, 2, 2)
    y = u(x, a, v)
    assert torch.equal(torch.compile(u, backend="eager")(x, a, v), y), seed
    # the compiled program's run path traces whole: no .item(), no data-dependent shapes
    program = u.encoder.program(torch.float32)
    seq = u.layout.pack(x, *a, *v, torch.zeros(3))
    assert torch.equal(torch.compile(program.run, fullgraph=True, backend="eager")(seq), program.run(seq))
    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, u(x, a, v))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, y) for r in results), seed


def test_save_and_load_a_drop_in(seed, tmp_path):
    # a drop-in's file is its nn.MultiheadAttention weights and sizes; the U is rebuilt from the sizes
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, dropout=0.1, batch_first=True)
    sim = SimulatedMultiheadAttention.from_torch(mha, seq_len=4).eval()
    path = tmp_path / "drop_in.safetensors"
    usim.save(sim, path)
    loaded = usim.load(path).eval()
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 4, 5), torch.randn(2, 4, 3)
    assert isinstance(loaded, SimulatedMultiheadAttention) and loaded.dropout == 0.1 and loaded.batch_first
    assert torch.equal(loaded(q, k, v)[0], sim(q, k, v)[0]), seed
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["out_proj.weight"][0, 0] += 1
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="altered"):
        usim.load(path)
    assert not torch.equal(usim.load(path, verify=False).out_proj.weight, sim.out_proj.weight)
