"""usim: transformers whose weights are constructed, not trained (arXiv 2506.18739)."""

from usim.checkpoint import load, save
from usim.engine import Encoder
from usim.layout import Block, Layout
from usim.mha import SimulatedMultiheadAttention, simulate_attention
from usim.ops import (AttentionCore, Construction, Determinant, EncoderLayerSimulator, EncoderStackSimulator,
                      GroupSort, Inverse, MatMul, MaxMin, ReLU, SimulatedGroupSortNetwork, SimulatedInverseAttention,
                      SimulatedLinearAttention, SimulatedLinformer, SimulatedParity, Softmax, Transpose,
                      UniversalSimulator)
from usim.ops.groupsort_network import abs_network
from usim.plot import plot  # matplotlib is imported only when a figure is drawn
from usim.progress import set_progress
from usim.transformer import SimulatedTransformerEncoderLayer, simulate_layers
from usim import rasp  # noqa: E402 (RASP front-end: usim.rasp.compile)

__version__ = "0.1.0"

__all__ = ["AttentionCore", "Block", "Construction", "Determinant", "Encoder", "EncoderLayerSimulator",
           "EncoderStackSimulator", "GroupSort", "Inverse", "Layout", "MatMul", "MaxMin", "ReLU",
           "SimulatedGroupSortNetwork", "SimulatedInverseAttention", "SimulatedLinearAttention", "SimulatedLinformer",
           "SimulatedMultiheadAttention", "SimulatedParity", "SimulatedTransformerEncoderLayer", "Softmax",
           "Transpose", "UniversalSimulator", "abs_network", "load", "plot", "rasp", "save", "set_progress",
           "simulate_attention", "simulate_layers"]
