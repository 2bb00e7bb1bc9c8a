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

# One universal U of the factored form, shared by every drop-in of every size: the MHA weights are
# U's *inputs* and its weights are the same for every size, so any number of drop-ins (and any
# sequence length) need one encoder; each call shape gets its layout and plans once (frames).
_SIMULATORS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def shared_simulator(form: str = "factored") -> UniversalSimulator:
    """The one universal U of this form, built on first use and kept while a drop-in holds it."""
    with _LOCK:
        simulator = _SIMULATORS.get(form)
        if simulator is None:  # built out of inference mode: drop-ins that train share it too
            with torch.inference_mode(False):
                simulator = UniversalSimulator(form=form)
            _SIMULATORS[form] = simulator
        return simulator


class _Shared:
    """Holds a shared simulator outside the module tree: not in state_dict, not copied by deepcopy,
    pickled as its key (found again or rebuilt on load). ``build(*key)`` finds or builds it
    (default: ``shared_simulator``)."""

    def __init__(self, key: tuple, build=None):
        self.key, self.build = key, build
        self.module = (build or shared_simulator)(*key)

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return _Shared, ((self.key,) if self.build is None else (self.key, self.build))


class SharedSimulatorMixin:
    """A drop-in whose constructed encoder is shared by every drop-in of its form (not state):
    ``simulator`` and a settable ``execution`` (the drop-in's own, passed to every call); the class
    says in ``_share()`` which ``_Shared``."""

    @property
    def simulator(self):
        """The construction computing this module (shared by every drop-in of its form)."""
        if "_shared" not in self.__dict__:
            self._shared = self._share()
        return self._shared.module

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, mode: str) -> None:
        if mode not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {mode!r}")
        self._execution = mode


