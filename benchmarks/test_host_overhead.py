"""Host time of one eager call per public op, vitfast vs aten's nearest op (``pytest benchmarks/ --benchmark-only``).

The probe of :mod:`benchmarks.host_overhead` as a pytest-benchmark group per op: our public call on Triton's real
launch path against the stand-in sm_90 driver (the launch a no-op), and aten's nearest op on tiny fp32 CPU tensors,
in the same run. CPU-only machines run it; on a GPU, profile the real launches instead (the cases skip there).
``python -m benchmarks.host_overhead`` writes the same numbers, split into dispatch / ours / Triton, to results/.
"""

from __future__ import annotations

import pytest

from benchmarks import host_overhead

PROBLEM = host_overhead.unavailable()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"host-overhead probe: {PROBLEM}")
PROBES = {probe.label: probe for probe in host_overhead.probes()} if PROBLEM is None else {}


@pytest.fixture(scope="module")
def capture():
    with host_overhead.stand_in_gpu() as launches:
        yield launches


@pytest.mark.parametrize("provider", ["vitfast", "aten"])
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("label", list(PROBES) or ["(none)"])
def test_host_overhead(benchmark, capture, label: str, passes: str, provider: str) -> None:
    probe = PROBES[label]
    host_overhead.recorded_launches(probe, capture)  # compiles this op's kernels once, outside the timing
    calls = {
        ("vitfast", "fwd"): probe.public,
        ("aten", "fwd"): probe.aten,
        ("vitfast", "fwd+bwd"): probe.public_backward,
        ("aten", "fwd+bwd"): probe.aten_backward,
    }
    benchmark.group = f"host overhead: {label} {passes}"
    benchmark.extra_info["aten_op"] = probe.aten_op
    benchmark(calls[(provider, passes)])
