"""Whole Hugging Face decoder layers computed by constructed encoders (``usim.ops.decoder_layer``).

``simulate_decoder_layers(model)`` replaces every decoder layer of a Llama, Mistral, Qwen2, GPT-2 or
GPT-NeoX model by a ``SimulatedDecoderLayer`` in its place. The adapter keeps the layer's own
submodules (so the state_dict keys are HF's and gradients reach the parameters) and never runs
them: their weights, read as x @ W per head, are the encoder's inputs (1/sqrt(head_dim) folded into
W_Q, b_Q in float64, differentiably). Per call it only moves data:

    hidden states (B, n, d)                       -> x
    the mask HF hands (None: causal; (B, kv) 0/1; (B, 1, n, kv) bool or additive)
                                                  -> keep (B, n, p + n), True where query i sees key j
                                                     (causal and sliding window from the layer when None)
    position_embeddings (cos, sin)                -> cos, sin (RoPE models)
    the cache's keys and values of this layer     -> past_keys, past_values (p cached tokens)

runs the encoder and writes the new tokens' keys (after RoPE) and values into the cache (``update``),
as HF's attention does. Encoders are shared by every layer of one form (sizes, norm, biases, MLP,
rotary features, residual) and built per shape on first use: n new and p cached tokens are padded up
to powers of two (p to at least 8, or to ``seq_len`` when it is given); padded keys are masked out.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections import OrderedDict
from dataclasses import replace

import torch
from einops import rearrange
from torch import nn

from usim.ops.decoder_layer import DecoderForm, DecoderLayerSimulator

SUPPORTED = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "GPT2Block", "GPTNeoXLayer")
LACKS = {  # what a known decoder layer has that the construction does not
    "Gemma2DecoderLayer": "attention logit softcapping, pre/post-feedforward norms and GemmaRMSNorm's (1 + weight)",
    "Gemma3DecoderLayer": "q/k norms, pre/post-feedforward norms and GemmaRMSNorm's (1 + weight)",
    "GemmaDecoderLayer": "GemmaRMSNorm's (1 + weight) and the GELU-tanh gated MLP",
    "MixtralDecoderLayer": "a mixture-of-experts MLP (block_sparse_moe)",
    "Qwen2MoeDecoderLayer": "a mixture-of-experts MLP",
    "Qwen3DecoderLayer": "q_norm and k_norm (RMSNorm per head before RoPE)",
    "GptOssDecoderLayer": "attention sinks and a mixture-of-experts MLP",
}
_ENCODERS: "OrderedDict" = OrderedDict()
_LOCK = threading.Lock()
_KEEP_ENCODERS = 16


def shared_decoder(form: DecoderForm, n: int, past: int, execution: str) -> DecoderLayerSimulator:
    """The encoder of this form and shape, built on first use (the last few kept)."""
    key = (form, n, past, execution)
    with _LOCK:
        if key in _ENCODERS:
            _ENCODERS.move_to_end(key)
            return _ENCODERS[key]
    sim = DecoderLayerSimulator(n, past, execution=execution, **form.__dict__)
    with _LOCK:
        _ENCODERS[key] = sim
        while len(_ENCODERS) > _KEEP_ENCODERS:
            _ENCODERS.popitem(last=False)
    return sim


def _bucket(size: int, seq_len: int | None, least: int = 1) -> int:
    """The size an encoder is built for: 0, ``seq_len`` (when given), else the next power of two >= least."""
    if size == 0:
        return 0
    if seq_len is not None:
        if size > seq_len:
            raise ValueError(f"{size} tokens exceed seq_len {seq_len}")
        return seq_len
    return max(least, 1 << (size - 1).bit_length())


def _activation(fn) -> str:
    name = type(fn).__name__
    if name in ("SiLUActivation", "SiLU") or fn is torch.nn.functional.silu:
        return "silu"
    if name == "GELUActivation" or (isinstance(fn, nn.GELU) and fn.approximate == "none"):
        return "gelu"
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation") or isinstance(fn, nn.GELU):
        return "gelu_tanh"
    if name in ("ReLU",):
        return "relu"
    raise ValueError(f"the MLP activation {name} is not supported: silu, gelu, the tanh gelus or relu")


def _heads(weight: torch.Tensor, count: int) -> list:
    """A (count * r, d) nn.Linear weight as count (d, r) matrices, x @ W per head."""
    return list(rearrange(weight, "(h r) d -> h d r", h=count).unbind(0))


def _vectors(bias: torch.Tensor, count: int) -> list:
    return list(rearrange(bias, "(h r) -> h r", h=count).unbind(0))


class SimulatedDecoderLayer(nn.Module):
    """A Hugging Face decoder layer (``SUPPORTED``) computed by one constructed encoder; returns what
    the layer returns (the new hidden states). Dropout in training mode is not simulated (ValueError)."""

    def __init__(self, layer: nn.Module, seq_len: int | None = None, execution: str = "fast"):
        super().__init__()
        kind = type(layer).__name__
        if kind not in SUPPORTED:
            raise ValueError(f"{kind} is not supported: " + LACKS.get(kind, f"not one of {', '.join(SUPPORTED)}"))
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.kind, self.seq_len, self.execution = kind, seq_len, execution
        for attr in ("use_parallel_residual", "attention_type"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self._signature = inspect.signature(type(layer).forward)
        self._form = self._read_form()
        self.layer_idx = self.attention_module.layer_idx
        self.train(layer.training)

    # --- what the layer is ----------------------------------------------------------------
    @property
    def attention_module(self) -> nn.Module:
        """The layer's attention module (its own child)."""
        return self.get_submodule({"GPT2Block": "attn", "GPTNeoXLayer": "attention"}.get(self.kind, "self_attn"))

    def _read_form(self) -> DecoderForm:
        if self.kind == "GPT2Block":
            attn = self.get_submodule("attn")
            if getattr(attn, "is_cross_attention", False) or hasattr(self, "crossattention"):
                raise ValueError("GPT2Block with cross-attention is not supported")
            d, heads = attn.embed_dim, attn.num_heads
            form = DecoderForm(d, heads, heads, d // heads, self.mlp.c_fc.weight.shape[1], "layer", True, True,
                               "plain", _activation(self.mlp.act), True)
            return form
        if self.kind == "GPTNeoXLayer":
            attn = self.attention
            d = attn.query_key_value.in_features
            heads = attn.config.num_attention_heads
            form = DecoderForm(d, heads, heads, attn.head_size, self.mlp.dense_h_to_4h.out_features, "layer",
                               attn.query_key_value.bias is not None, attn.dense.bias is not None, "plain",
                               _activation(self.mlp.act), self.mlp.dense_h_to_4h.bias is not None,
                               parallel=bool(self.use_parallel_residual))
            return form
        attn, mlp = self.self_attn, self.mlp
        heads, kv_heads = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        form = DecoderForm(attn.q_proj.in_features, heads, kv_heads, attn.head_dim, mlp.gate_proj.out_features, "rms",
                           attn.q_proj.bias is not None, attn.o_proj.bias is not None, "gated", _activation(mlp.act_fn),
                           mlp.gate_proj.bias is not None)
        return form

    @property
    def norms(self) -> tuple:
        if self.kind == "GPT2Block":
            return self.ln_1, self.ln_2
        return self.input_layernorm, self.post_attention_layernorm

    def eps(self) -> float:
        eps = {getattr(norm, "variance_epsilon", getattr(norm, "eps", None)) for norm in self.norms}
        if len(eps) != 1:
            raise ValueError(f"the two norms' eps differ ({sorted(eps)}): one eps per simulated layer")
        return eps.pop()

    def weights(self, dtype) -> dict:
        """The encoder's weight inputs (``DecoderForm.weights``), folded in float64, cast to dtype."""
        form, attn = self._form, self.attention_module
        H, G, r, scale = form.heads, form.kv_heads, form.head_dim, float(attn.scaling)
        first, second = self.norms
        out = {"n1w": first.weight, "n2w": second.weight}
        if form.norm == "layer":
            out.update(n1b=first.bias, n2b=second.bias)
        if self.kind == "GPT2Block":
            w, b = attn.c_attn.weight.double(), attn.c_attn.bias.double()   # Conv1D: (d, 3d), x @ w
            wq, wk, wv = rearrange(w, "d (three h r) -> three h d r", three=3, h=H).unbind(0)
            bq, bk, bv = rearrange(b, "(three h r) -> three h r", three=3, h=H).unbind(0)
            wo, bo = rearrange(attn.c_proj.weight, "(h r) d -> h r d", h=H), attn.c_proj.bias
            mlp = {"w1": self.mlp.c_fc.weight, "b1": self.mlp.c_fc.bias, "w2": self.mlp.c_proj.weight,
                   "b2": self.mlp.c_proj.bias}
        elif self.kind == "GPTNeoXLayer":
            qkv = attn.query_key_value
            w = rearrange(qkv.weight.double(), "(h three r) d -> three h d r", three=3, h=H)
            wq, wk, wv = w.unbind(0)
            bq = bk = bv = None
            if qkv.bias is not None:
                bq, bk, bv = rearrange(qkv.bias.double(), "(h three r) -> three h r", three=3, h=H).unbind(0)
            wo, bo = rearrange(attn.dense.weight, "d (h r) -> h r d", h=H), attn.dense.bias
            lin1, lin2 = self.mlp.dense_h_to_4h, self.mlp.dense_4h_to_h
            mlp = {"w1": lin1.weight.T, "b1": lin1.bias, "w2": lin2.weight.T, "b2": lin2.bias}
        else:
            wq, wk, wv = (_heads(p.weight.double(), c) for p, c in ((attn.q_proj, H), (attn.k_proj, G),
                                                                     (attn.v_proj, G)))
            bq, bk, bv = (None if p.bias is None else _vectors(p.bias.double(), c)
                          for p, c in ((attn.q_proj, H), (attn.k_proj, G), (attn.v_proj, G)))
            wo, bo = rearrange(attn.o_proj.weight, "d (h r) -> h r d", h=H), attn.o_proj.bias
            m = self.mlp
            mlp = {"wg": m.gate_proj.weight.T, "wu": m.up_proj.weight.T, "wd": m.down_proj.weight.T,
                   "bg": m.gate_proj.bias, "bu": m.up_proj.bias, "bd": m.down_proj.bias}
        for name, ws, bs, count, factor in (("q", wq, bq, H, scale), ("k", wk, bk, G, 1.0), ("v", wv, bv, G, 1.0)):
            out.update({f"w{name}{h}": ws[h] * factor for h in range(count)})
            if form.qkv_bias:
                out.update({f"b{name}{h}": bs[h] * factor for h in range(count)})
        out.update({f"wo{h}": wo[h] for h in range(H)})
        if form.o_bias:
            out["bo"] = bo
        out.update({k: v for k, v in mlp.items() if v is not None})
        return {k: v.to(dtype) for k, v in out.items()}

    def _weights(self, dtype) -> dict:
        """``weights(dtype)``, folded again only when a parameter changed (or gradients are wanted)."""
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self.weights(dtype)
        key = (dtype, tuple((p.data_ptr(), p._version) for p in params))
        if getattr(self, "_folded", None) is None or self._folded[0] != key:
            self._folded = (key, {k: v.detach() for k, v in self.weights(dtype).items()})
        return self._folded[1]

    # --- the call ---------------------------------------------------------------------------
    def forward(self, hidden_states, *args, **kwargs):
        call = self._signature.bind(self, hidden_states, *args, **kwargs).arguments
        extra = call.pop("kwargs", {}) or {}
        mask = call.get("attention_mask")
        cache = next((c for c in (call.get("cache"), call.get("layer_past"), extra.get("past_key_values"),
                                  extra.get("cache")) if c is not None), None)
        if call.get("encoder_hidden_states") is not None:
            raise ValueError(f"{self.kind}: cross-attention (encoder_hidden_states) is not simulated")
        if self.training:
            rates = {name: m.p for name, m in self.named_modules() if isinstance(m, nn.Dropout) and m.p > 0}
            rate = getattr(self.attention_module, "attention_dropout", 0.0)
            if rates or (isinstance(rate, float) and rate > 0):
                raise ValueError(f"dropout in training mode is not simulated (got {rates or rate}): call .eval()")
        x = hidden_states
        if x.dim() != 3 or x.shape[-1] != self._form.d:
            raise ValueError(f"hidden_states must be (batch, length, {self._form.d}), got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"hidden_states must be float32 or float64, got {x.dtype}")
        batch, n = x.shape[:2]
        past_keys, past_values = _cached(cache, self.layer_idx)
        past = 0 if past_keys is None else past_keys.shape[-2]
        keep = _keep(mask, batch, n, past, self._window(), x.device)
        form, cos, sin = self._form, None, None
        if self.kind != "GPT2Block":
            embeddings = call.get("position_embeddings")
            if embeddings is None:
                raise ValueError(f"{self.kind}: position_embeddings (cos, sin) are needed (the model computes them)")
            cos, sin = embeddings
            form = replace(form, rot=cos.shape[-1])
        sim = shared_decoder(form, _bucket(n, None), _bucket(past, self.seq_len, least=8), self.execution)
        y, keys, values = sim(x, self._weights(x.dtype), self.eps(), keep, cos, sin, past_keys, past_values)
        if cache is not None:
            (getattr(cache, "self_attention_cache", None) or cache).update(keys, values, self.layer_idx)
        return y

    def _window(self):
        attn = self.attention_module
        window = getattr(attn, "sliding_window", None)
        if window is None and self.kind == "MistralDecoderLayer":
            window = getattr(attn.config, "sliding_window", None)
        return window

    def extra_repr(self) -> str:
        return f"{self.kind}, seq_len={self.seq_len}, execution={self.execution}"


def _cached(cache, index: int):
    """This layer's cached keys and values (B, G, p, r), or (None, None)."""
    if cache is None:
        return None, None
    cache = getattr(cache, "self_attention_cache", None) or cache
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"a cache of type {type(cache).__name__} is not supported (a transformers Cache with .layers)")
    if index >= len(layers) or not getattr(layers[index], "is_initialized", False):
        return None, None
    layer = layers[index]
    if layer.keys is None or layer.keys.numel() == 0:
        return None, None
    return layer.keys, layer.values