class SimulatedMultiheadAttention(SharedSimulatorMixin, nn.Module):
    r"""Attention with the signature of :class:`torch.nn.MultiheadAttention`, computed by U.

    Args:
        embed_dim: Total dimension of the model.
        num_heads: Number of parallel attention heads; ``embed_dim`` must be divisible by it.
        seq_len: Optional: a sequence length planned ahead (query and key); any length runs, each new
            one planned on first use.
        bias: If specified, adds bias to input / output projection layers. Default: ``True``.
        kdim, vdim: Total number of features for keys and values. Default: ``embed_dim``.
        batch_first: If ``True``, input and output tensors are (batch, seq, feature). Default: ``False``.
        execution: ``"fused"`` (default), ``"fast"`` or ``"dense"``, the simulator's execution (see
            ``usim.Encoder``; docs/fused.md: fused is within 10x nn.MultiheadAttention's float error).

    NaN and inf in the inputs are not refused: they reach the outputs they reach in
    nn.MultiheadAttention (no host sync looks for them), except that a masked key's score takes no
    part at all, whatever it is. A row whose every key is masked has weights 0 and outputs
    out_proj's bias, as scaled_dot_product_attention (nn.MultiheadAttention with need_weights=False)
    gives (docs/masking.md).
    """

    def __init__(self, embed_dim: int, num_heads: int, seq_len: int | None = None, bias: bool = True,
                 kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None,
                 execution: str = "fused"):
        super().__init__()
        check_size("embed_dim", embed_dim)
        check_size("num_heads", num_heads)
        if seq_len is not None:
            check_size("seq_len", seq_len)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.seq_len = embed_dim, num_heads, seq_len
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.has_bias = bias
        self.dropout = 0.0  # as nn.MultiheadAttention's: on the attention weights in training mode
        self.kdim = check_size("kdim", kdim) if kdim is not None else embed_dim
        self.vdim = check_size("vdim", vdim) if vdim is not None else embed_dim
        if self.kdim == self.vdim == embed_dim:  # the parameters and state_dict keys of nn.MultiheadAttention
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if bias:
            nn.init.zeros_(self.out_proj.bias)
        self.execution = execution
        if seq_len is not None:
            self.plan(seq_len)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}" + \
            (f", seq_len={self.seq_len}" if self.seq_len is not None else "")

    def _share(self) -> _Shared:  # the one factored U
        return _Shared(("factored",))

    def plan(self, length: int, source: int | None = None) -> None:
        """Plan the simulator for queries of ``length`` and keys of ``source`` (default: length)
        ahead of the first call of that shape."""
        extra = int(self.has_bias)  # the homogeneous coordinate
        source = length if source is None else source
        self.simulator.plan(length, self.embed_dim + extra, self.num_heads, self.head_dim, source,
                            self.kdim + extra, self.vdim + extra)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, seq_len: int | None = None, execution: str = "fused", *,
                   share: bool = False) -> "SimulatedMultiheadAttention":
        """The drop-in for an existing ``nn.MultiheadAttention``: a copy of its weights (with their
        ``requires_grad``), or with ``share=True`` its very Parameters and ``out_proj`` module, so
        that weights tied to other modules stay tied and frozen ones stay frozen."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        p = mha.out_proj.weight
        sim = cls(mha.embed_dim, mha.num_heads, seq_len, bias=mha.in_proj_bias is not None, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device=p.device, dtype=p.dtype, execution=execution)
        sim.dropout = mha.dropout
        sim.train(mha.training)
        if share:
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
                if getattr(sim, name) is not None:
                    setattr(sim, name, getattr(mha, name))
            sim.out_proj = mha.out_proj
            return sim
        sim.load_state_dict(mha.state_dict(), strict=True)
        theirs = dict(mha.named_parameters())
        for name, p in sim.named_parameters():
            p.requires_grad_(theirs[name].requires_grad)
        return sim

    def folded(self, dtype=torch.float64):
        """U's weights (wq, wk, wv (H, d, head_dim), wo (H, head_dim, d), bo (d,)), folded from the
        MHA weights in float64 (d = embed_dim + 1 with bias, the homogeneous coordinate). The folding
        is differentiable: gradients reach in_proj_weight, in_proj_bias and out_proj."""
        H, E = self.num_heads, self.embed_dim
        if self.in_proj_weight is not None:
            weights = self.in_proj_weight.double().chunk(3)
        else:
            weights = (self.q_proj_weight.double(), self.k_proj_weight.double(), self.v_proj_weight.double())
        if self.has_bias:  # the homogeneous coordinate: [W | b] on [x, 1]
            biases = self.in_proj_bias.double().chunk(3)
            weights = [torch.cat([w, b[:, None]], dim=1) for w, b in zip(weights, biases)]
        wq, wk, wv = (rearrange(t, "(h k) e -> h e k", h=H) for t in weights)
        wq = wq / math.sqrt(self.head_dim)
        wo = rearrange(self.out_proj.weight.double(), "e (h k) -> h k e", h=H)
        if self.has_bias:  # the homogeneous column of the output is 0
            wo = torch.cat([wo, wo.new_zeros(*wo.shape[:-1], 1)], dim=-1)
            bo = torch.cat([self.out_proj.bias.double(), wo.new_zeros(1)])
        else:
            bo = wo.new_zeros(E)
        return tuple(t.to(dtype) for t in (wq, wk, wv, wo, bo))

    # nn.TransformerEncoderLayer / nn.TransformerEncoder take PyTorch's native fused kernel (which
    # reads in_proj_weight and would skip the simulator) only when this is True: it is not.
    _qkv_same_embed_dim = False

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        r"""Same arguments and return tuple as :meth:`torch.nn.MultiheadAttention.forward`.

        Returns:
            attn_output: (L, N, E), or (N, L, E) with ``batch_first``, or (L, E) unbatched.
            attn_weights: None unless ``need_weights``; (N, L, S) averaged over heads, or
            (N, num_heads, L, S) when ``average_attn_weights=False`` (batch dim dropped if unbatched).
        """
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention).")
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() not in (2, 3) or t.shape[-1] != width:
                raise ValueError(f"{name} must be (L, {width}), (L, N, {width}) or (N, L, {width}), "
                                 f"got {tuple(t.shape)}")
        unbatched = query.dim() == 2
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be batched or all unbatched, got "
                             f"{query.dim()}, {key.dim()} and {value.dim()} axes")

        def batched(t):  # (N, L, features)
            return t[None] if unbatched else (t if self.batch_first else t.transpose(0, 1))

        x, k, v = batched(query), batched(key), batched(value)
        if k.shape[:2] != v.shape[:2] or k.shape[0] != x.shape[0]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} do not fit query {tuple(query.shape)}")
        mask = self._key_mask(key_padding_mask, k, unbatched)
        scores_mask = self._attn_mask(attn_mask, x.shape[0], x.shape[1], k.shape[1])
        if mask is not None and mask.is_floating_point():  # added to every score of its key, as MHA does
            scores_mask = self._merged(mask, scores_mask, x.shape[1])
            mask = None
        if self.has_bias:
            x, k, v = (torch.cat([t, torch.ones_like(t[..., :1])], dim=-1) for t in (x, k, v))
        wq, wk, wv, wo, bo = (t.to(x.device) for t in self.folded(x.dtype))
        self_attention = query is key and key is value
        scale = None
        if self.training and self.dropout > 0:  # as MHA: dropout on the weights, kept ones scaled by 1/(1-p)
            keep = torch.rand(x.shape[0], self.num_heads, x.shape[1], k.shape[1], device=x.device) >= self.dropout
            scale = keep.to(x.dtype) / (1 - self.dropout) if self.dropout < 1 else torch.zeros_like(keep, dtype=x.dtype)
        out, weights = self.simulator.attention(x, wq, wk, wv, wo, key=None if self_attention else k,
                                                value=None if self_attention else v, key_padding_mask=mask,
                                                attn_mask=scores_mask, bo=bo, weight_scale=scale, finite=False,
                                                execution=self.execution)
        out = out[..., : self.embed_dim]
        if not self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out, weights = out[0], weights[0]
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=-3) if average_attn_weights else weights)

    def _attn_mask(self, mask, batch, length, source):
        """attn_mask (L, S) or (N * num_heads, L, S), as nn.MultiheadAttention takes it -> U's
        (L, S) or (N, num_heads, L, S)."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() == 2 and mask.shape == (length, source):
            return mask
        if mask.dim() == 3 and mask.shape == (batch * self.num_heads, length, source):
            return mask.unflatten(0, (batch, self.num_heads))
        raise ValueError(f"attn_mask must be ({length}, {source}) or ({batch * self.num_heads}, {length}, "
                         f"{source}), got {tuple(mask.shape)}")

    def _key_mask(self, mask, x, unbatched):
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() == 1 and unbatched:
            mask = mask[None]
        if mask.shape != x.shape[:2]:
            raise ValueError(f"key_padding_mask must be (N, S) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"key_padding_mask must be bool (True = ignore the key) or floating (added to the "
                            f"scores), got {mask.dtype}")
        return mask

    def _merged(self, key_mask, attn_mask, length):
        """A float key_padding_mask (N, S) added to attn_mask (bool or float, (L, S) or (N, H, L, S)),
        as nn.MultiheadAttention adds them: (N, num_heads, L, S) float, -inf = left out."""
        bias = key_mask[:, None, None, :].expand(-1, self.num_heads, length, -1)
        if attn_mask is None:
            return bias
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=bias.dtype).masked_fill(attn_mask, float("-inf"))
        return bias + attn_mask.to(bias.dtype)


