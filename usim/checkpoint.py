"""safetensors checkpoints: every weight and table as a tensor, everything else as JSON metadata.

Metadata keys: ``usim.format`` (version), ``usim.module`` (kind and constructor arguments),
``usim.layout`` (blocks), ``usim.slots`` (stream slot names in order), ``usim.layers``
(per-layer specs: heads, tiers, activation, hidden size, slots read and written). No pickle.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from usim.engine import FFN, Encoder, EncoderLayer, HardAttention
from usim.layout import Layout

FORMAT_VERSION = "1"


def save(module, path) -> None:
    """Write a construction (or a bare ``usim.Encoder`` with a layout attribute) to ``path``."""
    from usim.ops.base import Construction, layer_specs

    if isinstance(module, Construction):
        encoder, layout, kind, args = module.encoder, module.layout, module.kind, module.args
    elif isinstance(module, Encoder):
        encoder, layout, kind, args = module, getattr(module, "layout", None), "Encoder", {}
        if layout is None:
            layout = Layout.from_dict([{"name": "seq", "shape": [module.length], "role": "input"}])
    else:
        raise TypeError(f"cannot save a {type(module).__name__}: expected a usim construction or Encoder")
    tensors = {"pos_table": encoder.pos_table, "readout": encoder.readout}
    for i, layer in enumerate(encoder.layers):
        if layer.attn is not None:
            for name in ("query", "key", "value", "output"):
                tensors[f"layers.{i}.attn.{name}"] = getattr(layer.attn, name)
        if layer.ffn is not None:
            for name in ("w_in", "b_in", "w_out", "b_out"):
                tensors[f"layers.{i}.ffn.{name}"] = getattr(layer.ffn, name)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "usim.format": FORMAT_VERSION,
        "usim.module": json.dumps({"kind": kind, "args": args}),
        "usim.layout": json.dumps(layout.to_dict()),
        "usim.slots": json.dumps(encoder.slots),
        "usim.layers": json.dumps(layer_specs(encoder)),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def _read(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from None
    if "usim.format" not in metadata:
        raise ValueError(f"{path} is a safetensors file without usim metadata")
    if metadata["usim.format"] != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown usim format version {metadata['usim.format']!r} "
                         f"(this usim reads {FORMAT_VERSION!r})")
    try:
        meta = {k: json.loads(metadata[k]) for k in ("usim.module", "usim.layout", "usim.slots", "usim.layers")}
    except KeyError as e:
        raise ValueError(f"{path}: usim metadata lacks {e.args[0]!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: usim metadata is not valid JSON: {e}") from None
    return meta, tensors


def _tensor(tensors, name, shape, path):
    if name not in tensors:
        raise ValueError(f"{path}: tensor {name!r} is missing")
    t = tensors[name]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, metadata says {tuple(shape)}")
    return t


def load_encoder(path):
    """(Encoder, Layout, kind, args) from a checkpoint, checking every shape against the metadata."""
    meta, tensors = _read(path)
    layout = Layout.from_dict(meta["usim.layout"])
    slots = meta["usim.slots"]
    length, width = layout.length, len(slots)
    pos_table = _tensor(tensors, "pos_table", (length, width), path)
    readout = _tensor(tensors, "readout", (length,), path)
    if readout.numel() and (readout.min() < 0 or readout.max() >= width):
        raise ValueError(f"{path}: readout indexes slots outside 0..{width - 1}")
    layers = []
    for i, spec in enumerate(meta["usim.layers"]):
        attn = ffn = None
        try:
            if spec["heads"]:
                h, t, dk, dv = spec["heads"], spec["tiers"], spec["d_k"], spec["d_v"]
                attn = HardAttention(
                    _tensor(tensors, f"layers.{i}.attn.query", (h, t, dk, width), path),
                    _tensor(tensors, f"layers.{i}.attn.key", (h, t, dk, width), path),
                    _tensor(tensors, f"layers.{i}.attn.value", (h, dv, width), path),
                    _tensor(tensors, f"layers.{i}.attn.output", (h, width, dv), path),
                )
            if spec["activation"]:
                hidden, act = spec["hidden"], spec["activation"]
                rows = 2 * hidden if act == "bilinear" else hidden
                ffn = FFN(
                    act,
                    _tensor(tensors, f"layers.{i}.ffn.w_in", (rows, width), path),
                    _tensor(tensors, f"layers.{i}.ffn.b_in", (rows,), path),
                    _tensor(tensors, f"layers.{i}.ffn.w_out", (width, hidden), path),
                    _tensor(tensors, f"layers.{i}.ffn.b_out", (width,), path),
                )
        except KeyError as e:
            raise ValueError(f"{path}: layer {i} spec lacks {e.args[0]!r}") from None
        layers.append(EncoderLayer(attn, ffn))
    expected = {"pos_table", "readout"}
    for i, layer in enumerate(layers):
        if layer.attn is not None:
            expected |= {f"layers.{i}.attn.{n}" for n in ("query", "key", "value", "output")}
        if layer.ffn is not None:
            expected |= {f"layers.{i}.ffn.{n}" for n in ("w_in", "b_in", "w_out", "b_out")}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"{path}: tensors not described by the metadata: {extra}")
    encoder = Encoder(slots, pos_table, readout, layers)
    encoder.layout = layout
    module = meta["usim.module"]
    return encoder, layout, module.get("kind", "Encoder"), module.get("args", {})


def load(path, execution: str = "fast"):
    """Rebuild the saved construction from the file alone (no constructor is re-run); execution
    is "fast" or "dense" (see ``usim.Encoder.execution``)."""
    from usim.ops.base import REGISTRY

    encoder, layout, kind, args = load_encoder(path)
    encoder.execution = execution
    if kind == "Encoder":
        return encoder
    if kind not in REGISTRY:
        raise ValueError(f"{path}: unknown module kind {kind!r} (known: {sorted(REGISTRY)})")
    return REGISTRY[kind].from_parts(encoder, layout, args, execution)
