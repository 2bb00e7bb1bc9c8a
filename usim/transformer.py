"""A drop-in for ``torch.nn.TransformerEncoderLayer`` computed entirely by one constructed encoder.

The layer's weights become the inputs of ``usim.ops.layer.EncoderLayerSimulator`` (attention,
residuals, both LayerNorms and the feed-forward network), folded in float64 (differentiably) and
cast to the input's dtype:

    W_Q,h = Wq[h]^T / sqrt(r), b_Q,h = bq[h] / sqrt(r);  W_K,h, b_K,h, W_V,h, b_V,h likewise unscaled
    W_O,h = out_proj.weight[:, h]^T, b_O = out_proj.bias   (heads split the E features into chunks of r)
    W1 = linear1.weight^T, b1 = linear1.bias;  W2 = linear2.weight^T, b2 = linear2.bias
    gamma1, beta1 = norm1.weight, norm1.bias;  gamma2, beta2 = norm2.weight, norm2.bias

(absent biases are 0). The module keeps torch's submodules (``self_attn``, ``linear1``,
``linear2``, ``norm1``, ``norm2``, the dropouts) as the holders of its parameters, so its state_dict
is the torch layer's, key for key; its forward never calls them. The encoder is not state: every
drop-in of the same sizes (seq_len, d_model, heads, dim_feedforward, activation, norm placement,
eps, execution) shares one. ``src_mask`` and ``src_key_padding_mask`` (bool, True = left out, or
float, added to the scores) become the encoder's per-head ignore flags and score bias.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from usim.decoder import has_decoder_layers, simulate_decoder_layers
from usim.mha import SharedSimulatorMixin, _Shared
from usim.ops.base import check_size
from usim.ops.layer import EncoderLayerSimulator

_LAYERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def shared_layer(activation: str, norm_first: bool) -> EncoderLayerSimulator:
    """The one universal layer encoder of this form (activation, norm placement), built on first use
    and kept while a drop-in holds it: every size and eps runs on it."""
    key = (activation, norm_first)
    with _LOCK:
        simulator = _LAYERS.get(key)
        if simulator is None:  # built out of inference mode: drop-ins that train share it too
            with torch.inference_mode(False):
                simulator = EncoderLayerSimulator(activation=activation, norm_first=norm_first)
            _LAYERS[key] = simulator
        return simulator


def own_forward(module: nn.Module, base: type) -> bool:
    """Whether module is a subclass of base with a forward of its own (its computation may differ)."""
    return isinstance(module, base) and type(module).forward is not base.forward


def activation_name(activation) -> str:
    """"relu", "gelu" or "gelu_tanh" for the activations nn.TransformerEncoderLayer may hold
    (the strings "relu" / "gelu", F.relu, F.gelu, nn.ReLU, nn.GELU); ValueError for anything else,
    a subclass of nn.ReLU or nn.GELU with its own forward included (named)."""
    for base in (nn.ReLU, nn.GELU):
        if own_forward(activation, base):
            raise ValueError(f"activation {type(activation).__qualname__} is a subclass of nn.{base.__name__} with "
                             "its own forward: not simulated (its computation may differ)")
    if activation in ("relu", F.relu) or isinstance(activation, nn.ReLU):
        return "relu"
    if activation in ("gelu", F.gelu):
        return "gelu"
    if isinstance(activation, nn.GELU):
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    raise ValueError(f"activation {activation!r} is not supported: relu or gelu (exact or tanh) only")


class SimulatedTransformerEncoderLayer(SharedSimulatorMixin, nn.Module):
    r"""An encoder layer with the signature of :class:`torch.nn.TransformerEncoderLayer`, computed by
    one constructed encoder (``usim.ops.layer``): the one universal encoder of its form (activation,
    norm placement), shared by every drop-in, for sequences of any length.

    Same arguments as ``nn.TransformerEncoderLayer`` (plus ``seq_len``, optional: a length planned
    ahead, and ``execution``). Dropout is
    applied only in training mode and is not simulated: a training-mode forward with a dropout
    probability above 0 raises ValueError (call ``.eval()`` or use ``dropout=0``).
    """

    def __init__(self, d_model: int, nhead: int, seq_len: int | None = None, dim_feedforward: int = 2048,
                 dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None, execution: str = "fused"):
        super().__init__()
        check_size("d_model", d_model)
        check_size("nhead", nhead)
        if seq_len is not None:
            check_size("seq_len", seq_len)
        check_size("dim_feedforward", dim_feedforward)
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} must be divisible by nhead {nhead}")
        factory = {"device": device, "dtype": dtype}
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                               **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self._activation = activation_name(activation)
        self.activation = {"relu": F.relu, "gelu": F.gelu}.get(activation, activation) if isinstance(activation, str) \
            else activation
        self.seq_len, self._eps = seq_len, float(layer_norm_eps)
        self.execution = execution
        if seq_len is not None:
            self.simulator.plan(seq_len, d_model, nhead, dim_feedforward)

    @property
    def batch_first(self) -> bool:
        return self.self_attn.batch_first

    def extra_repr(self) -> str:
        return (f"seq_len={self.seq_len}, activation={self._activation}, norm_first={self.norm_first}, "
                f"eps={self.norm1.eps}")

    def _share(self) -> _Shared:  # the layer encoder of this form
        return _Shared((self._activation, bool(self.norm_first)), shared_layer)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer, seq_len: int | None = None, execution: str = "fused", *,
                   share: bool = False) -> "SimulatedTransformerEncoderLayer":
        """The drop-in with the weights, options and mode of an ``nn.TransformerEncoderLayer``: a copy
        of its weights (with their ``requires_grad``), or with ``share=True`` its very submodules
        (``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``, the dropouts), so its
        Parameters stay the model's: tied, frozen and known to optimizers built before."""
        check_layer(layer)
        mha = layer.self_attn
        p = layer.linear1.weight
        sim = cls(mha.embed_dim, mha.num_heads, seq_len, layer.linear1.out_features, layer.dropout.p,
                  layer.activation, layer.norm1.eps, mha.batch_first, layer.norm_first,
                  bias=mha.in_proj_bias is not None, device=p.device, dtype=p.dtype, execution=execution)
        if share:
            for name in HOLDERS:
                setattr(sim, name, getattr(layer, name))
            return sim.train(layer.training)
        for name in ("dropout", "dropout1", "dropout2"):
            getattr(sim, name).p = getattr(layer, name).p
        sim.self_attn.dropout = mha.dropout
        sim.load_state_dict(layer.state_dict(), strict=True)
        theirs = dict(layer.named_parameters())
        for name, param in sim.named_parameters():
            param.requires_grad_(theirs[name].requires_grad)
        return sim.train(layer.training)

    def folded(self, dtype=torch.float64) -> list[torch.Tensor]:
        """The encoder's weights (``usim.ops.layer.WEIGHTS``), folded from the layer's parameters in
        float64 and cast to dtype; differentiable."""
        mha = self.self_attn
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        return fold_weights(mha.num_heads, (wq, bq), (wk, bk), (wv, bv), mha.out_proj, self.norm1, self.linear1,
                            self.linear2, self.norm2, dtype)

    def forward(self, src: torch.Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        r"""Same arguments and result as :meth:`torch.nn.TransformerEncoderLayer.forward`: src (L, N, E),
        (N, L, E) with ``batch_first``, or (L, E) unbatched; the result has src's shape."""
        E = self.self_attn.embed_dim
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
        if src.is_nested or src.dim() not in (2, 3) or src.shape[-1] != E:
            raise ValueError(f"src must be (L, {E}), (L, N, {E}) or (N, L, {E}), got "
                             f"{'a nested tensor' if src.is_nested else tuple(src.shape)}")
        if src.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"src must be float32 or float64, got {src.dtype}")
        if self.training:
            rates = {name: getattr(self, name).p for name in ("dropout", "dropout1", "dropout2")}
            rates["self_attn.dropout"] = self.self_attn.dropout
            if any(p > 0 for p in rates.values()):
                raise ValueError(f"dropout in training mode is not simulated (got {rates}): call .eval() or set "
                                 "every dropout probability to 0")
        if self.norm1.eps != self._eps or self.norm2.eps != self._eps:
            raise ValueError(f"norm1.eps {self.norm1.eps} and norm2.eps {self.norm2.eps} must both be the "
                             f"layer_norm_eps this layer was built with, {self._eps}")
        if is_causal and src_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.TransformerEncoderLayer).")
        unbatched = src.dim() == 2
        x = src[None] if unbatched else (src if self.batch_first else src.transpose(0, 1))
        mask = additive_mask(src_mask, src_key_padding_mask, x, self.self_attn.num_heads, unbatched)
        out = self.simulator(x, *(w.to(x.device) for w in self.folded(x.dtype)), attn_mask=mask, eps=self._eps,
                             execution=self.execution)
        return out[0] if unbatched else (out if self.batch_first else out.transpose(0, 1))


