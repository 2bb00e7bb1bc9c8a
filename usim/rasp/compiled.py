"""The compiled program: an ``nn.Module`` holding the ``usim.Encoder`` of a RASP program.

``CompiledProgram(tokens)`` takes a token list (or a batch: a list of equal-length lists) and
returns the output list(s): a categorical output is an element of its value set, exactly (decoded
from the integer code the encoder reads out: 0 is None, the default of an empty selection); a
numerical output is a Python float. BOS is prepended inside and never returned.

The sequence is two blocks: ``bos`` (1 token) and ``tokens`` (n). The weights do not depend on n:
an input of n < max_seq_len tokens runs the same encoder with the positional pieces of n (its
``usim.engine.Frame``, made once per n). ``encoder`` / ``layout`` are the
max_seq_len frame (what ``usim.save`` writes and ``usim.plot`` draws).

Everything the module needs besides the weights (vocab, output value set, positional slots, the
per-node table of ``describe``) is one JSON string, ``args["program"]``, so a checkpoint loads
back into a working module. A RASP program holds Python functions, so a load cannot rebuild it to
compare (``rebuilt_on_load``): the digest still guards the file.
"""

from __future__ import annotations

import json
import math

import torch

from usim.engine import Encoder, Frame
from usim.layout import Layout
from usim.ops.base import Construction, register
from usim.positions import Piece, Positions


def positional_pieces(kind: str, param, n: int) -> dict:
    """{block: [(lo, hi, const, coef)]} of a positional slot for inputs of n tokens (block 0 is BOS)."""
    tok = {"one": [((0,), (n,), 1, (0,))], "position": [((0,), (n,), 1, (1,))], "real": [((0,), (n,), 1, (0,))],
           "index": [((0,), (n,), 0, (1,))], "length": [((0,), (n,), n, (0,))]}
    if kind == "bos" or kind == "one":
        pieces = {0: [((0,), (1,), 1, (0,))]}
        if kind == "one":
            pieces[1] = tok["one"]
        return pieces
    if kind in tok:
        return {1: tok[kind]}
    if kind == "index=":
        return {1: [((param,), (param + 1,), 1, (0,))]} if param < n else {}
    if kind == "after":
        return {1: [((param,), (n,), 1, (0,))]} if param < n else {}
    if kind == "length=":
        return {1: [((0,), (n,), 1, (0,))]} if param == n else {}
    if kind == "const":
        return {1: [((i,), (i + 1,), 1, (0,)) for i in param if i < n]}
    if kind == "table":  # param: per length (as a string key, JSON), the runs [lo, hi) where the slot is 1
        return {1: [((lo,), (hi,), 1, (0,)) for lo, hi in param.get(str(n), [])]}
    if kind in ("affine", "affine^2"):  # param: per length, runs [lo, hi, const, coef]: const + coef * index
        return {1: [((lo,), (hi,), const, (coef,)) for lo, hi, const, coef in param.get(str(n), [])]}
    raise ValueError(f"unknown positional kind {kind!r}")


def _encode(v):
    if isinstance(v, tuple):
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": repr(v)}
    return v


def _decode(v):
    if isinstance(v, dict):
        return tuple(_decode(x) for x in v["tuple"]) if "tuple" in v else float(v["float"])
    return v


def spec_json(spec: dict) -> str:
    spec = dict(spec)
    spec["vocab"] = None if spec["vocab"] is None else [_encode(v) for v in spec["vocab"]]
    if "values" in spec["output"]:
        spec["output"] = {**spec["output"], "values": [_encode(v) for v in spec["output"]["values"]]}
    return json.dumps(spec, sort_keys=True, allow_nan=False)


