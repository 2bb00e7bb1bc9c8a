"""What users trip on (issue 20): each class of problem, checked against nn.MultiheadAttention or torch.

1. Training after inference: a module called under ``torch.inference_mode()`` trains afterwards, as
   ``nn.MultiheadAttention`` does; so does another drop-in sharing its U, every op, and a simulated
   ``nn.TransformerEncoder`` evaluated first and fine-tuned then.
"""

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
