"""The declared nonlinearities an FFN sublayer may use (shared by the engine and the fast program)."""

import torch

ACTIVATIONS = ("identity", "relu", "bilinear", "exp", "reciprocal")


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
    a, b = pre.chunk(2, dim=-1)  # bilinear
    return a * b
