"""usim: transformers whose weights are constructed, not trained (arXiv 2506.18739)."""

from usim.checkpoint import load, save
from usim.engine import Encoder
from usim.layout import Block, Layout
from usim.mha import SimulatedMultiheadAttention
from usim.ops import (Construction, GroupSort, MatMul, MaxMin, ReLU, Softmax, Transpose,
                      UniversalSimulator)

__version__ = "0.1.0"

__all__ = ["Block", "Construction", "Encoder", "GroupSort", "Layout", "MatMul", "MaxMin", "ReLU",
           "SimulatedMultiheadAttention", "Softmax", "Transpose", "UniversalSimulator", "load", "save"]
