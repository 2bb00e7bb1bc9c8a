"""safetensors checkpoints: every weight and table as a tensor, everything else as JSON metadata.

Format "2". Tensors: ``positional`` (P, L) int32 (the positional table: one row per positional
slot, for the slots it sets; float64 only for a bare encoder whose table holds non-integers),
``positional_slots`` (P,) int64 (the slot of each row), ``readout`` (L,) int64, and per layer
``layers.{i}.attn.{query,key,value,output}`` and ``layers.{i}.ffn.{w_in,b_in,w_out,b_out}``, float64.
Metadata: ``usim.format`` ("2"), ``usim.module`` (kind and constructor arguments), ``usim.layout``
(blocks), ``usim.slots`` (stream slot names in order), ``usim.layers`` (per-layer specs: heads,
tiers, activation, hidden size, slots read and written) and ``usim.digest``: SHA-256 over every
tensor (name, dtype, shape and bytes, in sorted name order) and every other metadata entry. No
pickle.

Loading checks, in order, and raises ValueError saying what is wrong: the file parses; every
metadata entry is JSON of the right shape and types (naming the key); the tensors are exactly
those the metadata describes, with its shapes, the right dtypes, finite values and indexes in
range; the per-layer specs agree with the weights; for a registered kind, the recorded arguments
fit its constructor, and everything but the weights' values (usim.layout, usim.slots,
usim.layers, the positional features and the readout) equals a fresh construction's where one is
cheap to build (``_buildable``), or else every output block reads out a slot some layer writes
(all of this also with ``verify=False``); then, unless ``verify=False``: the digest matches and the
weights equal the fresh construction's bitwise (so a file edited and digested again still cannot
pass for the construction it names). ``verify=False`` is for files whose weights were edited on
purpose. Format "1" files (a dense ``pos_table``, no digest) still load: converted to the compact
table, verified against a fresh construction, or with ``verify=False``.

Format "3": an encoder whose positional features are in closed form (``usim.positions``: U, the
drop-ins, the layers) keeps them so, never as a per-token table: ``positional_slots`` (P,) int64
(the positional slots, in order), ``positional_pieces`` (K, 4 + 3 D) int64, a row per piece: slot,
block, const, square (0/1), then lo, hi and coefficients per axis (D = the most axes of a block;
missing axes lo 0, hi 1, coefficient 0), and ``readout_blocks`` (blocks,) int64 (the slot read in
each block), in place of ``positional`` and ``readout``. Everything else is format 2's. An encoder
with a positional table is written in format 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from usim.activations import ACTIVATIONS
from usim.engine import FFN, Encoder, EncoderLayer, HardAttention
from usim.layout import Layout
from usim.positions import Piece, Positions

FORMAT_VERSION = "2"  # "3" for closed-form positions (see the module docstring)
CLOSED_FORM_VERSION = "3"
READABLE_FORMATS = ("1", "2", "3")
REGENERATE = "python -m usim export checkpoints/"
# A registered construction is rebuilt and compared on load when L x W is at most this.
CHEAP_REBUILD = 1 << 22
DIGEST = "usim.digest"
META_KEYS = ("usim.module", "usim.layout", "usim.slots", "usim.layers")
ATTN = ("query", "key", "value", "output")
FFN_TENSORS = ("w_in", "b_in", "w_out", "b_out")
SPEC_KEYS = {"heads", "tiers", "d_k", "d_v", "activation", "hidden", "reads", "writes"}
# Bounds on sizes read from metadata (before any tensor is trusted).
MAX_SIZE = 1 << 40
MAX_ARG_DEPTH = 4


# --- saving ------------------------------------------------------------------------------------
def checkpoint_tensors(encoder: Encoder) -> dict:
    """The tensors a format-2 checkpoint holds for an encoder, by name (CPU, contiguous)."""
    if _closed_form(encoder):
        tensors = {"positional_slots": torch.tensor(encoder.positions.slots, dtype=torch.long),
                   "positional_pieces": _pieces_tensor(encoder.positions),
                   "readout_blocks": encoder.readout_blocks.detach().long()}
    else:
        positional = encoder.positional.detach()
        if positional.dtype != torch.int32:
            positional = positional.double()
        tensors = {"positional": positional, "positional_slots": encoder.positional_slots.detach().long(),
                   "readout": encoder.readout.detach().long()}
    for i, layer in enumerate(encoder.layers):
        if layer.attn is not None:
            for name in ATTN:
                tensors[f"layers.{i}.attn.{name}"] = getattr(layer.attn, name).detach().double()
        if layer.ffn is not None:
            for name in FFN_TENSORS:
                tensors[f"layers.{i}.ffn.{name}"] = getattr(layer.ffn, name).detach().double()
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


def _closed_form(encoder: Encoder) -> bool:
    """Whether an encoder is written in format 3 (positional features and readout per block)."""
    return encoder.positions.closed_form and hasattr(encoder, "readout_blocks")


def _pieces_tensor(positions: Positions) -> torch.Tensor:
    """(K, 4 + 3 D) int64: slot, block, const, square, lo (D), hi (D), coefficients (D) per piece."""
    dims = max(len(shape) for shape in positions.shapes)
    rows = []
    for slot in positions.slots:
        for p in positions.pieces[slot]:
            pad = dims - len(p.lo)
            rows.append([slot, p.block, p.const, int(p.square), *p.lo, *([0] * pad), *p.hi, *([1] * pad),
                         *p.coef, *([0] * pad)])
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), 4 + 3 * dims)


def _pieces(tensors: dict, layout: Layout, width: int, path: str) -> Positions:
    """The closed-form positions of a format-3 file, every entry checked (ValueError naming it)."""
    slots = _tensor(tensors, "positional_slots", None, (torch.int64,), path)
    rows = _tensor(tensors, "positional_pieces", None, (torch.int64,), path)
    shapes = [b.shape for b in layout.blocks]
    dims = max(len(shape) for shape in shapes)
    if slots.dim() != 1 or rows.dim() != 2 or rows.shape[1] != 4 + 3 * dims:
        raise ValueError(f"{path}: tensors 'positional_slots' {tuple(slots.shape)} and 'positional_pieces' "
                         f"{tuple(rows.shape)} must be (P,) and (K, {4 + 3 * dims})")
    _index(slots, "positional_slots", width, path)
    if len(set(slots.tolist())) != len(slots):
        raise ValueError(f"{path}: tensor 'positional_slots' names a slot twice")
    pieces = {int(s): [] for s in slots}
    for row in rows.tolist():
        slot, block, const, square = row[:4]
        if slot not in pieces or not 0 <= block < len(shapes) or square not in (0, 1) or abs(const) >= 2 ** 40:
            raise ValueError(f"{path}: tensor 'positional_pieces' has a bad row {row[:4]} (slot, block, const, square)")
        nd = len(shapes[block])
        lo, hi, coef = row[4: 4 + nd], row[4 + dims: 4 + dims + nd], row[4 + 2 * dims: 4 + 2 * dims + nd]
        if any(abs(c) >= 2 ** 20 for c in coef) or row[4 + nd: 4 + dims] != [0] * (dims - nd) or \
                row[4 + dims + nd: 4 + 2 * dims] != [1] * (dims - nd) or row[4 + 2 * dims + nd:] != [0] * (dims - nd):
            raise ValueError(f"{path}: tensor 'positional_pieces' has a bad row {row}")
        pieces[slot].append(Piece(block, tuple(lo), tuple(hi), const, tuple(coef), bool(square)))
    try:
        return Positions(shapes, pieces)
    except ValueError as e:
        raise ValueError(f"{path}: tensor 'positional_pieces': {e}") from None


def digest(tensors: dict, metadata: dict) -> str:
    """"sha256:<hex>" over the tensors (sorted by name: name, dtype, shape, bytes) and the metadata
    entries other than the digest itself (sorted by key)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        head = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape), len(data)])
        h.update(len(head).to_bytes(8, "little") + head.encode())
        h.update(data)
    for key in sorted(k for k in metadata if k != DIGEST):
        entry = json.dumps([key, metadata[key]])
        h.update(len(entry).to_bytes(8, "little") + entry.encode())
    return "sha256:" + h.hexdigest()