def _keep(mask, batch: int, n: int, past: int, window, device) -> torch.Tensor:
    """(B, n, past + n) bool: True where query i (position past + i) may see key j, from the mask HF
    hands a decoder layer (None: causal and the sliding window; (B, kv) padding 1/0 with causal;
    (B, 1, n, kv) bool, True = seen, or additive, 0 = seen)."""
    m = past + n
    i = torch.arange(n, device=device)[:, None] + past
    j = torch.arange(m, device=device)[None]
    causal = j <= i
    if window is not None:
        causal = causal & (j > i - window)
    if mask is None:
        return causal.expand(batch, n, m)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention masks of type {type(mask).__name__} are not supported (a tensor or None)")
    if mask.dim() == 2:
        if mask.shape[-1] != m:
            raise ValueError(f"a padding mask of {mask.shape[-1]} keys for {m} keys (cached and new)")
        return causal & mask.bool()[:, None, :]
    if mask.dim() != 4 or mask.shape[-2:] != (n, m) or mask.shape[1] != 1:
        raise ValueError(f"the attention mask must be (batch, 1, {n}, {m}), got {tuple(mask.shape)}")
    mask = mask[:, 0]
    if mask.dtype == torch.bool:
        return mask.expand(batch, n, m)
    seen = mask == 0
    if not (seen | (mask <= torch.finfo(mask.dtype).min / 2)).all():
        raise ValueError("an additive attention mask with score biases other than 0 and the dtype's minimum is "
                         "not supported")
    return seen.expand(batch, n, m)


