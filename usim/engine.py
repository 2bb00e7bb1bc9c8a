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
"""

from __future__ import annotations

import torch
from einops import einsum
from torch import nn

# The declared nonlinearities an FFN sublayer may use.
ACTIVATIONS = ("identity", "relu", "bilinear", "exp", "reciprocal")


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

    def select(self, x: torch.Tensor, head: int) -> torch.Tensor:
        """(B, L, L) bool: the keys each query of one head keeps (lexicographic max over the tiers)."""
        q = einsum(x, _cast(self.query[head], x), "b l w, t k w -> b t l k")
        k = einsum(x, _cast(self.key[head], x), "b l w, t k w -> b t l k")
        scores = q @ k.transpose(-1, -2)  # (B, T, L, L)
        keep = torch.ones_like(scores[:, 0], dtype=torch.bool)
        for t in range(scores.shape[1]):
            s = scores[:, t].masked_fill(~keep, float("-inf"))
            keep = keep & (s == s.amax(dim=-1, keepdim=True))
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Heads one at a time: the reference keeps one (B, T, L, L) score tensor alive, not H of them.
        out = torch.zeros_like(x)
        patterns = []
        observed = bool(self.hook_pattern._forward_hooks)  # weights materialised only when observed
        for h in range(self.heads):
            keep = self.select(x, h).to(x.dtype)
            count = keep.sum(dim=-1, keepdim=True)
            if observed:
                patterns.append(keep / count)
            v = x @ _cast(self.value[h], x).T  # (B, L, d_v)
            # Average as (sum of kept values) / count: exact for moves (count 1) and equal ties.
            out = out + ((keep @ v) / count) @ _cast(self.output[h], x).T
        if observed:
            self.hook_pattern(torch.stack(patterns, dim=1))
        return out


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ _cast(self.w_in, x).T + _cast(self.b_in, x)
        if self.activation == "identity":
            h = pre
        elif self.activation == "relu":
            h = torch.relu(pre)
        elif self.activation == "exp":
            h = torch.exp(pre)
        elif self.activation == "reciprocal":
            h = torch.reciprocal(pre)
        else:  # bilinear
            a, b = pre.split(self.hidden, dim=-1)
            h = a * b
        return h @ _cast(self.w_out, x).T + _cast(self.b_out, x)


class EncoderLayer(nn.Module):
    """An attention sublayer then an FFN sublayer, each optional, each added to the stream."""

    def __init__(self, attn: HardAttention | None = None, ffn: FFN | None = None):
        super().__init__()
        self.attn = attn
        self.ffn = ffn
        self.hook_resid = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(x)
        if self.ffn is not None:
            x = x + self.ffn(x)
        return self.hook_resid(x)


class Encoder(nn.Module):
    """The generic encoder: embeds a (B, L) token sequence, runs the layers, reads one slot per position.

    Embedding: token value times the ``value`` slot direction, plus the positional table (L, W).
    Readout: position l returns slot ``readout[l]`` of the final stream (the result slot at
    output positions, the value slot elsewhere), so the output is again a (B, L) sequence.
    """

    def __init__(self, slots: list[str], pos_table: torch.Tensor, readout: torch.Tensor,
                 layers: list[EncoderLayer]):
        super().__init__()
        if len(set(slots)) != len(slots):
            raise ValueError("slot names must be unique")
        if "value" not in slots:
            raise ValueError("the stream needs a 'value' slot")
        length, width = pos_table.shape
        if width != len(slots):
            raise ValueError(f"pos_table width {width} != {len(slots)} slots")
        if readout.shape != (length,):
            raise ValueError(f"readout shape {tuple(readout.shape)} != ({length},)")
        self.slots = list(slots)
        self.register_buffer("pos_table", pos_table)
        self.register_buffer("readout", readout.long())
        self.layers = nn.ModuleList(layers)

    @property
    def length(self) -> int:
        return self.pos_table.shape[0]

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

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        value = torch.zeros(self.stream_width, dtype=seq.dtype, device=seq.device)
        value[self.slots.index("value")] = 1
        return seq[..., None] * value + _cast(self.pos_table, seq)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) or (L,) floating -> the same shape."""
        if not torch.is_floating_point(seq):
            raise ValueError(f"sequence dtype must be floating, got {seq.dtype}")
        unbatched = seq.dim() == 1
        if unbatched:
            seq = seq[None]
        if seq.dim() != 2 or seq.shape[1] != self.length:
            raise ValueError(f"sequence shape {tuple(seq.shape)} does not fit length L={self.length}")
        x = self.embed(seq)
        for layer in self.layers:
            x = layer(x)
        index = self.readout.to(seq.device).expand(x.shape[0], -1)[..., None]
        out = x.gather(-1, index)[..., 0]
        return out[0] if unbatched else out

    @classmethod
    def load(cls, path) -> "Encoder":
        """Any usim checkpoint as a bare encoder."""
        from usim.checkpoint import load_encoder

        return load_encoder(path)[0]
