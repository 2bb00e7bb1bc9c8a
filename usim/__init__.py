"""usim: transformers whose weights are constructed, not trained (arXiv 2506.18739)."""

from usim.checkpoint import load, save
from usim.engine import Encoder
from usim.layout import Block, Layout
from usim.ops import Construction, Transpose

__version__ = "0.1.0"

__all__ = ["Block", "Construction", "Encoder", "Layout", "Transpose", "load", "save"]
