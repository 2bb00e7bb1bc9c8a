"""usim.rasp.compile: every construct exact against usim.rasp.evaluate, including what Tracr refuses."""

import math

import pytest
import torch
from helpers import same_outputs, seeded

import usim
import usim.rasp as r
from usim.rasp import Aggregate, Comparison, Map, Select, SelectorWidth, SequenceMap, indices, numerical, tokens


def agree(program, vocab, max_seq_len, name, trials=60, causal=False, dtype=torch.float32, lengths=None):
    """Compile, run random inputs batched per length, compare with the interpreter; the module."""
    module = r.compile(program, vocab, max_seq_len, causal=causal, dtype=dtype)
    rng = seeded(name)
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    for n in lengths or sorted({rng.randint(1, max_seq_len) for _ in range(3)} | {max_seq_len}):
        batch = [[rng.choice(vocab) for _ in range(n)] for _ in range(max(1, trials // 4))]
        got = module(batch)
        for xs, out in zip(batch, got):
            want = r.evaluate(program, xs, causal=causal)
            assert same_outputs(want, out, r.is_numerical(program), rel), (name, xs, want, out)
    return module


x = numerical(Map(float, tokens))
prev_mean = numerical(Aggregate(Select(indices, indices, Comparison.LT), x, default=0)).named("prev_mean")


def test_mean_of_previous_values_times_token_tracr_refuses():
    # a numerical Aggregate of arbitrary reals, then x * y: neither compiles in Tracr
    program = numerical(SequenceMap(lambda a, b: a * b, prev_mean, x)).named("prev_mean_times_x")
    for dtype in (torch.float32, torch.float64):
        agree(program, [1, 2.5, -3, 7], 8, "prev_mean_times_x", dtype=dtype)


def test_numerical_aggregate_any_width_is_the_exact_mean():
    program = numerical(Aggregate(Select(tokens, tokens, Comparison.LEQ), x, default=0.5)).named("mean_leq")
    agree(program, [0.1, -2.0, 3.0, 1e3], 10, "mean_leq")


def test_numerical_map_exact_on_its_value_set():
    cubic = numerical(Map(lambda v: v ** 3 - 2 * v, prev_mean)).named("cubic")  # Tracr: off by up to 100%
    agree(cubic, [0, 1, 2, 5], 6, "cubic", dtype=torch.float64)
    step = Map(lambda v: v > 1.5, prev_mean).named("above")  # numerical -> categorical
    agree(step, [0, 1, 2, 5], 6, "above")


def test_numerical_function_maps_any_real():
    program = numerical(Map(r.relu, numerical(tokens))).named("relu")
    m = r.compile(program, None, 5)
    assert m([-1.5, 2.25, 0.0]) == [0.0, 2.25, 0.0]
    recip = numerical(Map(r.reciprocal, numerical(tokens)))
    assert r.compile(recip, None, 4)([4.0, -0.5]) == [0.25, -2.0]


def test_composite_selectors():
    a, b = Select(tokens, tokens, Comparison.LT), Select(indices, indices, Comparison.GT)
    for sel, name in ((a | b, "or"), (a & ~b, "and_not"), (~(a | b), "nor"), ((a & b) | ~a, "mixed")):
        agree(SelectorWidth(sel).named(name), [1, 2, 3], 6, name)


def test_select_on_numerical_sops_with_eq():
    doubled = numerical(Map(lambda v: 2 * v, prev_mean))
    same = Select(doubled, doubled, Comparison.EQ)
    agree(SelectorWidth(same).named("same_prev_mean"), [0, 1, 3], 6, "same_prev_mean")


def test_selector_width_exact_to_512():
    program = SelectorWidth(Select(tokens, tokens, Comparison.LEQ)).named("rank")
    m = r.compile(program, [0, 1, 2], 512)
    rng = seeded("rank512")
    xs = [rng.choice([0, 1, 2]) for _ in range(512)]
    assert m(xs) == r.evaluate(program, xs)


def test_causal_mode_masks_every_selector():
    program = numerical(Aggregate(Select(tokens, tokens, Comparison.TRUE), x, default=0)).named("prefix_mean")
    agree(program, [1, 2, 4], 7, "causal_prefix_mean", causal=True)
    width = SelectorWidth(Select(tokens, tokens, Comparison.EQ)).named("causal_hist")
    agree(width, list("ab"), 7, "causal_hist", causal=True)


def test_categorical_outputs_are_exact_values_and_none():
    ratio = SequenceMap(lambda a, b: a * b / 3, tokens, indices).named("ratio")
    m = agree(ratio, [1, 2, 4], 5, "ratio")
    assert m([4, 1])[0] == 0.0 and m([1, 4])[1] == 4 / 3  # the Python value, not a float32 decoding
    shifted = Aggregate(Select(indices, indices, lambda k, q: q == k + 1), tokens).named("shift")
    assert r.compile(shifted, list("ab"), 4)(list("abba")) == [None, "a", "b", "b"]


def test_batch_dtype_bos_and_executions():
    program = SelectorWidth(Select(tokens, tokens, Comparison.EQ)).named("hist")
    m = r.compile(program, list("abc"), 6, dtype=torch.float64)
    batch = [list("abca"), list("ccca")]
    fast = m(batch)
    m.execution = "dense"
    assert m(batch) == fast == [r.evaluate(program, xs) for xs in batch]
    assert len(m(list("abcabc"))) == 6  # BOS is never returned
    assert m.encoder.layers[0].ffn.w_in.dtype == torch.float64


def test_describe_save_load(tmp_path):
    program = numerical(SequenceMap(lambda a, b: a * b, prev_mean, x)).named("prev_mean_times_x")
    m = r.compile(program, [1, 2, 3], 5)
    text = m.describe()
    assert "prev_mean" in text and "SequenceMap" in text and f"depth {m.depth}" in text
    usim.save(m, tmp_path / "p.safetensors")
    loaded = usim.load(tmp_path / "p.safetensors")
    assert loaded([3, 1, 2]) == m([3, 1, 2]) == r.evaluate(program, [3, 1, 2])
    assert loaded.describe() == text


def test_plot():
    pytest.importorskip("matplotlib")
    m = r.compile(SelectorWidth(Select(tokens, tokens, Comparison.EQ)), list("ab"), 4)
    assert len(usim.plot(m).axes) > 2 and len(usim.plot(m, list("abba")).axes) > 2


def test_errors_name_the_node():
    with pytest.raises(ValueError, match="inverse.*raises ZeroDivisionError.*0"):
        r.compile(Map(lambda v: 1 / v, tokens).named("inverse"), [0, 1, 2], 4)
    with pytest.raises(ValueError, match="cube.*unbounded"):
        r.compile(numerical(Map(lambda v: v ** 3, numerical(tokens))).named("cube"), None, 4)
    m = r.compile(Aggregate(Select(tokens, tokens, Comparison.TRUE), tokens).named("avg"), [1, 2], 4)
    with pytest.raises(ValueError, match="avg.*several different values"):
        r.evaluate(m and Aggregate(Select(tokens, tokens, Comparison.TRUE), tokens).named("avg"), [1, 2])
    with pytest.raises(ValueError, match="not one value"):
        m([1, 2, 2, 2])  # a mean of 1, 2, 2, 2 is no value of the categorical SOp
    with pytest.raises(ValueError, match="1..4"):
        m([1] * 5)
    with pytest.raises(ValueError, match="not in the vocab"):
        m([1, 3])
    with pytest.raises(ValueError, match="equal-length"):
        m([[1], [1, 2]])
    assert math.isclose(r.compile(numerical(Map(float, tokens)), [1, 2], 3)([2, 1])[0], 2.0)