def save(module, path) -> None:
    """Write a construction (or a bare ``usim.Encoder``, with its ``layout`` attribute if set) to ``path``."""
    from usim.ops.base import Construction, layer_specs

    from usim.mha import SimulatedMultiheadAttention

    if isinstance(module, SimulatedMultiheadAttention):
        return _save_drop_in(module, path)
    if isinstance(module, Construction):
        encoder, layout, kind, args = module.encoder, module.layout, module.kind, module.args
    elif isinstance(module, Encoder):
        encoder, layout, kind, args = module, getattr(module, "layout", None), "Encoder", {}
        if layout is None:  # the blocks of its positions (closed form), else one sequence
            shapes = module.positions.shapes if _closed_form(module) else [(module.length,)]
            layout = Layout.from_dict([{"name": f"block{i}" if len(shapes) > 1 else "seq", "shape": list(shape),
                                        "role": "input"} for i, shape in enumerate(shapes)])
    else:
        raise TypeError(f"cannot save a {type(module).__name__}: expected a usim construction or Encoder")
    tensors = checkpoint_tensors(encoder)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"cannot save: tensor {name!r} holds NaN or infinite values")
    metadata = {
        "usim.format": CLOSED_FORM_VERSION if "positional_pieces" in tensors else FORMAT_VERSION,
        "usim.module": json.dumps({"kind": kind, "args": args}, allow_nan=False),
        "usim.layout": json.dumps(layout.to_dict()),
        "usim.slots": json.dumps(encoder.slots),
        "usim.layers": json.dumps(layer_specs(encoder)),
    }
    metadata[DIGEST] = digest(tensors, metadata)
    _write(path, tensors, metadata)


