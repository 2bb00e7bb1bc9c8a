"""Hugging Face BERT models (e.g. all-MiniLM-L6-v2) with every self-attention computed by U.

A BERT self-attention block (``BertAttention``: ``self`` = BertSelfAttention, ``output`` = BertSelfOutput)
computes, in eval mode,

    LayerNorm(dense(concat_h softmax(Q_h K_h^T / sqrt(head_dim) + mask) V_h) + x),
    Q = query(x), K = key(x), V = value(x),

which is ``nn.MultiheadAttention`` followed by BERT's own residual and LayerNorm, with

    in_proj_weight = cat(query.weight, key.weight, value.weight)    (3E, E)
    in_proj_bias   = cat(query.bias, key.bias, value.bias)          (3E,)
    out_proj       = output.dense                                   (weight and bias)

(heads split the E features into contiguous head_dim chunks in both). :func:`simulate_bert_attention`
replaces each block by :class:`SimulatedBertAttention`: that MHA as a ``usim.SimulatedMultiheadAttention``
(U computes the attention), then the block's own dropout (a no-op in eval), residual and LayerNorm. The
attention mask that BERT hands the block (float additive 0 / -inf-like, or bool True = attend, as
(B, 1, Lq, Lk); or 0/1 (B, L)) becomes ``key_padding_mask``; a mask that differs between queries
(causal) is refused. Blocks are found by their structure, not their class, so the model may be a
``transformers.BertModel``, a model holding one (a sentence-transformers model, ``BertForMaskedLM``), or
one layer. Attention weights are not returned (``output_attentions`` is not supported).

Whole layers: a ``BertLayer`` (attention block, then ``intermediate``: dense and the activation,
then ``output``: dense, dropout, residual and LayerNorm) is a post-norm transformer encoder layer,

    h = LayerNorm1(x + attention(x)),   y = LayerNorm2(h + W2 act(W1 h + b1) + b2),

so :func:`simulate_bert_layers` replaces each by a :class:`SimulatedBertLayer`, computed entirely by
one constructed encoder (``usim.ops.layer``, the same as ``usim.SimulatedTransformerEncoderLayer``):
attention, residuals, both LayerNorms and the feed-forward network. Activations: "gelu" (exact),
the tanh forms ("gelu_new", "gelu_pytorch_tanh", "gelu_fast") and "relu".

Nothing here imports ``transformers``.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from usim.engine import EXECUTIONS
from usim.mha import SimulatedMultiheadAttention, _Shared
from usim.ops.base import check_size
from usim.transformer import additive_mask, fold_weights, own_forward, shared_layer

__all__ = ["SimulatedBertAttention", "SimulatedBertLayer", "bert_attention_to_mha", "simulate_bert_attention",
           "simulate_bert_layers"]


def _is_bert_attention(module: nn.Module) -> bool:
    sub, out = getattr(module, "self", None), getattr(module, "output", None)
    return (all(isinstance(getattr(sub, name, None), nn.Linear) for name in ("query", "key", "value"))
            and isinstance(getattr(out, "dense", None), nn.Linear)
            and isinstance(getattr(out, "LayerNorm", None), nn.LayerNorm))


def _check_self_attention(attention: nn.Module) -> None:
    """ValueError unless the block is plain bidirectional self-attention with square projections."""
    sub, dense = attention.self, attention.output.dense
    if getattr(attention, "is_cross_attention", False) or getattr(sub, "is_decoder", False) \
            or getattr(sub, "is_causal", False):
        raise ValueError("only bidirectional self-attention (a BERT encoder) can be simulated")
    if getattr(sub, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {sub.position_embedding_type!r} is not supported")
    embed_dim = sub.query.in_features
    if any(lin.weight.shape != (embed_dim, embed_dim) for lin in (sub.query, sub.key, sub.value, dense)):
        raise ValueError("query, key, value and output dense must all be square (all_head_size == hidden_size)")


def bert_attention_to_mha(attention: nn.Module) -> nn.MultiheadAttention:
    """The ``nn.MultiheadAttention`` (batch_first, no dropout) with a BERT self-attention block's weights."""
    _check_self_attention(attention)
    sub, dense = attention.self, attention.output.dense
    q, k, v = sub.query, sub.key, sub.value
    embed_dim, heads = q.in_features, sub.num_attention_heads
    weight = q.weight
    mha = nn.MultiheadAttention(embed_dim, heads, batch_first=True, device=weight.device, dtype=weight.dtype)

    def bias(lin):
        return lin.bias if lin.bias is not None else torch.zeros_like(weight[:, 0])

    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        mha.in_proj_bias.copy_(torch.cat([bias(q), bias(k), bias(v)]))
        mha.out_proj.weight.copy_(dense.weight)
        mha.out_proj.bias.copy_(bias(dense))
    return mha.eval()


