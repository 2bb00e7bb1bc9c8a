"""Seeded fuzz of checkpoint loading: damaged or altered files never load.

Small checkpoints (constructions and a bare encoder) are damaged in many ways: truncation, bit
flips in the tensor bodies, in the header and in its length, every metadata entry replaced by
each JSON type (null, booleans, numbers huge and negative, strings, arrays, objects, deep
nesting, invalid JSON) or removed, structured edits of every metadata key (kind, arguments,
layout blocks, slot names, layer specs, activations), tensors swapped, removed, added, reshaped,
retyped (F64 -> I64, ...), a NaN or infinite weight, edited weights, readout, positional entries
and slots. Every edit is tried with the digest left as it was and, for a registered construction,
with the digest computed again (as a deliberate editor would): each must raise ValueError from
``usim.load``, ``usim.Encoder.load`` and ``usim.checkpoint.load_encoder`` (never another
exception, never a module). The seed comes from the test id (tests/helpers.py), so a failure names a reproducible case.
"""

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import usim
from usim.checkpoint import digest, load_encoder

LOADERS = {"usim.load": usim.load, "usim.Encoder.load": usim.Encoder.load, "load_encoder": load_encoder}
JSON_VALUES = ["null", "true", "false", "0", "-1", "1e999", "-1e999", "3.5", "9" * 5000, "-" + "9" * 400, '"text"',
               '""', "[]", "{}", "[[]]", '{"a": 1}', "[" * 100_000 + "]" * 100_000,
               '{"a":' * 20_000 + "1" + "}" * 20_000, "not json", "NaN", "Infinity", "", "[1, 2", '{"kind": }']


def modules():
    """(name, module) of the checkpoints fuzzed; the last is a bare encoder (no registered kind)."""
    return [("transpose", usim.Transpose(2, 3)), ("softmax", usim.Softmax(2, 3)), ("inverse", usim.Inverse(2)),
            ("bare", usim.MaxMin(2, 2).encoder)]


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), load_file(str(path))


def write(path, tensors, metadata):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


class Cases:
    """Damaged files by category; ``run`` checks a seeded sample of each: a ValueError from every
    loader, nothing else. Edits that change nothing (flattening a 1-D tensor, ...) are skipped."""

    def __init__(self, directory):
        self.directory = directory
        self.cases = {}  # category -> [(what, write)]
        self.count = 0
        self.failures = []

    def add(self, category: str, what: str, write_file) -> None:
        self.cases.setdefault(category, []).append((what, write_file))

    def raw(self, category: str, what: str, data: bytes) -> None:
        self.add(category, what, lambda path: path.write_bytes(data))

    def edited(self, category: str, what: str, tensors, metadata, original, registered: bool,
               redigest: bool = True) -> None:
        """The edit with the stale digest, and (registered constructions) digested again."""
        if _same(tensors, original[1]) and metadata == original[0]:
            return
        self.add(category + ", stale digest", what, lambda path: write(path, tensors, metadata))
        if registered and redigest and "usim.digest" in metadata and "usim.digest" not in what:
            fresh = {**metadata, "usim.digest": digest(tensors, metadata)}
            self.add(category + ", digest recomputed", what, lambda path: write(path, tensors, fresh))

    def run(self, rng, per_category: int) -> None:
        path = self.directory / "case.safetensors"
        for category in sorted(self.cases):
            items = self.cases[category]
            for what, write_file in rng.sample(items, min(per_category, len(items))):
                write_file(path)
                self.count += 1
                for name, loader in LOADERS.items():
                    try:
                        loaded = loader(path)
                    except ValueError:
                        continue
                    except Exception as e:  # noqa: BLE001 - any other exception is the failure reported
                        self.failures.append(f"{category}: {what}: {name} raised {type(e).__name__}: {str(e)[:200]}")
                    else:
                        self.failures.append(f"{category}: {what}: {name} loaded it ({type(loaded).__name__})")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(a[k], b[k]) for k in a)


