"""usim.rasp's language and interpreter: Tracr's names and semantics, and each compiler pass alone."""

import pytest

import usim.rasp as r
from usim.rasp import (Aggregate, Comparison, Full, LinearSequenceMap, Map, Select, SelectorWidth, SequenceMap,
                       indices, length, numerical, tokens)
from usim.rasp.compile import nodes
from usim.rasp.lower import lower
from usim.rasp.values import value_sets


def test_primitives_maps_and_overloads():
    xs = [3, 1, 2]
    assert r.evaluate(tokens, xs) == xs and r.evaluate(indices, xs) == [0, 1, 2] and r.evaluate(length, xs) == [3] * 3
    assert r.evaluate(tokens + 1, xs) == [4, 2, 3] and r.evaluate(10 - tokens, xs) == [7, 9, 8]
    assert r.evaluate(tokens * indices, xs) == [0, 1, 4] and r.evaluate(tokens / 2, xs) == [1.5, 0.5, 1.0]
    assert r.evaluate(tokens < 2, xs) == [False, True, False] and r.evaluate(tokens == 2, xs) == [False, False, True]
    assert r.evaluate((tokens > 1) & (indices > 0), xs) == [False, False, True]
    assert r.evaluate(~(tokens > 1), xs) == [False, True, False]
    assert r.evaluate(LinearSequenceMap(tokens, indices, 2, -1), xs) == [6, 1, 2]
    assert r.evaluate(Full(7), xs) == [7, 7, 7]
    assert r.evaluate(r.ConstantSOp([1, 2, 3]), xs) == [1, 2, 3]
    simplified = Map(lambda v: v * 2, Map(lambda v: v + 1, tokens))
    assert simplified.inner is tokens and r.evaluate(simplified, xs) == [8, 4, 6]  # a Map of a Map is one Map


def test_select_is_key_first_and_aggregate_means():
    xs = [1, 2, 3]
    smaller = Select(tokens, tokens, Comparison.LT)  # predicate(key, query): key < query
    assert r.evaluate(smaller, xs) == [[False, False, False], [True, False, False], [True, True, False]]
    assert r.evaluate(SelectorWidth(smaller), xs) == [0, 1, 2]
    mean = numerical(Aggregate(smaller, numerical(tokens), default=0))
    assert r.evaluate(mean, xs) == [0, 1, 1.5]
    assert r.evaluate(Aggregate(Select(indices, indices, lambda k, q: k == q - 1), tokens), xs) == [None, 1, 2]
    both = Select(tokens, tokens, Comparison.LEQ) & ~Select(indices, indices, Comparison.EQ)
    assert r.evaluate(SelectorWidth(both | Select(tokens, tokens, Comparison.FALSE)), xs) == [0, 1, 2]


def test_causal_masks_every_selector():
    prefix = SelectorWidth(Select(tokens, tokens, Comparison.TRUE))
    assert r.evaluate(prefix, "abcd", causal=True) == [1, 2, 3, 4]
    assert r.evaluate(prefix, "abcd") == [4] * 4


def test_categorical_aggregate_of_different_values_raises():
    same = Aggregate(Select(tokens, tokens, Comparison.TRUE), tokens).named("all")
    assert r.evaluate(same, [5, 5]) == [5, 5]
    with pytest.raises(ValueError, match="'all' selects several different values"):
        r.evaluate(same, [5, 6])


def test_annotations_copy_and_name():
    x = Map(lambda v: v, tokens)
    num = numerical(x).named("x")
    assert r.is_categorical(x) and r.is_numerical(num) and num.name == "x" and x.name != "x"
    with pytest.raises(TypeError, match="SOp"):
        Map(lambda v: v, 3)


def test_passes_alone():
    a, b = Select(tokens, tokens, Comparison.LT), Select(indices, indices, Comparison.GT)
    assert lower(a & b) == [a, b]  # an AND splits into its Selects
    (single,) = lower(a | b)  # an OR over different SOps: one Select over paired keys and queries
    assert r.evaluate(SelectorWidth(single), [2, 1, 3]) == r.evaluate(SelectorWidth(a | b), [2, 1, 3])
    program = SelectorWidth(a & b)
    order, lowered = nodes(program)
    assert order[-1] is program and tokens in order and indices in order
    sets = value_sets(order, [1, 2], 4)
    assert sets[program.id] == {0, 1, 2, 3, 4} and sets[tokens.id] == {1, 2}
    frac = numerical(Aggregate(Select(indices, indices, Comparison.LEQ), numerical(tokens == 1), default=0))
    order, _ = nodes(frac)
    assert value_sets(order, [1, 2], 3)[frac.id] == {0, 1, 0.5, 1 / 3, 2 / 3}  # every k / m, not only 1 / m
    with pytest.raises(ValueError, match="ZeroDivisionError.*0"):
        inverse = Map(lambda v: 1 / v, tokens)
        value_sets(nodes(inverse)[0], [0, 1], 3)
    assert SequenceMap(lambda u, v: u, tokens, indices).children == (tokens, indices)
