import os

# Triton kernels are tested on the CPU through the interpreter; it must be selected before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import vitfast.backend  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_backend_and_seed():
    """Each test starts from the default backend and a fixed seed, whatever the previous test did."""
    vitfast.backend._current = None
    torch.manual_seed(0)
    yield
    vitfast.backend._current = None
