"""usim.plot: each construction's figure renders to a valid PNG with the panels it should have, shows
what the encoder really selected and computed, and refuses sizes it cannot draw legibly."""

import math
import sys

import pytest
import torch

import usim
from usim.plot import MAX_HEAD_PANELS, MAX_LAYERS, MAX_TOKENS, example_inputs, record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

OPS = {
    "transpose": lambda: usim.Transpose(3, 4),
    "matmul": lambda: usim.MatMul(2, 3, 2),
    "softmax": lambda: usim.Softmax(3, 3),
    "relu": lambda: usim.ReLU(2, 3),
    "maxmin": lambda: usim.MaxMin(2, 4),
    "groupsort": lambda: usim.GroupSort(2, 4, 4),
    "inverse": lambda: usim.Inverse(2),
    "determinant": lambda: usim.Determinant(2),
}


def expected_op_panels(op) -> set:
    """One panel per block; per layer one per head (grouped above MAX_HEAD_PANELS) and one for its stream."""
    labels = {f"block:{b.name}" for b in op.layout.blocks}
    for i, layer in enumerate(op.encoder.layers):
        heads = layer.attn.heads if layer.attn is not None else 0
        per_panel = math.ceil(heads / MAX_HEAD_PANELS) if heads else 1
        for start in range(0, heads, per_panel):
            labels.add(f"layer{i}:heads{start}-{min(heads, start + per_panel) - 1}")
        labels.add(f"layer{i}:stream")
    return labels


def save_png(fig, path):
    fig.savefig(path, dpi=30)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return data


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_figure_is_a_png_with_every_panel(name, tmp_path):
    pytest.importorskip("matplotlib")
    op = OPS[name]()
    fig = usim.plot(op)
    labels = [ax.get_label() for ax in fig.axes]
    assert len(labels) == len(expected_op_panels(op)), labels
    assert set(labels) == expected_op_panels(op)
    save_png(fig, tmp_path / f"{name}.png")


@pytest.mark.parametrize("heads", [1, 2])
def test_u_figure_is_a_png_with_overview_and_weights_per_head(heads, tmp_path):
    pytest.importorskip("matplotlib")
    u = usim.UniversalSimulator(3, 3, heads=heads)
    fig = usim.plot(u)
    labels = [ax.get_label() for ax in fig.axes]
    expected = {"overview", "x", "y:U", "y:torch"}
    expected |= {f"head{h}:{what}" for h in range(heads) for what in ("U", "torch", "difference")}
    assert len(labels) == 1 + 3 + 3 * heads and set(labels) == expected
    save_png(fig, tmp_path / "u.png")


def test_u_figure_shows_the_simulated_weights_beside_torch(seed):
    pytest.importorskip("matplotlib")
    u = usim.UniversalSimulator(2, 3, heads=1)
    x, a, v = torch.randn(2, 3), torch.randn(1, 3, 3), torch.randn(1, 3, 3)
    mask = torch.tensor([False, True])
    fig = usim.plot(u, x, a, v, key_padding_mask=mask)
    axes = {ax.get_label(): ax for ax in fig.axes}
    simulated = torch.as_tensor(axes["head0:U"].images[0].get_array())
    direct = torch.as_tensor(axes["head0:torch"].images[0].get_array())
    expected = torch.softmax((x @ a[0] @ x.T).masked_fill(mask, float("-inf")), -1).double()
    torch.testing.assert_close(direct, expected, msg=f"seed {seed}")
    torch.testing.assert_close(simulated, direct, atol=1e-6, rtol=0, msg=f"seed {seed}")
    assert (direct[:, 1] == 0).all(), "the masked key has weight 0"


def test_u_with_ffn_sublayer():
    pytest.importorskip("matplotlib")
    u = usim.UniversalSimulator(2, 2, heads=1, ffn_hidden=3)
    fig = usim.plot(u)
    axes = {ax.get_label(): ax for ax in fig.axes}
    simulated = torch.as_tensor(axes["y:U"].images[0].get_array())
    direct = torch.as_tensor(axes["y:torch"].images[0].get_array())
    torch.testing.assert_close(simulated, direct, atol=1e-5, rtol=0)


def test_u_overview_says_what_each_layer_computes():
    pytest.importorskip("matplotlib")
    u = usim.UniversalSimulator(2, 2, heads=1)
    fig = usim.plot(u)
    table = next(ax for ax in fig.axes if ax.get_label() == "overview").tables[0]
    rows = {}
    for (row, col), cell in table.get_celld().items():
        rows.setdefault(row, {})[col] = cell.get_text().get_text()
    assert len(rows) == 1 + u.depth  # the header, then a row per layer
    computes = " ".join(rows[r][3] for r in range(1, u.depth + 1))
    for stage in ("X·A_h", "softmax(S_h)", "Y = Σ_h P_h·(X·V_h)"):
        assert stage in computes, computes


def test_factored_u_figure():
    pytest.importorskip("matplotlib")
    import inspect

    if "head_dim" not in inspect.signature(usim.UniversalSimulator).parameters:
        pytest.skip("this U has no factored form")
    u = usim.UniversalSimulator(2, 3, heads=2, head_dim=2)
    fig = usim.plot(u)
    axes = {ax.get_label(): ax for ax in fig.axes}
    assert len(axes) == 1 + 3 + 3 * 2
    simulated = torch.as_tensor(axes["y:U"].images[0].get_array())
    direct = torch.as_tensor(axes["y:torch"].images[0].get_array())
    torch.testing.assert_close(simulated, direct, atol=1e-5, rtol=0)


