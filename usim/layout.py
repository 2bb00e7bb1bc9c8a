"""Sequence layouts (Proposition 1): named arrays flattened row-major and concatenated.

A layout is a list of blocks, each with a name, a shape and a role:
``input`` blocks are filled by ``pack``; ``output`` blocks start as zero tokens and are read by
``unpack``; ``scratch`` blocks are zero tokens used for intermediates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

ROLES = ("input", "output", "scratch")


@dataclass(frozen=True)
class Block:
    name: str
    shape: tuple[int, ...]
    role: str = "input"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Layout:
    def __init__(self, blocks: list[Block]):
        names = [b.name for b in blocks]
        if len(set(names)) != len(names):
            raise ValueError(f"block names must be unique, got {names}")
        for b in blocks:
            if b.role not in ROLES:
                raise ValueError(f"block {b.name!r}: role {b.role!r} is not one of {ROLES}")
            if not b.shape or any(int(s) < 1 for s in b.shape):
                raise ValueError(f"block {b.name!r}: every axis must be >= 1, got shape {b.shape}")
        self.blocks = [Block(b.name, tuple(int(s) for s in b.shape), b.role) for b in blocks]
        self.offsets = {}
        start = 0
        for b in self.blocks:
            self.offsets[b.name] = start
            start += b.size
        self.length = start

    @classmethod
    def of(cls, inputs: dict, outputs: dict, scratch: dict | None = None) -> "Layout":
        blocks = [Block(n, tuple(s), "input") for n, s in inputs.items()]
        blocks += [Block(n, tuple(s), "output") for n, s in outputs.items()]
        blocks += [Block(n, tuple(s), "scratch") for n, s in (scratch or {}).items()]
        return cls(blocks)

    def __getitem__(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block {name!r} in layout {[b.name for b in self.blocks]}")

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self.blocks == other.blocks

    def __repr__(self) -> str:
        inner = ", ".join(f"{b.name}{list(b.shape)}:{b.role}" for b in self.blocks)
        return f"Layout({inner}; L={self.length})"

    @property
    def inputs(self) -> list[Block]:
        return [b for b in self.blocks if b.role == "input"]

    @property
    def outputs(self) -> list[Block]:
        return [b for b in self.blocks if b.role == "output"]

    def span(self, name: str) -> range:
        """Sequence positions of a block."""
        return range(self.offsets[name], self.offsets[name] + self[name].size)

    def block_index(self, name: str) -> int:
        return [b.name for b in self.blocks].index(name)

    def coords(self, name: str) -> torch.Tensor:
        """(size, ndim) long tensor: the row-major multi-index of each token of a block."""
        shape = self[name].shape
        grids = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
        return torch.stack([g.reshape(-1) for g in grids], dim=-1)

    def feature(self, fn) -> torch.Tensor:
        """(L,) long tensor with fn(block, block_index, coords) evaluated per block.

        fn returns a (size,) tensor (or a number) for that block's tokens."""
        out = torch.zeros(self.length, dtype=torch.long)
        for i, b in enumerate(self.blocks):
            value = fn(b, i, self.coords(b.name))
            out[self.offsets[b.name]: self.offsets[b.name] + b.size] = torch.as_tensor(value)
        return out

    # --- packing -------------------------------------------------------------------------
    def pack(self, *arrays: torch.Tensor) -> torch.Tensor:
        """Input arrays (batched or not, batch shapes broadcast) -> (B, L) sequence.

        Output and scratch blocks are zero tokens. Use ``batch_shape`` to undo the batching."""
        blocks = self.inputs
        if len(arrays) != len(blocks):
            raise ValueError(f"expected {len(blocks)} arrays ({[b.name for b in blocks]}), got {len(arrays)}")
        batch_shape = self.batch_shape(*arrays)
        dtype = arrays[0].dtype
        device = arrays[0].device
        parts = []
        for b, a in zip(blocks, arrays):
            a = a.expand(*batch_shape, *b.shape).reshape(-1, *b.shape)
            parts.append((b.name, rearrange(a, "b ... -> b (...)")))
        batch = parts[0][1].shape[0] if parts else 1
        seq = torch.zeros(batch, self.length, dtype=dtype, device=device)
        for name, flat in parts:
            seq[:, self.offsets[name]: self.offsets[name] + flat.shape[1]] = flat
        return seq

    def batch_shape(self, *arrays: torch.Tensor) -> torch.Size:
        """Validate input arrays and return their broadcast batch shape."""
        blocks = self.inputs
        if len(arrays) != len(blocks):
            raise ValueError(f"expected {len(blocks)} arrays ({[b.name for b in blocks]}), got {len(arrays)}")
        batch_shapes = []
        for b, a in zip(blocks, arrays):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"block {b.name!r}: expected a torch.Tensor, got {type(a).__name__}")
            if a.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"block {b.name!r}: dtype must be float32 or float64, got {a.dtype}")
            nd = len(b.shape)
            if a.dim() < nd or tuple(a.shape[a.dim() - nd:]) != b.shape:
                raise ValueError(
                    f"block {b.name!r}: expected shape (..., {', '.join(map(str, b.shape))}), "
                    f"got {tuple(a.shape)}"
                )
            batch_shapes.append(a.shape[: a.dim() - nd])
        if len({a.dtype for a in arrays}) > 1:
            raise ValueError(f"all arrays must share one dtype, got {[str(a.dtype) for a in arrays]}")
        if len({a.device for a in arrays}) > 1:
            raise ValueError(f"all arrays must be on one device, got {[str(a.device) for a in arrays]}")
        return _broadcast(batch_shapes)

    def unpack(self, seq: torch.Tensor, batch_shape=None, blocks=None):
        """(B, L) or (L,) sequence -> the output block(s), shaped batch_shape + block shape.

        ``blocks`` names the blocks to read (default: the output blocks). With one block the tensor
        is returned, else a tuple in layout order."""
        if seq.shape[-1] != self.length:
            raise ValueError(f"sequence length {seq.shape[-1]} != layout length {self.length}")
        if batch_shape is None:
            batch_shape = seq.shape[:-1]
        results = []
        chosen = self.outputs if blocks is None else [self[name] for name in blocks]
        for b in chosen:
            flat = seq[..., self.offsets[b.name]: self.offsets[b.name] + b.size]
            results.append(flat.reshape(*batch_shape, *b.shape))
        return results[0] if len(results) == 1 else tuple(results)

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> list:
        return [{"name": b.name, "shape": list(b.shape), "role": b.role} for b in self.blocks]

    @classmethod
    def from_dict(cls, data: list) -> "Layout":
        try:
            return cls([Block(d["name"], tuple(d["shape"]), d["role"]) for d in data])
        except (KeyError, TypeError) as e:
            raise ValueError(f"layout metadata is malformed: {e}") from None


def _broadcast(shapes) -> torch.Size:
    """The broadcast of batch shapes (torch.broadcast_shapes imports sympy on first use: seconds)."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, start=ndim - len(shape)):
            if size != out[i] and 1 not in (size, out[i]):
                raise ValueError(f"batch shapes do not broadcast: {[tuple(s) for s in shapes]}")
            out[i] = size if out[i] == 1 else out[i]
    return torch.Size(out)
