"""Command line: `python -m usim demo` and `python -m usim export DIR`."""

from __future__ import annotations

import argparse
import time

import torch

import usim


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def demo(args) -> None:
    torch.manual_seed(args.seed)
    transpose_demo(args)
    print("\n" + "=" * 78 + "\n")
    simulator_demo(args)


def simulator_demo(args) -> None:
    from usim.mha import SimulatedMultiheadAttention
    from usim.ops.simulator import UniversalSimulator

    n, d, heads = args.tokens, args.embed_dim, args.heads
    u, build = _timed(UniversalSimulator, n, d, heads=heads)
    x = torch.randn(args.batch, n, d)
    a, v = torch.randn(heads, d, d) / d, torch.randn(heads, d, d)
    _, first = _timed(u, x, a, v)  # the first call plans and compiles the fast execution
    y, elapsed = _timed(u, x, a, v)
    x64, a64, v64 = x.double(), a.double(), v.double()
    scores = torch.einsum("bid,hde,bje->bhij", x64, a64, x64)
    reference = (torch.softmax(scores, -1) @ (x64[:, None] @ v64)).sum(1)
    direct = (torch.softmax(torch.einsum("bid,hde,bje->bhij", x, a, x), -1) @ (x[:, None] @ v)).sum(1)
    print(f"Universal simulator U(n={n}, d={d}, heads={heads}): depth {u.depth}, width {u.width}, "
          f"L = {u.layout.length}, built in {build:.2f} s")
    print(f"  sum_h softmax(x a_h x^T) x v_h on a batch of {args.batch}, float32: {elapsed * 1e3:.1f} ms "
          f"(first call, with planning: {first * 1e3:.0f} ms)")
    print(f"  max error vs float64: U {(y.double() - reference).abs().max().item():.2e}, "
          f"direct torch {(direct.double() - reference).abs().max().item():.2e}")

    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    sim, build = _timed(SimulatedMultiheadAttention.from_torch, mha, seq_len=n)
    _, first = _timed(sim, x, x, x)
    (out, weights), elapsed = _timed(sim, x, x, x)
    mha(x, x, x)
    (ref_out, ref_w), torch_time = _timed(mha, x, x, x)
    mha64 = torch.nn.MultiheadAttention(d, heads, batch_first=True, dtype=torch.float64)
    mha64.load_state_dict({k: t.double() for k, t in mha.state_dict().items()})
    out64, _ = mha64(x64, x64, x64)
    print(f"\nSimulatedMultiheadAttention.from_torch(nn.MultiheadAttention({d}, {heads})), {n} tokens: "
          f"depth {sim.simulator.depth}, width {sim.simulator.width}, L = {sim.simulator.layout.length}")
    print(f"  time: simulated {elapsed * 1e3:.1f} ms (first call {first * 1e3:.0f} ms), "
          f"nn.MultiheadAttention {torch_time * 1e3:.2f} ms")
    print(f"  max error vs float64: simulated {(out.double() - out64).abs().max().item():.2e}, "
          f"nn.MultiheadAttention {(ref_out.double() - out64).abs().max().item():.2e}; "
          f"attention weights differ by {(weights - ref_w).abs().max().item():.2e}")


def export(args) -> None:
    from usim.export import export as write_all

    for path in write_all(args.directory):
        print(f"wrote {path}")


def transpose_demo(args) -> None:
    n, m = args.n, args.m
    op = usim.Transpose(n, m)
    x = torch.randn(n, m)
    op(x)  # the first call plans and compiles the fast execution
    y, elapsed = _timed(op, x)
    reference = x.T
    print(op.describe())
    print(f"\ninput x ({n}x{m}):\n{x}")
    print(f"\nencoder output:\n{y}")
    print(f"\nreference x.T:\n{reference}")
    print(f"\nmax |difference| = {(y - reference).abs().max().item():.3g}  "
          f"bitwise equal: {torch.equal(y, reference)}  time {elapsed * 1e3:.1f} ms")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m usim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a constructed encoder beside its torch reference")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=4, help="n for U and the drop-in")
    p.add_argument("--embed-dim", type=int, default=4, help="d for U and the drop-in")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.set_defaults(func=demo)
    p = sub.add_parser("export", help="write the shipped checkpoints")
    p.add_argument("directory", nargs="?", default="checkpoints")
    p.set_defaults(func=export)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