def test_trace_sees_what_each_head_selects():
    """Transpose: output token (i, j) selects input token (j, i) and nothing else."""
    op = usim.Transpose(2, 3)
    x = torch.arange(6.0).reshape(2, 3)
    trace = record(op, lambda: op(x))
    pattern = trace.patterns[0][0]  # (L, L) of the one head
    ys, xs = op.layout.span("y"), op.layout.span("x")
    for i in range(3):
        for j in range(2):
            query = ys[i * 2 + j]
            assert pattern[query].nonzero().flatten().tolist() == [xs[j * 3 + i]]
    assert torch.equal(trace.sequence[xs.start: xs.stop], x.flatten().double())
    assert torch.equal(trace.output[ys.start: ys.stop], x.T.flatten().double())
    assert trace.streams[0].shape == (op.layout.length, op.encoder.stream_width)


def test_given_inputs_are_drawn_with_the_encoders_result():
    pytest.importorskip("matplotlib")
    op = usim.MatMul(2, 2, 2)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    fig = usim.plot(op, a, b)
    axes = {ax.get_label(): ax for ax in fig.axes}
    shown = sorted(t.get_text() for t in axes["block:y"].texts)
    assert shown == sorted(f"{v:.2f}" for v in (a @ b).flatten().tolist())
    assert sorted(t.get_text() for t in axes["block:a"].texts) == sorted(f"{v:.2f}" for v in a.flatten().tolist())


def test_batched_inputs_draw_their_first_item():
    pytest.importorskip("matplotlib")
    op = usim.ReLU(2, 2)
    x = torch.tensor([[[-1.0, 2.0], [3.0, -4.0]], [[9.0, 9.0], [9.0, 9.0]]])
    fig = usim.plot(op, x)
    axes = {ax.get_label(): ax for ax in fig.axes}
    assert sorted(t.get_text() for t in axes["block:y"].texts) == ["0.00", "0.00", "2.00", "3.00"]


def test_many_heads_are_grouped_into_few_panels():
    pytest.importorskip("matplotlib")
    op = usim.MatMul(2, 6, 2)  # 12 heads in its one layer
    fig = usim.plot(op)
    heads = [ax.get_label() for ax in fig.axes if ":heads" in ax.get_label()]
    assert len(heads) <= MAX_HEAD_PANELS and heads == ["layer0:heads0-1", "layer0:heads2-3", "layer0:heads4-5",
                                                       "layer0:heads6-7", "layer0:heads8-9", "layer0:heads10-11"]


def test_too_many_tokens_is_refused_with_the_sizes():
    pytest.importorskip("matplotlib")
    op = usim.MatMul(7, 7, 7)
    assert op.layout.length > MAX_TOKENS
    with pytest.raises(ValueError, match=rf"{op.layout.length} tokens.*at most {MAX_TOKENS}"):
        usim.plot(op)


def test_deep_encoders_need_a_choice_of_layers():
    pytest.importorskip("matplotlib")
    op = usim.Inverse(5)
    assert op.depth > MAX_LAYERS
    with pytest.raises(ValueError, match=rf"{op.depth} layers.*layers="):
        usim.plot(op)
    fig = usim.plot(op, layers=[0, 2])
    layers = {ax.get_label().split(":")[0] for ax in fig.axes if not ax.get_label().startswith("block")}
    assert layers == {"layer0", "layer2"}
    with pytest.raises(ValueError, match="out of range"):
        usim.plot(op, layers=[op.depth])
    with pytest.raises(TypeError, match="ints"):
        usim.plot(op, layers=["1"])


def test_large_u_is_refused():
    pytest.importorskip("matplotlib")
    u = usim.UniversalSimulator(2, 2, heads=5)
    with pytest.raises(ValueError, match="heads = 5"):
        usim.plot(u)


def test_not_a_construction_is_a_type_error():
    with pytest.raises(TypeError, match="Linear"):
        usim.plot(torch.nn.Linear(2, 2))


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[plot\]'"):
        usim.plot(usim.Transpose(2, 2))


def test_example_inputs_fit_every_op():
    for make in OPS.values():
        op = make()
        arrays, keywords = example_inputs(op)
        assert [tuple(a.shape) for a in arrays] == [b.shape for b in op.layout.inputs] and keywords == {}
    arrays, _ = example_inputs(usim.Inverse(3))
    assert torch.linalg.det(arrays[0]).abs() > 1
    u = usim.UniversalSimulator(2, 3, heads=2)
    (x, a, v), keywords = example_inputs(u)
    assert x.shape == (2, 3) and a.shape == v.shape == (2, 3, 3) and keywords == {}


def test_u_titles_fit_and_labels_come_from_the_slots_each_layer_writes(tmp_path):
    """The heading wraps to the figure's width (none cut off), and every layer's label names what
    that layer of the encoder writes (the factored form's weight multiplier included)."""
    pytest.importorskip("matplotlib")
    from usim.ops.base import layer_specs
    from usim.plot import U_STEPS, _u_computes

    u = usim.UniversalSimulator(3, 3, head_dim=2)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = usim.plot(u)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig._suptitle.get_window_extent(canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox)
    for factored, module in ((True, u), (False, usim.UniversalSimulator(2, 2))):
        for spec in layer_specs(module.encoder):
            label = _u_computes(spec, factored)
            for slot in spec["writes"]:
                step = slot.partition(".")[2].rstrip("0123456789")
                assert not step or U_STEPS.get(step, slot) in label, (slot, label)
    multiply = next(spec for spec in layer_specs(u.encoder) if "p.pd" in spec["writes"])
    assert "weight multiplier" in _u_computes(multiply, True)
