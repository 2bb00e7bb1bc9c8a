"""Tracr interoperation: every program of Tracr's compiler/lib.py, converted by from_tracr and compiled,
equals Tracr's own rasp.evaluate on 200 random inputs (categorical equal, numerical within 1e-6).

Tracr's lib is loaded from the installed package by file path: ``from tracr.compiler import lib``
would import Tracr's JAX compiler through the package's __init__. The vocabularies and lengths are
those of Tracr's compiler/test_cases.py (itself importing that package), some at 10 tokens, where
Tracr's compiled models are no longer exact.
"""

import importlib.util
import os

import pytest
from helpers import same_outputs, seeded

import usim.rasp as ur

tracr = pytest.importorskip("tracr", reason="the [tracr] extra is not installed")
rasp = pytest.importorskip("tracr.rasp.rasp")


def tracr_lib():
    path = os.path.join(os.path.dirname(tracr.__file__), "compiler", "lib.py")
    spec = importlib.util.spec_from_file_location("tracr_compiler_lib", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lib = tracr_lib()
# name: (program, vocab, max_seq_len, distinct tokens)
CASES = {
    "length": (lambda n: lib.make_length(), list("abcd"), 10, False),
    "length_numerical": (lambda n: rasp.numerical(lib.make_length()), list("abcd"), 10, False),
    "reverse": (lambda n: lib.make_reverse(rasp.tokens), list("abcd"), 10, False),
    "hist": (lambda n: lib.make_hist(), list("abcd"), 8, False),
    "sort_unique": (lambda n: lib.make_sort_unique(rasp.tokens, rasp.tokens), [1, 2, 3, 4, 5, 6], 5, True),
    "sort": (lambda n: lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=n, min_key=1), [1, 2, 3, 4], 5, False),
    "sort_freq": (lambda n: lib.make_sort_freq(max_seq_len=n), [1, 2, 3, 4], 5, False),
    "frac_prevs": (lambda n: lib.make_frac_prevs(rasp.tokens == "("), list("abc()"), 10, False),
    "pair_balance": (lambda n: lib.make_pair_balance(rasp.tokens, "(", ")"), list("abc()"), 10, False),
    "shuffle_dyck2": (lambda n: lib.make_shuffle_dyck(["()", "{}"]), list("(){}"), 6, False),
    "shift_by": (lambda n: lib.shift_by(2, rasp.tokens), list("abcd"), 5, False),
    "detect_pattern": (lambda n: lib.detect_pattern(rasp.tokens, "abc"), list("abc"), 6, False),
    "count_less_freq": (lambda n: lib.make_count_less_freq(2), list("abcd"), 6, False),
    "count": (lambda n: lib.make_count(rasp.tokens, "a"), list("abc"), 8, False),
    "nary_sequencemap": (lambda n: lib.make_nary_sequencemap(lambda x, y, z: x + y - z, rasp.tokens,
                                                             rasp.tokens, rasp.indices), [1, 2, 3], 5, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lib_program_matches_tracr_evaluate(name):
    make, vocab, max_seq_len, distinct = CASES[name]
    program = make(max_seq_len)
    module = ur.compile(ur.from_tracr(program), vocab, max_seq_len)
    rng = seeded(name)
    by_length = {}
    for _ in range(200):
        n = rng.randint(1, min(max_seq_len, len(vocab)) if distinct else max_seq_len)
        by_length.setdefault(n, []).append(rng.sample(vocab, n) if distinct else [rng.choice(vocab) for _ in range(n)])
    for n, batch in sorted(by_length.items()):
        for xs, got in zip(batch, module(batch)):
            want = rasp.evaluate(program, xs)
            assert same_outputs(want, got, rasp.is_numerical(program)), (name, xs, want, got)


def test_tracr_test_inputs():
    # a few of Tracr's own test inputs and expected outputs (compiler/test_cases.py)
    frac = ur.compile(ur.from_tracr(lib.make_frac_prevs(rasp.tokens == "l")), list("helo"), 5)
    assert frac(list("hello")) == pytest.approx([0.0, 0.0, 1 / 3, 1 / 2, 2 / 5], rel=1e-6)
    dyck = ur.compile(ur.from_tracr(lib.make_shuffle_dyck(["()", "{}", "[]"])), list("(){}[]"), 6)
    assert dyck(list("({)[}]")) == [1] * 6 and dyck(list("(){)}")) == [0] * 5
    freq = ur.compile(ur.from_tracr(lib.make_sort_freq(max_seq_len=5)), [1, 2, 3, 4], 5)
    assert freq([2, 4, 2, 1]) == [2, 2, 4, 1]


def test_composite_selector_and_names_survive():
    sel = rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.LT) | \
        rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.GT)
    program = rasp.SelectorWidth(sel).named("either")  # Tracr cannot compile an | of selectors
    ours = ur.from_tracr(program)
    assert ours.name == "either"
    module = ur.compile(ours, [1, 2, 3], 6)
    for xs in ([3, 1, 2], [1, 1, 2, 3, 3, 1]):
        assert module(xs) == rasp.evaluate(program, xs)


def test_constant_selector_is_refused():
    program = rasp.SelectorWidth(rasp.ConstantSelector([[True]]))
    with pytest.raises(ValueError, match="ConstantSelector"):
        ur.from_tracr(program)


def test_benchmark_script_runs(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "rasp.py"
    done = subprocess.run([sys.executable, str(script), "--lengths", "5", "--programs", "hist", "reverse",
                           "--repeats", "2", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(script.parents[1])})
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "rasp.json").read_text())["rows"]
    assert [r["program"] for r in rows] == ["reverse", "hist"] and all(r["call_ms"] > 0 for r in rows)
    assert "| reverse | 5 |" in (tmp_path / "rasp.md").read_text()
