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
    from usim.ops.attention_core import AttentionCore
    from usim.ops.layer import LAYER_ACTIVATIONS, EncoderLayerSimulator

    # one file per universal form: the same weights run every size
    for form in ("av", "av_ffn", "factored"):
        table[f"universal_{form}"] = lambda form=form: UniversalSimulator(form=form)
    table["universal_core"] = AttentionCore
    for activation in LAYER_ACTIVATIONS:
        for norm_first, place in ((True, "prenorm"), (False, "postnorm")):
            table[f"universal_layer_{activation}_{place}"] = \
                lambda a=activation, f=norm_first: EncoderLayerSimulator(activation=a, norm_first=f)
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
