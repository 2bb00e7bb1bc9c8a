"""The one generic encoder: average-hard attention heads and an FFN over a residual stream.

Every usim operation is only weights for this module. A layer is

    x = x + sum_h attn_h(x)            (average-hard attention, GAHAT / RASP select-aggregate)
    x = x + W_out act(W_in x + b_in) + b_out

Hard attention with *score tiers*: a head has T bilinear score forms (W_Q[t], W_K[t]). The keys
kept are those maximising tier 0; among them, those maximising tier 1; and so on. The kept keys
share the weight equally (ties averaged). This is the limit of one score
s_0 * BIG^(T-1) + ... + s_(T-1) as BIG grows, but it never adds a content score to a large
positional penalty in one float sum, so no precision is lost. Most heads have a single tier.

The residual stream has one scalar slot per name (``Encoder.slots``); the constructions in
``usim.construct`` read and write slots by name.

Three executions of the same weights (``Encoder.execution``): "dense", the reference, scores all
L x L pairs of every head; "fast" (default) plans the position-only selections once and runs only
the entries the result depends on (``usim.plan``, ``usim.program``, ``usim.structured``); "fused" is
fast with each bilinear FFN's terms and the averaging head reading them run as one contraction
(``usim.fused``: close to dense, not bitwise). Each sublayer reads and writes only the stream
columns its weights use: the other columns would only add exact zeros.
"""

from __future__ import annotations

import torch
from einops import einsum
from torch import nn

from usim.activations import ACTIVATIONS, activate
from usim.average import dense_ordered_sum, ordered_sum
from usim.plan import plan_encoder
from usim.positions import Positions
from usim.program import compile_encoder
from usim.fused import plan_fused
from usim.structured import NotStructured, compile_structured

EXECUTIONS = ("fast", "dense", "fused")
# The memory budget of the fast execution, in stream numbers (128 MiB of float32): the batch runs in
# chunks of as many sequences as keep one chunk's largest block (structured program) or its live
# entries (per-token program) near this many numbers; a single sequence always runs whole. Set
# usim.engine.CHUNK to trade memory for fewer, larger operations.
CHUNK = 1 << 25


def _versions(module: nn.Module) -> tuple:
    """Changes whenever a buffer of the module is replaced or modified in place (cache keys)."""
    # inference tensors (a module built under torch.inference_mode) have no version counter: they
    # cannot be modified in place outside inference mode anyway
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in module.buffers())


