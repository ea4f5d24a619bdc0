"""The host-overhead probe: what one eager call of each public op costs the CPU before any GPU work, no GPU needed.

    python -m benchmarks.host_overhead               # table, plus markdown + JSON under benchmarks/results/
    python -m benchmarks.host_overhead --json X.json # JSON only

Triton's real launch path runs: the public op, the backend dispatch, the eager op path (``EagerOp``: one autograd
node, no ``torch.library`` dispatch), our launcher (checks, output allocation, strides), the launch cache
(``JITFunction.run`` on a specialization's first launch only) and the compiled kernel's launcher, against the
stand-in sm_90 driver of :mod:`benchmarks.sm90`, whose launcher unpacks the arguments like Triton's C launcher and
then does nothing. Tensors are small CPU tensors that the ops are told they may hand to the kernels (the probe
patches ``kernel_can_run``); nothing is computed on them.

Per op, median host microseconds per call (spread: min-max of the repeats), split three ways:

- ``triton``: the recorded launch(es) alone, replayed through vitfast's ``launch`` (the eager check, then the launch
  cache's call of the compiled kernel's no-op launcher; ``JITFunction.run`` before the cache existed);
- ``ours``: our launcher function minus ``triton`` (argument checks, allocations, stride and grid arithmetic);
- ``dispatch``: the public call minus the launcher (backend dispatch, coverage checks, the eager op path and its
  autograd node). With the native eager path (csrc/eager.cpp: every op, once its key has a plan) the public call
  does not run the Python launcher at all, so this comes out negative: the split describes the Python path
  (``VITFAST_NATIVE_EAGER=0`` times the public call on it);

and, in the same run, the nearest single aten op on fp32 tensors of the same tiny shapes with one intra-op thread
(dispatch, allocation and a near-empty CPU kernel). ``F.scaled_dot_product_attention`` and ``F.conv2d`` are not
used: their CPU paths cost far more host time than their CUDA dispatch, so attention is compared with its ``q k^T``
matmul and the patch embedding with a GEMM. ``ratio`` = public call / aten. ``fwd+bwd`` rows time the public call
plus ``backward()`` against the same for aten. Times are the thread's CPU time, so they hold on a shared machine
(caches shared with other jobs still move them a little); absolute numbers depend on its CPU. The variants of one
op are timed with their repeats interleaved, so that the ratios hold when the machine's speed drifts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import sm90

OP_MODULES = ("layer_norm", "attention", "rope", "swiglu", "patch_embed", "linear")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Probe:
    """One op call, three ways of making it, and aten's nearest op."""

    op: str
    label: str
    public: Callable[[], object]
    launcher: Callable[[], object]
    aten: Callable[[], object]
    aten_op: str
    public_backward: Callable[[], object] | None = None
    aten_backward: Callable[[], object] | None = None


