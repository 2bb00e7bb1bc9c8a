"""The checkpoints in checkpoints/: each equals a fresh construction bitwise and computes its op."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import usim
from usim.checkpoint import CLOSED_FORM_VERSION, FORMAT_VERSION, checkpoint_tensors
from usim.export import shipped

ROOT = Path(__file__).resolve().parents[1] / "checkpoints"


def test_every_shipped_file_is_listed_and_present():
    assert sorted(p.stem for p in ROOT.glob("*.safetensors")) == sorted(shipped())


@pytest.mark.parametrize("stem", sorted(shipped()))
def test_equals_fresh_construction(stem):
    path = ROOT / f"{stem}.safetensors"
    fresh = shipped()[stem]()
    tensors = load_file(str(path))
    expected = checkpoint_tensors(fresh.encoder)
    assert sorted(tensors) == sorted(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    # format 3 where the positional features are in closed form (U), else format 2 (a table)
    assert meta["usim.format"] == (CLOSED_FORM_VERSION if "positional_pieces" in expected else FORMAT_VERSION)
    assert ("positional_pieces" in expected) == stem.startswith("universal_")
    assert json.loads(meta["usim.module"]) == {"kind": fresh.kind, "args": fresh.args}
    assert json.loads(meta["usim.slots"]) == fresh.encoder.slots


def run_bare(path, *arrays):
    module = usim.load(path)
    encoder = usim.Encoder.load(path)
    batch_shape = module.layout.batch_shape(*arrays)
    return module, module.layout.unpack(encoder(module.layout.pack(*arrays)), batch_shape)


def test_ops_through_bare_encoder(seed):
    x, y = torch.randn(3, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, dtype=torch.float64)
    _, out = run_bare(ROOT / "transpose_4x4.safetensors", x)
    assert torch.equal(out, x.transpose(-1, -2)), seed
    _, out = run_bare(ROOT / "relu_4x4.safetensors", x)
    assert torch.equal(out, torch.relu(x)), seed
    _, out = run_bare(ROOT / "maxmin_4x4.safetensors", x)
    pairs = x.unflatten(-1, (2, 2))
    assert torch.equal(out, torch.stack([pairs.amax(-1), pairs.amin(-1)], -1).flatten(-2)), seed
    _, out = run_bare(ROOT / "groupsort_4x4_g4.safetensors", x)
    assert torch.equal(out, x.sort(-1, descending=True).values), seed
    _, out = run_bare(ROOT / "matmul_4x4x4.safetensors", x, y)
    torch.testing.assert_close(out, x @ y, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
    _, out = run_bare(ROOT / "softmax_4x4.safetensors", x)
    torch.testing.assert_close(out, torch.softmax(x, -1), rtol=1e-12, atol=1e-14, msg=f"seed {seed}")
    well = x + 4 * torch.eye(4, dtype=torch.float64)
    _, out = run_bare(ROOT / "inverse_4.safetensors", well)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, torch.linalg.inv(well), rtol=1e-10, atol=1e-10, msg=f"seed {seed}")
    module = usim.load(ROOT / "determinant_4.safetensors")
    torch.testing.assert_close(module(well), torch.linalg.det(well), rtol=1e-10, atol=1e-10, msg=f"seed {seed}")


@pytest.mark.parametrize("n, d, heads", [(3, 3, 1), (4, 4, 2), (8, 5, 2)])
def test_universal_file_through_bare_encoder(seed, n, d, heads):
    """The one (A, V) file runs every size: the layout of (n, d, heads) over the file's weights, in
    the bare encoder, gives softmax(x a x^T) x v summed over heads."""
    from usim.ops.simulator import _builder

    module = usim.load(ROOT / "universal_av.safetensors")
    encoder = usim.Encoder.load(ROOT / "universal_av.safetensors")
    b, layout = _builder("av", (n, d, heads, None))
    x = torch.randn(n, d, dtype=torch.float64)
    a, v = torch.randn(heads, d, d, dtype=torch.float64) / d, torch.randn(heads, d, d, dtype=torch.float64)
    seq = layout.pack(x, *a, *v, torch.zeros(n, dtype=torch.float64))  # no key ignored
    y = layout.unpack(encoder(seq, b.frame()))[0][0]  # the output y of the one packed sequence
    scores = torch.einsum("id,hde,je->hij", x, a, x)
    reference = (torch.softmax(scores, -1) @ (x @ v)).sum(0)
    torch.testing.assert_close(y, reference, rtol=1e-10, atol=1e-10, msg=f"seed {seed}")
    assert torch.equal(module(x, a, v), y), seed
