"""What the engine and the benchmarks both measure with: the agreement rule and the timer.

Kept beneath both (it imports only torch) so that :mod:`vitfast.engine` checks and times its candidates exactly as
``vitfast bench`` checks and times providers, without importing the benchmark harness (timm, the model registry).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# scaled max error an output may show against the reference output before it counts as a wrong answer
AGREEMENT_TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 1e-3}


def tolerance_for(dtype: torch.dtype) -> float:
    """The agreement tolerance of a torch dtype (one of :data:`DTYPES`)."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return AGREEMENT_TOLERANCE[name]
    raise ValueError(f"no agreement tolerance for {dtype}; the dtypes measured are {', '.join(DTYPES)}.")


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``, computed in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def agreement(output: torch.Tensor, expected: torch.Tensor, tolerance: float) -> tuple[float, bool]:
    """(scaled max error, within tolerance) of one output; a misshaped or non-finite output never agrees."""
    if output.shape != expected.shape or not torch.isfinite(output).all():
        return math.inf, False
    error = scaled_error(output, expected)
    return error, error <= tolerance


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> tuple[float, list[float], Any]:
    """Time ``fn``: (first-call seconds, per-call milliseconds, the output of the first call).

    On CUDA each timed call starts from an idle device (synchronize, event, call, event), so a number is the latency
    of one isolated call as a caller sees it; on the CPU, wall-clock time per call.
    """
    _sync(device)
    start = time.perf_counter()
    first_output = fn()
    _sync(device)
    first_call = time.perf_counter() - start
    if isinstance(first_output, torch.Tensor):
        first_output = first_output.clone()  # CUDA-graph outputs are overwritten by the next replay
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            torch.cuda.synchronize(device)
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return first_call, times, first_output


def summarize(times: list[float]) -> dict[str, float]:
    """Median, quartiles and minimum of per-call milliseconds."""
    ordered = sorted(times)
    if len(ordered) >= 2:
        p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        p25 = p75 = ordered[0]
    return {"median_ms": statistics.median(ordered), "p25_ms": p25, "p75_ms": p75, "min_ms": ordered[0]}