# the submodules holding a layer's parameters and dropout rates (shared with the replaced layer)
HOLDERS = ("self_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2")


def check_layer(layer) -> None:
    """TypeError unless an nn.TransformerEncoderLayer; ValueError naming what the drop-in does not
    compute: a subclass with its own forward, an unsupported activation or option."""
    if not isinstance(layer, nn.TransformerEncoderLayer):
        raise TypeError(f"expected nn.TransformerEncoderLayer, got {type(layer).__name__}")
    if own_forward(layer, nn.TransformerEncoderLayer):
        raise ValueError(f"{type(layer).__qualname__} is a subclass of nn.TransformerEncoderLayer with its own "
                         "forward: not simulated (its computation may differ)")
    activation_name(layer.activation)
    mha = layer.self_attn
    unsupported = [name for name, bad in (
        ("add_bias_kv", mha.bias_k is not None), ("add_zero_attn", mha.add_zero_attn),
        ("kdim/vdim != d_model", not mha._qkv_same_embed_dim),
        ("self_attn with its own forward", own_forward(mha, nn.MultiheadAttention)),
        ("norm1.eps != norm2.eps", layer.norm1.eps != layer.norm2.eps),
        ("LayerNorm without elementwise_affine", not (layer.norm1.elementwise_affine and
                                                     layer.norm2.elementwise_affine))) if bad]
    if unsupported:
        raise ValueError(f"unsupported options of this nn.TransformerEncoderLayer: {', '.join(unsupported)}")