def damage_bytes(cases, rng, name, data: bytes) -> None:
    header = struct.unpack("<Q", data[:8])[0]
    for cut in sorted({0, 1, 7, 8, 9, 8 + header // 2, 8 + header, len(data) - 1,
                       *(rng.randrange(1, len(data)) for _ in range(4))}):
        cases.raw("truncated", f"{name}: truncated to {cut} bytes", data[:cut])
    regions = {"header length": (0, 8), "header": (8, 8 + header), "tensor body": (8 + header, len(data))}
    for region, (lo, hi) in regions.items():
        for _ in range(24):
            pos, bit = rng.randrange(lo, hi), rng.randrange(8)
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            cases.raw(f"bit flip in the {region}", f"{name}: bit {bit} of byte {pos}", bytes(flipped))


def damage_metadata(cases, name, tensors, meta, registered) -> None:
    original = (meta, tensors)

    def edit(category, what, key, value, redigest=True):
        text = value if isinstance(value, str) and category.endswith("JSON") else json.dumps(value)
        cases.edited(category, f"{name}: {key} {what}", tensors, {**meta, key: text}, original, registered, redigest)

    for key in list(meta):
        cases.edited(f"{key} removed", f"{name}", tensors, {k: v for k, v in meta.items() if k != key},
                     original, registered)
        values = JSON_VALUES if key != "usim.format" else ["9", "", "2 ", "3", "1", "02", "null"]
        for value in values:
            edit(f"{key} replaced by other JSON", f"= {value[:30]!r}", key, value)
    module = json.loads(meta["usim.module"])
    kind, args = module["kind"], module["args"]
    for what, value in [("as a list", [kind, args]), ("without kind", {"args": args}),
                        ("without args", {"kind": kind}), ("with an extra key", {**module, "x": 1}),
                        ("kind null", {**module, "kind": None}), ("kind a number", {**module, "kind": 3}),
                        ("args a list", {**module, "args": [1, 2]}), ("args null", {**module, "args": None})]:
        edit("usim.module of the wrong shape", what, "usim.module", value)
    for other in ("Transpose", "ReLU", "MaxMin", "Softmax", "Inverse", "Determinant"):
        if other != kind:
            edit("kind edited", f"kind {other}", "usim.module", {"kind": other, "args": args})
    # Digested again, these would be the truth: a bare encoder (a kind this usim does not know is
    # run as the bare encoder it is by usim.Encoder.load; usim.load refuses it).
    for other in ("Encoder", "Nope"):
        if other != kind:
            edit("kind edited", f"kind {other}", "usim.module", {"kind": other, "args": {}}, redigest=False)
    for arg, value in args.items():
        numeric = isinstance(value, int) and not isinstance(value, bool)
        for new in ((value + 1, value - 1) if numeric else (1,)) + (0, -1, 2.5, str(value), None, [value], True,
                                                                    10 ** 30, {"v": value}):
            edit("argument edited", f"args[{arg!r}] = {new!r}", "usim.module", {"kind": kind, "args": {**args, arg: new}})
        edit("argument edited", f"without {arg!r}", "usim.module",
             {"kind": kind, "args": {k: v for k, v in args.items() if k != arg}})
    if args:
        edit("argument edited", "an extra argument", "usim.module", {"kind": kind, "args": {**args, "extra": 1}})
        edit("argument edited", "execution as an argument", "usim.module",
             {"kind": kind, "args": {**args, "execution": "nope"}})

    layout = json.loads(meta["usim.layout"])
    edits = [("blocks reversed", layout[::-1]), ("a block dropped", layout[1:]),
             ("a block added", layout + [{"name": "extra", "shape": [1], "role": "scratch"}]),
             ("a block twice", layout + layout[:1])]
    for i, block in enumerate(layout):
        for key, new in (("shape", block["shape"][::-1] if len(set(block["shape"])) > 1 else [block["shape"][0] + 1]),
                         ("shape", [0]), ("shape", []), ("shape", [2.0]), ("shape", [True]), ("shape", "2"),
                         ("shape", [10 ** 20]), ("role", "input" if block["role"] != "input" else "output"),
                         ("role", "nope"), ("name", block["name"] + "x"), ("name", 3), ("name", "")):
            edited = [dict(b) for b in layout]
            edited[i][key] = new
            edits.append((f"block {i} {key} = {new!r}", edited))
        edits.append((f"block {i} without role", [{k: v for k, v in b.items() if k != "role" or j != i}
                                                  for j, b in enumerate(layout)]))
        edits.append((f"block {i} a list", [list(b.values()) if j == i else b for j, b in enumerate(layout)]))
    for what, value in edits:
        edit("layout edited", what, "usim.layout", value)

    slots = json.loads(meta["usim.slots"])
    i, j = slots.index("value"), slots.index("one")
    swapped = list(slots)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    edit("slot names swapped", "value and one", "usim.slots", swapped)
    edit("slot names swapped", "the last two", "usim.slots", slots[:-2] + slots[:-3:-1])
    for what, value in [("one dropped", slots[:-1]), ("one added", slots + ["extra"]), ("a name twice", slots[:-1] + slots[:1]),
                        ("value renamed", ["val" if s == "value" else s for s in slots]), ("a number", slots[:-1] + [3]),
                        ("a null", slots[:-1] + [None])]:
        edit("slot names edited", what, "usim.slots", value)

    layers = json.loads(meta["usim.layers"])
    edits = [("a layer dropped", layers[1:]), ("a layer twice", layers + layers[-1:]), ("layers reversed", layers[::-1]),
             ("a layer null", [None] + layers[1:]), ("a layer a list", [list(layers[0].values())] + layers[1:])]
    for what, value in edits:
        edit("layer list edited", what, "usim.layers", value)
    swap = {"exp": "reciprocal", "reciprocal": "exp", "relu": "identity", "identity": "relu", "bilinear": "relu"}
    for i, spec in enumerate(layers):
        if spec["activation"] is not None:
            edited = [dict(s) for s in layers]
            edited[i]["activation"] = swap[spec["activation"]]
            edit("activation names swapped", f"layer {i}: {spec['activation']} -> {swap[spec['activation']]}",
                 "usim.layers", edited)
        changes = [("activation", "tanh"), ("activation", 3), ("heads", spec["heads"] + 1), ("heads", -1),
                   ("heads", True), ("heads", 2.0), ("heads", None), ("tiers", spec["tiers"] + 1),
                   ("hidden", spec["hidden"] + 1), ("hidden", "1"), ("reads", spec["reads"][:-1]),
                   ("reads", spec["reads"] + ["nope"]), ("reads", "value"), ("writes", spec["writes"][::-1] + ["value"]),
                   ("writes", None), ("extra", 1)]
        if spec["heads"]:
            changes += [("d_k", spec["d_k"] + 1), ("d_v", spec["d_v"] + 1), ("d_k", 0)]
        for key, new in changes:
            edited = [dict(s) for s in layers]
            edited[i][key] = new
            edit("layer spec edited", f"layer {i} {key} = {new!r}", "usim.layers", edited)
        for key in ("heads", "activation", "reads"):
            edit("layer spec edited", f"layer {i} without {key}", "usim.layers",
                 [{k: v for k, v in s.items() if k != key or j != i} for j, s in enumerate(layers)])


