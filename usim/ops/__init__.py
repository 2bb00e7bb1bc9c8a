"""One file per constructed operation; each registers itself for usim.load."""

from usim.ops.base import Construction
from usim.ops.groupsort import GroupSort
from usim.ops.matmul import MatMul
from usim.ops.maxmin import MaxMin
from usim.ops.relu import ReLU
from usim.ops.simulator import UniversalSimulator
from usim.ops.softmax import Softmax
from usim.ops.transpose import Transpose

__all__ = ["Construction", "GroupSort", "MatMul", "MaxMin", "ReLU", "Softmax", "Transpose", "UniversalSimulator"]