def fold_weights(heads: int, q, k, v, out, norm1, linear1, linear2, norm2, dtype=torch.float64) -> list[torch.Tensor]:
    """The encoder layer's inputs (``usim.ops.layer.WEIGHTS``, cast to dtype) from torch-style
    parameters: q, k, v as (weight (E, E), bias or None) pairs, out, linear1 and linear2 as nn.Linear,
    norm1 and norm2 as nn.LayerNorm. Folded in float64 (differentiably); absent biases are 0."""
    E = out.weight.shape[0]
    scale = 1 / math.sqrt(E // heads)

    def f64(t, size):
        return t.double() if t is not None else torch.zeros(size, dtype=torch.float64, device=out.weight.device)

    wq, wk, wv = (rearrange(w.double(), "(h k) e -> h e k", h=heads) for w, _ in (q, k, v))
    bq, bk, bv = (rearrange(f64(b, E), "(h k) -> h k", h=heads) for _, b in (q, k, v))
    wo = rearrange(out.weight.double(), "e (h k) -> h k e", h=heads)
    hidden = linear1.weight.shape[0]
    weights = [wq * scale, wk, wv, bq * scale, bk, bv, wo, f64(out.bias, E), norm1.weight.double(), f64(norm1.bias, E),
               linear1.weight.double().T, f64(linear1.bias, hidden), linear2.weight.double().T, f64(linear2.bias, E),
               norm2.weight.double(), f64(norm2.bias, E)]
    return [w.to(dtype) for w in weights]


def additive_mask(src_mask, key_padding_mask, x: torch.Tensor, heads: int, unbatched: bool):
    """src_mask ((L, L) or (N * heads, L, L)) and key_padding_mask ((N, L), or (L,) unbatched), each
    bool (True = left out) or float (added to the scores), as one float mask added to the scores:
    (L, L), (N, heads, L, L), or None."""
    batch, length = x.shape[:2]
    total = None
    for name, mask, shapes in (("src_mask", src_mask, ((length, length), (batch * heads, length, length))),
                               ("src_key_padding_mask", key_padding_mask,
                                ((batch, length),) + (((length,),) if unbatched else ()))):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) not in shapes:
            raise ValueError(f"{name} must be {' or '.join(map(str, shapes))}, got {tuple(mask.shape)}")
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask, float("-inf"))
        elif not mask.is_floating_point():
            raise TypeError(f"{name} must be bool or floating, got {mask.dtype}")
        mask = mask.to(x.dtype)
        if name == "src_mask" and mask.dim() == 3:
            mask = mask.unflatten(0, (batch, heads))
        if name == "src_key_padding_mask":
            mask = mask.reshape(batch, 1, 1, length)
        total = mask if total is None else total + mask
    return total.expand(batch, heads, length, length) if total is not None and total.dim() == 4 else total