@register
class CompiledProgram(Construction):
    """A compiled RASP program (build it with ``usim.rasp.compile``)."""

    rebuilt_on_load = False

    @classmethod
    def from_parts(cls, encoder: Encoder, layout: Layout, args: dict, execution: str = "fast"):
        module = super().from_parts(encoder, layout, args, execution)
        spec = json.loads(args["program"])
        spec["vocab"] = None if spec["vocab"] is None else [_decode(v) for v in spec["vocab"]]
        if "values" in spec["output"]:
            spec["output"]["values"] = [_decode(v) for v in spec["output"]["values"]]
        module.spec = spec
        module.codes = None if spec["raw"] else {v: i + 1 for i, v in enumerate(spec["vocab"])}
        module.__dict__["_frames"] = {}
        encoder.readout  # made per token now, not on the first call (that would reset the plan caches)
        return module

    @property
    def max_seq_len(self) -> int:
        return self.spec["max_seq_len"]

    @property
    def title(self) -> str:
        return f"RASP {self.spec['name']!r} (max_seq_len={self.max_seq_len}{', causal' if self.spec['causal'] else ''})"

    def frame(self, n: int):
        """The ``usim.engine.Frame`` of inputs of n tokens (None for max_seq_len: the encoder's own):
        the positional pieces of n, the same weights."""
        if n == self.max_seq_len:
            return None
        frames = self.__dict__["_frames"]
        if n not in frames:
            enc = self.encoder
            pieces = {}
            for name, (kind, param) in self.spec["positional"].items():
                per_block = positional_pieces(kind, param, n)
                pieces[enc.slots.index(name)] = [Piece(blk, lo, hi, const, coef, square=kind == "affine^2")
                                                 for blk, spec in per_block.items() for lo, hi, const, coef in spec]
            frames[n] = Frame(Positions([(1,), (n,)], pieces),
                              [enc.slots.index("value"), enc.slots.index(self.spec["readout"])])
        return frames[n]

    def _codes(self, xs: list) -> list:
        vocab = self.spec["vocab"]
        if self.codes is None:
            for x in xs:
                if isinstance(x, bool) or not isinstance(x, (int, float)) or (vocab is not None and x not in vocab):
                    raise ValueError(f"token {x!r} is not {'in the vocab' if vocab is not None else 'a real number'}")
            return [float(x) for x in xs]
        try:
            return [self.codes[x] for x in xs]
        except (KeyError, TypeError):
            bad = next(x for x in xs if not _hashable_in(x, self.codes))
            raise ValueError(f"token {bad!r} is not in the vocab {vocab[:8]}{' ...' if len(vocab) > 8 else ''}") from None

    def forward(self, xs, dtype=None):
        """tokens (a list) -> outputs (a list); a batch (a list of equal-length lists) -> a list of lists."""
        batched = isinstance(xs, (list, tuple)) and len(xs) > 0 and all(isinstance(x, (list, tuple)) for x in xs)
        rows = [list(x) for x in xs] if batched else [list(xs) if not isinstance(xs, str) else list(xs)]
        n = len(rows[0])
        if not 1 <= n <= self.max_seq_len:
            raise ValueError(f"an input of {n} tokens: this program is compiled for 1..{self.max_seq_len}")
        if any(len(r) != n for r in rows):
            raise ValueError(f"a batch needs equal-length inputs, got lengths {sorted({len(r) for r in rows})}")
        dtype = dtype or getattr(torch, self.spec["dtype"])
        seq = torch.tensor([[0.0] + self._codes(r) for r in rows], dtype=dtype)
        with torch.no_grad():
            out = self.encoder(seq, frame=self.frame(n))[:, 1:].tolist()
        result = [self._decode_row(r) for r in out]
        return result if batched else result[0]

    def run(self, *inputs):
        """``forward`` (``usim.plot`` calls this with ``example_tokens``)."""
        return self.forward(*inputs)

    def example_tokens(self, seed: int = 0) -> list:
        """A max_seq_len input drawn from the vocab (for pictures)."""
        g = torch.Generator().manual_seed(seed)
        vocab = self.spec["vocab"]
        if vocab is None:
            return [round(float(v), 1) for v in torch.randn(self.max_seq_len, generator=g)]
        return [vocab[int(i)] for i in torch.randint(len(vocab), (self.max_seq_len,), generator=g)]

    def _decode_row(self, row: list) -> list:
        out = self.spec["output"]
        if out["encoding"] == "numerical":
            return [float(v) for v in row]
        values, decoded = out["values"], []
        for v in row:
            k = int(v) if v == int(v) else -1
            if not 0 <= k <= len(values):
                raise ValueError(f"the compiled output {v!r} is not one value of {self.spec['name']!r}: a categorical "
                                 f"Aggregate averaged several different values (see docs/rasp.md)")
            decoded.append(None if k == 0 else values[k - 1])
        return decoded

    def describe(self) -> str:
        """Per RASP node: its kind, encoding, the layers that compute it, heads and slots; then the layers."""
        rows = [f"{self.title}: depth {self.depth}, width {self.width}, stream {self.encoder.stream_width} slots",
                f"{'node':<28} {'kind':<18} {'encoding':<12} {'layers':<12} {'heads':>5} {'slots':>5}"]
        for name, kind, encoding, layers, heads, slots in self.spec["nodes"]:
            span = "-" if not layers else (f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}")
            rows.append(f"{name[:28]:<28} {kind:<18} {encoding:<12} {span:<12} {heads:>5} {slots:>5}")
        return "\n".join(rows) + "\n\n" + super().describe()


def _hashable_in(x, codes: dict) -> bool:
    try:
        return x in codes
    except TypeError:
        return False
