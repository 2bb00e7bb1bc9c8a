"""Placing the compiled nodes into layers (Tracr's ``craft_graph_to_model``, greedily).

A layer is an attention sublayer then an FFN sublayer; *stage* 2l is layer l's attention, 2l + 1
its FFN. A slot written at stage s can be read at any later stage. A node's *steps* are heads
(an attention stage) or FFN units with one declared activation (an FFN stage, whose activation all
its units share); ``place`` puts each step at the earliest free stage after the previous one, so a
node lands as soon as its inputs are ready (as soon as possible, in topological order).

A ``Copy`` step (a linear read written to a slot) fits any FFN stage whose activation is identity,
relu or bilinear: x = relu(x) - relu(-x) = x * 1, each exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from usim.construct import FFN, ONE, Builder, Unit, expr, scaled

LINEAR = ("identity", "relu", "bilinear")


@dataclass
class Heads:
    heads: list


@dataclass
class Units:
    activation: str
    units: list


@dataclass
class Copy:
    """out = expr, in whichever linear-capable activation the stage has."""

    expr: dict
    out: str

    def units(self, activation: str) -> list:
        if activation == "relu":
            return [Unit(self.expr, self.out), Unit(scaled(self.expr, -1.0), {self.out: -1.0})]
        if activation == "bilinear":
            return [Unit(self.expr, self.out, gate=ONE)]
        return [Unit(self.expr, self.out)]


@dataclass
class Stage:
    heads: list = field(default_factory=list)
    activation: str | None = None
    units: list = field(default_factory=list)
    copies: list = field(default_factory=list)  # made into units once the activation is known


class Schedule:
    def __init__(self):
        self.stages: list[Stage] = []
        self.writers: dict = {}  # slot -> [(stage, unit or None for a head)]

    def _stage(self, s: int) -> Stage:
        while len(self.stages) <= s:
            self.stages.append(Stage())
        return self.stages[s]

    def _fits(self, s: int, step) -> bool:
        if isinstance(step, Heads):
            return s % 2 == 0
        if s % 2 == 0:
            return False
        act = self._stage(s).activation
        if isinstance(step, Copy):
            return act is None or act in LINEAR
        if self._stage(s).copies and step.activation not in LINEAR:
            return False
        return act is None or act == step.activation

    def place(self, ready: int, steps: list) -> tuple[int, list[int]]:
        """Place the steps in order after stage ``ready``; (the last stage used, every stage used)."""
        s, used = ready, []
        for step in steps:
            s += 1
            while not self._fits(s, step):
                s += 1
            stage = self._stage(s)
            if isinstance(step, Heads):
                stage.heads += step.heads
                for head in step.heads:
                    for _, dst in head.moves:
                        self.writers.setdefault(dst, []).append((s, None))
            elif isinstance(step, Copy):
                stage.copies.append(step)
            else:
                stage.activation = step.activation
                stage.units += step.units
                for unit in step.units:
                    for slot in expr(unit.out):
                        self.writers.setdefault(slot, []).append((s, unit))
            used.append(s)
        return s, used

    def fuse(self, e: dict, out: str, integral: bool = False) -> int | None:
        """Write out = e (a linear combination of slots) from the FFN units that write e's slots, when
        every slot of e is written at one FFN stage and by nothing else: out then sums the units with
        the weights the slots would give them. Exact when each unit writes one of e's slots alone with
        weight 1 (out adds the same products), or, with ``integral``, when every weight is an integer
        (0/1 units, integer codes). The stage, or None."""
        writers = [w for slot in e for w in self.writers.get(slot, [(None, None)])]
        if len({s for s, _ in writers}) != 1 or any(u is None for _, u in writers):
            return None
        units = list({id(u): u for _, u in writers}.values())
        weights = [sum(c * e.get(slot, 0.0) for slot, c in expr(u.out).items()) for u in units]
        single = all(expr(u.out) == {slot: 1.0} for slot in e for _, u in self.writers[slot])
        if not single and not (integral and all(float(w).is_integer() for u in units
                                                for w in list(expr(u.out).values()) + list(e.values()))):
            return None
        for unit, weight in zip(units, weights):
            if weight:
                unit.out = {**expr(unit.out), out: weight}
        return writers[0][0]

    def build(self, b: Builder) -> list[int]:
        """Append the layers to the builder; the layer index of every stage (None if it vanished)."""
        layer_of, layer = [], 0
        for l in range(0, len(self.stages), 2):
            attn, ffn = self._stage(l), self._stage(l + 1)
            act = ffn.activation or "identity"
            units = ffn.units + [u for c in ffn.copies for u in c.units(act)]
            if not attn.heads and not units:
                layer_of += [None, None]
                continue
            b.layer(attn.heads, FFN(act, units) if units else None)
            layer_of += [layer, layer]
            layer += 1
        return layer_of
