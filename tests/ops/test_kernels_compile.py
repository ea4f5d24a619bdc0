"""Every Triton kernel compiles for an H100 (sm_90) at the launchers' GPU configurations, and fits the SM.

The op tests run the kernels only through Triton's interpreter, which never runs the compiler: a kernel that does not
compile for sm_90, needs more shared memory than an H100 block can have, or spills its registers would go unnoticed
until it met a GPU. ``_compile_kernels.py`` compiles each launch the launchers make for representative shapes (fake
CUDA tensors, ``GPUTarget("cuda", 90, 32)``, ptxas from the triton wheel) in a subprocess without
``TRITON_INTERPRET``; no GPU is needed. The module skips when the CUDA compile toolchain is missing.

Run with ``-s`` (or ``-rA``) to see the table of registers, spills and shared memory per kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_compile_kernels.py")

# H100 (sm_90) limits, CUDA C programming guide, compute capability 9.0: 227 KB of shared memory per block (opt-in
# dynamic shared memory, which is what Triton uses), 228 KB per SM of which the driver reserves 1 KB per resident block,
# 64 K 32-bit registers per SM, allocated per warp in units of 256; at most 2048 threads and 32 blocks per SM.
MAX_SHARED_PER_BLOCK = 227 * 1024
SHARED_PER_SM = 228 * 1024
RESERVED_SHARED_PER_BLOCK = 1024
REGISTERS_PER_SM = 64 * 1024
REGISTER_ALLOCATION_UNIT = 256
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
# Spills are reported, not asserted, up to this many bytes of local memory per thread: a little spilling on a kernel
# that sits at 255 registers costs a few percent, more than this points at a tile configuration that is wrong.
MAX_LOCAL_BYTES = 1024


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    result_path = tmp_path_factory.mktemp("compile") / "kernels.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    process = subprocess.run(
        [sys.executable, str(SCRIPT), str(result_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if process.returncode != 0:
        pytest.fail(f"{SCRIPT.name} exited with {process.returncode}:\n{process.stderr[-8000:]}")
    result = json.loads(result_path.read_text())
    if "unavailable" in result:
        pytest.skip(f"cannot compile for sm_90 here: {result['unavailable']}")
    return result


def _resident_programs(row: dict) -> int:
    """Programs of this kernel one H100 SM holds at once (the tightest of threads, registers, shared memory)."""
    warps = row["num_warps"]
    registers_per_warp = -(-row["regs"] * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    return min(
        MAX_BLOCKS_PER_SM,
        MAX_THREADS_PER_SM // (32 * warps),
        REGISTERS_PER_SM // (registers_per_warp * warps),
        SHARED_PER_SM // (row["shared"] + RESERVED_SHARED_PER_BLOCK),
    )


def _table(rows: list[dict]) -> str:
    header = (
        f"{'kernel':<34} {'case':<26} {'blocks':<26} {'warps':>5} {'stages':>6} {'regs':>4} {'local B':>7} "
        f"{'spill st/ld B':>13} {'smem KB':>7} {'prog/SM':>7} {'compile s':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['kernel']:<34} {row['case']:<26} FAILED: {row['error'].splitlines()[0][:100]}")
            continue
        spills = f"{row['spill_stores']}/{row['spill_loads']}"
        seconds = "(reused)" if row.get("reused") else f"{row['seconds']:.1f}"
        lines.append(
            f"{row['kernel']:<34} {row['case']:<26} {row['blocks']:<26} {row['num_warps']:>5} {row['num_stages']:>6} "
            f"{row['regs']:>4} {row['local_bytes']:>7} {spills:>13} {row['shared'] / 1024:>7.1f} "
            f"{_resident_programs(row):>7} {seconds:>9}"
        )
    return "\n".join(lines)


def _compiled(report: dict) -> list[dict]:
    return [row for row in report["launches"] if "error" not in row]


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(report: dict) -> None:
    print(f"\ntriton {report['triton']}, target sm_90 (H100)\n{_table(report['launches'])}")
    failures = [row for row in report["launches"] if "error" in row]
    assert not failures, "kernels that do not compile for sm_90:\n" + "\n\n".join(
        f"{row['kernel']} [{row['case']}]:\n{row['error']}" for row in failures
    )
    assert {row["target"] for row in report["launches"]} == {"cuda:90"}
    # every @triton.jit kernel of the op modules is among the compiled ones: a new kernel needs a case
    missing = set(report["kernels"]) - {f"{row['op']}.{row['kernel']}" for row in report["launches"]}
    assert not missing, f"kernels no case of {SCRIPT.name} compiles: {sorted(missing)}"


@pytest.mark.slow
def test_shared_memory_fits_an_h100_block(report: dict) -> None:
    too_large = [row for row in _compiled(report) if row["shared"] > MAX_SHARED_PER_BLOCK]
    assert not too_large, "shared memory above the H100's 227 KB per block:\n" + "\n".join(
        f"{row['kernel']} [{row['case']}] {row['blocks']}: {row['shared']} bytes" for row in too_large
    )


@pytest.mark.slow
def test_registers_fit_and_spills_are_small(report: dict) -> None:
    rows = _compiled(report)
    # ptxas bounds registers by the launch's thread count (Triton's .maxntid), so this holds unless that changes
    unlaunchable = [row for row in rows if row["regs"] * 32 * row["num_warps"] > REGISTERS_PER_SM]
    assert not unlaunchable, "more registers than an SM has for one program: " + ", ".join(
        f"{row['kernel']} [{row['case']}] {row['regs']} x {32 * row['num_warps']} threads" for row in unlaunchable
    )
    spilling = [row for row in rows if row["local_bytes"] > MAX_LOCAL_BYTES]
    assert not spilling, f"more than {MAX_LOCAL_BYTES} bytes of local memory (spills) per thread:\n" + "\n".join(
        f"{row['kernel']} [{row['case']}] {row['blocks']}: {row['local_bytes']} bytes local, spill stores / loads "
        f"{row['spill_stores']} / {row['spill_loads']} bytes"
        for row in spilling
    )