def damage_tensors(cases, rng, name, tensors, meta, registered) -> None:
    original = (meta, tensors)
    names = sorted(tensors)

    def edit(category, what, edited):
        cases.edited(category, f"{name}: {what}", edited, meta, original, registered)

    top = len(json.loads(meta["usim.slots"]))
    for n in names:
        t = tensors[n]
        edit("tensor removed", n, {k: v for k, v in tensors.items() if k != n})
        edit("tensor reshaped", f"{n} flattened", {**tensors, n: t.reshape(-1)})
        edit("tensor reshaped", f"{n} with an extra row", {**tensors, n: torch.cat([t, t[:1]])})
        for dtype in (torch.int64, torch.float32, torch.float64, torch.int32):
            if t.dtype != dtype:
                edit("dtype changed", f"{n} as {dtype}", {**tensors, n: t.to(dtype)})
        if not t.numel():
            continue
        i = rng.randrange(t.numel())
        flat = t.reshape(-1)

        def put(value):
            return {**tensors, n: flat.clone().index_fill_(0, torch.tensor([i]), value).reshape(t.shape)}

        if t.is_floating_point():
            for value in (float("nan"), float("inf"), -float("inf")):
                edit("NaN or infinite weight", f"{n}[{i}] = {value}", put(value))
            for value in (flat[i].item() + 1.0, -flat[i].item() - 0.5, flat[i].item() * (1 + 2 ** -52)):
                edit("weight edited", f"{n}[{i}] = {value}", put(value))
        else:
            category = {"readout": "readout edited", "positional": "positional entry edited"}.get(n, "positional slots edited")
            for value in {int(flat[i]) + 1, int(flat[i]) - 1, -1, top, 2 ** 31 - 1}:
                edit(category, f"{n}[{i}] = {value}", put(value))
    for a in names:
        for b in names:
            if a < b and tensors[a].shape == tensors[b].shape and tensors[a].dtype == tensors[b].dtype:
                edit("tensors swapped", f"{a} and {b}", {**tensors, a: tensors[b], b: tensors[a]})
    edit("tensors swapped", "positional rows reversed", {**tensors, "positional": tensors["positional"].flip(0)})
    edit("tensors swapped", "positional slots reversed", {**tensors, "positional_slots": tensors["positional_slots"].flip(0)})
    first = next(n for n in names if n.startswith("layers."))
    edit("tensor added", "an extra layer tensor", {**tensors, "layers.99.attn.query": tensors[first]})
    edit("tensor added", "a dense pos_table", {**tensors, "pos_table": torch.zeros(2, 2, dtype=torch.float64)})


