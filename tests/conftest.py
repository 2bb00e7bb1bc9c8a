"""Every test is seeded from its node id (see helpers.py): torch, random and numpy, before it runs.
A test that takes the `seed` fixture gets the value to put in its failure messages; a failing test's
report carries its seed and the USIM_TEST_SEED that reproduces it either way."""

import random

import numpy
import pytest
import torch

from helpers import BASE_SEED, SEED_ENV, seed_for


@pytest.fixture(autouse=True)
def seed(request):
    value = seed_for(request.node.nodeid)
    torch.manual_seed(value)
    random.seed(value)
    numpy.random.seed(value)
    request.node.usim_seed = value
    return value


def _rerun(nodeid: str) -> str:
    return f"{SEED_ENV}={BASE_SEED} python -m pytest '{nodeid}'"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and hasattr(item, "usim_seed"):
        report.sections.append(("usim seed", f"seed {item.usim_seed}; reproduce with: {_rerun(item.nodeid)}"))


def pytest_report_header(config):
    return f"usim test seeds: crc32(node id) started at {SEED_ENV}={BASE_SEED}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if BASE_SEED or exitstatus:
        terminalreporter.write_line(f"usim test seeds: {SEED_ENV}={BASE_SEED} reproduces this run")
