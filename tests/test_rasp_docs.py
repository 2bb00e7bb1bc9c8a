"""docs/rasp.md: every Python block runs as written (the Tracr one where Tracr is installed)."""

import importlib.util
import re
from pathlib import Path

import pytest

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "docs" / "rasp.md").read_text(), re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_block_runs(i):
    if "tracr" in BLOCKS[i] and importlib.util.find_spec("tracr") is None:
        pytest.skip("the [tracr] extra is not installed")
    exec(compile(BLOCKS[i], f"docs/rasp.md block {i}", "exec"), {})
