import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import usim


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
    assert meta["usim.format"] == "1"
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


def rewrite(path, out, tensors=None, **meta_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(tensors if tensors is not None else load_file(str(path)), str(out), metadata=meta)


def test_unknown_format_version(saved, tmp_path):
    _, path = saved
    rewrite(path, tmp_path / "v9.safetensors", **{"usim.format": "9"})
    with pytest.raises(ValueError, match="unknown usim format version '9'"):
        usim.load(tmp_path / "v9.safetensors")


def test_shape_disagrees_with_metadata(saved, tmp_path):
    _, path = saved
    tensors = load_file(str(path))
    tensors["layers.0.attn.value"] = torch.zeros(1, 2, 3)
    rewrite(path, tmp_path / "shape.safetensors", tensors)
    with pytest.raises(ValueError, match="'layers.0.attn.value' has shape"):
        usim.load(tmp_path / "shape.safetensors")
    tensors = load_file(str(path))
    del tensors["pos_table"]
    rewrite(path, tmp_path / "missing.safetensors", tensors)
    with pytest.raises(ValueError, match="'pos_table' is missing"):
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
