import os

import torch

# Without a GPU, Triton kernels are tested through the interpreter, which must be selected before triton is imported.
# With a GPU the real compiler runs (torch.compile's own kernels would fail under the interpreter).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import vitfast.backend  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_backend_and_seed():
    """Each test starts from the default backend and a fixed seed, whatever the previous test did."""
    vitfast.backend._current = None
    torch.manual_seed(0)
    yield
    vitfast.backend._current = None
