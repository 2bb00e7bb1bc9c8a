"""A drop-in for ``torch.nn.MultiheadAttention`` (self-attention) computed by the universal simulator.

The MHA weights become the inputs of U in its factored form (``head_dim``), with a homogeneous
coordinate for the input biases:

    x~ = [x, 1]                                           (n, E + 1)
    W_Q,h = [Wq_h | bq_h]^T / sqrt(head_dim),  W_K,h = [Wk_h | bk_h]^T,  W_V,h = [Wv_h | bv_h]^T
    W_O,h = Wo[:, h] ^T,  b_O = bo                        (out_proj split by head)

so that sum_h softmax((x~ W_Q,h)(x~ W_K,h)^T)(x~ W_V,h) W_O,h + b_O
      = out_proj(concat_h softmax(Q_h K_h^T / sqrt(head_dim)) V_h).
Each head costs n * (E + 1) * head_dim product terms, as in nn.MultiheadAttention, not n * E^2.
The folding is done in float64 and cast to the input's dtype; everything after it runs in the
simulator's encoder. Without bias the homogeneous coordinate is dropped (d = E).
"""

from __future__ import annotations

import copy
import math
import threading
import weakref

import torch
from einops import rearrange
from torch import nn

from usim.engine import EXECUTIONS
from usim.ops.base import check_size
from usim.ops.simulator import UniversalSimulator

# One U per (seq_len, d, heads, head_dim, execution), shared by every drop-in of those sizes: the
# MHA weights are U's *inputs*, so six MiniLM layers need one encoder and one compiled program.
_SIMULATORS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def shared_simulator(seq_len: int, d: int, heads: int, head_dim: int, execution: str) -> UniversalSimulator:
    """The U of these sizes, built on first use and kept while a drop-in holds it."""
    key = (seq_len, d, heads, head_dim, execution)
    with _LOCK:
        simulator = _SIMULATORS.get(key)
        if simulator is None:
            simulator = UniversalSimulator(seq_len, d, heads=heads, head_dim=head_dim, execution=execution)
            _SIMULATORS[key] = simulator
        return simulator


class _Shared:
    """Holds a shared simulator outside the module tree: not in state_dict, not copied by deepcopy,
    pickled as its sizes (rebuilt or found again on load)."""

    def __init__(self, key: tuple):
        self.key = key
        self.module = shared_simulator(*key)

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return _Shared, (self.key,)


