"""Command line: `python -m usim demo`."""

from __future__ import annotations

import argparse
import time

import torch

import usim


def demo(args) -> None:
    torch.manual_seed(args.seed)
    n, m = args.n, args.m
    op = usim.Transpose(n, m)
    x = torch.randn(n, m)
    start = time.perf_counter()
    y = op(x)
    elapsed = time.perf_counter() - start
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
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
