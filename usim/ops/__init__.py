"""One file per constructed operation; each registers itself for usim.load."""

from usim.ops.attention_core import AttentionCore
from usim.ops.base import Construction
from usim.ops.decoder_layer import DecoderLayerSimulator
from usim.ops.determinant import Determinant
from usim.ops.groupsort import GroupSort
from usim.ops.groupsort_network import SimulatedGroupSortNetwork
from usim.ops.inverse import Inverse
from usim.ops.inverse_simulator import SimulatedInverseAttention
from usim.ops.layer import EncoderLayerSimulator, EncoderStackSimulator
from usim.ops.linear_attention import SimulatedLinearAttention
from usim.ops.linformer import SimulatedLinformer
from usim.ops.matmul import MatMul
from usim.ops.maxmin import MaxMin
from usim.ops.parity import SimulatedParity
from usim.ops.relu import ReLU
from usim.ops.simulator import UniversalSimulator
from usim.ops.softmax import Softmax
from usim.ops.transpose import Transpose

__all__ = ["AttentionCore", "Construction", "DecoderLayerSimulator", "Determinant", "EncoderLayerSimulator", "EncoderStackSimulator",
           "GroupSort", "Inverse", "MatMul", "MaxMin", "ReLU", "SimulatedGroupSortNetwork", "SimulatedInverseAttention",
           "SimulatedLinearAttention", "SimulatedLinformer", "SimulatedParity", "Softmax", "Transpose",
           "UniversalSimulator"]