def _is_decoder_layer(module: nn.Module) -> bool:
    name = type(module).__name__
    return name in SUPPORTED or name.endswith("DecoderLayer")


def has_decoder_layers(model: nn.Module) -> bool:
    """Whether the model holds a Hugging Face decoder layer (supported or not)."""
    return any(_is_decoder_layer(m) for m in model.modules())


def simulate_decoder_layers(model: nn.Module, seq_len: int | None = None, *, inplace: bool = False,
                            execution: str = "fast") -> nn.Module:
    """``model`` (deep-copied unless ``inplace``) with every decoder layer replaced by a
    :class:`SimulatedDecoderLayer` in its place. ValueError naming the layer class and what it lacks
    for a decoder layer not in ``SUPPORTED`` (nothing is replaced then), or if there is none."""
    hits = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if _is_decoder_layer(child)]
    if not hits:
        raise ValueError(f"no decoder layer found in {type(model).__name__} (supported: {', '.join(SUPPORTED)})")
    for _, _, child in hits:
        if type(child).__name__ not in SUPPORTED:
            kind = type(child).__name__
            raise ValueError(f"{kind} is not supported: " + LACKS.get(kind, f"not one of {', '.join(SUPPORTED)}"))
    if not inplace:
        model = copy.deepcopy(model)
        hits = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                if _is_decoder_layer(child)]
    for parent, name, child in hits:
        setattr(parent, name, SimulatedDecoderLayer(child, seq_len, execution))
    return model