class SimulatedMultiheadAttention(nn.Module):
    r"""Self-attention with the signature of :class:`torch.nn.MultiheadAttention`, computed by U.

    Args:
        embed_dim: Total dimension of the model.
        num_heads: Number of parallel attention heads; ``embed_dim`` must be divisible by it.
        seq_len: The longest sequence the simulator is built for; shorter ones are padded and masked.
        bias: If specified, adds bias to input / output projection layers. Default: ``True``.
        batch_first: If ``True``, input and output tensors are (batch, seq, feature). Default: ``False``.
        execution: ``"fast"`` (default) or ``"dense"``, the simulator's execution (see ``usim.Encoder``).
    """

    def __init__(self, embed_dim: int, num_heads: int, seq_len: int, bias: bool = True, batch_first: bool = False,
                 device=None, dtype=None, execution: str = "fast"):
        super().__init__()
        check_size("embed_dim", embed_dim)
        check_size("num_heads", num_heads)
        check_size("seq_len", seq_len)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.seq_len = embed_dim, num_heads, seq_len
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.has_bias = bias
        self.dropout = 0.0  # as nn.MultiheadAttention's; only 0 is simulated in training mode
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)
        self.execution = execution

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, seq_len={self.seq_len}"

    @property
    def simulator(self) -> UniversalSimulator:
        """The U computing this attention (shared by every drop-in of the same sizes; not state)."""
        return self._shared.module

    @property
    def execution(self) -> str:
        return self._shared.key[-1]

    @execution.setter
    def execution(self, mode: str) -> None:
        if mode not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {mode!r}")
        d = self.embed_dim + int(self.has_bias)
        self._shared = _Shared((self.seq_len, d, self.num_heads, self.head_dim, mode))

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, seq_len: int, execution: str = "fast") -> "SimulatedMultiheadAttention":
        """Copy the weights of an existing ``nn.MultiheadAttention`` (packed q/k/v projections)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError("only nn.MultiheadAttention with kdim == vdim == embed_dim is supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        p = mha.in_proj_weight
        sim = cls(mha.embed_dim, mha.num_heads, seq_len, bias=mha.in_proj_bias is not None,
                  batch_first=mha.batch_first, device=p.device, dtype=p.dtype, execution=execution)
        sim.dropout = mha.dropout
        sim.train(mha.training)
        with torch.no_grad():
            sim.in_proj_weight.copy_(mha.in_proj_weight)
            sim.out_proj.weight.copy_(mha.out_proj.weight)
            if sim.has_bias:
                sim.in_proj_bias.copy_(mha.in_proj_bias)
                sim.out_proj.bias.copy_(mha.out_proj.bias)
        return sim

    def folded(self, dtype=torch.float64):
        """U's weights (wq, wk, wv (H, d, head_dim), wo (H, head_dim, d), bo (d,)), folded from the
        MHA weights in float64 (d = embed_dim + 1 with bias, the homogeneous coordinate). The folding
        is differentiable: gradients reach in_proj_weight, in_proj_bias and out_proj."""
        H = self.num_heads
        w = self.in_proj_weight.double()
        if self.has_bias:
            w = torch.cat([w, self.in_proj_bias.double()[:, None]], dim=1)  # (3E, E+1)
        wq, wk, wv = (rearrange(t, "(h k) e -> h e k", h=H) for t in w.chunk(3))
        wq = wq / math.sqrt(self.head_dim)
        wo = rearrange(self.out_proj.weight.double(), "e (h k) -> h k e", h=H)
        if self.has_bias:  # the homogeneous column of the output is 0
            wo = torch.cat([wo, wo.new_zeros(*wo.shape[:-1], 1)], dim=-1)
            bo = torch.cat([self.out_proj.bias.double(), wo.new_zeros(1)])
        else:
            bo = wo.new_zeros(w.shape[1])
        return tuple(t.to(dtype) for t in (wq, wk, wv, wo, bo))

    # nn.TransformerEncoderLayer / nn.TransformerEncoder take PyTorch's native fused kernel (which
    # reads in_proj_weight and would skip the simulator) only when this is True: it is not.
    _qkv_same_embed_dim = False

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        r"""Same arguments and return tuple as :meth:`torch.nn.MultiheadAttention.forward`, for self-attention.

        Returns:
            attn_output: (L, N, E), or (N, L, E) with ``batch_first``, or (L, E) unbatched.
            attn_weights: None unless ``need_weights``; (N, L, L) averaged over heads, or
            (N, num_heads, L, L) when ``average_attn_weights=False`` (batch dim dropped if unbatched).
        """
        if not (key is query or torch.equal(key, query)) or not (value is query or torch.equal(value, query)):
            raise ValueError("SimulatedMultiheadAttention computes self-attention: query, key and value "
                             "must be the same tensor")
        if self.training and self.dropout > 0:
            raise NotImplementedError(f"dropout {self.dropout} on the attention weights in training mode is not "
                                      "simulated (U computes the weights inside the encoder); use eval mode")
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attn_mask and is_causal are not simulated yet: U masks keys only "
                                      "(use key_padding_mask)")
        if not isinstance(query, torch.Tensor) or query.dim() not in (2, 3) or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (L, E), (L, N, E) or (N, L, E) with E={self.embed_dim}, "
                             f"got {tuple(getattr(query, 'shape', ()))}")
        unbatched = query.dim() == 2
        x = query[None] if unbatched else (query if self.batch_first else query.transpose(0, 1))
        if x.shape[1] > self.seq_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds the simulator's seq_len {self.seq_len}")
        mask = self._key_mask(key_padding_mask, x, unbatched)
        if self.has_bias:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        wq, wk, wv, wo, bo = (t.to(x.device) for t in self.folded(x.dtype))
        out, weights = self.simulator.attention(x, wq, wk, wv, wo, key_padding_mask=mask, bo=bo)
        out = out[..., : self.embed_dim]
        if not self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out, weights = out[0], weights[0]
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=-3) if average_attn_weights else weights)

    def _key_mask(self, mask, x, unbatched):
        if mask is None:
            return None
        if mask.dim() == 1 and unbatched:
            mask = mask[None]
        if mask.shape != x.shape[:2]:
            raise ValueError(f"key_padding_mask must be (N, L) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        if mask.dtype == torch.bool:
            return mask
        if torch.is_floating_point(mask) and bool(((mask == 0) | (mask == float("-inf"))).all()):
            return mask == float("-inf")
        raise NotImplementedError("a float key_padding_mask is simulated only with values 0 and -inf")


def simulate_attention(model: nn.Module, seq_len: int, *, inplace: bool = False, execution: str = "fast") -> nn.Module:
    """The model with every ``nn.MultiheadAttention`` replaced by an equivalent
    ``SimulatedMultiheadAttention`` (same weights, U built for sequences up to ``seq_len``).

    A deep copy unless ``inplace``. Works in ``nn.TransformerEncoderLayer`` and
    ``nn.TransformerEncoder`` with their default arguments in eval mode (PyTorch's fused fast path
    steps aside, so the simulator really runs); attention masks (``attn_mask``, ``is_causal``) and
    cross-attention raise NotImplementedError when called."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_size("seq_len", seq_len)
    if isinstance(model, nn.MultiheadAttention):
        return SimulatedMultiheadAttention.from_torch(model, seq_len, execution=execution)
    model = model if inplace else copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, name, SimulatedMultiheadAttention.from_torch(child, seq_len, execution=execution))
    return model
