"""usim.rasp.paper: the paper's constructions written in RASP agree with torch, and compile to the
hand constructions' shapes where RASP can say the same thing."""

import zlib

import pytest
import torch
from helpers import ulp_floor

import usim
import usim.rasp.paper as paper


def draw(name, *shape):
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}{shape}".encode()))
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def cofactor_ref(a):
    return torch.linalg.det(a)[..., None, None] * torch.linalg.inv(a).transpose(-1, -2)


def shifted(name, n):
    return draw(name, 6, n, n) + n * torch.eye(n, dtype=torch.float64)  # well away from singular


def maxmin_ref(a):
    return torch.stack([torch.maximum(a[..., ::2], a[..., 1::2]), torch.minimum(a[..., ::2], a[..., 1::2])],
                       -1).flatten(-2)


CASES = [
    ("transpose", lambda: [draw("t", 6, 3, 4)], lambda a: a.transpose(-1, -2), 1),
    ("matmul", lambda: [draw("a", 6, 3, 4), draw("b", 6, 4, 2)], torch.matmul, 1),
    ("relu", lambda: [draw("r", 6, 3, 4)], torch.relu, 1),
    ("maxmin", lambda: [draw("m", 6, 3, 4)], maxmin_ref, 2),  # b + relu(a - b): two roundings
    ("softmax", lambda: [draw("s", 6, 3, 5) * 3], lambda a: torch.softmax(a, -1), 1),
    *[("determinant", lambda n=n: [shifted("d", n)], lambda a: torch.linalg.det(a)[..., None], 1) for n in (1, 2, 3, 4)],
    *[("cofactor", lambda n=n: [shifted("c", n)], cofactor_ref, 1) for n in (2, 3, 4)],
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_listing_agrees_with_torch(case):
    name, inputs, ref_fn, ulps = CASES[case]
    xs = inputs()
    ref = ref_fn(*xs)
    ours32 = paper.run(name, *[x.float() for x in xs])
    assert ours32.dtype == torch.float32 and ours32.shape == ref.shape
    err = (ours32.double() - ref).abs().max().item()
    torch_err = (ref_fn(*[x.float() for x in xs]).double() - ref).abs().max().item()
    assert err <= 10 * torch_err + ulps * ulp_floor(ref, torch.float32), (name, err, torch_err)
    ours64 = paper.run(name, *xs)
    assert (ours64 - ref).abs().max().item() <= 1e-12 * ref.abs().max().item(), name


def test_shapes_beside_the_hand_constructions():
    # one head per fetch, as Transpose and MatMul: the same depth and width
    assert (paper.compiled("transpose", 3, 4).depth, paper.compiled("transpose", 3, 4).width) == (1, 1)
    assert (paper.compiled("matmul", 2, 3, 2).depth, paper.compiled("matmul", 2, 3, 2).width) == \
        (usim.MatMul(2, 3, 2).depth, usim.MatMul(2, 3, 2).width)
    assert paper.compiled("softmax", 2, 3).depth == usim.Softmax(2, 3).depth
    for name, sizes in (("transpose", (3, 4)), ("matmul", (2, 3, 2)), ("cofactor", (3,))):
        # every fetch is an affine selection: the structured execution runs it (strided views)
        assert paper.compiled(name, *sizes).encoder.structured(torch.float32, None) is not None, name
    with pytest.raises(ValueError, match="n <= 4"):
        paper.determinant(5)
    with pytest.raises(ValueError, match="shapes"):
        paper.run("matmul", torch.ones(2, 3), torch.ones(2, 2))
