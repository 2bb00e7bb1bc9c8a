import os

import pytest
import torch


@pytest.fixture
def seed():
    """A fresh seed per test, seeded into torch; tests put it in their failure messages."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value
