import pytest
import torch

from usim.layout import Block, Layout


@pytest.mark.parametrize("shapes", [{"v": (5,)}, {"a": (2, 3), "b": (3, 1)}, {"t": (2, 3, 4), "s": (1,)}])
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_round_trip(seed, shapes, batch):
    layout = Layout.of(inputs=shapes, outputs={})
    arrays = [torch.randn(*batch, *s, dtype=torch.float64) for s in shapes.values()]
    seq = layout.pack(*arrays)
    assert seq.shape == (torch.Size(batch).numel(), layout.length)
    assert layout.length == sum(torch.Size(s).numel() for s in shapes.values())
    back = layout.unpack(seq, batch, blocks=list(shapes))
    back = back if isinstance(back, tuple) else (back,)
    for a, r in zip(arrays, back):
        assert torch.equal(a, r), seed


def test_row_major_order():
    layout = Layout.of(inputs={"a": (2, 3), "b": (2,)}, outputs={"c": (1, 2)})
    a = torch.arange(6.0).reshape(2, 3)
    seq = layout.pack(a, torch.tensor([6.0, 7.0]))
    assert seq.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 0, 0]]
    assert layout.length == 10 and list(layout.span("c")) == [8, 9]
    assert layout.coords("a").tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    seq[0, 8:] = torch.tensor([8.0, 9.0])
    assert layout.unpack(seq[0]).tolist() == [[8.0, 9.0]]


def test_batch_shapes_broadcast():
    layout = Layout.of(inputs={"x": (2, 2), "w": (2, 2)}, outputs={})
    seq = layout.pack(torch.ones(3, 2, 2), torch.eye(2))
    assert seq.shape == (3, 8)
    assert torch.equal(seq[:, 4:], torch.eye(2).reshape(1, 4).expand(3, 4))


def test_errors_name_the_block():
    layout = Layout.of(inputs={"x": (2, 3), "w": (3, 3)}, outputs={"y": (2, 3)})
    with pytest.raises(ValueError, match=r"block 'w': expected shape \(\.\.\., 3, 3\), got \(3, 2\)"):
        layout.pack(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="expected 2 arrays"):
        layout.pack(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="block 'x': dtype"):
        layout.pack(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="one dtype"):
        layout.pack(torch.zeros(2, 3), torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="broadcast"):
        layout.pack(torch.zeros(4, 2, 3), torch.zeros(5, 3, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layout.pack([[0.0] * 3] * 2, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="length"):
        layout.unpack(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="unique"):
        Layout([Block("a", (1,)), Block("a", (2,))])
    with pytest.raises(ValueError, match=">= 1"):
        Layout([Block("a", (0, 2))])


def test_serialisation_round_trip():
    layout = Layout.of(inputs={"x": (2, 3)}, outputs={"y": (3, 2)}, scratch={"s": (4,)})
    assert Layout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="malformed"):
        Layout.from_dict([{"name": "x"}])


def test_inputs_that_are_not_tensors():
    """Lists, numpy arrays, meta and sparse tensors: TypeError / ValueError naming the block."""
    import numpy as np

    layout = Layout.of(inputs={"x": (2, 3)}, outputs={"y": (3, 2)})
    with pytest.raises(TypeError, match=r"block 'x' must be a torch.Tensor, got list \(convert it with torch.as_tensor\)"):
        layout.batch_shape([[0.0] * 3] * 2)
    with pytest.raises(TypeError, match="block 'x' must be a torch.Tensor, got numpy.ndarray"):
        layout.pack(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="block 'x' must be a tensor with values, got one on the meta device"):
        layout.batch_shape(torch.empty(2, 3, device="meta"))
    with pytest.raises(ValueError, match="block 'x' must be a dense"):
        layout.batch_shape(torch.zeros(2, 3).to_sparse())


@pytest.mark.parametrize("data", [None, 3, "x", {}, [], [None], [[1, 2]], [{"name": "x"}],
                                  [{"name": "x", "shape": [2], "role": "input", "extra": 1}],
                                  [{"name": 3, "shape": [2], "role": "input"}],
                                  [{"name": "x", "shape": 2, "role": "input"}],
                                  [{"name": "x", "shape": [], "role": "input"}],
                                  [{"name": "x", "shape": [2.0], "role": "input"}],
                                  [{"name": "x", "shape": [True], "role": "input"}],
                                  [{"name": "x", "shape": [0], "role": "input"}],
                                  [{"name": "x", "shape": [10 ** 30], "role": "input"}],
                                  [{"name": "x", "shape": [2 ** 21, 2 ** 21], "role": "input"}],
                                  [{"name": "x", "shape": [2], "role": "nope"}],
                                  [{"name": "x", "shape": [2], "role": None}],
                                  [{"name": "x", "shape": [2], "role": "input"}] * 2])
def test_from_dict_rejects_malformed(data):
    with pytest.raises(ValueError, match="layout metadata is malformed"):
        Layout.from_dict(data)
