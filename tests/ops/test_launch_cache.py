"""The launch cache of ``vitfast.ops._triton``: a cached launch is the launch ``JITFunction.run`` would make.

Without a GPU, Triton's real launch path runs against a stand-in sm_90 driver (:mod:`benchmarks.sm90`) whose launcher
here records its arguments instead of launching. A wrong cache hit would launch a kernel compiled for another
specialization, a silent wrong answer, so each thing Triton specializes on is changed in turn and must reach Triton's
compiler again; things it does not specialize on must not. The tests compile a two-line kernel (a fraction of a
second each) and skip where the CUDA toolchain of the triton wheel is missing.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from benchmarks import sm90  # noqa: E402
from vitfast.ops import _triton  # noqa: E402

jit = pytest.importorskip("triton.runtime.jit")
from triton.runtime.driver import driver  # noqa: E402

_OFFSET = tl.constexpr(0.0)  # a global the kernel reads: changing it must raise, as JITFunction.run does


def _scale(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * scale + _OFFSET, mask=mask)


class _RecordingLauncher:
    """The compiled kernel's launcher: keeps every call's arguments (tensors as their address), calls the launch
    hooks around the launch as Triton's C launcher does, and launches nothing."""

    calls: list[tuple] = []

    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, *args) -> None:
        self.calls.append(tuple((a.dtype, a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args))
        launch_metadata, enter_hook, exit_hook = args[6:9]
        if enter_hook is not None:
            enter_hook(launch_metadata)
        if exit_hook is not None:
            exit_hook(launch_metadata)


class _RecordingDriver(sm90.Sm90Driver):
    launcher_cls = _RecordingLauncher


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """Triton compiling for sm_90 (real compiler, ``JITFunction`` rather than the interpreter) and launching nowhere."""
    with pytest.MonkeyPatch.context() as patch:
        with pytest.MonkeyPatch.context() as no_interpreter:  # sm90's check refuses it; the kernels here are compiled
            no_interpreter.delenv("TRITON_INTERPRET", raising=False)
            problem = sm90.toolchain_problem()
        if problem is not None:
            pytest.skip(f"cannot compile for sm_90 here: {problem}")
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton_cache")))
        saved = driver._active
        driver.set_active(_RecordingDriver())
        try:
            yield
        finally:
            for kernel in _KERNELS:  # nothing to unload: a compiled kernel's __del__ would ask the real driver
                for compiled in (c for caches in kernel.device_caches.values() for c in caches[0].values()):
                    compiled.module = None
            _KERNELS.clear()
            driver._active = saved


_KERNELS: list = []


def _new_kernel():
    _KERNELS.append(jit.JITFunction(_scale))
    return _KERNELS[-1]


@pytest.fixture
def kernel(stand_in, pristine_triton_language):
    """A fresh JITFunction: nothing compiled yet (with the language as imported: tests/conftest.py says why)."""
    return _new_kernel()


@pytest.fixture
def cache():
    return _triton.LaunchCache()


def _compiles(kernel) -> int:
    """Specializations Triton has compiled for this kernel (its own in-memory cache)."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def _args(n: int = 37, dtype: torch.dtype = torch.float32, offset: int = 0) -> tuple:
    x = torch.randn(n + offset, dtype=dtype)[offset:]
    return x, torch.empty(n, dtype=dtype), n, 2.0


def _launch(cache, kernel, args, block: int = 64, **options) -> None:
    cache(kernel, (triton.cdiv(args[2], block),), args, {"BLOCK": block, **options})


def test_same_specialization_reuses_the_compile(kernel, cache, monkeypatch) -> None:
    _launch(cache, kernel, _args())
    assert (cache.misses, len(cache.entries), _compiles(kernel)) == (1, 1, 1)
    runs = []
    run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: runs.append(1) or run(*a, **k))
    # other tensors, another length (neither 1 nor a multiple of 16) and scale: what Triton does not specialize on
    _launch(cache, kernel, (*_args(45)[:3], 3.0))
    assert runs == [] and cache.misses == 1 and _compiles(kernel) == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"dtype": torch.float16}, id="dtype"),
        pytest.param({"offset": 1}, id="pointer-not-16-byte-aligned"),
        pytest.param({"n": 32}, id="int-multiple-of-16"),
        pytest.param({"n": 1}, id="int-equal-to-1"),
        pytest.param({"block": 128}, id="constexpr"),
        pytest.param({"num_warps": 2}, id="num_warps"),
        pytest.param({"num_stages": 2}, id="num_stages"),
    ],
)
def test_each_specialization_change_compiles_again(kernel, cache, change: dict) -> None:
    """Triton compiles the changed launch anew (so it is a specialization) and the cache did not serve it."""
    _launch(cache, kernel, _args())
    args = {key: change[key] for key in ("n", "dtype", "offset") if key in change}
    options = {key: value for key, value in change.items() if key not in args}
    _launch(cache, kernel, _args(**args), **options)
    assert _compiles(kernel) == 2, "the change is no specialization of Triton's: the test proves nothing"
    assert cache.misses == 2 and len(cache.entries) == 2
    first, second = cache.entries.values()
    assert first.launcher is not second.launcher  # each compiled kernel has its own launcher
    # and the changed launch is served from its own entry afterwards
    _launch(cache, kernel, _args(**args), **options)
    assert cache.misses == 2


def test_cached_launch_passes_what_jit_function_run_passes(kernel, cache) -> None:
    """The launcher gets the same grid, stream, function, metadata and arguments through the cache as through
    ``kernel[grid]``: the results on a GPU are the same launch's."""
    args = _args()
    calls = _RecordingLauncher.calls
    calls.clear()
    kernel[(1,)](*args, BLOCK=64, num_warps=2)
    for _ in range(2):  # the miss (through kernel[grid]) and the hit (the cached launcher)
        cache(kernel, (1,), args, {"BLOCK": 64, "num_warps": 2})
    assert cache.misses == 1 and len(calls) == 3
    # index 6, the launch metadata: what JITFunction.run builds for launch hooks (none here; the cache passes None)
    uncached, through_miss, through_hit = (call[:6] + call[7:] for call in calls)
    assert through_miss == uncached and through_hit == uncached


def test_launch_hooks_and_wrapped_kernels_go_through_triton(kernel, cache) -> None:
    from triton import knobs

    seen = []

    def hook(metadata) -> None:
        seen.append(metadata.get()["name"])

    _launch(cache, kernel, _args())
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _launch(cache, kernel, _args())
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert seen == ["_scale"] and cache.misses == 1

    # triton.heuristics (like triton.autotune) picks constexprs per call: never cached, launched by Triton each time
    heuristic = triton.heuristics({"BLOCK": lambda named: 64})(_new_kernel())
    _RecordingLauncher.calls.clear()
    for _ in range(2):
        cache(heuristic, (1,), _args(), {})
    assert len(_RecordingLauncher.calls) == 2 and len(cache.entries) == 1 and cache.misses == 1


def test_triton_without_the_stages_hook_is_cached(kernel, cache, monkeypatch) -> None:
    """Triton 3.6 (the GPU machines') has no ``knobs.runtime.add_stages_inspection_hook``: the launch path is still
    recognized, and a cached launch never reads the hook (3.8's own ``JITFunction.run`` does, so the miss runs with
    it present)."""
    from triton import knobs

    _launch(cache, kernel, _args())
    with monkeypatch.context() as patch:
        patch.delattr(type(knobs.runtime), "add_stages_inspection_hook")
        api = cache._detect()
        assert api is not False and api[-1] is False
        cache._api = api
        _launch(cache, kernel, _args())
    assert cache.misses == 1 and len(cache.entries) == 1


def test_changed_global_raises_as_triton_does(kernel, cache, monkeypatch) -> None:
    _launch(cache, kernel, _args())
    monkeypatch.setitem(globals(), "_OFFSET", tl.constexpr(1.0))
    with pytest.raises(RuntimeError, match="Global variable _OFFSET has changed"):
        _launch(cache, kernel, _args())


def test_unknown_launch_path_falls_back_to_kernel_grid(kernel, cache, monkeypatch, caplog) -> None:
    """A Triton whose JITFunction.run calls its compiled kernel otherwise: every launch goes through kernel[grid]."""
    monkeypatch.setattr(_triton, "_RUN_CALL", "kernel.run(grid_0, something_else)")
    runs = []
    run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: runs.append(1) or run(*a, **k))
    with caplog.at_level(logging.DEBUG, logger="vitfast"):
        for _ in range(3):
            _launch(cache, kernel, _args())
    assert len(runs) == 3 and not cache.entries
    assert sum("launch cache" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize(
    "values",
    [
        [0, 1, 2, 15, 16, -16, 17, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**31) - 1],
        [True, False, 0.5, 1.0, None],
    ],
    ids=["ints", "others"],
)
def test_arg_key_is_at_least_as_fine_as_tritons(values: list) -> None:
    """Two values with one key have one Triton specialization (what Triton's own specializer says)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def triton_spec(value):
        return native_specialize_impl(BaseBackend, value, False, True, True)

    tensors = [torch.empty(8, dtype=dtype)[offset:] for dtype in (torch.float16, torch.float32) for offset in (0, 1, 4)]
    everything = values + tensors
    for a in everything:
        for b in everything:
            if _triton._arg_key(a) == _triton._arg_key(b):
                assert triton_spec(a) == triton_spec(b), (a, b)


def test_interpreter_launches_keep_the_plain_path() -> None:
    """Under TRITON_INTERPRET=1 (these tests) the ops launch through kernel[grid]: the cache is never consulted."""
    if not _triton.INTERPRETER:
        pytest.skip("the interpreter is off")
    from vitfast import ops
    from vitfast.backend import use_backend

    misses = _triton.launch_cache.misses
    with use_backend("triton"):
        ops.layer_norm(torch.randn(3, 16), None, None)
    assert _triton.launch_cache.misses == misses and os.environ.get("TRITON_INTERPRET") == "1"
