"""usim.rasp: write a program in RASP (Tracr's language), get exact constructed weights.

``compile(program, vocab, max_seq_len)`` -> a module holding one ``usim.Encoder``;
``evaluate(program, xs)`` is the reference interpreter; ``from_tracr(expr)`` converts a Tracr
program; ``usim.rasp.paper`` holds the paper's listings. See docs/rasp.md.
"""

from usim.rasp.language import (Aggregate, Comparison, ConstantSOp, Full, Function, LinearSequenceMap, Map, Select,
                                Selector, SelectorAnd, SelectorNot, SelectorOr, SelectorWidth, SequenceMap, SOp,
                                categorical, exp, indices, is_categorical, is_numerical, length, numerical,
                                reciprocal, relu, rsqrt, tokens)
from usim.rasp.evaluate import evaluate
from usim.rasp.compile import compile
from usim.rasp.compiled import CompiledProgram


def from_tracr(expr):
    """A Tracr ``tracr.rasp.rasp`` program as a usim.rasp program (needs Tracr: the [tracr] extra and tracr-pypi, docs/rasp.md)."""
    from usim.rasp.tracr import from_tracr as convert
    return convert(expr)


__all__ = ["Aggregate", "Comparison", "CompiledProgram", "ConstantSOp", "Full", "Function", "LinearSequenceMap", "Map",
           "Select", "Selector", "SelectorAnd", "SelectorNot", "SelectorOr", "SelectorWidth", "SequenceMap", "SOp",
           "categorical", "compile", "evaluate", "exp", "from_tracr", "indices", "is_categorical", "is_numerical",
           "length", "numerical", "reciprocal", "relu", "rsqrt", "tokens"]