def _key_padding_mask(mask, batch: int, length: int):
    """HF's attention mask as given to the block -> (batch, length) bool, True = padding key (or None)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        blocked = ~mask
    elif mask.is_floating_point():  # additive: 0 to attend, the dtype's minimum (or -inf) to mask
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not ((mask == 0) | blocked).all():
            raise NotImplementedError("an additive attention mask is simulated only with values 0 and -inf")
    else:  # 0/1 integers, 1 = attend
        blocked = mask == 0
    if blocked.dim() > 2:  # (B, [heads,] Lq, Lk): the same keys must be masked for every query
        blocked = blocked.reshape(blocked.shape[0], -1, blocked.shape[-1])
        if not (blocked == blocked[:, :1]).all():
            raise NotImplementedError("the attention mask differs between queries (causal?): U masks keys only")
        blocked = blocked[:, 0]
    return blocked.expand(batch, length)


class SimulatedBertAttention(nn.Module):
    """Drop-in for a BERT self-attention block: LayerNorm(dropout(mha(x)) + x), mha computed by U.

    ``mha`` is a :class:`usim.SimulatedMultiheadAttention` built from the block's query/key/value and
    output dense (see the module docstring); ``dropout`` and ``LayerNorm`` are the block's own modules.
    ``forward`` returns ``(output, None)`` like ``BertAttention``.
    """

    _ignored = {"position_ids"}  # handed to every layer by transformers 5; self-attention does not read it

    def __init__(self, attention: nn.Module, seq_len: int | None = None, execution: str = "fused"):
        super().__init__()
        self.mha = SimulatedMultiheadAttention.from_torch(bert_attention_to_mha(attention), seq_len,
                                                          execution=execution)
        self.dropout, self.LayerNorm = attention.output.dropout, attention.output.LayerNorm

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        extra = [f"argument {i + 2}" for i, a in enumerate(args) if a is not None and a is not False]
        extra += [k for k, a in kwargs.items() if k not in self._ignored and a is not None and a is not False]
        if extra:
            raise NotImplementedError(f"SimulatedBertAttention computes plain self-attention; got {extra} "
                                      "(head_mask, cross-attention, caches and output_attentions are not supported)")
        mask = _key_padding_mask(attention_mask, *hidden_states.shape[:2])
        out, _ = self.mha(hidden_states, hidden_states, hidden_states, key_padding_mask=mask, need_weights=False)
        return self.LayerNorm(self.dropout(out) + hidden_states), None


def simulate_bert_attention(model: nn.Module, seq_len: int | None = None, *, inplace: bool = False,
                            execution: str = "fused") -> nn.Module:
    """``model`` (deep-copied unless ``inplace``) with every BERT self-attention block replaced by a
    :class:`SimulatedBertAttention` (any length; ``seq_len``, optional, is planned ahead).

    Raises ValueError if the model holds no such block, or later, in forward, for a longer input.
    """
    _check_model(model, seq_len)
    return _replace(model if inplace else copy.deepcopy(model), _is_bert_attention,
                    lambda child: SimulatedBertAttention(child, seq_len, execution=execution),
                    "BERT self-attention block (with .self.query/key/value and .output.dense/LayerNorm)")


def _check_model(model, seq_len) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a BERT model, or a model holding one), got "
                        f"{type(model).__name__}")
    if seq_len is not None:
        check_size("seq_len", seq_len)


def _replace(model: nn.Module, found, make, what: str, check=None) -> nn.Module:
    """model with every submodule for which ``found`` holds replaced by ``make(submodule)``, one
    replacement per submodule however many names or parents reach it (ValueError naming ``what`` if
    there is none; ``check(submodule)`` runs on every one before anything is replaced)."""
    hits = [(parent, name, child) for parent in model.modules() for name, child in list(parent._modules.items())
            if child is not None and found(child)]
    if not hits:
        raise ValueError(f"no {what} found in {type(model).__name__}")
    for _, _, child in hits if check is not None else ():
        check(child)
    made: dict = {}
    for parent, name, child in hits:
        if id(child) not in made:
            made[id(child)] = make(child)
        setattr(parent, name, made[id(child)])
    return model


def _is_bert_layer(module: nn.Module) -> bool:
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    return (_is_bert_attention(getattr(module, "attention", None))
            and isinstance(getattr(inter, "dense", None), nn.Linear)
            and isinstance(getattr(out, "dense", None), nn.Linear)
            and isinstance(getattr(out, "LayerNorm", None), nn.LayerNorm))


def bert_activation(fn) -> str:
    """The declared activation of a BERT intermediate activation (transformers' ACT2FN modules, by
    class name): ValueError for any other."""
    name = type(fn).__name__
    for base in (nn.GELU, nn.ReLU):
        if own_forward(fn, base):
            raise ValueError(f"the intermediate activation {type(fn).__qualname__} is a subclass of "
                             f"nn.{base.__name__} with its own forward: not simulated (its computation may differ)")
    if name == "GELUActivation":
        return "gelu"
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation") or \
            (isinstance(fn, nn.GELU) and fn.approximate == "tanh"):
        return "gelu_tanh"
    if isinstance(fn, nn.GELU):
        return "gelu"
    if isinstance(fn, nn.ReLU) or fn is torch.relu or fn is torch.nn.functional.relu:
        return "relu"
    raise ValueError(f"the intermediate activation {name} is not supported: gelu, the tanh gelus or relu")


class SimulatedBertLayer(nn.Module):
    """Drop-in for a BERT encoder layer (``BertLayer``), computed entirely by one constructed encoder.

    Holds the layer's own ``attention``, ``intermediate`` and ``output`` modules (so its state_dict is
    the layer's); its forward never runs them: their weights are the encoder's inputs. Returns what
    the replaced layer returns: the hidden states (transformers 5), or a 1-tuple (4.x). Dropout in
    training mode is not simulated (ValueError; ``.eval()`` or probabilities 0).
    """

    _ignored = SimulatedBertAttention._ignored

    def __init__(self, layer: nn.Module, seq_len: int | None = None, execution: str = "fused"):
        super().__init__()
        if seq_len is not None:
            check_size("seq_len", seq_len)
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        if not _is_bert_layer(layer):
            raise TypeError(f"expected a BERT layer (.attention, .intermediate.dense, .output.dense/LayerNorm), "
                            f"got {type(layer).__name__}")
        if getattr(layer, "add_cross_attention", False) or getattr(layer, "is_decoder", False):
            raise ValueError("only encoder layers (no decoder, no cross-attention) can be simulated")
        _check_self_attention(layer.attention)
        if getattr(layer, "chunk_size_feed_forward", 0):
            raise ValueError("chunk_size_feed_forward is not supported (the feed-forward runs whole)")
        eps = {layer.attention.output.LayerNorm.eps, layer.output.LayerNorm.eps}
        if len(eps) != 1:
            raise ValueError(f"the two LayerNorms' eps differ ({sorted(eps)}): one eps per simulated layer")
        self.attention, self.intermediate, self.output = layer.attention, layer.intermediate, layer.output
        self._tuple = "output_attentions" in inspect.signature(type(layer).forward).parameters  # transformers 4.x
        sub = layer.attention.self
        self._shared = _Shared((bert_activation(layer.intermediate.intermediate_act_fn), False), shared_layer)
        self.seq_len, self._eps, self.execution = seq_len, eps.pop(), execution
        if seq_len is not None:
            self.simulator.plan(seq_len, sub.query.in_features, sub.num_attention_heads,
                                layer.intermediate.dense.out_features)
        self.train(layer.training)

    @property
    def simulator(self):
        """The encoder computing this layer (shared by every layer of the same sizes; not state)."""
        return self._shared.module

    def folded(self, dtype=torch.float64) -> list[torch.Tensor]:
        """The encoder's inputs from the layer's weights (float64 folding, differentiable)."""
        sub = self.attention.self
        qkv = ((lin.weight, lin.bias) for lin in (sub.query, sub.key, sub.value))
        return fold_weights(sub.num_attention_heads, *qkv, self.attention.output.dense, self.attention.output.LayerNorm,
                            self.intermediate.dense, self.output.dense, self.output.LayerNorm, dtype)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        extra = [f"argument {i + 2}" for i, a in enumerate(args) if a is not None and a is not False]
        extra += [k for k, a in kwargs.items() if k not in self._ignored and a is not None and a is not False]
        if extra:
            raise NotImplementedError(f"SimulatedBertLayer computes a plain encoder layer; got {extra} (head_mask, "
                                      "cross-attention, caches and output_attentions are not supported)")
        if self.training:
            rates = {name: m.p for name, m in self.named_modules() if isinstance(m, nn.Dropout) and m.p > 0}
            if rates:
                raise ValueError(f"dropout in training mode is not simulated (got {rates}): call .eval()")
        x = hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"hidden_states must be (batch, length, hidden), got {tuple(getattr(x, 'shape', ()))}")
        padding = _key_padding_mask(attention_mask, *x.shape[:2])
        mask = additive_mask(None, padding, x, self.attention.self.num_attention_heads, False)
        out = self.simulator(x, *(w.to(x.device) for w in self.folded(x.dtype)), attn_mask=mask, eps=self._eps,
                             execution=self.execution)
        return (out,) if self._tuple else out


def simulate_bert_layers(model: nn.Module, seq_len: int | None = None, *, inplace: bool = False,
                         execution: str = "fused") -> nn.Module:
    """``model`` (deep-copied unless ``inplace``) with every BERT encoder layer replaced by a
    :class:`SimulatedBertLayer` (any length; ``seq_len``, optional, is planned ahead): attention,
    residuals, LayerNorms and feed-forward all computed by constructed encoders. Each drop-in holds
    the layer's own modules, so its Parameters stay the model's (frozen ones frozen; with
    ``inplace`` an optimizer built before still trains the model); a layer reached under several
    names becomes one drop-in.

    Raises TypeError if model is not an nn.Module; ValueError if it holds no BERT layer, or one whose
    activation is not computed (checked before anything is replaced).
    """
    _check_model(model, seq_len)
    return _replace(model if inplace else copy.deepcopy(model), _is_bert_layer,
                    lambda child: SimulatedBertLayer(child, seq_len, execution=execution),
                    "BERT layer (with .attention, .intermediate.dense and .output.dense/LayerNorm)",
                    check=lambda child: bert_activation(child.intermediate.intermediate_act_fn))
