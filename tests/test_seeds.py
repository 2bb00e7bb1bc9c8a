"""The suite is deterministic: each test's seed comes from its node id (conftest.py, helpers.py), a
failure names its seed and the USIM_TEST_SEED that reproduces it, and USIM_TEST_SEED=random explores."""

import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import torch

from helpers import BASE_SEED, seed_for

PROBE = '''
import random
import torch

def test_draws(seed):
    print("DRAW", seed, torch.rand(2).tolist(), random.random())

def test_fails():
    assert torch.rand(1).item() > 2
'''


def run_probe(tmp_path, env_seed=None):
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(Path(__file__).with_name(name), tmp_path / name)
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "USIM_TEST_SEED"}
    if env_seed is not None:
        env["USIM_TEST_SEED"] = env_seed
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_probe.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120).stdout
    return out, re.search(r"DRAW .*", out).group(0)


def test_seed_is_the_node_ids_crc32_and_seeds_torch(seed, request):
    assert seed == seed_for(request.node.nodeid) == zlib.crc32(request.node.nodeid.encode(), BASE_SEED)
    assert torch.initial_seed() == seed


def test_runs_repeat_failures_name_their_seed_and_random_explores(tmp_path):
    first, draw = run_probe(tmp_path)
    again, same = run_probe(tmp_path)
    assert draw == same and draw.startswith(f"DRAW {zlib.crc32(b'test_probe.py::test_draws')} "), (draw, same)
    assert re.search(r"seed \d+; reproduce with: USIM_TEST_SEED=0 python -m pytest 'test_probe.py::test_fails'", first), first
    explored, other = run_probe(tmp_path, "random")
    base = re.search(r"USIM_TEST_SEED=(\d+) reproduces this run", explored).group(1)
    assert other != draw and other.startswith(f"DRAW {zlib.crc32(b'test_probe.py::test_draws', int(base))} ")
    assert run_probe(tmp_path, base)[1] == other  # the printed base reproduces the run
