"""Programmatic dependent launch, checked offline for sm_90: every forward kernel the engine launches, with and without.

    python -m benchmarks.pdl_check                 # the table, also as markdown + JSON under benchmarks/results/
    python -m benchmarks.pdl_check --json OUT.json # JSON only, to that path (what tests/ops/test_pdl.py reads)

A kernel launched with PDL (``launch_pdl=True``) may start before the kernel ahead of it in the stream has finished,
so it must execute ``griddepcontrol.wait`` before its first global memory access. For every kernel that takes the
``PDL`` constexpr, the first launch the kernel report's cases make (``benchmarks.kernel_report.CASES``, model groups
first) is compiled twice for sm_90 with :mod:`benchmarks.sm90`: as the launcher makes it (``PDL`` left at False,
what every launch outside :func:`vitfast.ops._triton.use_pdl` compiles) and with ``PDL=True, launch_pdl=True`` (what
``launch()`` adds inside it). Each row has both variants' registers, shared memory, spills, global access counts and
where the ``griddepcontrol`` instructions sit in the PTX (:func:`benchmarks.sm90.grid_dependency_order`) and in
the SASS (:func:`sass_grid_dependency_order`).

``launch_path`` (:func:`launch_path`): vitfast's own ``launch()`` and launch cache on the host-overhead probe's
stand-in GPU (:func:`benchmarks.host_overhead.stand_in_gpu`), one LayerNorm call outside and inside PDL, twice each:
which ``PDL`` / ``launch_pdl`` keywords reach the cache, how many specializations were compiled, whether the second
calls were served from the cache, and whether each compiled kernel's ``launch_pdl`` (what its launcher sets the
launch attribute from) matches its PTX.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import kernel_report, sm90

# the groups searched first for a kernel's launch: the shapes the engine captures most
_PREFERRED_GROUPS = ("ViT-B/16 bs 1", "BEiT v2-B bs 8", "EVA-02-L/448 bs 8")
_KEPT = ("regs", "local_bytes", "spill_stores", "shared", "num_warps", "launch_pdl", "grid_dependency")


# SASS (what the GPU runs; ptxas schedules, so PTX order alone is not the last word): griddepcontrol.wait assembles to
# ACQBULK and .launch_dependents to PREEXIT (sm_90, cuobjdump of Triton's cubins); global memory opcodes
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_SASS_GLOBAL = {"LDG", "STG", "LDGSTS", "ATOMG", "REDG", "RED", "ATOM", "LD", "ST", "UBLKCP", "UTMALDG", "UTMASTG"}


def sass_grid_dependency_order(cubin: bytes, cuobjdump: str) -> dict[str, Any]:
    """Instruction indices of the first ACQBULK (the wait), PREEXIT (the trigger) and global memory access in the
    cubin's SASS, and how many global accesses precede the first wait."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([cuobjdump, "-sass", file.name], check=True, capture_output=True, text=True).stdout
    opcodes = [found.group(1) for line in listing.splitlines() if (found := _SASS_LINE.search(line))]
    wait = opcodes.index("ACQBULK") if "ACQBULK" in opcodes else None
    globals_at = [i for i, op in enumerate(opcodes) if op in _SASS_GLOBAL]
    return {
        "first_wait": wait,
        "first_trigger": opcodes.index("PREEXIT") if "PREEXIT" in opcodes else None,
        "first_global": globals_at[0] if globals_at else None,
        "globals_before_wait": sum(1 for i in globals_at if wait is None or i < wait),
    }


