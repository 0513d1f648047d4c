"""Test-wide setup.

TRITON_INTERPRET must be set before Triton is first imported, so that backend="triton" runs
the real kernels on CPU tensors through Triton's interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
