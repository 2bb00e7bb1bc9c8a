"""``compile(program, vocab, max_seq_len)``: a RASP program as the weights of one ``usim.Encoder``.

The passes, each its own function or file (as Tracr's compiler):

1. ``nodes``: the program graph, children first; every selector lowered to an AND of Selects
   (``usim.rasp.lower``);
2. ``value_sets`` (``usim.rasp.values``): the values each SOp can take;
3. ``Emitter`` (``usim.rasp.emit``): each node as Exprs of slots (``usim.rasp.encode``) and the
   heads / FFN units that write them, placed into layers by ``usim.rasp.schedule``;
4. the ``usim.construct.Builder`` builds the encoder; ``CompiledProgram`` wraps it.

The token sequence is BOS then the n input tokens (one block each): a categorical vocabulary is
embedded as codes 1..|vocab| (BOS 0), a numerical one as the values themselves. Positional
features (index, length, ...) are closed-form pieces of n, so an input of any length n <=
max_seq_len runs the same layers with its own positions.
"""

from __future__ import annotations

import torch

from usim.construct import Builder
from usim.layout import Block, Layout
from usim.rasp import language as L
from usim.rasp.compiled import CompiledProgram, spec_json
from usim.rasp.encode import ordered
from usim.rasp.emit import Emitter
from usim.rasp.lower import lower
from usim.rasp.values import value_sets


def nodes(program) -> tuple[list, dict]:
    """(every node, children before parents; {selector id: its lowered Selects})."""
    order, seen, lowered = [], set(), {}

    def visit(e):
        if e.id in seen:
            return
        seen.add(e.id)
        children = e.children
        if isinstance(e, (L.Aggregate, L.SelectorWidth)):
            sel = e.selector
            if sel.id not in lowered:
                lowered[sel.id] = lower(sel)
            children = [s for s in lowered[sel.id]] + ([e.sop] if isinstance(e, L.Aggregate) else [])
        elif isinstance(e, L.Selector) and not isinstance(e, L.Select):
            children = []
        for c in children:
            visit(c)
        order.append(e)

    visit(program)
    return order, lowered


def _layout(n: int) -> Layout:
    return Layout([Block("bos", (1,), "input"), Block("tokens", (n,), "input")])


def compile(program, vocab, max_seq_len: int, causal: bool = False, dtype=torch.float32) -> CompiledProgram:
    """Compile an SOp for inputs of 1..max_seq_len tokens from ``vocab`` (a collection of tokens;
    None: any real number, for a numerical ``tokens``). See docs/rasp.md."""
    if not isinstance(program, L.SOp):
        raise TypeError(f"compile needs a RASP SOp, got {type(program).__name__}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be an int >= 1, got {max_seq_len!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if vocab is not None:
        vocab = list(vocab)
        if not vocab or None in vocab:
            raise ValueError(f"vocab must be a non-empty collection of tokens (no None), got {vocab!r}")
        vocab = ordered(vocab)  # a set's order varies from run to run; the codes must not
    order, lowered = nodes(program)
    sets = value_sets(order, vocab, max_seq_len)
    raw = any(isinstance(e, L.TokensType) and L.is_numerical(e) for e in order) or vocab is None
    if raw and vocab is not None and not all(isinstance(v, (int, float)) for v in vocab):
        raise ValueError("a numerical tokens SOp needs a vocab of numbers")
    layout = _layout(max_seq_len)
    b = Builder(layout)
    em = Emitter(b, vocab, sets, lowered, max_seq_len, causal, raw, dtype)
    for e in order:
        em.emit(e)
    decode = em.readout(program)
    em.register_read(decode.get("reads", {}))
    layer_of = em.schedule.build(b)
    b.readout["tokens"] = decode["slot"]
    encoder = b.build()
    spec = {"name": program.name, "vocab": vocab, "max_seq_len": max_seq_len, "causal": causal, "raw": raw, "readout": decode["slot"],
            "dtype": str(dtype).replace("torch.", ""), "output": decode["output"],
            "positional": em.positional, "nodes": em.rows(layer_of)}
    return CompiledProgram.from_parts(encoder, layout, {"program": spec_json(spec)})
