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
            problem = tensor_problem(a)
            if problem is not None:
                raise (TypeError if not isinstance(a, torch.Tensor) else ValueError)(f"block {b.name!r} must be {problem}")
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
        """The inverse of ``to_dict``; ValueError ("layout metadata is malformed: ...", naming the
        block and key) for anything else: a JSON value of the wrong type, a missing or unknown key,
        an axis that is not an integer >= 1, a layout of more than 2^40 tokens, an unknown role."""
        def bad(why: str):
            return ValueError(f"layout metadata is malformed: {why}")

        if not isinstance(data, (list, tuple)) or not data:
            raise bad(f"expected a non-empty list of blocks, got {_kind(data)}")
        blocks, total = [], 0
        for i, d in enumerate(data):
            if not isinstance(d, dict):
                raise bad(f"block {i} must be an object with name, shape and role, got {_kind(d)}")
            for key in ("name", "shape", "role"):
                if key not in d:
                    raise bad(f"block {i} lacks {key!r}")
            if set(d) - {"name", "shape", "role"}:
                raise bad(f"block {i} has unknown keys {sorted(str(k)[:20] for k in set(d) - {'name', 'shape', 'role'})[:5]}")
            name, shape, role = d["name"], d["shape"], d["role"]
            if not isinstance(name, str) or not name:
                raise bad(f"block {i} 'name' must be a non-empty string, got {_kind(name)}")
            if not isinstance(shape, (list, tuple)) or not shape or len(shape) > 32:
                raise bad(f"block {name!r} 'shape' must be a list of 1 to 32 axes, got {_kind(shape)}")
            for s in shape:
                if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_TOKENS:
                    raise bad(f"block {name!r} 'shape' axes must be integers in 1..{MAX_TOKENS}, got {_kind(s)}")
            if not isinstance(role, str) or role not in ROLES:
                raise bad(f"block {name!r} 'role' must be one of {ROLES}, got {_kind(role)}")
            total += math.prod(shape)
            if total > MAX_TOKENS:
                raise bad(f"more than {MAX_TOKENS} tokens")
            blocks.append(Block(name, tuple(shape), role))
        try:
            return cls(blocks)
        except ValueError as e:
            raise bad(str(e)) from None


MAX_TOKENS = 1 << 40  # the most tokens a layout read from metadata may have


def tensor_problem(a) -> str | None:
    """Why a value cannot be an input tensor, as the end of "x must be ...": not a torch.Tensor (a
    list, a numpy array, ...), a meta tensor (no values), a sparse layout; None if it can be."""
    if not isinstance(a, torch.Tensor):
        module = type(a).__module__.split(".")[0]
        name = type(a).__name__ if module == "builtins" else f"{module}.{type(a).__name__}"
        hint = " (convert it with torch.as_tensor)" if hasattr(a, "__array__") or isinstance(a, (list, tuple)) else ""
        return f"a torch.Tensor, got {name}{hint}"
    if a.device.type == "meta":
        return "a tensor with values, got one on the meta device"
    if a.layout != torch.strided:
        return f"a dense (strided) tensor, got layout {a.layout}"
    return None


def _kind(value) -> str:
    """A short description of a value from metadata (never a long or deeply nested repr)."""
    if isinstance(value, (list, tuple, dict)):
        return f"{type(value).__name__} of {len(value)} items"
    text = repr(value) if not isinstance(value, int) or isinstance(value, bool) or value.bit_length() < 200 \
        else f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 40 else text[:39] + "…"


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
