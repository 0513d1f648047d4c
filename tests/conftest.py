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
# Hugging Face libraries: never reach the network (a test that tries fails instead of
# downloading), and keep `datasets`' Arrow cache out of the user's home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf-datasets-tests-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