def _cpu(*shape: int, dtype: torch.dtype = torch.bfloat16, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _aten(*shape: int) -> torch.Tensor:
    """A tensor for aten's reference call: fp32, whose tiny CPU kernels cost least (CPU bf16 GEMMs are emulated)."""
    return torch.randn(*shape).requires_grad_(True)


def _backward(fn: Callable[[], torch.Tensor | tuple]) -> Callable[[], None]:
    def run() -> None:
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def probes() -> list[Probe]:
    """The public ops at ViT-B/16 / EVA-02 widths, on a few rows (the host cost does not depend on the size)."""
    from vitfast import ops

    # the op modules (``vitfast.ops.layer_norm`` as an attribute is the public function of that name)
    attention, layer_norm, linear, patch_embed, rope, swiglu = (
        importlib.import_module(f"vitfast.ops.{name}")
        for name in ("attention", "layer_norm", "linear", "patch_embed", "rope", "swiglu")
    )

    # Tiny shapes: the host path does not depend on the size, and the CPU work the probe cannot avoid (aten ops
    # inside our backwards, such as the partial-sum reductions and linear's weight-gradient GEMM) stays negligible.
    rows, width, heads, side, head_dim, hidden, fc_width = 4, 64, 2, 4, 64, 128, 256
    tokens, patch = 1 + side * side, 16
    x, w, b = _cpu(rows, width, grad=True), _cpu(width, grad=True), _cpu(width, grad=True)
    branch = _cpu(rows, width, grad=True)
    # aten's tensors: separate leaves, so that its autograd graph is as deep as ours
    tx, tw, tb, tbranch = _aten(rows, width), _aten(width), _aten(width), _aten(rows, width)
    q, k, v = (_cpu(1, heads, tokens, head_dim, grad=True) for _ in range(3))
    tq, tk = _aten(1, heads, tokens, head_dim), _aten(1, heads, head_dim, tokens)
    cos, sin = rope.rope_2d_table((side, side), head_dim)
    table = _cpu((2 * side - 1) ** 2 + 3, heads, grad=True)
    index = torch.randint(0, table.shape[0], (tokens, tokens))
    gate, up = _cpu(rows, hidden, grad=True), _cpu(rows, hidden, grad=True)
    tgate = _aten(rows, hidden)
    packed = _cpu(rows, 2 * hidden, grad=True)
    ln_w, ln_b = _cpu(hidden, grad=True), _cpu(hidden, grad=True)
    image = _cpu(1, 3, side * patch, side * patch, grad=True)
    patch_w, patch_b = _cpu(width, 3, patch, patch, grad=True), _cpu(width, grad=True)
    pos, cls = _cpu(1, tokens, width, grad=True), _cpu(1, 1, width, grad=True)
    fc_w, fc_b = _cpu(fc_width, width, grad=True), _cpu(fc_width, grad=True)
    tfc_w = _aten(width, width)
    scale = head_dim**-0.5

    def no_grad(*tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.detach() for t in tensors]

    xd, wd, bd, branchd = no_grad(x, w, b, branch)
    qd, kd, vd = no_grad(q, k, v)
    return [
        Probe("layer_norm", "layer_norm", lambda: ops.layer_norm(x, w, b),
              lambda: layer_norm.layer_norm_fwd(xd, None, None, wd, bd, 1e-6),
              lambda: F.layer_norm(tx, (width,), tw, tb), "F.layer_norm",
              _backward(lambda: ops.layer_norm(x, w, b)), _backward(lambda: F.layer_norm(tx, (width,), tw, tb))),
        Probe("layer_norm_residual", "layer_norm_residual", lambda: ops.layer_norm_residual(x, branch, None, w, b),
              lambda: layer_norm.layer_norm_fwd(xd, branchd, None, wd, bd, 1e-6),
              lambda: F.layer_norm(tx + tbranch, (width,), tw, tb), "add + F.layer_norm",
              _backward(lambda: ops.layer_norm_residual(x, branch, None, w, b)),
              _backward(lambda: F.layer_norm(tx + tbranch, (width,), tw, tb))),
        Probe("attention", "attention", lambda: ops.attention(q, k, v),
              lambda: attention.attention_fwd(qd, kd, vd, scale),
              lambda: torch.matmul(tq, tk), "torch.matmul (q k^T)",
              _backward(lambda: ops.attention(q, k, v)),
              _backward(lambda: torch.matmul(tq, tk))),
        Probe("attention", "attention + RoPE", lambda: ops.attention(q, k, v, rope=(cos, sin), num_prefix_tokens=1),
              lambda: attention.attention_fwd(*rope.rope_2d_qk_fwd(qd, kd, cos, sin, 1), vd, scale),
              lambda: torch.matmul(tq, tk), "torch.matmul (q k^T)",
              _backward(lambda: ops.attention(q, k, v, rope=(cos, sin), num_prefix_tokens=1)),
              _backward(lambda: torch.matmul(tq, tk))),
        Probe("attention", "attention + rel-pos bias",
              lambda: ops.attention(q, k, v, rel_pos_bias_table=table, rel_pos_index=index),
              lambda: attention.attention_fwd(qd, kd, vd, scale, table.detach(), index),
              lambda: torch.matmul(tq, tk), "torch.matmul (q k^T)",
              _backward(lambda: ops.attention(q, k, v, rel_pos_bias_table=table, rel_pos_index=index)),
              _backward(lambda: torch.matmul(tq, tk))),
        Probe("rope_2d_qk", "rope_2d_qk", lambda: ops.rope_2d_qk(q, k, cos, sin, 1),
              lambda: rope.rope_2d_qk_fwd(qd, kd, cos, sin, 1),
              lambda: torch.mul(tq, tq), "torch.mul",
              _backward(lambda: ops.rope_2d_qk(q, k, cos, sin, 1)), _backward(lambda: torch.mul(tq, tq))),
        Probe("swiglu", "swiglu", lambda: ops.swiglu(gate, up),
              lambda: swiglu.swiglu_fwd(gate.detach(), up.detach()),
              lambda: F.silu(tgate), "F.silu",
              _backward(lambda: ops.swiglu(gate, up)), _backward(lambda: F.silu(tgate))),
        Probe("swiglu", "swiglu_packed", lambda: ops.swiglu_packed(packed),
              lambda: swiglu.swiglu_packed_fwd(packed.detach()),
              lambda: F.silu(tgate), "F.silu",
              _backward(lambda: ops.swiglu_packed(packed)), _backward(lambda: F.silu(tgate))),
        Probe("swiglu", "swiglu_layer_norm", lambda: ops.swiglu_layer_norm(gate, up, ln_w, ln_b),
              lambda: swiglu.swiglu_layer_norm_fwd(gate.detach(), up.detach(), ln_w.detach(), ln_b.detach(), 1e-6),
              lambda: F.layer_norm(tgate, (hidden,)), "F.layer_norm",
              _backward(lambda: ops.swiglu_layer_norm(gate, up, ln_w, ln_b)),
              _backward(lambda: F.layer_norm(tgate, (hidden,)))),
        Probe("patch_embed", "patch_embed_tokens", lambda: ops.patch_embed_tokens(image, patch_w, patch_b, pos, cls),
              lambda: patch_embed.patch_embed_fwd(*no_grad(image, patch_w, patch_b, pos, cls)),
              lambda: F.linear(tx, tfc_w), "F.linear (the patch GEMM)",
              _backward(lambda: ops.patch_embed_tokens(image, patch_w, patch_b, pos, cls)),
              _backward(lambda: F.linear(tx, tfc_w))),
        Probe("linear", "linear + GELU", lambda: ops.linear(x, fc_w, fc_b, "gelu"),
              lambda: linear.linear_fwd(xd, fc_w.detach(), fc_b.detach(), "gelu"),
              lambda: F.linear(tx, tfc_w), "F.linear",
              _backward(lambda: ops.linear(x, fc_w, fc_b, "gelu")), _backward(lambda: F.linear(tx, tfc_w))),
    ]  # fmt: skip


def time_per_call(fn: Callable[[], object], calls: int, repeats: int) -> dict[str, float]:
    """Median (and min / max over ``repeats``) of the mean host time per call of ``calls`` calls, microseconds.

    Host time is the calling thread's CPU time (``time.thread_time_ns``): what a launch costs the CPU, without the
    time the thread waits while other processes hold the cores (wall time on a shared machine moved 2-3x between
    runs).
    """
    return time_interleaved({"fn": fn}, calls, repeats)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], calls: int, repeats: int) -> dict[str, dict[str, float]]:
    """:func:`time_per_call` of several functions, their repeats interleaved (one repeat of each in turn), so that
    a change in the machine's speed during the measurement (a shared VM's moved aten's own time 1.8x between runs
    a few seconds apart) reaches all of them alike and their ratios hold."""
    for fn in fns.values():
        for _ in range(max(3, calls // 10)):
            fn()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.thread_time_ns()
                for _ in range(calls):
                    fn()
                samples[name].append((time.thread_time_ns() - start) / calls / 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: {"median": statistics.median(values), "min": min(values), "max": max(values)}
        for name, values in samples.items()
    }


class _LaunchCapture:
    """The real ``launch``, also keeping each launch while :func:`recorded_launches` records (so that it can be
    replayed alone).

    Only then: kept on every timed call, the launches' tensors would never be freed, and the growing heap (page
    faults, fresh allocations) was timed as our launchers' cost (~15 us per call on a 2-core machine).
    """

    def __init__(self, launch: Callable) -> None:
        self._launch = launch
        self.launches: list[tuple] = []
        self.recording = False

    def __call__(self, kernel, grid, *args, **kwargs) -> None:
        if self.recording:
            self.launches.append((kernel, grid, args, kwargs))
        self._launch(kernel, grid, *args, **kwargs)


def unavailable() -> str | None:
    """Why the probe cannot run here (None when it can)."""
    problem = sm90.toolchain_problem()
    if problem is None and torch.cuda.is_available():
        problem = "this machine has a GPU: profile the real launches there (the probe is for machines without one)"
    return problem


def _register_native(modules: list, cpu: bool) -> None:
    """Fresh native eager entry points (no plans) for the ops of ``modules``; ``cpu``: taking CPU tensors too."""
    for module in modules:
        if hasattr(module, "register_ext"):
            module.register_ext(cpu=cpu)


@contextlib.contextmanager
def stand_in_gpu() -> Iterator[_LaunchCapture]:
    """Our ops on CPU tensors take the Triton path to a no-op sm_90 launch; yields the capture of the launches.

    Inside: Triton's stand-in driver (:func:`benchmarks.sm90.offline_sm90`), ``kernel_can_run`` true for any tensor
    (nothing runs on them), the ``"triton"`` backend (``set_backend`` would refuse it without a GPU) and one intra-op
    thread (a tiny aten op otherwise pays for waking the pool, which is not dispatch cost). All restored on exit.
    """
    import vitfast.backend
    from vitfast.ops import _triton

    modules = [importlib.import_module(f"vitfast.ops.{name}") for name in OP_MODULES]
    capture = _LaunchCapture(_triton.launch)
    saved = {module: module.kernel_can_run for module in modules if hasattr(module, "kernel_can_run")}
    saved_threads = torch.get_num_threads()
    with sm90.offline_sm90(modules, capture):
        for module in saved:
            module.kernel_can_run = lambda *tensors: True
        _register_native(modules, cpu=True)  # the native eager paths take the probe's CPU tensors too
        saved_backend, vitfast.backend._current = vitfast.backend._current, "triton"
        torch.set_num_threads(1)
        try:
            yield capture
        finally:
            torch.set_num_threads(saved_threads)
            vitfast.backend._current = saved_backend
            for module, fn in saved.items():
                module.kernel_can_run = fn
            _register_native(modules, cpu=False)


class RecordedLaunches:
    """The kernel launches one launcher call made, replayed alone through vitfast's ``launch`` (the ``triton``
    column: the eager check, then the launch cache's compiled-kernel launcher, or ``kernel[grid]`` where it does not
    apply)."""

    def __init__(self, launch: Callable, launches: list[tuple]) -> None:
        self._launch = launch
        self.launches = launches

    @property
    def count(self) -> int:
        return len(self.launches)

    def __call__(self) -> None:
        for kernel, grid, args, kwargs in self.launches:
            self._launch(kernel, grid, *args, **kwargs)


def recorded_launches(probe: Probe, capture: _LaunchCapture) -> RecordedLaunches:
    """Run the probe's launcher once (compiling its kernels on first use) and return a replay of its launches."""
    capture.launches.clear()
    capture.recording = True
    try:
        probe.launcher()
    finally:
        capture.recording = False
    return RecordedLaunches(capture._launch, list(capture.launches))


def measure(calls: int = 200, repeats: int = 7) -> dict:
    """Every probe, timed; ``{"unavailable": why}`` where the probe cannot run."""
    problem = unavailable()
    if problem is not None:
        return {"unavailable": problem}
    import triton

    rows = []
    with stand_in_gpu() as capture:
        for probe in probes():
            triton_only = recorded_launches(probe, capture)
            timings = time_interleaved(
                {"public": probe.public, "launcher": probe.launcher, "triton": triton_only, "aten": probe.aten},
                calls,
                repeats,
            )
            row = {"op": probe.op, "label": probe.label, "aten_op": probe.aten_op, "launches": triton_only.count}
            row.update({f"{name}_us": value for name, value in timings.items()})
            public, launcher, triton_us = (timings[n]["median"] for n in ("public", "launcher", "triton"))
            row["split_us"] = {"dispatch": public - launcher, "ours": launcher - triton_us, "triton": triton_us}
            row["ratio"] = public / timings["aten"]["median"]
            if probe.public_backward is not None:
                backward = time_interleaved(
                    {"ours": probe.public_backward, "aten": probe.aten_backward}, max(10, calls // 4), repeats
                )
                row["fwd_bwd_us"], row["aten_fwd_bwd_us"] = backward["ours"], backward["aten"]
                row["fwd_bwd_ratio"] = row["fwd_bwd_us"]["median"] / row["aten_fwd_bwd_us"]["median"]
            rows.append(row)
            print(f"{probe.label:<26} {public:8.1f} us  ({row['ratio']:.1f}x aten)", file=sys.stderr, flush=True)
        native = native_launches()
        direct = direct_launch_check(capture)
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{_cpu_name()}, {platform.system()}, Python {platform.python_version()}",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "calls": calls,
        "repeats": repeats,
        "native_launches": native,
        "direct_launch": direct,
        "rows": rows,
    }


# The bytes Triton's launcher packs for a scalar of each signature type (its C extractors: an int in its width, a
# float as a C float or double), for the check below; a pointer is the tensor's address.
_TRITON_PACKING = {"i32": "<i", "u32": "<I", "i64": "<q", "u64": "<Q", "fp32": "<f", "fp64": "<d"}


def _triton_cells(compiled: Any, args: tuple) -> list[tuple[bool, int]]:
    """The kernel parameters Triton's launcher passes for a launch with ``args``, as ``(is a pointer, value)`` of
    8-byte cells: the non-constexpr arguments by the compiled kernel's signature (a tensor's address, a scalar's
    bits), then the two null scratch pointers."""
    cells = []
    for kind, value in zip(compiled.src.signature.values(), args, strict=False):
        if kind == "constexpr":
            continue
        if kind.startswith("*"):
            cells.append((True, value.data_ptr()))
        else:
            cells.append((False, int.from_bytes(struct.pack(_TRITON_PACKING[kind], value).ljust(8, b"\0"), "little")))
    return [*cells, (False, 0), (False, 0)]


def _compare_launches(
    fill: list[tuple], recorded: list[dict], addresses: Callable[[int], int | None], across: bool = True
) -> list[str]:
    """What differs between the launches the fill made through Triton (kernel, grid, args, kwargs) and the direct
    launches of the replay (the recording launch's). A fill address that ``addresses`` cannot map to the replay's (a
    temporary, an output the op does not return) binds at its first use: every later use must pass the same replay
    address, no two fill addresses one, and none null; ``across``: over all the launches (tensors that live through
    them all, as in one forward), else per launch (a backward's: the allocator reuses what an earlier op freed)."""
    from vitfast.ops import _triton

    if len(fill) != len(recorded):
        return [f"{len(fill)} launches in the fill, {len(recorded)} direct launches in the replay"]
    problems: list[str] = []
    bound: dict[int, int] = {}
    for (kernel, grid, args, kwargs), got in zip(fill, recorded, strict=True):
        grid, kwargs = (*grid, 1, 1)[:3], dict(kwargs)
        _triton._add_pdl(kernel, kwargs)  # what launch() passes on (the capture sees the call before it)
        compiled = _triton.launch_cache.entry(kernel, grid, args, kwargs).compiled
        metadata, name = compiled.metadata, kernel.fn.__name__
        want = {"grid": grid, "block": (32 * metadata.num_warps, 1, 1), "shared": metadata.shared, "stream": 0,
                "function": compiled.function, "attrs": [(6, 1)] if metadata.launch_pdl else []}  # fmt: skip
        for field, value in want.items():
            have = tuple(got[field]) if isinstance(value, tuple) else got[field]
            if have != value:
                problems.append(f"{name}: {field} {have} instead of {value}")
        cells = _triton_cells(compiled, args)
        if not across:
            bound.clear()
        if len(cells) != len(got["params"]):
            problems.append(f"{name}: {len(got['params'])} parameters instead of {len(cells)}")
            continue
        for i, ((pointer, value), param) in enumerate(zip(cells, got["params"], strict=True)):
            want_value = addresses(value) if pointer else value
            if pointer and want_value is None:
                want_value = bound.get(value)
                if want_value is None:
                    if param == 0 or param in bound.values():
                        problems.append(f"{name}: parameter {i} is {param:#x}: null, or another tensor's")
                    bound[value] = want_value = param
            if param != want_value:
                problems.append(f"{name}: parameter {i} is {param:#x} instead of {want_value:#x}")
    return problems


def direct_launch_check(capture: _LaunchCapture) -> dict[str, Any]:
    """The native replays' direct launches (csrc/eager.cpp calling cuLaunchKernelEx itself, ``_triton._direct_launch``)
    against what Triton's launcher passes for the same launches, per probe, through the stand-in's recording launch
    (:class:`benchmarks.sm90.StandInLaunch`, built against NVIDIA's cuda.h).

    Per probe, with fresh native entry points: a first call (the fill: the Python path, its launches through Triton
    and the capture), then a replay; each direct launch's grid, block, shared memory, stream, function, attributes
    and parameter cells must be what Triton's packing rules give for the fill's launch (:func:`_triton_cells`, the
    rules written here again from Triton's extractors), a tensor argument's address mapped from the fill's to the
    replay's (an input's is the same, an output's the replay output's). The replay must call no Python launch.
    Then the same for fwd+bwd (counts and the non-pointer cells: the backward's inputs are the autograd engine's);
    what a replay in a thread without a current context did (retained its device's primary context, once); PDL (the
    layer norm compiled with ``launch_pdl``: the attribute set); and a launch that fails (the replay raises).
    ``{"unavailable": why}`` without the compiled extension.
    """
    import inspect

    from triton.runtime.driver import driver

    from vitfast.ops import _triton

    if _triton.native_api() is None:
        return {"unavailable": "no compiled extension (vitfast._C)"}
    launch = sm90.StandInLaunch.build()
    active = driver.active
    modules = [importlib.import_module(f"vitfast.ops.{name}") for name in OP_MODULES]

    def fresh(functions: tuple[int, ...] | None) -> None:  # new native entry points: plans with these functions
        active.launch_driver = functions
        _register_native(modules, cpu=True)

    def run(fn: Callable[[], Any]) -> tuple[list, Any, list, list]:
        capture.launches.clear()
        capture.recording = True
        try:
            first = fn()
            fill = list(capture.launches)
            capture.launches.clear()
            launch.clear()
            second = fn()
            return fill, (first, second), launch.launches(), list(capture.launches)
        finally:
            capture.recording = False

    def outputs(result: Any) -> list[torch.Tensor]:
        return [result] if isinstance(result, torch.Tensor) else [o for o in result if isinstance(o, torch.Tensor)]

    rows = []
    try:
        for probe in probes():
            fresh(launch.recording)
            inputs = [v for v in inspect.getclosurevars(probe.public).nonlocals.values() if isinstance(v, torch.Tensor)]
            spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in inputs]
            fill, (first, second), recorded, python = run(probe.public)
            moved = {a.data_ptr(): b.data_ptr() for a, b in zip(outputs(first), outputs(second), strict=True)}

            def addresses(address: int, moved: dict = moved, spans: list = spans) -> int | None:
                if any(start <= address < start + size for start, size in spans):
                    return address
                return moved.get(address)

            problems = _compare_launches(fill, recorded, addresses)
            problems += [f"{len(python)} launches through Python in the replay"] if python else []
            row = {"label": probe.label, "launches": len(fill), "direct": len(recorded), "problems": problems}
            if probe.public_backward is not None:
                fresh(launch.recording)
                fill, _, recorded, python = run(probe.public_backward)
                row["fwd_bwd"] = {"launches": len(fill), "direct": len(recorded), "python": len(python)}
                if len(fill) == len(recorded):
                    row["fwd_bwd"]["problems"] = _compare_launches(fill, recorded, lambda address: None, across=False)
            rows.append(row)
        context = launch.context()  # since the last probe's fwd+bwd: its thread started without a context
        # PDL: a forward compiled with launch_pdl launches with the programmatic-serialization attribute
        ln_probe = next(p for p in probes() if p.label == "layer_norm")
        fresh(launch.recording)
        saved, _triton._pdl.on = _triton._pdl.on, True
        try:
            fill, _, recorded, _ = run(ln_probe.public)
        finally:
            _triton._pdl.on = saved
        pdl = {"launches": len(fill), "attrs": [r["attrs"] for r in recorded]}
        # a launch the driver refuses: the replay raises instead of returning unwritten outputs
        fresh(launch.failing)
        ln_probe.public()
        try:
            ln_probe.public()
            failure = "no error"
        except RuntimeError as exc:
            failure = str(exc)
    finally:
        fresh(None)
    return {"rows": rows, "context": context, "pdl": pdl, "failure": failure}


def native_launches() -> dict[str, list[int]] | None:
    """Per op with a native eager entry point (csrc/eager.cpp), ``[plans, declined keys]`` after the probes: one plan
    or more for every op the probes call whose Python path can be replayed (a key that never gets a plan runs the
    Python path, the fill's watch and more, on every call); None without the compiled extension."""
    from vitfast.ops import _triton

    if _triton.native_api() is None:
        return None
    return {name: list(_triton.native_plans(op)) for name, op in _triton.EAGER_OPS.items() if op.native is not None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} x {len(names)}" if names else platform.machine()


def _us(timing: dict) -> str:
    return f"{timing['median']:.1f} ({timing['min']:.1f}-{timing['max']:.1f})"


def markdown(result: dict) -> str:
    lines = [
        f"# Host overhead per eager op call, {result['date']} (no GPU: stand-in sm_90 driver, no-op launch)",
        "",
        f"{result['machine']}; torch {result['torch']}, triton {result['triton']}; "
        f"`python -m benchmarks.host_overhead`; median us per call over {result['repeats']} repeats of "
        f"{result['calls']} calls (min-max). How to read: the docstring of `benchmarks/host_overhead.py`.",
        "",
        "| op | launches | public call | dispatch | ours | triton | aten | ratio | fwd+bwd | aten fwd+bwd | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        split = row["split_us"]
        lines.append(
            f"| {row['label']} | {row['launches']} | {_us(row['public_us'])} | {split['dispatch']:.1f} "
            f"| {split['ours']:.1f} | {split['triton']:.1f} | {_us(row['aten_us'])} ({row['aten_op']}) "
            f"| {row['ratio']:.1f}x | {_us(row['fwd_bwd_us'])} | {_us(row['aten_fwd_bwd_us'])} "
            f"| {row['fwd_bwd_ratio']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    calls, repeats, json_path, out_dir = parse_args(argv, "benchmarks.host_overhead", __doc__, "calls", 200)
    return write(measure(calls, repeats), json_path, out_dir, "host_overhead", markdown)


def parse_args(
    argv: list[str] | None, module: str, doc: str, unit: str, default: int
) -> tuple[int, int, Path | None, Path]:
    """``(count, repeats, --json, --out-dir)`` of a measurement's command line: ``--<unit>`` (``default``) timed per
    repeat, ``--repeats`` (7), both at least 1."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the JSON result to this path only (no markdown)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the dated markdown + JSON go")
    parser.add_argument(f"--{unit}", type=int, default=default, help=f"{unit} per timed repeat (default {default})")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (default 7)")
    args = parser.parse_args(argv)
    count = getattr(args, unit)
    if count < 1 or args.repeats < 1:
        parser.error(f"--{unit} and --repeats must be at least 1")
    return count, args.repeats, args.json, args.out_dir


def write(result: dict, json_path: Path | None, out_dir: Path, name: str, markdown: Callable[[dict], str]) -> int:
    """A measurement's exit code, after writing it: to ``json_path`` only, or as ``<date>_<name>.md`` and ``.json``
    under ``out_dir`` (the markdown printed too); 2 with nothing written where it could not run here."""
    if "unavailable" in result:
        print(f"cannot measure here: {result['unavailable']}", file=sys.stderr)
        return 2
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1))
        return 0
    text = markdown(result)
    stem = out_dir / f"{result['date']}_{name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