def _write(path, tensors: dict, metadata: dict) -> None:
    """The safetensors file, byte for byte the same for the same module: safetensors writes its
    metadata map in hash order, so the header is written again with the metadata keys sorted (the
    tensors' offsets do not change; the header is padded with spaces to 8 bytes, as the format says).
    OSError naming the path when it cannot be written (a directory, a missing folder)."""
    data = safetensors_bytes(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    target = os.fspath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot save to {target!r}: it is a directory (give a file name)")
    folder = os.path.dirname(target) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {target!r}: folder {folder!r} does not exist")
    with open(target, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data[8 + size:])


DROP_IN = "SimulatedMultiheadAttention"
DROP_IN_ARGS = ("embed_dim", "num_heads", "seq_len", "bias", "kdim", "vdim", "batch_first", "dropout")


def _save_drop_in(module, path) -> None:
    """A drop-in is its nn.MultiheadAttention weights (its state_dict) and its sizes: the U that
    computes it is rebuilt from the sizes, as when it was made."""
    args = {"embed_dim": module.embed_dim, "num_heads": module.num_heads, "seq_len": module.seq_len,
            "bias": module.has_bias, "kdim": module.kdim, "vdim": module.vdim, "batch_first": module.batch_first,
            "dropout": float(module.dropout)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"cannot save: tensor {name!r} holds NaN or infinite values")
    metadata = {"usim.format": FORMAT_VERSION, "usim.module": json.dumps({"kind": DROP_IN, "args": args})}
    metadata[DIGEST] = digest(tensors, metadata)
    _write(path, tensors, metadata)


def _load_drop_in(metadata: dict, tensors: dict, path: str, verify: bool, execution: str):
    from usim.mha import SimulatedMultiheadAttention

    module = _json(metadata, "usim.module", path)
    args = module.get("args") if isinstance(module, dict) else None
    if not isinstance(args, dict) or sorted(args) != sorted(DROP_IN_ARGS):
        raise ValueError(f"{path}: 'usim.module' args of a {DROP_IN} must be exactly {list(DROP_IN_ARGS)}")
    for key in ("embed_dim", "num_heads", "seq_len", "kdim", "vdim"):
        if key != "seq_len" or args[key] is not None:  # seq_len: optional (a length planned ahead)
            _int(args[key], f"{path}: 'usim.module' args.{key}", minimum=1)
    for key in ("bias", "batch_first"):
        if not isinstance(args[key], bool):
            raise ValueError(f"{path}: 'usim.module' args.{key} must be true or false, got {_short(args[key])}")
    if not isinstance(args["dropout"], (int, float)) or isinstance(args["dropout"], bool) or \
            not 0 <= args["dropout"] < 1:
        raise ValueError(f"{path}: 'usim.module' args.dropout must be a number in [0, 1), got {_short(args['dropout'])}")
    if verify:
        _verify_digest(metadata, tensors, path)
    if args["embed_dim"] % args["num_heads"]:
        raise ValueError(f"{path}: 'usim.module' args.embed_dim {args['embed_dim']} is not divisible by "
                         f"num_heads {args['num_heads']}")
    # The tensors first (with verify=False too): nothing is allocated for sizes the file does not hold.
    expected = _drop_in_shapes(args)
    dtypes = {t.dtype for t in tensors.values()}
    for name in sorted(set(expected) | set(tensors)):
        t, want = tensors.get(name), expected.get(name)
        if t is None or want is None or tuple(t.shape) != want or not t.is_floating_point():
            raise ValueError(f"{path}: tensor {name!r} {tuple(t.shape) if t is not None else '(missing)'} does not "
                             f"fit a {DROP_IN} of these sizes (expected {want if want else 'no such tensor'})")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values")
    if len(dtypes) != 1:
        raise ValueError(f"{path}: the tensors of a {DROP_IN} must share one dtype, got {sorted(map(str, dtypes))}")
    dropout = args.pop("dropout")
    try:
        drop_in = SimulatedMultiheadAttention(**args, execution=execution, dtype=dtypes.pop())
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'usim.module' args do not make a {DROP_IN}: {e}") from None
    drop_in.dropout = float(dropout)
    drop_in.load_state_dict(tensors, strict=True)
    return drop_in


def _drop_in_shapes(args: dict) -> dict:
    """The state_dict shapes of a drop-in (as nn.MultiheadAttention's) from its recorded sizes."""
    e, k, v = args["embed_dim"], args["kdim"], args["vdim"]
    shapes = {"in_proj_weight": (3 * e, e)} if k == v == e else \
        {"q_proj_weight": (e, e), "k_proj_weight": (e, k), "v_proj_weight": (e, v)}
    shapes["out_proj.weight"] = (e, e)
    if args["bias"]:
        shapes.update({"in_proj_bias": (3 * e,), "out_proj.bias": (e,)})
    return shapes


# --- reading and validating ----------------------------------------------------------------------
def _read(path):
    """(metadata, tensors) of a safetensors file; ValueError for anything unreadable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    _check_regular_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from None
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: the safetensors metadata is not a map of strings")
    if "usim.format" not in metadata:
        raise ValueError(f"{path} is a safetensors file without usim metadata")
    version = metadata["usim.format"]
    if version not in READABLE_FORMATS:
        raise ValueError(f"{path}: unknown usim format version {_short(version)} "
                         f"(this usim reads {', '.join(map(repr, READABLE_FORMATS))})")
    return metadata, tensors


def _check_regular_file(path: str) -> None:
    """A folder, a FIFO, a device or a socket is refused at once (reading a FIFO would wait forever)."""
    import stat

    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path} is a folder, not a checkpoint: give a .safetensors file in it")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file (a FIFO, device or socket): a checkpoint is a .safetensors file")


def _short(value, limit: int = 60) -> str:
    """A bounded description of a JSON value for messages (never recursing into it)."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'} of {len(value)} items"
    text = repr(value) if not isinstance(value, int) or isinstance(value, bool) or value.bit_length() < 200 \
        else f"an integer of {value.bit_length()} bits"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reject_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _json(metadata: dict, key: str, path: str):
    if key not in metadata:
        raise ValueError(f"{path}: usim metadata lacks {key!r}")
    try:
        return json.loads(metadata[key], parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"{path}: usim metadata {key!r} is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN / Infinity, integers too long to convert
        raise ValueError(f"{path}: usim metadata {key!r} is not valid JSON: {e}") from None


def _int(value, where: str, minimum: int = 0, maximum: int = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {_short(value)}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{where} must be in {minimum}..{maximum}, got {_short(value)}")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a JSON array, got {_short(value)}")
    return value


def _check_args(args, path: str) -> dict:
    """Constructor arguments: an object of names to numbers, strings, booleans, null or short
    arrays of those (at most MAX_ARG_DEPTH levels), walked without recursion."""
    if not isinstance(args, dict):
        raise ValueError(f"{path}: usim.module 'args' must be a JSON object, got {_short(args)}")
    stack = [(f"args[{k!r}]", v, 1) for k, v in args.items()]
    while stack:
        where, value, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{path}: usim.module {where} is not finite")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
            raise ValueError(f"{path}: usim.module {where} is out of range: {_short(value)}")
        if isinstance(value, list):
            if depth >= MAX_ARG_DEPTH:
                raise ValueError(f"{path}: usim.module {where} is nested too deeply")
            stack += [(f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            raise ValueError(f"{path}: usim.module {where} must not be a JSON object")
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"{path}: usim.module {where} has an unsupported type")
    return args


def _ints_in(args: dict):
    stack = list(args.values())
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack += value
        elif isinstance(value, int) and not isinstance(value, bool):
            yield value


def _parse(metadata: dict, path: str) -> dict:
    """The usim metadata, type-checked (ValueError naming the key otherwise)."""
    meta = {key: _json(metadata, key, path) for key in META_KEYS}
    module = meta["usim.module"]
    if not isinstance(module, dict):
        raise ValueError(f"{path}: usim.module must be a JSON object with 'kind' and 'args', got {_short(module)}")
    for key in ("kind", "args"):
        if key not in module:
            raise ValueError(f"{path}: usim.module lacks {key!r}")
    extra = sorted(set(module) - {"kind", "args"})
    if extra:
        raise ValueError(f"{path}: usim.module has unknown keys {[_short(k) for k in extra[:5]]}")
    kind = module["kind"]
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{path}: usim.module 'kind' must be a non-empty string, got {_short(kind)}")
    args = _check_args(module["args"], path)
    try:
        layout = Layout.from_dict(meta["usim.layout"])
    except ValueError as e:
        raise ValueError(f"{path}: usim.layout: {e}") from None
    slots = _list(meta["usim.slots"], f"{path}: usim.slots")
    for i, s in enumerate(slots):
        if not isinstance(s, str) or not s:
            raise ValueError(f"{path}: usim.slots[{i}] must be a non-empty string, got {_short(s)}")
    if len(set(slots)) != len(slots):
        raise ValueError(f"{path}: usim.slots names a slot twice")
    if "value" not in slots:
        raise ValueError(f"{path}: usim.slots lacks the 'value' slot")
    names = set(slots)
    specs = _list(meta["usim.layers"], f"{path}: usim.layers")
    for i, spec in enumerate(specs):
        where = f"{path}: usim.layers[{i}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be a JSON object, got {_short(spec)}")
        unknown = sorted(set(spec) - SPEC_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {[_short(k) for k in unknown[:5]]}")
        for key in ("heads", "tiers", "activation", "hidden", "reads", "writes"):
            if key not in spec:
                raise ValueError(f"{where} lacks {key!r}")
        heads = _int(spec["heads"], f"{where} 'heads'")
        tiers = _int(spec["tiers"], f"{where} 'tiers'")
        if heads:
            if tiers < 1:
                raise ValueError(f"{where} 'tiers' must be >= 1 for a layer with heads")
            for key in ("d_k", "d_v"):
                if key not in spec:
                    raise ValueError(f"{where} lacks {key!r}")
                _int(spec[key], f"{where} {key!r}", minimum=1)
        elif tiers or "d_k" in spec or "d_v" in spec:
            raise ValueError(f"{where} describes attention ('tiers', 'd_k', 'd_v') without heads")
        activation = spec["activation"]
        hidden = _int(spec["hidden"], f"{where} 'hidden'")
        if activation is None:
            if hidden:
                raise ValueError(f"{where} 'hidden' must be 0 without an activation")
        elif not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"{where} 'activation' must be null or one of {ACTIVATIONS}, got {_short(activation)}")
        for key in ("reads", "writes"):
            for j, s in enumerate(_list(spec[key], f"{where} {key!r}")):
                if not isinstance(s, str) or s not in names:
                    raise ValueError(f"{where} {key!r}[{j}] is not a slot name: {_short(s)}")
    return {"format": metadata["usim.format"], "kind": kind, "args": args, "layout": layout,
            "slots": slots, "specs": specs}


def _tensor(tensors, name, shape, dtypes, path):
    if name not in tensors:
        raise ValueError(f"{path}: tensor {name!r} is missing")
    t = tensors[name]
    if t.dtype not in dtypes:
        raise ValueError(f"{path}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}, expected "
                         f"{' or '.join(str(d).removeprefix('torch.') for d in dtypes)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, metadata says {tuple(shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return t


def _index(t: torch.Tensor, name: str, width: int, path: str) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= width):
        raise ValueError(f"{path}: tensor {name!r} indexes slots outside 0..{width - 1}")


def _build(parsed: dict, tensors: dict, path: str) -> Encoder:
    """The encoder the metadata and tensors describe, every tensor checked against the metadata."""
    from usim.ops.base import layer_specs

    layout, slots, specs = parsed["layout"], parsed["slots"], parsed["specs"]
    length, width = layout.length, len(slots)
    f64 = (torch.float64,)
    if parsed["format"] == "3":
        expected = {"readout_blocks", "positional_slots", "positional_pieces"}
        readout = _tensor(tensors, "readout_blocks", (len(layout.blocks),), (torch.int64,), path)
        _index(readout, "readout_blocks", width, path)
        positional, readout = _pieces(tensors, layout, width, path), readout.tolist()
    else:
        expected = {"readout"}
        readout = _tensor(tensors, "readout", (length,), (torch.int64,), path)
        _index(readout, "readout", width, path)
    if parsed["format"] == "1":
        positional = _tensor(tensors, "pos_table", (length, width), f64, path)
        expected.add("pos_table")
    elif parsed["format"] == "2":
        values = _tensor(tensors, "positional", None, (torch.int32, torch.float64), path)
        if values.dim() != 2 or values.shape[1] != length:
            raise ValueError(f"{path}: tensor 'positional' has shape {tuple(values.shape)}, expected (P, {length})")
        columns = _tensor(tensors, "positional_slots", (values.shape[0],), (torch.int64,), path)
        _index(columns, "positional_slots", width, path)
        if len(set(columns.tolist())) != len(columns):
            raise ValueError(f"{path}: tensor 'positional_slots' names a slot twice")
        if values.is_floating_point() and bool((values == values.round()).all()) and bool((values.abs() < 2 ** 31).all()):
            raise ValueError(f"{path}: tensor 'positional' holds integers as float64 (usim writes them as int32)")
        positional = (values, columns)
        expected |= {"positional", "positional_slots"}
    layers = []
    for i, spec in enumerate(specs):
        attn = ffn = None
        if spec["heads"]:
            h, t, dk, dv = spec["heads"], spec["tiers"], spec["d_k"], spec["d_v"]
            names = [f"layers.{i}.attn.{n}" for n in ATTN]
            shapes = [(h, t, dk, width), (h, t, dk, width), (h, dv, width), (h, width, dv)]
            attn = HardAttention(*[_tensor(tensors, n, s, f64, path) for n, s in zip(names, shapes)])
            expected |= set(names)
        if spec["activation"] is not None:
            hidden, act = spec["hidden"], spec["activation"]
            rows = 2 * hidden if act == "bilinear" else hidden
            names = [f"layers.{i}.ffn.{n}" for n in FFN_TENSORS]
            shapes = [(rows, width), (rows,), (width, hidden), (width,)]
            ffn = FFN(act, *[_tensor(tensors, n, s, f64, path) for n, s in zip(names, shapes)])
            expected |= set(names)
        layers.append(EncoderLayer(attn, ffn))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"{path}: tensors not described by the metadata: {extra[:10]}")
    try:
        encoder = Encoder(slots, positional, readout, layers)
    except (ValueError, TypeError, RuntimeError, IndexError) as e:
        raise ValueError(f"{path}: the tensors do not form an encoder: {e}") from None
    actual = layer_specs(encoder)
    for i, (said, found) in enumerate(zip(specs, actual)):
        if said != found:
            keys = sorted(k for k in set(said) | set(found) if said.get(k) != found.get(k))
            raise ValueError(f"{path}: usim.layers[{i}] disagrees with the weights on {keys}")
    encoder.layout = layout
    return encoder


def _verify_digest(metadata: dict, tensors: dict, path: str) -> None:
    stored = metadata.get(DIGEST)
    if stored is None:
        raise ValueError(f"{path}: usim metadata lacks {DIGEST!r} (pass verify=False to load it unverified)")
    computed = digest(tensors, metadata)
    if stored != computed:
        raise ValueError(f"{path}: the file was altered or damaged: its digest is {_short(stored, 80)}, its "
                         f"tensors and metadata give {computed} (pass verify=False to load edited weights)")


def _cheap(parsed: dict, encoder: Encoder) -> bool:
    """Whether a fresh construction is cheap to build: a small encoder, and no integer argument
    larger than the file's token count (the sizes of every construction are below it)."""
    if encoder.length * encoder.stream_width > CHEAP_REBUILD:
        return False
    return all(abs(v) <= max(encoder.length, 16) for v in _ints_in(parsed["args"]))


def _buildable(parsed: dict, encoder: Encoder) -> bool:
    """Whether a fresh construction of the recorded kind is cheap enough to build at load (to check
    the file's structure against, with verify=False too): a small encoder (``_cheap``), or closed-form
    positions (format 3: built without a per-token table) with no integer argument larger than every
    block dimension and the block count (the sizes of every construction fit its blocks)."""
    if _cheap(parsed, encoder):
        return True
    layout = parsed["layout"]
    bound = max([16, len(layout.blocks)] + [max(b.shape) for b in layout.blocks])
    return parsed["format"] == CLOSED_FORM_VERSION and all(abs(v) <= bound for v in _ints_in(parsed["args"]))


def _check_signature(parsed: dict, path: str) -> None:
    """The recorded arguments bind to the kind's constructor (no unknown argument, none missing)."""
    import inspect

    from usim.ops.base import REGISTRY

    kind, args = parsed["kind"], parsed["args"]
    signature = inspect.signature(REGISTRY[kind].__init__).parameters
    params = {k: p for k, p in signature.items()
              if k not in ("self", "execution") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    keywords = any(p.kind == p.VAR_KEYWORD for p in signature.values())  # **form: the constructor checks them
    unknown = [] if keywords else sorted(set(args) - set(params))
    missing = sorted(k for k, p in params.items() if p.default is p.empty and k not in args)
    if unknown or missing:
        raise ValueError(f"{path}: usim.module args do not fit the kind {kind!r} ({', '.join(params)}): "
                         + "; ".join(([f"unknown {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])))


def _fresh(parsed: dict, path: str):
    """A fresh construction from the recorded kind and arguments (ValueError naming usim.module)."""
    from usim.ops.base import REGISTRY

    kind, args = parsed["kind"], parsed["args"]
    try:
        fresh = REGISTRY[kind](**args)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RecursionError, MemoryError) as e:
        raise ValueError(f"{path}: usim.module: {_title(parsed)} cannot be built from the recorded arguments: {e}") from None
    if fresh.args != args:
        raise ValueError(f"{path}: differs from a fresh {_title(parsed)}: usim.module args should read "
                         f"{_short(json.dumps(fresh.args), 200)}")
    return fresh


def _title(parsed: dict) -> str:
    return f"{parsed['kind']}({', '.join(f'{k}={_short(v)}' for k, v in parsed['args'].items())})"


def _check_structure(parsed: dict, encoder: Encoder, fresh, path: str) -> None:
    """Everything but the weights' values agrees with a fresh construction: usim.layout, usim.slots,
    usim.layers, and the positional and readout tensors (ValueError naming the field)."""
    from usim.ops.base import layer_specs

    where = f"{path}: differs from a fresh {_title(parsed)}"
    if fresh.layout != parsed["layout"]:
        raise ValueError(f"{where}: usim.layout is {parsed['layout']}, the construction's is {fresh.layout}")
    if fresh.encoder.slots != parsed["slots"]:
        diff = [i for i, (a, b) in enumerate(zip(fresh.encoder.slots, parsed["slots"])) if a != b]
        raise ValueError(f"{where}: usim.slots differ" + (f" from position {diff[0]}" if diff else " in length"))
    if layer_specs(fresh.encoder) != parsed["specs"]:
        i = next((i for i, (a, b) in enumerate(zip(layer_specs(fresh.encoder), parsed["specs"])) if a != b),
                 min(len(parsed["specs"]), fresh.encoder.depth))
        raise ValueError(f"{where}: usim.layers differ at layer {i} (heads, tiers, activation or slots)")
    ours, theirs = _structure_tensors(encoder), _structure_tensors(fresh.encoder)
    if parsed["format"] == "1":  # compare the dense tables (the compact columns may be ordered otherwise)
        ours = {k: v for k, v in ours.items() if not k.startswith("positional")}
        theirs = {k: v for k, v in theirs.items() if not k.startswith("positional")}
        if not torch.equal(encoder.pos_table, fresh.encoder.pos_table):
            raise ValueError(f"{where}: tensor 'pos_table' differs")
    _compare(ours, theirs, where)


def _structure_tensors(encoder: Encoder) -> dict:
    """A checkpoint's tensors other than the layer weights: positional features and readout."""
    if _closed_form(encoder):
        return {"positional_slots": torch.tensor(encoder.positions.slots, dtype=torch.long),
                "positional_pieces": _pieces_tensor(encoder.positions),
                "readout_blocks": encoder.readout_blocks.detach().long().cpu()}
    return {k: v for k, v in checkpoint_tensors(encoder).items() if not k.startswith("layers.")}


def _compare(ours: dict, theirs: dict, where: str) -> None:
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name), theirs.get(name)
        if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            raise ValueError(f"{where}: tensor {name!r} differs")


def _check_readout_written(parsed: dict, encoder: Encoder, path: str) -> None:
    """Without a construction to compare with: every output block reads out a slot some layer writes."""
    written = {s for spec in parsed["specs"] for s in spec["writes"]}
    layout = parsed["layout"]
    for i, block in enumerate(layout.blocks):
        if block.role != "output":
            continue
        if hasattr(encoder, "readout_blocks"):
            name, slots = "readout_blocks", {int(encoder.readout_blocks[i])}
        else:
            start = layout.offsets[block.name]
            name, slots = "readout", set(encoder.readout[start: start + block.size].tolist())
        unwritten = sorted(parsed["slots"][j] for j in slots if parsed["slots"][j] not in written)
        if unwritten:
            raise ValueError(f"{path}: tensor {name!r} reads output block {block.name!r} from slot(s) {unwritten} "
                             f"that no layer writes")


def _load(path, verify: bool, known_kind: bool):
    from usim.ops.base import REGISTRY

    path = os.fspath(path)
    metadata, tensors = _read(path)
    parsed = _parse(metadata, path)
    kind = parsed["kind"]
    if known_kind and kind != "Encoder" and kind not in REGISTRY:
        raise ValueError(f"{path}: unknown module kind {_short(kind)} (known: {sorted(REGISTRY)})")
    encoder = _build(parsed, tensors, path)
    if parsed["format"] != "1" and verify:
        _verify_digest(metadata, tensors, path)
    fresh = None
    if kind in REGISTRY and getattr(REGISTRY[kind], "rebuilt_on_load", True):
        # the kind, its arguments and the layout agree (with verify=False too)
        _check_signature(parsed, path)
        if _buildable(parsed, encoder):
            fresh = _fresh(parsed, path)
            _check_structure(parsed, encoder, fresh, path)
    if fresh is None:
        _check_readout_written(parsed, encoder, path)
    if verify:
        if parsed["format"] == "1" and fresh is None:
            raise ValueError(f"{path}: a format 1 checkpoint has no digest and this one cannot be checked "
                             f"against a fresh construction: regenerate it (`{REGENERATE}` for the shipped "
                             f"ones, or usim.save) or load it with verify=False")
        if fresh is not None:  # the weights, bitwise
            where = f"{path}: differs from a fresh {_title(parsed)}"
            layers = lambda e: {k: v for k, v in checkpoint_tensors(e).items() if k.startswith("layers.")}
            _compare(layers(encoder), layers(fresh.encoder), where)
    return encoder, parsed["layout"], kind, parsed["args"]


def load_encoder(path, *, verify: bool = True):
    """(Encoder, Layout, kind, args) from a checkpoint, every tensor checked against the metadata,
    and, unless verify=False, the digest and (for a registered construction that is cheap to
    build) a fresh construction compared bitwise. ValueError says what differs. A kind this usim
    does not know still loads (as the bare encoder it is)."""
    return _load(path, verify, known_kind=False)


def load(path, execution: str | None = None, *, verify: bool = True):
    """Rebuild the saved construction from the file (verified as ``load_encoder`` says); execution
    is "fast", "fused" or "dense" (see ``usim.Encoder.execution``; default: "fused" for a drop-in,
    "fast" for the rest, as when built). ValueError for an unknown kind."""
    from usim.ops.base import REGISTRY

    metadata, tensors = _read(os.fspath(path))
    module = metadata.get("usim.module", "")
    if f'"{DROP_IN}"' in module:  # a drop-in: its MHA weights and sizes
        return _load_drop_in(metadata, tensors, os.fspath(path), verify, execution or "fused")
    execution = execution or "fast"
    encoder, layout, kind, args = _load(path, verify, known_kind=True)
    encoder.execution = execution
    if kind == "Encoder":
        return encoder
    return REGISTRY[kind].from_parts(encoder, layout, args, execution)


Encoder.reader = load_encoder  # Encoder.load reads checkpoints through this module
