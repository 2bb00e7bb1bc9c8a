import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import usim
from usim.checkpoint import REGENERATE, checkpoint_tensors, digest


@pytest.fixture
def saved(tmp_path):
    op = usim.Transpose(3, 5)
    path = tmp_path / "t.safetensors"
    usim.save(op, path)
    return op, path


def test_round_trip_bitwise(seed, saved):
    op, path = saved
    loaded = usim.load(path)
    assert isinstance(loaded, usim.Transpose) and loaded.args == {"n": 3, "m": 5}
    assert loaded.layout == op.layout and loaded.encoder.slots == op.encoder.slots
    for name, t in op.encoder.state_dict().items():
        assert torch.equal(t, loaded.encoder.state_dict()[name]), name
    x = torch.randn(4, 3, 5)
    assert torch.equal(loaded(x), op(x)), seed


def test_bare_encoder_runs_any_checkpoint(seed, saved):
    op, path = saved
    encoder = usim.Encoder.load(path)
    assert type(encoder) is usim.Encoder
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    assert torch.equal(op.layout.unpack(encoder(op.layout.pack(x))), x.transpose(-1, -2)), seed
    assert encoder.layout == op.layout


def test_metadata_describes_layers(saved):
    _, path = saved
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["usim.format"] == "2" and meta["usim.digest"].startswith("sha256:")
    assert json.loads(meta["usim.module"]) == {"kind": "Transpose", "args": {"n": 3, "m": 5}}
    (layer,) = json.loads(meta["usim.layers"])
    assert layer["heads"] == 1 and layer["activation"] is None and layer["writes"] == ["result"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        usim.load(tmp_path / "nope.safetensors")


def test_truncated_file(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        usim.load(bad)
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated or damaged"):
        usim.Encoder.load(bad)


def test_safetensors_without_usim_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="without usim metadata"):
        usim.load(path)


def rewrite(path, out, tensors=None, redigest=False, **meta_changes):
    """Copy a checkpoint with some tensors or metadata entries replaced; the digest is kept (so it
    no longer matches) unless redigest, which recomputes it as an editor would."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    tensors = tensors if tensors is not None else load_file(str(path))
    if redigest:
        meta["usim.digest"] = digest(tensors, meta)
    save_file(tensors, str(out), metadata=meta)


def test_unknown_format_version(saved, tmp_path):
    _, path = saved
    rewrite(path, tmp_path / "v9.safetensors", **{"usim.format": "9"})
    with pytest.raises(ValueError, match="unknown usim format version '9'"):
        usim.load(tmp_path / "v9.safetensors")


def test_shape_disagrees_with_metadata(saved, tmp_path):
    _, path = saved
    tensors = load_file(str(path))
    tensors["layers.0.attn.value"] = torch.zeros(1, 2, 3, dtype=torch.float64)
    rewrite(path, tmp_path / "shape.safetensors", tensors)
    with pytest.raises(ValueError, match="'layers.0.attn.value' has shape"):
        usim.load(tmp_path / "shape.safetensors")
    tensors = load_file(str(path))
    del tensors["positional"]
    rewrite(path, tmp_path / "missing.safetensors", tensors)
    with pytest.raises(ValueError, match="'positional' is missing"):
        usim.load(tmp_path / "missing.safetensors")


def test_unknown_kind_and_bad_json(saved, tmp_path):
    _, path = saved
    rewrite(path, tmp_path / "kind.safetensors", **{"usim.module": json.dumps({"kind": "Nope", "args": {}})})
    with pytest.raises(ValueError, match="unknown module kind 'Nope'"):
        usim.load(tmp_path / "kind.safetensors")
    rewrite(path, tmp_path / "json.safetensors", **{"usim.layers": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        usim.load(tmp_path / "json.safetensors")


def test_save_rejects_other_modules(tmp_path):
    with pytest.raises(TypeError, match="cannot save"):
        usim.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_digest_detects_edits(saved, tmp_path):
    """One weight changed: the stored digest no longer matches; digested again, the file still
    differs from a fresh Transpose(3, 5); verify=False loads it, as edited."""
    op, path = saved
    tensors = load_file(str(path))
    tensors["layers.0.attn.value"] = tensors["layers.0.attn.value"] * 2
    bad = tmp_path / "edited.safetensors"
    rewrite(path, bad, tensors)
    for loader in (usim.load, usim.Encoder.load, lambda p: usim.checkpoint.load_encoder(p)):
        with pytest.raises(ValueError, match="altered or damaged"):
            loader(bad)
    rewrite(path, bad, tensors, redigest=True)
    with pytest.raises(ValueError, match=r"differs from a fresh Transpose\(n=3, m=5\): tensor 'layers.0.attn.value'"):
        usim.load(bad)
    with pytest.raises(ValueError, match="differs from a fresh"):
        usim.Encoder.load(bad)
    edited = usim.load(bad, verify=False)
    x = torch.randn(3, 5)
    assert torch.equal(edited(x), 2 * x.T)
    assert torch.equal(usim.Encoder.load(bad, verify=False).layers[0].attn.value, tensors["layers.0.attn.value"])
    assert torch.equal(usim.checkpoint.load_encoder(bad, verify=False)[0].readout, op.encoder.readout)


def test_lies_with_a_fresh_digest(tmp_path):
    """Edits an editor digests again: the kind, the slot names, the activations; each differs from
    a fresh construction of the kind the file names."""
    op = usim.Softmax(2, 3)
    path = tmp_path / "s.safetensors"
    usim.save(op, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    slots = json.loads(meta["usim.slots"])
    i, j = slots.index("value"), slots.index("one")
    slots[i], slots[j] = slots[j], slots[i]
    layers = json.loads(meta["usim.layers"])
    swapped = [{**spec, "activation": {"exp": "reciprocal", "reciprocal": "exp"}.get(spec["activation"], spec["activation"])}
               for spec in layers]
    edits = {
        "kind": {"usim.module": json.dumps({"kind": "ReLU", "args": {"n": 2, "m": 3}})},
        "args": {"usim.module": json.dumps({"kind": "Softmax", "args": {"n": 3, "m": 2}})},
        "slots": {"usim.slots": json.dumps(slots)},
        "activations": {"usim.layers": json.dumps(swapped)},
    }
    for name, change in edits.items():
        bad = tmp_path / f"{name}.safetensors"
        rewrite(path, bad, redigest=True, **change)
        with pytest.raises(ValueError, match="fresh"):
            usim.load(bad)
        rewrite(path, bad, **change)
        with pytest.raises(ValueError, match="altered or damaged|disagrees"):
            usim.load(bad)


@pytest.mark.parametrize("verify", [True, False])
def test_invalid_tensors_rejected_even_unverified(saved, tmp_path, verify):
    _, path = saved
    good = load_file(str(path))
    cases = {
        "NaN or infinite": {"layers.0.attn.value": good["layers.0.attn.value"].clone().index_fill_(1, torch.tensor([0]), float("nan"))},
        "dtype int64": {"layers.0.attn.query": good["layers.0.attn.query"].long()},
        "dtype float32": {"layers.0.attn.key": good["layers.0.attn.key"].float()},
        "readout' indexes slots": {"readout": good["readout"] + 100},
        "positional_slots' indexes slots": {"positional_slots": good["positional_slots"] - 100},
        "positional_slots' names a slot twice": {"positional_slots": good["positional_slots"][[0] * len(good["positional_slots"])]},
        "holds integers as float64": {"positional": good["positional"].double()},
        "not described": {"extra": torch.zeros(2)},
    }
    for message, change in cases.items():
        bad = tmp_path / "bad.safetensors"
        rewrite(path, bad, {**good, **change}, redigest=True)
        with pytest.raises(ValueError, match=message):
            usim.load(bad, verify=verify)
        with pytest.raises(ValueError, match=message):
            usim.Encoder.load(bad, verify=verify)


def write_format_1(module, path, **meta_changes):
    """A checkpoint as usim wrote them before format 2: the dense pos_table, no digest."""
    from usim.ops.base import layer_specs

    encoder = module if isinstance(module, usim.Encoder) else module.encoder
    tensors = {k: v for k, v in checkpoint_tensors(encoder).items() if not k.startswith("positional")}
    tensors["pos_table"] = encoder.pos_table
    layout = module.layout if hasattr(module, "layout") else usim.Layout.of({"seq": (encoder.length,)}, {})
    kind, args = (module.kind, module.args) if hasattr(module, "kind") else ("Encoder", {})
    meta = {"usim.format": "1", "usim.module": json.dumps({"kind": kind, "args": args}),
            "usim.layout": json.dumps(layout.to_dict()), "usim.slots": json.dumps(encoder.slots),
            "usim.layers": json.dumps(layer_specs(encoder)), **meta_changes}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def test_format_1_still_loads(seed, tmp_path):
    """Format 1 files load (the dense table made compact), checked against a fresh construction;
    one that cannot be checked asks to be regenerated or loaded with verify=False."""
    op = usim.Inverse(3)
    path = tmp_path / "old.safetensors"
    write_format_1(op, path)
    loaded = usim.load(path)
    for name, t in op.encoder.state_dict().items():
        assert torch.equal(t, loaded.encoder.state_dict()[name]), name
    a = torch.randn(3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    assert torch.equal(loaded(a), op(a)), seed
    assert torch.equal(usim.Encoder.load(path).positional, op.encoder.positional)
    tensors = load_file(str(path))
    tensors["pos_table"][0, 3] += 1
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=json_meta(path))
    for verify in (True, False):  # positional features are the layout's, not weights to edit
        with pytest.raises(ValueError, match="'pos_table' differs"):
            usim.load(tmp_path / "edited.safetensors", verify=verify)
    bare = tmp_path / "bare.safetensors"
    write_format_1(op.encoder, bare)
    with pytest.raises(ValueError, match="format 1.*" + re.escape(REGENERATE)):
        usim.Encoder.load(bare)
    assert torch.equal(usim.Encoder.load(bare, verify=False).positional, op.encoder.positional)


def json_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_bare_encoder_checkpoint(tmp_path):
    """A bare encoder (no registered kind) is covered by the digest alone."""
    encoder = usim.Transpose(2, 3).encoder
    path = tmp_path / "bare.safetensors"
    usim.save(encoder, path)
    loaded = usim.load(path)
    assert type(loaded) is usim.Encoder and torch.equal(loaded.positional, encoder.positional)
    tensors = load_file(str(path))
    tensors["readout"][0] = 1
    rewrite(path, tmp_path / "edited.safetensors", tensors)
    with pytest.raises(ValueError, match="altered or damaged"):
        usim.Encoder.load(tmp_path / "edited.safetensors")


def test_save_rejects_nan(tmp_path):
    op = usim.Transpose(2, 2)
    op.encoder.layers[0].attn.value[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        usim.save(op, tmp_path / "nan.safetensors")


def _edits(path) -> dict:
    """Edits that leave every tensor well-formed but the file inconsistent with its kind: message -> change."""
    meta, tensors = json_meta(path), load_file(str(path))
    module, layout = json.loads(meta["usim.module"]), json.loads(meta["usim.layout"])
    readout = "readout_blocks" if "readout_blocks" in tensors else "readout"
    other = tensors[readout].clone()
    outputs = [i for i, b in enumerate(layout) if b["role"] == "output"]
    if readout == "readout_blocks":  # the first output block reads the slot another block reads, then slot 4
        other[outputs[0]] = other[outputs[-1]] if len(outputs) > 1 else 4
    else:
        other[other == other.max()] = 4
    renamed = [dict(b, name="q" if i == 0 else b["name"]) for i, b in enumerate(layout)]
    role = [dict(b, role="scratch" if i == outputs[0] else b["role"]) for i, b in enumerate(layout)]
    bigger = {k: v + 1 if k in ("n", "m") else v for k, v in module["args"].items()}
    return {
        f"tensor '{readout}' differs": ({**tensors, readout: other}, {}),
        "(usim.module args do not fit the kind 'AttentionCore'|fresh AttentionCore.*usim.module args)": (None, {"usim.module": json.dumps({**module, "kind": "AttentionCore"})}),
        "fresh ReLU.*usim.(slots|layout)": (None, {"usim.module": json.dumps({"kind": "ReLU", "args": {"n": 3, "m": 3}})}),
        "unknown \\['extra'\\]": (None, {"usim.module": json.dumps({**module, "args": {**module["args"], "extra": 1}})}),
        "(missing \\['n'\\]|usim.module: .* cannot be built)": (None, {"usim.module": json.dumps({**module, "args": {k: v for k, v in module["args"].items() if k != "n"}})}),
        "usim.layout is": (None, {"usim.module": json.dumps({**module, "args": bigger})}),
        "usim.layout is Layout\\(q": (None, {"usim.layout": json.dumps(renamed)}),
        "usim.layout is .*:scratch": (None, {"usim.layout": json.dumps(role)}),
    }


@pytest.mark.parametrize("kind", ["Softmax", "UniversalSimulator"])
def test_unverified_loads_refuse_a_layout_or_kind_the_constructor_does_not_make(seed, tmp_path, kind):
    """verify=False trusts edited weights, never a kind, arguments, layout or readout that disagree
    with the constructor: a ValueError naming the field at load, never an error at forward."""
    op = usim.Softmax(3, 3) if kind == "Softmax" else usim.UniversalSimulator(3, 3)  # formats 2 and 3
    path = tmp_path / "op.safetensors"
    usim.save(op, path)
    for message, (tensors, change) in _edits(path).items():
        bad = tmp_path / "bad.safetensors"
        rewrite(path, bad, tensors, redigest=True, **change)
        for loader in (usim.load, usim.Encoder.load):
            with pytest.raises(ValueError, match=message):
                loader(bad, verify=False)
    assert usim.load(path, verify=False).layout == op.layout, seed


def test_unbuildable_files_still_read_out_written_slots(tmp_path, monkeypatch):
    """Where no fresh construction is built to compare with (too large), an output block that reads
    a slot no layer writes is refused at load."""
    op = usim.UniversalSimulator(2, 2)
    path = tmp_path / "u.safetensors"
    usim.save(op, path)
    tensors = load_file(str(path))
    unwritten = json.loads(json_meta(path)["usim.slots"]).index("row")
    tensors["readout_blocks"][op.layout.block_index("y")] = unwritten
    rewrite(path, tmp_path / "bad.safetensors", tensors, redigest=True)
    monkeypatch.setattr(usim.checkpoint, "_buildable", lambda parsed, encoder: False)
    with pytest.raises(ValueError, match="'readout_blocks' reads output block 'y' from slot.*'row'.* no layer writes"):
        usim.load(tmp_path / "bad.safetensors", verify=False)
    assert usim.load(path, verify=False).layout == op.layout