def _first_launches(recorder: sm90.Recorder) -> dict[str, tuple[kernel_report.Case, sm90.Launch]]:
    """kernel name -> (case, launch): the first forward launch of each kernel that takes ``PDL`` (recorded by
    ``recorder``, the op modules' launch function)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    order = sorted(
        kernel_report.CASES,
        key=lambda case: (
            _PREFERRED_GROUPS.index(case.group) if case.group in _PREFERRED_GROUPS else len(_PREFERRED_GROUPS)
        ),
    )
    found: dict[str, tuple[kernel_report.Case, sm90.Launch]] = {}
    for case in order:
        recorder.launches.clear()
        recorder.phase = "fwd"
        with FakeTensorMode():
            case.run(recorder)
        for launch in recorder.launches:
            if launch.phase == "fwd" and "PDL" in launch.kernel.arg_names and launch.name not in found:
                found[launch.name] = (case, launch)
    return found


def _keywords(key: tuple) -> dict[str, Any]:
    """The keyword arguments a launch-cache key holds: their count, then the names, then the values (LaunchCache)."""
    count = key[4]
    return dict(zip(key[5 : 5 + count], key[5 + count : 5 + 2 * count], strict=True))


def launch_path() -> dict[str, Any]:
    """The ``PDL`` plumbing of ``launch()`` on the stand-in GPU (see the module docstring)."""
    import torch

    from benchmarks import host_overhead
    from vitfast import ops
    from vitfast.ops import _triton
    from vitfast.ops.layer_norm import _layer_norm_fwd_kernel

    x, weight, bias = torch.randn(4, 197, 768), torch.randn(768), torch.randn(768)
    cache = _triton.launch_cache
    result: dict[str, Any] = {}
    with host_overhead.stand_in_gpu() as capture:
        for label, on in (("outside", False), ("inside", True)):
            # forced: pdl_supported() says no on this machine (no GPU); the stand-in GPU is an sm_90
            saved, _triton._pdl.on = _triton._pdl.on, on
            try:
                capture.launches.clear()
                capture.recording = True  # the capture keeps launches only while it records
                misses = cache.misses
                ops.layer_norm(x, weight, bias, 1e-6)
                ops.layer_norm(x, weight, bias, 1e-6)
            finally:
                capture.recording = False
                _triton._pdl.on = saved
            (kernel, _, _, kwargs), *_ = capture.launches
            keys = [key for key in cache.entries if key[0] == id(kernel)]
            result[label] = {
                # what the launcher passed: nothing (launch() adds PDL itself, from use_pdl's state)
                "from_launcher": sorted(k for k in kwargs if k in ("PDL", "launch_pdl")),
                "compiles": cache.misses - misses,  # 1: the first call compiled, the second came from the cache
                "cache_keys_with_pdl": sorted(_keywords(key).get("PDL") for key in keys),
            }
        device_cache = next(iter(_layer_norm_fwd_kernel.device_caches.values()))[0]
        # (launch_pdl, has the wait) of every specialization compiled in this process, distinct pairs
        result["compiled"] = sorted(
            {(bool(k.metadata.launch_pdl), "griddepcontrol.wait" in k.asm["ptx"]) for k in device_cache.values()}
        )
    return result


def collect() -> dict:
    """The rows, or ``{"unavailable": why}`` when sm_90 kernels cannot be compiled here."""
    problem = sm90.toolchain_problem()
    if problem is not None:
        return {"unavailable": problem}
    import triton

    modules = [importlib.import_module(f"vitfast.ops.{name}") for name in kernel_report.OP_MODULES]
    rows = []
    recorder = sm90.Recorder()
    from triton import knobs

    cuobjdump = knobs.nvidia.cuobjdump.path
    with sm90.offline_sm90(modules, recorder):
        compile_launch = sm90.Compiler()
        for name, (case, launch) in _first_launches(recorder).items():
            pdl = sm90.Launch(
                launch.kernel, launch.grid, launch.args, {**launch.kwargs, "PDL": True, "launch_pdl": True}
            )
            variants = {}
            for label, variant in (("plain", launch), ("pdl", pdl)):
                compiled = compile_launch(variant)
                variants[label] = {key: compiled[key] for key in _KEPT}
                variants[label]["global_ops"] = {
                    kind: sum(compiled["ptx"]["kernel"][kind].values()) for kind in ("loads", "stores", "cp_async")
                }
                wrapped = [sm90.DevicePointer(a) if hasattr(a, "data_ptr") else a for a in variant.args]
                with contextlib.redirect_stdout(io.StringIO()):  # compiled already: Triton's in-memory cache
                    kernel = variant.kernel.warmup(*wrapped, grid=variant.grid, **variant.kwargs)
                variants[label]["sass_grid_dependency"] = sass_grid_dependency_order(kernel.asm["cubin"], cuobjdump)
            rows.append({"kernel": name, "group": case.group, "case": case.label, **variants})
            print(f"{case.group:<18} {case.label:<34} {name}", file=sys.stderr, flush=True)
    return {
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "target": "sm_90, offline",
        "rows": rows,
        "launch_path": launch_path(),
    }


def table(report: dict) -> str:
    header = (
        f"{'kernel':<30} {'case':<34} {'regs':>9} {'smem':>11} {'wait/trig':>9} {'1st wait':>8} {'1st global':>10} "
        f"{'before':>6} {'SASS wait/global':>16} {'pdl attr':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in report["rows"]:
        plain, pdl = row["plain"], row["pdl"]
        order = pdl["grid_dependency"]
        lines.append(
            f"{row['kernel']:<30} {row['case'][:34]:<34} {plain['regs']:>4}/{pdl['regs']:<4} "
            f"{plain['shared']:>5}/{pdl['shared']:<5} {order['waits']:>4}/{order['triggers']:<4} "
            f"{order['first_wait']!s:>8} {order['first_global']!s:>10} {order['globals_before_wait']:>6} "
            f"{pdl['sass_grid_dependency']['first_wait']!s:>7}/{pdl['sass_grid_dependency']['first_global']!s:<8} "
            f"{pdl['launch_pdl']!s:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pdl_check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows as JSON to this path")
    parser.add_argument("--out-dir", type=Path, default=kernel_report.RESULTS, help="where the dated files go")
    args = parser.parse_args(argv)
    report = collect()
    done = kernel_report.json_or_unavailable(report, args.json)
    if done is not None:
        return done
    text = (
        f"triton {report['triton']}, {report['target']}, {report['date']} (`python -m benchmarks.pdl_check`). "
        "regs, smem: plain / PDL variant; wait/trig: griddepcontrol.wait / .launch_dependents in the PDL variant's "
        "PTX; 1st wait, 1st global: PTX line numbers; before: global accesses before the wait; SASS: instruction "
        "index of ACQBULK / the first global access\n\n" + table(report) + f"\n\nlaunch(): {report['launch_path']}\n"
    )
    print(text)
    stem = args.out_dir / f"{report['date']}_pdl_check"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(f"# PDL, offline sm_90\n\n```\n{text}```\n")
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
