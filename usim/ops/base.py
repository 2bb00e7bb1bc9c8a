"""The common shell of every constructed operation: an encoder, a layout, constructor arguments.

An operation's ``__init__`` only builds weights (through ``usim.construct.Builder``); its forward
is pack -> ``Encoder`` -> unpack, plus input checks. ``usim.load`` rebuilds an operation from its
checkpoint with ``from_parts``, without running the constructor again.

A *universal* construction (U, the attention core and the layers built without sizes) holds one
encoder whose weights serve every size of its form. Per call shape it builds, once, the layout and
the ``usim.engine.Frame`` (positional features and readout) of that shape: ``frames`` maps the
shape's sizes to them (the oldest dropped past ``engine.FRAMES_CACHED``). Its ``layout`` is the
layout of the smallest size (all sizes 1), which its encoder was built at, for inspection.
"""

from __future__ import annotations

import torch
from torch import nn

from usim import engine
from usim.engine import Encoder, Frame
from usim.layout import Layout, tensor_problem

# kind name -> class, filled by ``register``; used by usim.load.
REGISTRY: dict[str, type] = {}


def register(cls):
    REGISTRY[cls.__name__] = cls
    return cls


def check_size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class Construction(nn.Module):
    """Base class: holds ``encoder`` and ``layout``; subclasses build them in ``__init__``."""

    def __init__(self, encoder: Encoder, layout: Layout, args: dict, execution: str = "fast"):
        super().__init__()
        if encoder.length != layout.length:
            raise ValueError(f"encoder length {encoder.length} != layout length {layout.length}")
        self.encoder = encoder
        self.layout = layout
        self.args = dict(args)
        self.execution = execution
        self.frames: dict = {}  # sizes -> (Layout, Frame): a universal construction's call shapes

    @property
    def universal(self) -> bool:
        """Whether this construction runs every size (built without sizes)."""
        return False

    def frame_for(self, sizes: tuple, build) -> tuple[Layout, Frame]:
        """The layout and frame of one call shape: ``build()`` gives the (Builder, Layout) of the
        construction at these sizes (results set); its weights are never built, only its positions
        and readout (the encoder's weights are the same for every size)."""
        found = self.frames.get(sizes)
        if found is None:
            b, layout = build()
            if b.slots != self.encoder.slots or len(b.layers) != self.encoder.depth:
                raise RuntimeError(f"{self.title}: the construction at sizes {sizes} has other slots or layers "
                                   "than its universal encoder")
            while len(self.frames) >= engine.FRAMES_CACHED:
                del self.frames[next(iter(self.frames))]
            found = self.frames[sizes] = (layout, b.frame())
        return found

    @classmethod
    def from_parts(cls, encoder: Encoder, layout: Layout, args: dict, execution: str = "fast"):
        module = cls.__new__(cls)
        Construction.__init__(module, encoder, layout, args, execution)
        return module

    @property
    def execution(self) -> str:
        """"fast" (default) or "dense" (the reference): see ``usim.Encoder.execution``."""
        return self.encoder.execution

    @execution.setter
    def execution(self, mode: str) -> None:
        self.encoder.execution = mode

    @property
    def kind(self) -> str:
        return type(self).__name__

    @property
    def depth(self) -> int:
        """Number of encoder layers."""
        return self.encoder.depth

    @property
    def width(self) -> int:
        """Most heads in one layer."""
        return self.encoder.width

    def run(self, *arrays: torch.Tensor, finite: bool = True, at: tuple | None = None,
            execution: str | None = None):
        """pack -> encoder -> unpack, with the batch shape of the inputs restored. ``at``: the (Layout,
        Frame) of a call shape (``frame_for``; default: this construction's own); ``execution``:
        this call's (default: the encoder's)."""
        layout, frame = (self.layout, None) if at is None else at
        batch_shape = layout.batch_shape(*arrays)
        if finite:
            for block, a in zip(layout.inputs, arrays):
                if not torch.isfinite(a).all():
                    raise ValueError(f"block {block.name!r}: input has NaN or infinite values")
        if torch.is_inference_mode_enabled():
            # Out of inference mode (autograd off): the plans, programs and caches built on this call are
            # ordinary tensors, so the module (or another sharing its encoder) can be trained later.
            with torch.inference_mode(False), torch.no_grad():
                return self._run(arrays, batch_shape, layout, frame, execution)
        return self._run(arrays, batch_shape, layout, frame, execution)

    def _run(self, arrays, batch_shape, layout, frame, execution):
        dtype = arrays[0].dtype if arrays else torch.float64
        device = arrays[0].device if arrays else None
        program = self.encoder.structured(dtype, device, frame, execution)
        if program is None:
            return layout.unpack(self.encoder(layout.pack(*arrays), frame, execution), batch_shape)
        # The structured program reads the input blocks and returns the output blocks: the token
        # sequence (inputs, zeros elsewhere) is never packed whole.
        index = {b.name: i for i, b in enumerate(layout.blocks)}
        inputs = {index[b.name]: _batch_first(a.expand(*batch_shape, *b.shape), len(b.shape))
                  for b, a in zip(layout.inputs, arrays)}
        wanted = [index[b.name] for b in layout.outputs]
        batch = next(iter(inputs.values())).shape[0]
        rows = max(1, engine.CHUNK // program.size)  # the memory budget: see usim.engine.CHUNK
        parts = [program.forward({i: t[start: start + rows] for i, t in inputs.items()}, wanted)
                 for start in range(0, max(batch, 1), rows)]  # an empty batch runs once, empty
        results = [(torch.cat([p[index[b.name]] for p in parts]) if len(parts) > 1 else parts[0][index[b.name]])
                   .reshape(*batch_shape, *b.shape) for b in layout.outputs]
        return results[0] if len(results) == 1 else tuple(results)

    def check_matrices(self, **tensors) -> None:
        """Each keyword is a tensor whose last two axes must equal the shape of the input block of
        the same name (TypeError / ValueError naming the argument and the shapes otherwise)."""
        for name, t in tensors.items():
            shape = self.layout[name].shape
            problem = tensor_problem(t)
            if problem is not None:
                raise (TypeError if not isinstance(t, torch.Tensor) else ValueError)(f"{name} must be {problem}")
            if t.dim() < 2 or tuple(t.shape[-2:]) != shape:
                raise ValueError(f"this {self.title} needs {name}: expected shape (..., {shape[0]}, {shape[1]}), "
                                 f"got {tuple(t.shape)}")

    @property
    def title(self) -> str:
        """The kind and constructor arguments, e.g. ``MatMul(n=2, m=3, p=4)``."""
        return f"{self.kind}({', '.join(f'{k}={v}' for k, v in self.args.items())})"

    def describe(self) -> str:
        """Layers, heads, slots read and written; with execution "fused", the places fused and not."""
        text = describe(self.encoder, title=self.title)
        if self.execution != "fused":
            return text
        program = self.encoder.program()
        if hasattr(program, "places"):
            return text + "\n" + program.describe(self.encoder.slots)
        why = self.encoder._cache().get("why not structured", "")
        return text + f"\nfused execution: not structured ({why}): runs as fast, per token"

    def extra_repr(self) -> str:
        return ", ".join([f"{k}={v}" for k, v in self.args.items()] + [f"depth={self.depth}", f"width={self.width}"])

    def __repr__(self) -> str:
        """One line, like nn.MultiheadAttention's: sizes, depth, heads per layer (``describe()`` for more)."""
        tokens = "any" if self.universal else self.encoder.length
        return f"{self.kind}({self.extra_repr()}, tokens={tokens}, slots={self.encoder.stream_width})"


def _batch_first(a: torch.Tensor, block_dims: int) -> torch.Tensor:
    """(batch..., *block) -> (B, *block), a view where it can be (a shared weight keeps batch stride 0)."""
    batch = a.shape[: a.dim() - block_dims]
    if len(batch) == 1:
        return a
    return a.unsqueeze(0) if not batch else a.reshape(-1, *a.shape[a.dim() - block_dims:])


def _slots_touched(encoder: Encoder, columns: list[torch.Tensor]) -> list[str]:
    used = torch.zeros(encoder.stream_width, dtype=torch.bool)
    for c in columns:
        used |= (c.reshape(-1, c.shape[-1]) != 0).any(0).cpu()
    return [s for s, u in zip(encoder.slots, used) if u]


def layer_specs(encoder: Encoder) -> list[dict]:
    """Per layer: heads, tiers, FFN activation and hidden size, slots read and written."""
    specs = []
    for layer in encoder.layers:
        reads, writes = [], []
        spec = {"heads": 0, "tiers": 0, "activation": None, "hidden": 0}
        if layer.attn is not None:
            a = layer.attn
            spec.update(heads=a.heads, tiers=a.tiers, d_k=a.query.shape[2], d_v=a.value.shape[1])
            reads += [a.query, a.key, a.value]
            writes.append(a.output.transpose(-1, -2))
        if layer.ffn is not None:
            f = layer.ffn
            spec.update(activation=f.activation, hidden=f.hidden)
            reads.append(f.w_in)
            writes += [f.w_out.T, f.b_out[None]]
        spec["reads"] = _slots_touched(encoder, reads)
        spec["writes"] = _slots_touched(encoder, writes)
        specs.append(spec)
    return specs


def describe(encoder: Encoder, title: str = "Encoder") -> str:
    rows = [f"{title}: depth {encoder.depth}, width {encoder.width}, stream {encoder.stream_width} slots, "
            f"L = {encoder.length}",
            f"{'layer':>5}  {'heads':>5}  {'tiers':>5}  {'ffn':<10}  {'hidden':>6}  reads -> writes"]
    for i, s in enumerate(layer_specs(encoder)):
        rows.append(f"{i:>5}  {s['heads']:>5}  {s['tiers']:>5}  {str(s['activation'] or '-'):<10}  "
                    f"{s['hidden']:>6}  {','.join(s['reads'])} -> {','.join(s['writes'])}")
    return "\n".join(rows)