def _cast(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.to(dtype=like.dtype, device=like.device)


class HardAttention(nn.Module):
    """H average-hard heads with T score tiers each.

    Buffers: query, key (H, T, d_k, W); value (H, d_v, W); output (H, W, d_v).
    ``hook_pattern`` sees the (B, H, L, L) attention weights (an identity module: register a forward
    hook on it to read them).
    """

    def __init__(self, query, key, value, output):
        super().__init__()
        heads, tiers, d_k, width = query.shape
        if key.shape != query.shape:
            raise ValueError(f"key shape {tuple(key.shape)} != query shape {tuple(query.shape)}")
        if value.shape[0] != heads or value.shape[2] != width:
            raise ValueError(f"value shape {tuple(value.shape)} does not fit H={heads}, W={width}")
        if output.shape != (heads, width, value.shape[1]):
            raise ValueError(f"output shape {tuple(output.shape)} != {(heads, width, value.shape[1])}")
        self.register_buffer("query", query)
        self.register_buffer("key", key)
        self.register_buffer("value", value)
        self.register_buffer("output", output)
        self.hook_pattern = nn.Identity()

    @property
    def heads(self) -> int:
        return self.query.shape[0]

    @property
    def tiers(self) -> int:
        return self.query.shape[1]

    @torch.inference_mode(False)  # cached tensors must be ordinary: autograd may meet them later
    def _sparse(self, like: torch.Tensor):
        """(value read (H*d_v, R), read columns (R,), output (S, H*d_v), written columns (S,)):
        the value and output maps restricted to the stream columns they use."""
        key = (like.dtype, like.device, _versions(self))
        if getattr(self, "_sparse_cache", (None,))[0] != key:
            heads, d_v, width = self.value.shape
            value = self.value.reshape(heads * d_v, width)
            output = self.output.permute(1, 0, 2).reshape(width, heads * d_v)
            reads = (value != 0).any(0).nonzero()[:, 0]
            writes = (output != 0).any(1).nonzero()[:, 0]
            self._sparse_cache = (key, (_cast(value[:, reads], like), reads.to(like.device),
                                        _cast(output[writes], like), writes.to(like.device)))
        return self._sparse_cache[1]

    @torch.inference_mode(False)  # cached tensors must be ordinary: autograd may meet them later
    def _tier_reads(self, like: torch.Tensor):
        """Per (head, tier): (columns, query read, key read), restricted to the columns used."""
        key = (like.dtype, like.device, _versions(self))
        if getattr(self, "_tier_cache", (None,))[0] != key:
            reads = []
            for h in range(self.heads):
                row = []
                for t in range(self.tiers):
                    cols = ((self.query[h, t] != 0) | (self.key[h, t] != 0)).any(0).nonzero()[:, 0]
                    row.append((cols.to(like.device), _cast(self.query[h, t][:, cols], like),
                                _cast(self.key[h, t][:, cols], like)))
                reads.append(row)
            self._tier_cache = (key, reads)
        return self._tier_cache[1]

    def _scores(self, x: torch.Tensor, head: int, tier: int, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of one tier: (B, L, L), or (B, L, K) against the candidate keys (L, K)."""
        cols, query, key = self._tier_reads(x)[head][tier]
        used = x[..., cols]
        q, k = used @ query.T, used @ key.T  # (B, L, d_k)
        if keys is None:
            return q @ k.transpose(-1, -2)
        return einsum(q, k[:, keys], "b l d, b l c d -> b l c")

    def select(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """(B, L, L) bool: the keys each query of one head keeps (lexicographic max over the tiers)."""
        keep = torch.ones(x.shape[0], x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
        for t in range(self.tiers):
            s = self._scores(x, head, t).masked_fill(~keep, float("-inf"))
            keep = keep & (s == s.amax(dim=-1, keepdim=True))
        return keep

    def _candidates(self, x: torch.Tensor, head: int, plan) -> torch.Tensor:
        """(B, L, K) bool over the plan's candidate keys: the run-time (content) tiers."""
        keep = plan.valid.expand(x.shape[0], -1, -1)
        for t in range(plan.first_dynamic, self.tiers):
            s = self._scores(x, head, t, plan.index).masked_fill(~keep, float("-inf"))
            keep = keep & (s == s.amax(dim=-1, keepdim=True))
        return keep

    def forward(self, x: torch.Tensor, plans=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sum of the heads' outputs at the written columns (B, L, S), those columns (S,)).

        plans: one ``usim.plan.HeadPlan`` per head (fast execution), or None (dense reference)."""
        value, reads, output, writes = self._sparse(x)
        batch, length = x.shape[:2]
        d_v = self.value.shape[1]
        v = (x[..., reads] @ value.T).unflatten(-1, (self.heads, d_v))  # (B, L, H, d_v)
        observed = bool(self.hook_pattern._forward_hooks)  # weights materialised only when observed
        pattern = x.new_zeros(batch, self.heads, length, length) if observed else None
        mean = torch.empty_like(v)
        gathers = [h for h in range(self.heads) if plans is not None and plans[h].kind == "gather"]
        if gathers:
            index = torch.stack([plans[h].index for h in gathers], dim=1)  # (L, G)
            mean[:, :, gathers] = v[:, index, torch.tensor(gathers, device=x.device)]
            if observed:
                for h in gathers:
                    pattern[:, h, torch.arange(length, device=x.device), plans[h].index] = 1
        for h in range(self.heads):
            kind = "dense" if plans is None else plans[h].kind
            if kind == "candidates":
                keep = self._candidates(x, h, plans[h]).to(x.dtype)  # (B, L, K)
                count = keep.sum(dim=-1, keepdim=True)
                mean[:, :, h] = ordered_sum(keep, v[:, plans[h].index, h]) / count
                if observed:
                    pattern[:, h].scatter_add_(-1, plans[h].index.expand(batch, -1, -1), keep / count)
            elif kind == "dense":
                # Heads one at a time: one (B, T, L, L) score tensor alive, not H of them.
                keep = self.select(x, h).to(x.dtype)
                count = keep.sum(dim=-1, keepdim=True)
                # Average as (sum of kept values in key order) / count (usim.average).
                mean[:, :, h] = dense_ordered_sum(keep, v[:, :, h]) / count
                if observed:
                    pattern[:, h] = keep / count
        if observed:
            self.hook_pattern(pattern)
        return mean.flatten(-2) @ output.T, writes


class FFN(nn.Module):
    """W_out act(W_in x + b_in) + b_out with one declared activation.

    For ``bilinear`` W_in has 2*hidden rows: unit i is (a_i . x + b_i) * (c_i . x + d_i), an
    exact product of two linear reads (the Bilinear GLU variant).
    """

    def __init__(self, activation: str, w_in, b_in, w_out, b_out):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
        rows = 2 * w_out.shape[1] if activation == "bilinear" else w_out.shape[1]
        if w_in.shape[0] != rows or b_in.shape != (rows,) or b_out.shape != (w_out.shape[0],):
            raise ValueError(
                f"FFN shapes do not fit: w_in {tuple(w_in.shape)}, b_in {tuple(b_in.shape)}, "
                f"w_out {tuple(w_out.shape)}, b_out {tuple(b_out.shape)} ({activation})"
            )
        self.activation = activation
        self.register_buffer("w_in", w_in)
        self.register_buffer("b_in", b_in)
        self.register_buffer("w_out", w_out)
        self.register_buffer("b_out", b_out)

    @property
    def hidden(self) -> int:
        return self.w_out.shape[1]

    @torch.inference_mode(False)  # cached tensors must be ordinary: autograd may meet them later
    def _sparse(self, like: torch.Tensor):
        """(w_in, b_in, read columns, w_out, b_out, written columns), restricted to the columns used."""
        key = (like.dtype, like.device, _versions(self))
        if getattr(self, "_sparse_cache", (None,))[0] != key:
            reads = (self.w_in != 0).any(0).nonzero()[:, 0]
            writes = ((self.w_out != 0).any(1) | (self.b_out != 0)).nonzero()[:, 0]
            self._sparse_cache = (key, (_cast(self.w_in[:, reads], like), _cast(self.b_in, like),
                                        reads.to(like.device), _cast(self.w_out[writes], like),
                                        _cast(self.b_out[writes], like), writes.to(like.device)))
        return self._sparse_cache[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the output at the written columns (B, L, S), those columns (S,))."""
        w_in, b_in, reads, w_out, b_out, writes = self._sparse(x)
        return activate(self.activation, x[..., reads] @ w_in.T + b_in) @ w_out.T + b_out, writes


class EncoderLayer(nn.Module):
    """An attention sublayer then an FFN sublayer, each optional, each added to the stream.

    Each sublayer reads and writes only the stream columns its weights use (the others would add
    exact zeros); the additions are in place unless autograd needs the old stream."""

    def __init__(self, attn: HardAttention | None = None, ffn: FFN | None = None):
        super().__init__()
        self.attn = attn
        self.ffn = ffn
        self.hook_resid = nn.Identity()

    def forward(self, x: torch.Tensor, plans=None) -> torch.Tensor:
        if self.attn is not None:
            x = _add_columns(x, *self.attn(x, plans))
        if self.ffn is not None:
            x = _add_columns(x, *self.ffn(x))
        if self.hook_resid._forward_hooks:  # observers get a copy, not the stream updated in place
            return self.hook_resid(x.clone())
        return x


def _add_columns(x: torch.Tensor, delta: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad):
        return x.index_add(-1, columns, delta)
    return x.index_add_(-1, columns, delta)


class PositionalTable:
    """The positional table of an object holding ``positions`` (a Frame, an Encoder), made per token
    on demand and kept."""

    @property
    def positional(self) -> torch.Tensor:
        """(P, L) the positional table, a row per positional slot (materialised on demand, kept)."""
        return self._table()[0]

    @property
    def positional_slots(self) -> torch.Tensor:
        """(P,) the slot of each row of ``positional``."""
        return self._table()[1]

    def _table(self):
        if "_table_cache" not in self.__dict__:
            with torch.inference_mode(False):  # an ordinary tensor: autograd may use it later
                self.__dict__["_table_cache"] = self.positions.table()
        return self.__dict__["_table_cache"]


class Frame(PositionalTable):
    """The per-size facts of one token sequence, apart from the weights: the positional features in
    closed form (``usim.positions.Positions``) and the slot read in each block. An encoder's weights
    are the same for every size of its form; a frame says where each block lies and what is read out.
    ``Encoder.forward(seq, frame=...)`` runs the weights over any frame (plans are cached per frame)."""

    def __init__(self, positions: Positions, readout_blocks):
        if not isinstance(positions, Positions):
            raise TypeError(f"positions must be a usim.positions.Positions, got {type(positions).__name__}")
        readout_blocks = torch.as_tensor(readout_blocks, dtype=torch.long)
        if readout_blocks.shape != (len(positions.shapes),):
            raise ValueError(f"readout: {tuple(readout_blocks.shape)} slots for {len(positions.shapes)} blocks")
        self.positions, self.readout_blocks = positions, readout_blocks

    @property
    def length(self) -> int:
        return self.positions.length

    @property
    def readout(self) -> torch.Tensor:
        """(L,) the slot read at each position."""
        if "_readout" not in self.__dict__:
            sizes = torch.tensor(self.positions.offsets).diff()
            self.__dict__["_readout"] = self.readout_blocks.repeat_interleave(sizes)
        return self.__dict__["_readout"]



# Frames whose plans and programs an encoder keeps at once (the oldest is dropped first).
FRAMES_CACHED = 256


class Encoder(PositionalTable, nn.Module):
    """The generic encoder: embeds a (B, L) token sequence, runs the layers, reads one slot per position.

    Embedding: token value times the ``value`` slot direction, plus the positional table (L, W)
    (stored as its nonzero columns, ``positional`` (P, L) and ``positional_slots`` (P,)).
    Readout: position l returns slot ``readout[l]`` of the final stream (the result slot at
    output positions, the value slot elsewhere), so the output is again a (B, L) sequence.
    """

    def __init__(self, slots: list[str], pos_table, readout,
                 layers: list[EncoderLayer], execution: str = "fast"):
        """pos_table: the positional features, as a ``usim.positions.Positions`` (closed form, per
        block), a dense table (L, W), or compact as (values (P, L): one row per positional slot, the
        slot index of each row (P,)); tables are kept as ``Positions`` of one block.
        readout: the slot read at each position (L,), or one slot per block of a ``Positions``."""
        super().__init__()
        self.execution = execution
        if len(set(slots)) != len(slots):
            raise ValueError("slot names must be unique")
        if "value" not in slots:
            raise ValueError("the stream needs a 'value' slot")
        if isinstance(pos_table, Positions):
            positions = pos_table
            if positions.slots and (min(positions.slots) < 0 or max(positions.slots) >= len(slots)):
                raise ValueError(f"positional slots must be slot indices in 0..{len(slots) - 1}")
        else:
            if isinstance(pos_table, torch.Tensor):
                if pos_table.dim() != 2 or pos_table.shape[1] != len(slots):
                    raise ValueError(f"pos_table shape {tuple(pos_table.shape)}: its width must be the {len(slots)} slots")
                columns = (pos_table != 0).any(0).nonzero()[:, 0]
                values = pos_table[:, columns].T.contiguous()
            else:
                values, columns = pos_table
                columns = torch.as_tensor(columns, dtype=torch.long)
                if values.dim() != 2 or columns.shape != (values.shape[0],):
                    raise ValueError(f"positional values {tuple(values.shape)} and slots {tuple(columns.shape)} "
                                     "do not fit: expected (P, L) and (P,)")
                if len(columns) and (columns.min() < 0 or columns.max() >= len(slots) or len(set(columns.tolist())) < len(columns)):
                    raise ValueError(f"positional columns must be distinct slot indices in 0..{len(slots) - 1}")
            if values.is_floating_point() and bool((values == values.round()).all()) and \
                    bool((values.abs() < 2 ** 31).all()):
                values = values.to(torch.int32)
            positions = Positions.from_table(values, columns.tolist()) if values.shape[1] else \
                Positions([(0,)], {})
        self.slots = list(slots)
        self.positions = positions
        if isinstance(readout, torch.Tensor):
            if readout.shape != (positions.length,):
                raise ValueError(f"readout shape {tuple(readout.shape)} != ({positions.length},)")
            self.register_buffer("readout_tokens", readout.long())
        else:
            if len(readout) != len(positions.shapes):
                raise ValueError(f"readout: {len(readout)} slots for {len(positions.shapes)} blocks")
            # a layout fact, not a weight: kept with the encoder, never in its state_dict
            self.register_buffer("readout_blocks", torch.tensor([int(r) for r in readout], dtype=torch.long),
                                 persistent=False)
        self.layers = nn.ModuleList(layers)

    @property
    def readout(self) -> torch.Tensor:
        """(L,) the slot read at each position (made per token on first use: it may be edited in place)."""
        if not hasattr(self, "readout_tokens"):
            with torch.inference_mode(False):  # an ordinary tensor: autograd may use it later
                self._readout_tokens()
        return self.readout_tokens

    def _readout_tokens(self) -> None:
        if not hasattr(self, "readout_tokens"):
            sizes = torch.tensor(self.positions.offsets).diff()
            tokens = self.readout_blocks.repeat_interleave(sizes.to(self.readout_blocks.device))
            del self.readout_blocks
            self.register_buffer("readout_tokens", tokens)


    @property
    def pos_table(self) -> torch.Tensor:
        """The dense positional table (L, W) in float64 (built on demand: for small encoders)."""
        table = torch.zeros(self.length, self.stream_width, dtype=torch.float64)
        table[:, self.positional_slots] = self.positional.double().T
        return table

    @property
    def length(self) -> int:
        return self.positions.length

    @property
    def stream_width(self) -> int:
        return len(self.slots)

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def width(self) -> int:
        """Most heads in one layer."""
        return max([layer.attn.heads for layer in self.layers if layer.attn is not None], default=0)

    @property
    def execution(self) -> str:
        """"fast" (default): position-only selections planned once and applied as gathers (see
        ``usim.plan``); "dense": the reference, every head scores all L x L pairs; "fused": fast with
        each bilinear FFN's terms and the head averaging them run as one contraction (``usim.fused``)."""
        return self._execution

    @execution.setter
    def execution(self, mode: str) -> None:
        if mode not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {mode!r}")
        self._execution = mode

    def _cache(self, frame: Frame | None = None) -> dict:
        """Plans and programs of a frame (None: the encoder's own), valid while no weight, table or
        readout changes (in place or not)."""
        fingerprint = _versions(self)
        if self.__dict__.get("_cache_key") != fingerprint:
            self.__dict__["_cache_key"], self.__dict__["_cached"] = fingerprint, {}
        cache = self.__dict__["_cached"]
        if frame is None:
            return cache
        frames = cache.setdefault("frames", {})  # frame -> its cache, oldest first
        if frame not in frames:
            while len(frames) >= FRAMES_CACHED:
                del frames[next(iter(frames))]
            frames[frame] = {}
        return frames[frame]

    def _frame(self, frame: Frame | None):
        """What carries the per-size facts: the given frame, else the encoder itself."""
        if frame is not None and not isinstance(frame, Frame):
            raise TypeError(f"frame must be a usim.engine.Frame, got {type(frame).__name__}")
        return self if frame is None else frame

    def plans(self, device=None, frame: Frame | None = None) -> list:
        """The fast execution's per-layer head plans (computed once, cached per device and frame)."""
        cache = self._cache(frame)
        if "plans" not in cache:
            cache["plans"] = plan_encoder(self, self._frame(frame))
        device = torch.device(device or "cpu")
        if ("plans", str(device)) not in cache:
            cache["plans", str(device)] = [None if p is None else [h.to(device) for h in p] for p in cache["plans"]]
        return cache["plans", str(device)]

    def embed(self, seq: torch.Tensor, frame: Frame | None = None) -> torch.Tensor:
        source = self._frame(frame)
        x = seq.new_zeros(seq.shape[0], source.length, self.stream_width)
        x[..., source.positional_slots.to(seq.device)] = _cast(source.positional, seq).T
        x[..., self.slots.index("value")] += seq
        return x

    def forward(self, seq: torch.Tensor, frame: Frame | None = None, execution: str | None = None) -> torch.Tensor:
        """seq (B, L) or (L,) floating -> the same shape. ``frame``: the sizes to run the weights at
        (default: the encoder's own); ``execution``: this call's (default: ``self.execution``)."""
        if not torch.is_floating_point(seq):
            raise ValueError(f"sequence dtype must be floating, got {seq.dtype}")
        execution = self._execution_of(execution)
        length = self._frame(frame).length
        unbatched = seq.dim() == 1
        if unbatched:
            seq = seq[None]
        if seq.dim() != 2 or seq.shape[1] != length:
            raise ValueError(f"sequence shape {tuple(seq.shape)} does not fit length L={length}")
        if execution != "dense" and not self._observed():
            program = self.program(seq.dtype, seq.device, frame, execution)
            rows = max(1, CHUNK // program.size)
            out = torch.cat([program.run(part) for part in seq.split(rows)])
        else:  # the whole stream, layer by layer (what hooks observe); fast and fused use the head plans
            plans = self.plans(seq.device, frame) if execution != "dense" else [None] * self.depth
            # The batch runs in chunks so that the stream and the heads' values stay near CHUNK numbers.
            heads = max([self.width] + [layer.attn.heads * layer.attn.value.shape[1]
                                        for layer in self.layers if layer.attn is not None])
            rows = max(1, CHUNK // (length * max(self.stream_width, heads)))
            out = torch.cat([self._run(part, plans, frame) for part in seq.split(rows)])
        return out[0] if unbatched else out

    def _execution_of(self, execution: str | None) -> str:
        if execution is None:
            return self.execution
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        return execution

    def _observed(self) -> bool:
        """Whether a hook watches an intermediate (then the whole stream is computed)."""
        return any(m._forward_hooks or m._forward_pre_hooks for layer in self.layers for m in
                   [layer.hook_resid] + ([layer.attn.hook_pattern] if layer.attn is not None else []))

    def structured(self, dtype, device, frame: Frame | None = None, execution: str | None = None):
        """The structured program (``usim.structured``) when the fast execution runs one (no hook
        observes the stream and every selection is affine), else None."""
        if self._execution_of(execution) == "dense" or self._observed():
            return None
        program = self.program(dtype, device, frame, execution)
        return program if getattr(program, "structured", False) else None

    def program(self, dtype=torch.float64, device=None, frame: Frame | None = None, execution: str | None = None):
        """The fast execution's compiled program (``usim.program.Program``), cached per dtype, device
        and frame; with execution "fused" (default: ``self.execution``), the fused one (``usim.fused``)
        where the program is structured."""
        cache = self._cache(frame)
        key = ("program", dtype, str(torch.device(device or "cpu")))
        if key not in cache:  # compiled per dtype and device (a float64 master would double the memory)
            if "structured" not in cache:
                try:
                    cache["structured"] = compile_structured(self, self._frame(frame))
                except NotStructured as e:
                    cache["structured"] = None
                    cache["why not structured"] = str(e)
            structured = cache["structured"]
            cache[key] = structured if structured is not None else \
                compile_encoder(self, self._frame(frame)).to(dtype, device)
        if self._execution_of(execution) == "fused" and getattr(cache[key], "structured", False):
            if "fused" not in cache:  # the products contracted where the weights allow (usim.fused)
                cache["fused"] = plan_fused(cache["structured"])
            return cache["fused"]
        return cache[key]

    def _run(self, seq: torch.Tensor, plans: list, frame: Frame | None = None) -> torch.Tensor:
        x = self.embed(seq, frame)
        for layer, plan in zip(self.layers, plans):
            x = layer(x, plan)
        index = self._frame(frame).readout.to(seq.device).expand(x.shape[0], -1)[..., None]
        return x.gather(-1, index)[..., 0]

    # The checkpoint reader, set by ``usim.checkpoint`` when it is imported (it imports this module,
    # so this module does not import it: no import circle).
    reader = None

    @classmethod
    def load(cls, path, *, verify: bool = True) -> "Encoder":
        """Any usim checkpoint as a bare encoder (digest checked unless verify=False)."""
        if Encoder.reader is None:
            raise RuntimeError("usim.checkpoint is not imported (import usim does it)")
        return Encoder.reader(path, verify=verify)[0]
