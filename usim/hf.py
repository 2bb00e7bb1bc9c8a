"""``attn_implementation="usim"``: every Hugging Face model's attention core computed by U.

``import usim.hf`` registers :func:`usim_attention_forward` under the name ``"usim"`` with
``transformers.AttentionInterface`` (and eager's mask builder under the same name with
``AttentionMaskInterface``, so models hand it eager's additive float masks). Then

    AutoModelForCausalLM.from_pretrained(path, attn_implementation="usim")
    AutoModel.from_config(config, attn_implementation="usim")
    model.set_attn_implementation("usim")

run every attention of the model through :class:`usim.AttentionCore`: the model's own Linear layers,
RoPE, caches and norms stay torch's; U computes, per call,

    attn_output = softmax(scaling * Q K^T + mask) V,   attn_weights = that softmax (after dropout)

from query (B, H, L, D) and key, value (B, G, S, D) (grouped-query heads read their group's K, V).
The mask, as transformers builds it (B, 1 or H, L, S), additive float: -inf entries become ignore
flags, finite ones (the dtype's minimum too) a score bias added as eager adds it; bool: True =
attend. An ignored key has weight exactly 0 whatever the kept scores are. A row whose every key is
masked by the dtype's minimum gives what eager gives (every score rounds to that minimum: the
average of all values); a row whose every key is ignored (-inf, a bool mask) has weights 0 and
output 0, as in torch's scaled_dot_product_attention (eager gives NaN there). No mask with a causal
module (``is_causal``): key j is kept for query i when j <= i + S - L (the queries are the last L
positions). Dropout in training mode as eager's: p = 1 gives weights 0, as F.dropout.

One universal core (``AttentionCore()``, its weights the same for every size) serves every layer,
every model and every call: each call shape (L, S, H, G, D) gets its layout and plans once, so a
``generate()`` that grows the sequence builds no new encoder and computes on no padding. Options U
does not compute (``softcap``, attention sinks, ...) raise ValueError.
Non-finite inputs propagate as in eager attention; nothing is checked on the host.
"""

from __future__ import annotations

import threading

import torch

from usim.ops.attention_core import AttentionCore

__all__ = ["clear_cache", "core", "simulators", "usim_attention_forward"]

# kwargs transformers passes that need nothing from the kernel (the mask already carries the
# sliding window and packed sequences; caches and positions were applied before the call)
_IGNORED = {"position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value", "layer_idx",
            "output_attentions", "output_hidden_states", "return_dict", "sliding_window", "is_causal",
            "deterministic", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "token_type_ids"}

_CORES: dict = {}  # "core" -> the one universal AttentionCore
_LOCK = threading.Lock()


def core() -> AttentionCore:
    """The one universal attention core every call shares (built on first use)."""
    with _LOCK:
        if "core" not in _CORES:
            with torch.inference_mode(False):
                _CORES["core"] = AttentionCore(execution="fused")  # within 10x torch's own error (docs/fused.md)
        return _CORES["core"]


def simulators() -> dict:
    """The shared simulators built so far: {"core": the universal AttentionCore} once a call ran."""
    with _LOCK:
        return dict(_CORES)


def clear_cache() -> None:
    """Forget the shared simulator (it is rebuilt on the next call)."""
    with _LOCK:
        _CORES.clear()


def _score_inputs(mask, module, kwargs, length: int, source: int, dtype, device):
    """(ignore flags, bias) for the scores, (B or 1, H or 1, L, S) (or None: no mask). A float mask's
    -inf entries (after the cast to dtype) are ignore flags, its finite entries the bias."""
    if mask is None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        if not causal or length == 1:
            return None, None
        i, j = torch.arange(length, device=device)[:, None], torch.arange(source, device=device)[None, :]
        return j > i + source - length, None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2] != length or mask.shape[-1] < source:
        raise ValueError(f"attention_mask must be a tensor (B, 1 or heads, {length}, {source}), "
                         f"got {tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
    mask = mask[..., :source]
    if mask.dtype == torch.bool:  # True = attend
        return ~mask, None
    if not mask.is_floating_point():
        raise ValueError(f"attention_mask must be float (additive) or bool, got {mask.dtype}")
    bias = mask.to(dtype)
    ignore = bias == float("-inf")  # left out of the row's max and sum; finite entries are added
    return ignore, bias.masked_fill(ignore, 0)


def usim_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``AttentionInterface`` signature: query (B, H, L, D), key and value (B, G, S, D) ->
    (attn_output (B, L, H, D), attn_weights (B, H, L, S)), both computed by U."""
    refused = sorted(k for k, v in kwargs.items() if k not in _IGNORED and v is not None and v is not False)
    if refused:
        raise ValueError(f"attn_implementation='usim' does not compute {', '.join(map(repr, refused))} "
                         f"(softmax(scaling * Q K^T + mask) V only); use another implementation for this model")
    if query.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"attn_implementation='usim' computes in float32 or float64, got {query.dtype}")
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape or key.shape[0] != query.shape[0] \
            or key.shape[-1] != query.shape[-1] or query.shape[1] % key.shape[1]:
        raise ValueError(f"query must be (B, H, L, D) and key, value (B, G, S, D) with G dividing H, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    (_, heads, length, head_dim), (_, kv_heads, source, _) = query.shape, key.shape
    ignore, bias = _score_inputs(attention_mask, module, kwargs, length, source, query.dtype, query.device)
    if not 0 <= dropout <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, got {dropout}")
    scale = None
    if dropout and module.training:  # as eager: dropout on the weights, the kept ones scaled by 1 / (1 - p)
        keep = torch.rand(query.shape[0], heads, length, source, device=query.device) >= dropout
        scale = keep.to(query.dtype) / (1 - dropout) if dropout < 1 else torch.zeros_like(keep, dtype=query.dtype)
    sim = core()
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, weights = sim.attention(query, key, value, scaling=scaling, ignore=ignore, bias=bias,
                                 weight_scale=scale)
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register ``"usim"`` with transformers' attention and mask interfaces (done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("usim", usim_attention_forward)
    AttentionMaskInterface.register("usim", eager_mask)


register()
