"""One file per constructed operation; each registers itself for usim.load."""

from usim.ops.base import Construction
from usim.ops.transpose import Transpose

__all__ = ["Construction", "Transpose"]
