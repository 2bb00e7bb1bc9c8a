"""The shipped checkpoints: one registry of constructors, written by `python -m usim export DIR`."""

from __future__ import annotations

from pathlib import Path

import usim


def shipped() -> dict:
    """File stem -> a zero-argument constructor of the module saved under that name."""
    from usim.ops.determinant import Determinant
    from usim.ops.groupsort import GroupSort
    from usim.ops.inverse import Inverse
    from usim.ops.matmul import MatMul
    from usim.ops.maxmin import MaxMin
    from usim.ops.relu import ReLU
    from usim.ops.simulator import UniversalSimulator
    from usim.ops.softmax import Softmax

    table = {
        "transpose_4x4": lambda: usim.Transpose(4, 4),
        "matmul_4x4x4": lambda: MatMul(4, 4, 4),
        "softmax_4x4": lambda: Softmax(4, 4),
        "relu_4x4": lambda: ReLU(4, 4),
        "maxmin_4x4": lambda: MaxMin(4, 4),
        "groupsort_4x4_g4": lambda: GroupSort(4, 4, 4),
        "inverse_4": lambda: Inverse(4),
        "determinant_4": lambda: Determinant(4),
    }
    for n in (3, 4, 8):
        for heads in (1, 2):
            table[f"u_n{n}_d{n}_h{heads}"] = lambda n=n, heads=heads: UniversalSimulator(n, n, heads=heads)
    return table


def export(directory) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, build in shipped().items():
        path = directory / f"{stem}.safetensors"
        usim.save(build(), path)
        written.append(path)
    return written