def simulate_attention(model: nn.Module, seq_len: int | None = None, *, inplace: bool = False,
                       execution: str = "fused") -> nn.Module:
    """The model with every ``nn.MultiheadAttention`` replaced by an equivalent
    ``SimulatedMultiheadAttention`` (all computed by the one universal U; ``seq_len``, optional, is
    planned ahead).

    A deep copy unless ``inplace``. Each drop-in holds the replaced module's own Parameters and
    ``out_proj``, so tied weights stay tied and frozen ones (``requires_grad=False``) stay frozen; a
    module reachable under several names or from several parents becomes one drop-in, shared the same
    way. Works in ``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``,
    ``nn.TransformerDecoderLayer`` and ``nn.Transformer`` with their default arguments in eval mode
    (PyTorch's fused fast path steps aside, so the simulator really runs), with attention masks,
    cross-attention, and dropout on the attention weights in training mode.

    Raises ValueError for a subclass of ``nn.MultiheadAttention`` with its own ``forward`` (its
    computation may differ: nothing is replaced), naming it; TypeError for TorchScript (scripted or
    traced) modules, which cannot be changed: simulate the eager model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if seq_len is not None:
        check_size("seq_len", seq_len)
    found = list(model.named_modules())
    for path, module in found:
        if isinstance(module, torch.jit.ScriptModule):
            raise TypeError(f"{path or 'the model'} is a TorchScript module ({type(module).__name__}): its "
                            "attention cannot be replaced; pass the eager model (script it afterwards, if at all)")
        if isinstance(module, nn.MultiheadAttention) and type(module).forward is not nn.MultiheadAttention.forward:
            raise ValueError(f"{path or 'the model'} is a {type(module).__qualname__}, a subclass of "
                             "nn.MultiheadAttention with its own forward: not simulated (its computation may "
                             "differ); nothing was replaced")
    model = model if inplace else copy.deepcopy(model)
    if isinstance(model, nn.MultiheadAttention):
        return SimulatedMultiheadAttention.from_torch(model, seq_len, execution=execution, share=True)
    drop_ins: dict = {}  # id of the replaced module -> its drop-in (one per module, however reached)
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):  # every name: named_children() skips aliases
            if isinstance(child, nn.MultiheadAttention):
                if id(child) not in drop_ins:
                    drop_ins[id(child)] = SimulatedMultiheadAttention.from_torch(child, seq_len, execution=execution,
                                                                                 share=True)
                setattr(module, name, drop_ins[id(child)])
        if getattr(module, "use_nested_tensor", False):  # nn.TransformerEncoder decided this with MHA inside:
            module.use_nested_tensor = False  # nested tensors would skip the layers' attention modules
    return model