def simulate_layers(model: nn.Module, seq_len: int | None = None, *, inplace: bool = False,
                    execution: str = "fused") -> nn.Module:
    """The model with every ``nn.TransformerEncoderLayer`` replaced by the equivalent
    ``SimulatedTransformerEncoderLayer`` (same weights; ``seq_len``, optional, is planned ahead), or
    every Hugging Face decoder layer by a ``usim.decoder.SimulatedDecoderLayer``.

    The rules of ``usim.simulate_attention``: a deep copy unless ``inplace``; each drop-in holds the
    replaced layer's own submodules, so its Parameters stay the model's (tied ones tied, frozen ones
    frozen, and with ``inplace`` an optimizer built before still trains the model); a layer reached
    under several names or from several parents becomes one drop-in. ``nn.TransformerEncoder``'s
    nested-tensor path is switched off (it would bypass the layers). Checked before anything is
    replaced: ValueError if the model holds no such layer, or one the drop-in does not compute (a
    subclass with its own forward, its activation's too, or an unsupported option), naming it;
    TypeError for a TorchScript module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if has_decoder_layers(model):
        return simulate_decoder_layers(model, seq_len, inplace=inplace, execution=execution)
    if seq_len is not None:
        check_size("seq_len", seq_len)
    found = 0
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, torch.jit.ScriptModule):
            raise TypeError(f"{path or 'the model'} is a TorchScript module ({type(module).__name__}): its layers "
                            "cannot be replaced; pass the eager model")
        if isinstance(module, nn.TransformerEncoderLayer):
            try:
                check_layer(module)
            except ValueError as e:
                raise ValueError(f"{path or 'the model'}: {e}; nothing was replaced") from None
            found += 1
    if not found:
        raise ValueError(f"no nn.TransformerEncoderLayer found in {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    if isinstance(model, nn.TransformerEncoderLayer):
        return SimulatedTransformerEncoderLayer.from_torch(model, seq_len, execution=execution, share=True)
    drop_ins: dict = {}  # id of the replaced layer -> its drop-in (one per layer, however reached)
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):  # every name: named_children() skips aliases
            if isinstance(child, nn.TransformerEncoderLayer):
                if id(child) not in drop_ins:
                    drop_ins[id(child)] = SimulatedTransformerEncoderLayer.from_torch(child, seq_len,
                                                                                      execution=execution, share=True)
                setattr(module, name, drop_ins[id(child)])
        if getattr(module, "use_nested_tensor", False):
            module.use_nested_tensor = False
    return model