def test_fuzz_damaged_checkpoints_never_load(seed, tmp_path):
    rng = random.Random(seed)
    cases = Cases(tmp_path)
    for name, module in modules():
        path = tmp_path / f"{name}.safetensors"
        usim.save(module, path)
        usim.load(path)  # the intact file loads
        registered = name != "bare"
        meta, tensors = read(path)
        damage_bytes(cases, rng, name, path.read_bytes())
        damage_metadata(cases, name, tensors, meta, registered)
        damage_tensors(cases, rng, name, tensors, meta, registered)
    assert len({c.split(",")[0] for c in cases.cases}) >= 20  # kinds of damage
    cases.run(rng, per_category=8)
    assert cases.count >= 300
    assert not cases.failures, f"seed {seed}: {len(cases.failures)} of {cases.count} damaged files:\n" + "\n".join(cases.failures[:40])


def test_fuzz_edited_weights_load_unverified(tmp_path):
    """verify=False is the way to load weights edited on purpose (and only valid ones)."""
    op = usim.Transpose(2, 3)
    path = tmp_path / "t.safetensors"
    usim.save(op, path)
    meta, tensors = read(path)
    tensors["layers.0.attn.value"] = tensors["layers.0.attn.value"] * 3
    write(path, tensors, meta)
    with pytest.raises(ValueError, match="altered or damaged"):
        usim.load(path)
    x = torch.randn(2, 3)
    assert torch.equal(usim.load(path, verify=False)(x), 3 * x.T)
    tensors["layers.0.attn.value"][0, 0, 0] = float("nan")
    write(path, tensors, meta)
    with pytest.raises(ValueError, match="NaN"):
        usim.load(path, verify=False)
