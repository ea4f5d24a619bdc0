"""Shared test utilities: weight randomization, a scaled error bound, the offline sm_90 reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vitfast.bench import scaled_error  # max |actual - expected| / max |expected|


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter fresh random values at a sensible scale.

    Freshly initialized models have zero biases, zero relative-position tables, unit norms and tiny heads, under which
    a wrong bias layout or a mis-indexed table would go unnoticed; random values make every parameter matter.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        noise = torch.randn(param.shape, generator=generators[param.device], device=param.device)
        if param.ndim == 1 and "norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.1 * noise
        elif "gamma" in name:
            value = 0.5 + 0.1 * noise
        elif "relative_position_bias_table" in name:
            value = 0.5 * noise
        else:
            value = 0.05 * noise
        param.copy_(value.to(param.dtype))
    return model


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = scaled_error(actual, expected)
    assert error <= tol, f"{what}: max abs error {error:.3e} of the output scale exceeds {tol:.0e}"


def assert_kernel_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    baseline: torch.Tensor,
    floor: float | None = None,
    what: str = "",
) -> None:
    """STYLE rule 5: the kernel's error is at most twice PyTorch's own error in the same dtype, plus a small floor.

    ``expected`` is the fp64 (or fp32) reference; ``baseline`` the plain-PyTorch result computed in the kernel's input
    dtype. Errors are scaled by ``max |expected|``; the floor defaults to the machine epsilon of ``actual``'s dtype.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the kernel output"
    if floor is None:
        floor = torch.finfo(actual.dtype).eps
    baseline_error = scaled_error(baseline, expected)
    error = scaled_error(actual, expected)
    assert error <= 2 * baseline_error + floor, (
        f"{what}: scaled error {error:.3e} exceeds 2 x PyTorch's {baseline_error:.3e} + {floor:.0e}"
    )


REPO_ROOT = Path(__file__).resolve().parents[1]


def offline_report(module: str, result_path: Path, timeout: int, *args: str) -> dict:
    """The JSON of ``python -m <module> --json <result_path> <args>`` (an offline sm_90 compile:
    ``benchmarks.kernel_report``, ``benchmarks.pdl_check``, ``benchmarks.host_overhead``), run in a subprocess
    without Triton's interpreter, which compiling real kernels needs; the test skips where this machine cannot
    compile for sm_90, and fails on any other error."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # this checkout's vitfast first, whatever an editable install elsewhere points at
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    process = subprocess.run(
        [sys.executable, "-m", module, "--json", str(result_path), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if process.returncode != 0:
        pytest.fail(f"{module} exited with {process.returncode}:\n{process.stderr[-8000:]}")
    result = json.loads(result_path.read_text())
    if "unavailable" in result:
        pytest.skip(f"cannot compile for sm_90 here: {result['unavailable']}")
    return result
