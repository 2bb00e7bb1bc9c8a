"""The declared nonlinearities an FFN sublayer may use (shared by the engine and the fast program).

Each is elementwise (the paper's RASP model allows any elementwise map in the FFN), except
``bilinear``, the exact product of two linear reads (it halves the last axis):

    identity  t                     relu        max(t, 0)
    exp       e^t                   reciprocal  1 / t
    gelu      t * Phi(t) = t / 2 * (1 + erf(t / sqrt 2))   (exact form, torch's F.gelu default, BERT's)
    gelu_tanh t / 2 * (1 + tanh(sqrt(2 / pi) * (t + 0.044715 t^3)))   (F.gelu(approximate="tanh"))
    rsqrt     1 / sqrt(t)          (LayerNorm's 1 / sqrt(var + eps))
    silu      t * sigmoid(t)       (F.silu: the gate of Llama's MLP)
    sigmoid   1 / (1 + e^-t)
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "bilinear", "exp", "reciprocal", "gelu", "gelu_tanh", "rsqrt", "silu", "sigmoid")
# The activations with act(0) = 0: a matrix stage may use them (tokens outside it must stay 0).
ZERO_AT_ZERO = ("identity", "relu", "gelu", "gelu_tanh", "silu")


def activate(activation: str, pre: torch.Tensor) -> torch.Tensor:
    """One declared activation on the pre-activations (..., rows); bilinear halves the last axis."""
    if activation == "identity":
        return pre
    if activation == "relu":
        return torch.relu(pre)
    if activation == "exp":
        return torch.exp(pre)
    if activation == "reciprocal":
        return torch.reciprocal(pre)
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "gelu_tanh":
        return F.gelu(pre, approximate="tanh")
    if activation == "rsqrt":
        return torch.rsqrt(pre)
    if activation == "silu":
        return F.silu(pre)
    if activation == "sigmoid":
        return torch.sigmoid(pre)
    a, b = pre.chunk(2, dim=-1)  # bilinear
    return a * b
