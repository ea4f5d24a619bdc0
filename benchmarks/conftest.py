"""Shared fixtures for the benchmark suite (``pytest benchmarks/ --benchmark-only``)."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
NO_GPU = "GPU case: this machine has no CUDA GPU (the CPU case of this suite runs instead)"


def synchronized(fn, device: str):
    """Wrap ``fn`` so that pytest-benchmark's wall clock sees the GPU work finish."""
    if device.startswith("cuda"):

        def timed():
            fn()
            torch.cuda.synchronize()

        return timed
    return fn


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 cases measure fp32, not TF32."""
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield


def pytest_benchmark_update_machine_info(config, machine_info):
    """The GPU and library versions in the JSON report (benchmarks/training_table.py reads the device name)."""
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:  # optional (STYLE rule 6): the reference runs
        machine_info["triton"] = None
    if CUDA:
        machine_info["cuda_device"] = torch.cuda.get_device_name()
