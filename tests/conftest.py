"""Test-wide setup.

TRITON_INTERPRET must be set before Triton is first imported, so that backend="triton" runs
the real kernels on CPU tensors through Triton's interpreter.
"""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh Inductor cache per session: a cache left by an older checkout can replay graphs that
# call the ops with an outdated schema.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-tests-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
