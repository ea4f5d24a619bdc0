"""What every Triton kernel file shares: optional import, launching, CPU twins and fallbacks.

Triton is optional (STYLE rule 6). Without it ``triton.jit`` is a stand-in that keeps the kernel definitions
importable and raises a clear error if a kernel is ever launched; no ``"triton"`` implementation is registered
with :mod:`vitfast.backend`, so the reference runs.

Tests run the kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported). Then, and only then, the ``torch.library`` ops launch their kernels on CPU tensors. Otherwise the body of
each op runs its PyTorch reference for tensors the kernels cannot take (:func:`kernel_can_run`), so
``torch.ops.vitfast.*`` runs on any device, also under ``torch.compile`` (which traces the op body). Under the
interpreter, ``torch.compile`` of the ops cannot work (``wrap_triton`` cannot trace an interpreted kernel): compile
tests run on a GPU, and opcheck on the CPU skips its AOT-dispatch checks.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import struct
import threading
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode

__all__ = [
    "EAGER_OPS",
    "HAS_TRITON",
    "INTERPRETER",
    "KERNEL_DTYPES",
    "cdiv",
    "direct_launch_driver",
    "eager_memo",
    "empty",
    "gpu_sms",
    "kernel_can_run",
    "launch",
    "log_fallback",
    "native_api",
    "native_fill",
    "native_plans",
    "native_state",
    "next_power_of_2",
    "num_sms",
    "plan_sms",
    "register_native",
    "pdl_prologue",
    "pdl_supported",
    "plain_eager",
    "rows_2d",
    "tl",
    "triton",
    "triton_op",
    "use_pdl",
    "widen_bf16_dot",
]

logger = logging.getLogger("vitfast")

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # input dtypes every kernel takes

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package still imports and runs the reference path
    HAS_TRITON = False

    class _MissingKernel:
        def __init__(self, fn: Callable) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Callable:
            raise RuntimeError(f"Triton kernel {self.fn.__name__} needs the triton package; pip install triton.")

    class _TritonStandIn:
        @staticmethod
        def jit(fn: Callable | None = None, **_: Any) -> Any:
            return _MissingKernel(fn) if fn is not None else _MissingKernel

    class _LanguageStandIn:
        constexpr = int  # only ever used in annotations

    triton = _TritonStandIn()
    tl = _LanguageStandIn()
    # torch.library.triton_op warns once per op definition that it cannot scan for kernels without triton; the ops
    # never launch here (no "triton" backend is registered), so the warnings say nothing a user can act on
    logging.getLogger("torch._library.triton").addFilter(
        lambda record: not record.getMessage().startswith("Triton not available")
    )

_logged: set[tuple[str, str]] = set()
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # exactly these types: subclasses (FakeTensor, DTensor) are not
_PLAIN_TYPES = frozenset((*_PLAIN_TENSORS, type(None), int, float, bool, str))


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. Not ``triton.cdiv``: since Triton 3.8 that is a ``constexpr_function``, whose
    host call unwraps its arguments and cost ~2 us (more than the arithmetic by a thousand times)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch grids are sized from it); cached per device."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# SM count assumed off a GPU (the interpreter): an H100's / H200's, so that CPU runs take the decisions those would
NOMINAL_SMS = 132


def gpu_sms(device: torch.device) -> int | None:
    """The device's SM count on a GPU; None anywhere else (plans that size for the interpreter there)."""
    return num_sms(device) if device.type == "cuda" else None


def plan_sms(device: torch.device) -> int:
    """The SM count a launch plan is sized for: the device's on a GPU, :data:`NOMINAL_SMS` anywhere else."""
    sms = gpu_sms(device)
    return NOMINAL_SMS if sms is None else sms


def widen_bf16_dot(dtype: torch.dtype) -> bool:
    """Whether bf16 ``tl.dot`` operands must be widened to fp32: under the interpreter only.

    Triton's interpreter (3.8) multiplies bf16 tiles as their raw uint16 bits. Products of bf16 values are exact in
    fp32 and a GPU's bf16 dot accumulates in fp32, so widening the operands there computes the same sums.
    """
    return INTERPRETER and dtype == torch.bfloat16


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(value, torch.Tensor) and is_fake(value)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel`` over ``grid``: through ``torch.library.wrap_triton`` (visible to torch.compile) when traced.

    A plain eager launch goes through :data:`launch_cache` (the compiled kernel's launcher, called directly once
    Triton has compiled the specialization). Under the interpreter, ``wrap_triton`` hands back the plain kernel,
    which cannot run on the fake tensors that shape propagation (opcheck, make_fx) passes in; the outputs are already
    allocated, so the launch is skipped.
    """
    if not HAS_TRITON:
        raise RuntimeError("vitfast's Triton kernels need the triton package; pip install triton.")
    if INTERPRETER:
        values = (*args, *kwargs.values())
        if any(_is_fake(a) for a in values):
            return
        if _direct.depth or plain_eager(values):
            if _direct.recorded is not None:
                _record(kernel, grid, args, kwargs, lambda: kernel[grid](*args, **kwargs))
            else:
                kernel[grid](*args, **kwargs)
            return
    elif _direct.depth or plain_eager((*args, *kwargs.values())):
        # Plain eager call (CUDA-graph capture included): launch directly. Through wrap_triton, each eager launch
        # dispatches a higher-order op, which cost ~80 us of host time per kernel on an H100 host (2026-11-22:
        # vit_base_patch16_224 bs 1 eager on the kernels 10.5 ms vs 5.1 ms on the reference path), far more than
        # the kernels themselves take.
        _add_pdl(kernel, kwargs)
        if _direct.recorded is not None:
            _record(kernel, grid, args, kwargs, lambda: launch_cache(kernel, grid, args, kwargs))
        else:
            launch_cache(kernel, grid, args, kwargs)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def _record(kernel: Any, grid: Any, args: tuple, kwargs: dict, run: Callable) -> None:
    """A launch while :func:`native_fill` runs: recorded, and run outside the fill's dispatch mode (which watches the
    op's own aten ops; the interpreter's run no other)."""
    _direct.recorded.append((kernel, grid, args, kwargs))
    with _disable_current_modes():
        run()


class _Uncacheable(Exception):
    """An argument whose specialization the launch cache does not model: that launch goes through ``kernel[grid]``."""


def _arg_key(arg: Any) -> Any:
    """What Triton specializes a runtime argument on, or more (a finer key only costs an extra cache entry).

    Tensors: dtype and 16-byte alignment of the address. Python ints: the integer type the value fits (i32, i64,
    u64), ``== 1`` (a constant) and divisibility by 16. floats, bools, None: the type alone (Triton passes floats as
    fp32 and bools as i1 unspecialized; None is a constexpr).
    """
    kind = type(arg)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return arg.dtype, not arg.data_ptr() & 15
    if kind is int:
        return (
            int,
            arg == 1,
            not arg & 15,
            -0x8000_0000 <= arg <= 0x7FFF_FFFF,
            -0x8000_0000_0000_0000 <= arg <= 0x7FFF_FFFF_FFFF_FFFF,
        )
    if kind is float or kind is bool or arg is None:
        return kind
    raise _Uncacheable


def _args_key(args: tuple) -> list:
    """The key of a launch's arguments: :func:`_arg_key` of each, with the common cases inline (the key is built on
    every launch, and a call per argument cost ~0.3 us).

    Tensors: :func:`_arg_key`'s own ``(dtype, aligned)``. A Python int other than 1 that fits an i32 (strides, sizes):
    whether 16 divides it, the one thing :func:`_arg_key` tells apart among those ints, as a bool, which no other
    kind's key equals (tuples, types). Everything else through :func:`_arg_key`.
    """
    return [
        (arg.dtype, not arg.data_ptr() & 15)
        if (kind := type(arg)) is torch.Tensor or kind is torch.nn.Parameter
        else (not arg & 15 if arg != 1 and -0x8000_0000 <= arg <= 0x7FFF_FFFF else _arg_key(arg))
        if kind is int
        else _arg_key(arg)
        for arg in args
    ]


class _CompiledLaunch:
    """One cached specialization: the compiled kernel's launcher and what ``JITFunction.run`` passes to it."""

    __slots__ = ("compiled", "constexprs", "direct", "function", "globals", "kernel", "launcher", "packed_metadata")

    def __init__(self, kernel: Any, compiled: Any, constexprs: tuple) -> None:
        self.kernel = kernel  # the cache is keyed by id(kernel): this keeps the id from being reused
        self.compiled = compiled
        self.direct: Any = _MISSING  # _direct_template(self), on a native fill's first use
        self.launcher = compiled.run
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata
        self.constexprs = constexprs
        # the globals the kernel read when it compiled, which JITFunction.run checks on every launch (and raises if
        # one changed); with a tl.constexpr's value beside it, for the check's fast path in LaunchCache.__call__
        self.globals = tuple(
            (name, value, scope, value.value if type(value) is tl.constexpr else _MISSING)
            for (name, _), (value, scope) in kernel.used_global_vals.items()
        )


# The call JITFunction.run makes to a compiled kernel, which the cache replays; checked in Triton's source once.
_RUN_CALL = (
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,"
    " knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())"
)


class LaunchCache:
    """Eager launches straight to the compiled kernel's launcher, skipping ``JITFunction.run`` once it has compiled.

    ``JITFunction.run`` binds the arguments, specializes each one, builds and hashes a string key and reads several
    knobs on every call, ~20-35 us of host time for our kernels (benchmarks/results/2026-12-01_host_overhead.md),
    more than aten spends on a whole op. The first launch of a specialization goes through ``kernel[grid](...)``
    (compiling if needed) and the compiled kernel is kept under a key that determines Triton's own: the kernel, the
    driver and current device, the debug / instrumentation knobs, every keyword argument (the constexprs,
    ``num_warps``, ``num_stages``) and :func:`_arg_key` of every positional argument. Later launches with the same key
    call the launcher with the grid, the current stream and the arguments in the order ``JITFunction.run`` passes
    them (``bound_args``: the positional arguments, then the constexprs).

    Anything the key does not model goes through ``kernel[grid]``, every time: a kernel that is not a plain
    ``JITFunction`` (``triton.autotune`` / ``triton.heuristics`` wrap one; they choose the configuration per call), a
    pre-run hook, launch hooks or a pipeline-inspection hook set in ``triton.knobs`` (profilers such as proton),
    a callable grid, constexprs passed positionally or left to their defaults, an argument of another type. So does
    every launch when Triton's launch path is not the one the cache replays (the private API checked once, in
    ``JITFunction.run``'s source; a debug log says so).
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, _CompiledLaunch] = {}
        self.misses = 0  # launches that went through kernel[grid] to fill an entry (tests count them)
        self._driver: Any = None
        self._api: Any = None  # (knobs, driver config, HookChain or None, JITFunction, has stages hook) or False

    def _detect(self) -> Any:
        """Triton's private launch API as this cache uses it, or False (and a debug log) when it differs."""
        try:
            import inspect

            from triton import knobs
            from triton.runtime.driver import driver
            from triton.runtime.jit import JITFunction

            hook_chain = getattr(knobs, "HookChain", None)
            problem = None
            if _RUN_CALL not in " ".join(inspect.getsource(JITFunction.run).split()):
                problem = "JITFunction.run calls its compiled kernel differently"
            elif not all(hasattr(knobs.runtime, n) for n in ("launch_enter_hook", "launch_exit_hook", "debug")):
                problem = "triton.knobs.runtime lacks the launch hooks or the debug flag"
            elif not hasattr(knobs.compilation, "instrumentation_mode"):
                problem = "triton.knobs.compilation lacks instrumentation_mode"
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            logger.debug(
                "vitfast: Triton %s's launch path is not the one the launch cache replays (%s); every launch goes "
                "through kernel[grid].",
                getattr(triton, "__version__", "?"),
                problem,
            )
            return False
        # Triton 3.8's pipeline-inspection hook adds to JITFunction.run's key; Triton 3.6 has none
        stages_hook = hasattr(knobs.runtime, "add_stages_inspection_hook")
        return knobs, driver, hook_chain, JITFunction, stages_hook

    def _launch_api(self) -> Any:
        """Triton's launch API when a launch may be replayed now, else None: no launch hook with calls, no
        pipeline-inspection hook, and the private API this cache replays (checked once)."""
        api = self._api
        if api is None:
            api = self._api = self._detect()
        if api is False:
            return None
        knobs, _driver, hook_chain, _jit_function, stages_hook = api
        runtime = knobs.runtime
        enter_hook, exit_hook = runtime.launch_enter_hook, runtime.launch_exit_hook
        if (
            not (enter_hook is None or (type(enter_hook) is hook_chain and not enter_hook.calls))
            or not (exit_hook is None or (type(exit_hook) is hook_chain and not exit_hook.calls))
            or (stages_hook and runtime.add_stages_inspection_hook is not None)
        ):
            return None
        return api

    def _replay_api(self, kernel: Any, grid: Any) -> Any:
        """:meth:`_launch_api` for a launch of ``kernel`` over ``grid`` that the cache models: a plain
        ``JITFunction`` without pre-run hooks, a tuple grid; else None."""
        api = self._launch_api()
        if api is None or type(kernel) is not api[3] or kernel.pre_run_hooks or type(grid) is not tuple:
            return None
        return api

    def _active_driver(self, api: Any) -> Any:
        active = api[1].active
        if active is not self._driver:  # a compiled kernel's handles belong to the driver that loaded it
            self.entries.clear()
            self._driver = active
        return active

    @staticmethod
    def _key(api: Any, kernel: Any, device: Any, args: tuple, kwargs: dict) -> tuple:
        """The entry's key (raises :class:`_Uncacheable` or TypeError for a launch the cache does not model)."""
        knobs = api[0]
        return (
            id(kernel),
            device,
            knobs.runtime.debug,
            knobs.compilation.instrumentation_mode,
            len(kwargs),  # the names, then the values: no (name, value) pair built per keyword argument
            *kwargs,
            *kwargs.values(),
            *_args_key(args),
        )

    def __call__(self, kernel: Any, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        api = self._replay_api(kernel, grid)
        if api is None:
            kernel[grid](*args, **kwargs)
            return
        constexpr_type = tl.constexpr
        runtime = api[0].runtime
        active = self._active_driver(api)
        device = active.get_current_device()
        try:
            key = self._key(api, kernel, device, args, kwargs)
            entry = self.entries.get(key)
        except (_Uncacheable, TypeError):  # TypeError: an unhashable keyword argument
            kernel[grid](*args, **kwargs)
            return
        if entry is None or entry.kernel is not kernel:
            self._fill(key, kernel, grid, args, kwargs)
            return
        for name, value, scope, plain in entry.globals:
            current = scope.get(name, _MISSING)
            # Triton's check is `current != value`, which for two tl.constexpr builds a third (~2 us each); equal
            # plain values mean that check passes, anything else takes it as it is
            if plain is not _MISSING and type(current) is constexpr_type and current.value == plain:
                continue
            if current != value:
                kernel[grid](*args, **kwargs)  # raises Triton's error about the changed global
                return
        size = len(grid)
        entry.launcher(
            grid[0],
            grid[1] if size > 1 else 1,
            grid[2] if size > 2 else 1,
            active.get_current_stream(device),
            entry.function,
            entry.packed_metadata,
            None,  # launch metadata: only launch hooks read it, and with one set the launch is not cached
            runtime.launch_enter_hook,
            runtime.launch_exit_hook,
            *args,
            *entry.constexprs,
        )

    def entry(self, kernel: Any, grid: Any, args: tuple, kwargs: dict) -> _CompiledLaunch | None:
        """The cached specialization that :meth:`__call__` replays for this launch (it has launched once), or None."""
        api = self._replay_api(kernel, grid)
        if api is None:
            return None
        active = self._active_driver(api)
        try:
            entry = self.entries.get(self._key(api, kernel, active.get_current_device(), args, kwargs))
        except (_Uncacheable, TypeError):
            return None
        return entry if entry is not None and entry.kernel is kernel else None

    def native_state(self) -> tuple[tuple, Any, Any, Any] | None:
        """What a native replay (csrc/eager.cpp) needs now: ``(state, stream, enter hook, exit hook)``, where
        ``state`` is everything :meth:`_key` reads besides the launch itself; None when no replay may run now."""
        api = self._launch_api()
        if api is None:
            return None
        knobs = api[0]
        runtime = knobs.runtime
        active = self._active_driver(api)
        device = active.get_current_device()
        state = (active, device, runtime.debug, knobs.compilation.instrumentation_mode, _pdl.on)
        return state, active.get_current_stream(device), runtime.launch_enter_hook, runtime.launch_exit_hook

    def _fill(self, key: tuple, kernel: Any, grid: tuple, args: tuple, kwargs: dict) -> None:
        """Launch through ``kernel[grid]`` (compiling if needed); keep the compiled kernel when it can be replayed."""
        self.misses += 1
        compiled = kernel[grid](*args, **kwargs)
        params = kernel.params
        if (
            compiled is None
            or hasattr(compiled, "result")  # an asynchronous compile's future
            or any(param.is_constexpr for param in params[: len(args)])
            or not all(param.is_constexpr and param.name in kwargs for param in params[len(args) :])
        ):
            return
        self.entries[key] = _CompiledLaunch(kernel, compiled, tuple(kwargs[p.name] for p in params[len(args) :]))


_MISSING = object()


launch_cache = LaunchCache()


class _DirectCalls(threading.local):
    """How deep this thread is inside the body of an :class:`EagerOp` called directly (launches need no check), and
    the list its launches are recorded in while :func:`native_fill` runs one (else None), and what the op's
    setup_context did during that fill (a :class:`_RecordedContext`)."""

    depth = 0
    recorded: list | None = None
    context: Any = None


_direct = _DirectCalls()
_is_grad_enabled = torch.is_grad_enabled


def plain_eager(args: tuple[Any, ...]) -> bool:
    """Whether a call may skip ``torch.library``'s dispatch: nothing traces it and no transform wraps it.

    Nothing compiling (dynamo), no dispatch mode (fake tensors, make_fx, FlopCounter, opcheck's checks), no functorch
    transform (vmap, grad, functionalize), no ``torch.jit.trace`` and only plain tensors (no FakeTensor, DTensor or
    other subclass) among the arguments. Anything else goes through the registered op, which is what those tools are
    built to see.
    """
    if not _untraced():
        return False
    # the common argument types by a set lookup; isinstance only for the others (a subclass of Tensor is refused)
    return all(type(a) in _PLAIN_TYPES or not isinstance(a, torch.Tensor) for a in args)


def _untraced() -> bool:
    """:func:`plain_eager` but for the argument types: nothing compiling, no dispatch mode, no functorch transform,
    no ``torch.jit.trace`` (whose trace records the registered op; a direct launch would be left out of it)."""
    return (
        not _is_compiling()
        and _get_current_dispatch_mode() is None
        and _peek_interpreter_stack() is None
        and _get_tracing_state() is None
    )


_is_compiling = torch.compiler.is_compiling
_get_tracing_state = torch._C._get_tracing_state
_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack


class _EagerAutograd(torch.autograd.Function):
    """The autograd node of an :class:`EagerOp` called eagerly: its registered setup_context and backward, unchanged.

    Same contract as the node ``register_autograd`` builds (one gradient per output, zeros for outputs that got
    none, ``ctx.needs_input_grad`` per op input), without the dispatcher's redispatch around the forward.
    """

    @staticmethod
    def forward(ctx: Any, op: EagerOp, *args: Any) -> Any:
        output = op.direct(*args)
        if _direct.recorded is not None:  # a native fill: what setup_context does is kept for the native node
            _direct.context = _RecordedContext(ctx)
            op.setup_context(_direct.context, args, output)
        else:
            op.setup_context(ctx, args, output)
        ctx.eager_op = op
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        needs_input_grad = ctx.needs_input_grad
        ctx.needs_input_grad = needs_input_grad[1:]
        try:
            result = ctx.eager_op.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs_input_grad
        return (None, *result) if isinstance(result, tuple) else (None, result)


class EagerOp:
    """A ``torch.library.triton_op`` that an untraced eager call runs without the dispatcher.

    Calling it: under tracing (:func:`plain_eager` false) it is the registered op, what torch.compile, opcheck,
    make_fx and functorch see, unchanged. Otherwise the op's Python body runs directly, inside one
    :class:`_EagerAutograd` node when a gradient is wanted. ``torch.library``'s dispatch of a Python op (schema
    parse, autograd redispatch, generated Function) cost more host time than the op's launcher and Triton's launch
    together (benchmarks/results/2026-12-01_host_overhead.md), against ~5 us for an aten op.
    """

    def __init__(self, op: Any, fn: Callable) -> None:
        self.op = op
        self.fn = fn
        self.backward: Callable | None = None
        self.setup_context: Callable | None = None
        self.native: Callable | None = None  # its native entry point, if any (:func:`register_native`)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        self.backward = backward
        self.setup_context = setup_context

    def __getattr__(self, name: str) -> Any:  # register_fake, register_kernel, ... of the CustomOpDef
        return getattr(self.op, name)

    def direct(self, *args: Any) -> Any:
        """The op's body, its launches marked as plain eager (``plain_eager`` was decided once, by the caller)."""
        _direct.depth += 1
        try:
            return self.fn(*args)
        finally:
            _direct.depth -= 1

    def native_call(self, *args: Any) -> Any:
        """The op's native entry point (C++, :func:`register_native`) for this call, autograd node included, or
        NotImplemented: no native path, a traced call, a call inside another op's fill, or arguments it does not
        take. A public wrapper may try it before its own checks: the op's ``covers`` (its coverage check) runs at a
        key's first call, and a key it declines stays with the Python path."""
        native = self.native
        if native is None or _direct.recorded is not None or not (_direct.depth or _untraced()):
            return NotImplemented
        return native(*args)

    def __call__(self, *args: Any) -> Any:
        if not (_direct.depth or plain_eager(args)):
            return self.op(*args)
        # not inside another op's fill, whose recording must see every launch its Python path makes
        if self.native is not None and _direct.recorded is None:
            result = self.native(*args)
            if result is not NotImplemented:
                return result
        return self._python(args)

    def after_native(self, *args: Any) -> Any:
        """The call of a wrapper whose :meth:`native_call` answered NotImplemented: as calling the op, without asking
        the native entry point a second time."""
        if not (_direct.depth or plain_eager(args)):
            return self.op(*args)
        return self._python(args)

    def _python(self, args: tuple) -> Any:
        if self.backward is not None and _is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return _EagerAutograd.apply(self, *args)
        return self.direct(*args)


# -------------------------------------------------------------------------------------- the native eager path
# An EagerOp may have a native entry point (csrc/eager.cpp): one C++ mechanism for every op, which knows none of
# them. It keys a call by its arguments' types, values and tensor layouts, and replays what the Python path did for
# the key's first call (native_fill: the launches, the allocations, what the autograd node saves), or answers
# NotImplemented and the Python path runs. It asks Python once per call whether it may launch now (native_state).

NATIVE_ENV = "VITFAST_NATIVE_EAGER"  # "0": no native eager path (the Python one runs; for comparisons)
_native_tokens: dict[tuple, int] = {}


def native_api() -> Any:
    """The compiled extension's native-path functions (``native_op``, ``native_plans``), or None: no extension, no
    Triton, or ``VITFAST_NATIVE_EAGER=0``."""
    if not HAS_TRITON or os.environ.get(NATIVE_ENV, "").strip() == "0":
        return None
    from vitfast import _ext

    return _ext.module if _ext.HAS_EXT and hasattr(_ext.module, "native_op") else None


def native_state(*settings: Any) -> tuple[int, Any, Any, Any] | None:
    """The native path's launch state, called once per native call: ``(token, stream, enter hook, exit hook)``, or
    None when no replay may run now (a launch hook or pipeline-inspection hook is set; Triton's launch API is not the
    one :class:`LaunchCache` replays).

    ``token`` numbers everything a cached launch depends on besides its arguments: the driver and current device,
    Triton's debug and instrumentation knobs, PDL, and the op's own ``settings`` (module values its launch plan
    reads, and the values of the kernel globals it names); the native path keys its plans by it. Under the
    interpreter there is no driver, stream or hook.
    """
    if INTERPRETER:
        state: tuple = (None, NOMINAL_SMS, settings)
        stream = enter_hook = exit_hook = None
    else:
        found = launch_cache.native_state()
        if found is None:
            return None
        launch_state, stream, enter_hook, exit_hook = found
        state = (launch_state, NOMINAL_SMS, settings)  # NOMINAL_SMS: what plan_sms answers off a GPU
    token = _native_tokens.get(state)
    if token is None:
        token = _native_tokens[state] = len(_native_tokens)
    return token, stream, enter_hook, exit_hook


# the aten ops a fill may run and still give a plan: allocations (uninitialized) and views
_ALLOCATIONS = frozenset(
    (
        torch.ops.aten.empty.memory_format,
        torch.ops.aten.empty_like.default,
        torch.ops.aten.empty_strided.default,
        torch.ops.aten.new_empty.default,
        torch.ops.aten.new_empty_strided.default,
    )
)


# ... and zero-filled allocations (a split reduction's arrival counters, say), which a replay allocates zeroed
_ZEROED = frozenset((torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default))


class _AllocationsOnly(TorchDispatchMode):
    """Watches a fill: ``only`` stays true while the Python path runs no aten op but allocations (zero-filled ones
    too) and views, so that its outputs and temporaries hold what its launches wrote and nothing else, or zeros
    where nothing wrote (launches run outside the mode). ``zeroed``: the storages a zero-filled allocation made."""

    def __init__(self) -> None:
        super().__init__()
        self.only = True
        self.zeroed: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        if func in _ZEROED:
            self.zeroed.add(result.untyped_storage().data_ptr())
        elif func not in _ALLOCATIONS and not func.is_view:
            self.only = False
        return result


class _RecordedContext:
    """The ctx an op's setup_context gets during a fill that wants a gradient: it passes everything on to the real
    ctx and keeps what was saved, marked non-differentiable and set, for the native node."""

    _MODELLED = frozenset(("save_for_backward", "mark_non_differentiable", "needs_input_grad"))

    def __init__(self, ctx: Any) -> None:
        object.__setattr__(self, "ctx", ctx)
        object.__setattr__(self, "saved", ())
        object.__setattr__(self, "constant", ())
        object.__setattr__(self, "attrs", {})
        object.__setattr__(self, "modelled", True)

    def save_for_backward(self, *tensors: Any) -> None:
        object.__setattr__(self, "saved", tensors)
        self.ctx.save_for_backward(*tensors)

    def mark_non_differentiable(self, *tensors: Any) -> None:
        object.__setattr__(self, "constant", tensors)
        self.ctx.mark_non_differentiable(*tensors)

    def __setattr__(self, name: str, value: Any) -> None:
        self.attrs[name] = value
        setattr(self.ctx, name, value)

    def __getattr__(self, name: str) -> Any:  # needs_input_grad; anything else the native node does not model
        if name not in self._MODELLED:
            object.__setattr__(self, "modelled", False)
        return getattr(self.ctx, name)


_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype)


def _constant(value: Any) -> bool:
    """Whether a ctx attribute can be kept for every call of a key (a tensor cannot)."""
    if isinstance(value, tuple):
        return all(_constant(v) for v in value)
    return type(value) in _CONSTANT_TYPES


def _plan(
    args: tuple, result: Any, launches: list, context: _RecordedContext | None, zeroed: Collection[int] = ()
) -> tuple | None:
    """The plan csrc/eager.cpp replays for a fill, or None when it cannot model the call.

    Every tensor a launch got is a call argument (the same address and dtype) or lies in a fresh allocation: a
    buffer (on a storage no argument shares; allocated zero-filled where its storage is in ``zeroed``), or a view of
    one at another offset; each output is a buffer's own view, one output per storage. A saved tensor is an argument
    or an output (the same object); the ctx's attributes are constants.
    """
    single = type(result) in _PLAIN_TENSORS
    outputs = (result,) if single else result
    if not isinstance(outputs, tuple) or not outputs or not launches:
        return None
    by_address: dict[tuple, int] = {}
    argument_storages = set()
    for i, a in enumerate(args):
        if type(a) in _PLAIN_TENSORS:
            by_address.setdefault((a.data_ptr(), a.dtype), i)
            argument_storages.add(a.untyped_storage().data_ptr())
    buffers: list[tuple] = []
    views: dict[int, tuple[torch.Tensor, int]] = {}  # storage address -> (the view its buffer is allocated as, index)

    def slot(t: torch.Tensor) -> tuple | None:
        """``(1, buffer)``, ``(3, buffer, sizes, strides, storage offset)`` (another view of a buffer) or None."""
        storage = t.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        if t.layout != torch.strided or nbytes % t.element_size():
            return None
        if nbytes and address in argument_storages:
            return None
        found = views.get(address) if nbytes else None  # an empty storage has no address: a buffer of its own
        if found is None:
            if nbytes:
                views[address] = (t, len(buffers))
            buffers.append(
                (t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), nbytes // t.element_size(),
                 not t.data_ptr() & 15, bool(nbytes) and address in zeroed)
            )  # fmt: skip
            return 1, len(buffers) - 1
        view, index = found
        if view.dtype != t.dtype:
            return None
        if view.data_ptr() == t.data_ptr():
            return 1, index
        return 3, index, tuple(t.shape), t.stride(), t.storage_offset()

    output_buffers = []
    for o in outputs:
        if type(o) not in _PLAIN_TENSORS:
            return None
        storage = o.untyped_storage()
        if storage.nbytes() and storage.data_ptr() in views:
            return None  # a second output on one storage
        output_buffers.append(slot(o))
        if output_buffers[-1] is None:
            return None
    steps = []
    for grid, launcher, function, metadata, constexprs, launch_args, direct in launches:
        slots = []
        for a in launch_args:
            if type(a) in _PLAIN_TENSORS:
                i = by_address.get((a.data_ptr(), a.dtype))
                slots.append((0, i) if i is not None else slot(a))
                if slots[-1] is None:
                    return None
            elif a is None or type(a) in (int, float, bool):
                slots.append((2, a))
            else:
                return None
        steps.append((grid, launcher, function, metadata, constexprs, tuple(slots), direct))
    saved: list[tuple] = []
    differentiable: tuple = ()
    attrs: dict = {}
    if context is not None:
        if not context.modelled or not all(_constant(v) for v in context.attrs.values()):
            return None
        for t in context.saved:
            position = next((i for i, a in enumerate(args) if a is t), None) if t is not None else None
            if t is None:
                saved.append((2, None))
            elif position is not None:
                saved.append((0, position))
            elif (j := next((j for j, o in enumerate(outputs) if o is t), None)) is not None:
                saved.append((1, j))
            else:
                return None
        constant = {id(t) for t in context.constant}
        if len(constant) != sum(any(o is t for o in outputs) for t in context.constant):
            return None  # marked a tensor that is not an output
        differentiable = tuple(id(o) not in constant for o in outputs)
        attrs = dict(context.attrs)
    outputs_at = tuple(b for _, b in output_buffers)
    return single, tuple(buffers), outputs_at, tuple(steps), tuple(saved), differentiable, attrs


# A native replay's own launch (csrc/eager.cpp, launch_direct), on Triton's CUDA driver: cuLaunchKernelEx with the
# parameters Triton's launcher would pass. Triton packs each non-constexpr argument by its signature type
# (triton/backends/nvidia/driver.c's extractors in 3.8, the generated launcher in 3.6, the same rules): a pointer as
# the tensor's 64-bit address, an int in its width, an fp32 as a C float; then two scratch pointers (global,
# profile), null for a kernel without scratch memory. Per type: the PTX parameter types the kernel's entry may
# declare for it, and the bits of a constant (None: not a value Triton's launcher would take as it is).
DIRECT_ENV = "VITFAST_DIRECT_LAUNCH"  # "0": native replays call Triton's launcher instead of cuLaunchKernelEx
_PTX_ENTRY = re.compile(r"\.entry\s+[\w$]+\s*\(([^)]*)\)")
_INTS = (int, bool)


def _bits_int(width: int) -> Callable[[Any], int | None]:
    return lambda v: int(v) & ((1 << width) - 1) if type(v) in _INTS else None


def _bits_float(code: str) -> Callable[[Any], int | None]:
    def bits(v: Any) -> int | None:
        try:
            return struct.unpack("<Q" if code == "d" else "<I", struct.pack("<" + code, v))[0]
        except (struct.error, OverflowError, TypeError):  # a float32 overflow: Triton's cast gives inf, not this
            return None

    return bits


_DIRECT_SCALARS: dict[str, tuple[tuple[str, ...], Callable[[Any], int | None]]] = {
    "i32": ((".u32", ".s32", ".b32"), _bits_int(32)),
    "u32": ((".u32", ".s32", ".b32"), _bits_int(32)),
    "i64": ((".u64", ".s64", ".b64"), _bits_int(64)),
    "u64": ((".u64", ".s64", ".b64"), _bits_int(64)),
    "fp32": ((".f32",), _bits_float("f")),
    "fp64": ((".f64",), _bits_float("d")),
}
_DIRECT_SCRATCH = 2  # Triton's trailing scratch pointers (global, profile)
_DRIVER_FUNCTIONS = (
    "cuLaunchKernelEx",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuDevicePrimaryCtxRetain",
    "cuDeviceGet",
)
_libcuda: list = []  # [(the library, its functions' addresses or None)], once per process


def direct_launch_driver(active: Any) -> tuple[int, ...] | None:
    """The addresses of the CUDA driver functions a native replay's direct launch calls (``_DRIVER_FUNCTIONS``, from
    libcuda.so.1, the library Triton's launcher opens) for Triton's CUDA driver ``active``; None for another driver,
    without libcuda, or with ``VITFAST_DIRECT_LAUNCH=0`` (then replays call Triton's launcher). The host-overhead
    probe's stand-in driver replaces this function."""
    if os.environ.get(DIRECT_ENV, "").strip() == "0" or type(active).__module__ != "triton.backends.nvidia.driver":
        return None
    if not _libcuda:
        try:
            library = ctypes.CDLL("libcuda.so.1")
            found = tuple(ctypes.cast(getattr(library, name), ctypes.c_void_p).value for name in _DRIVER_FUNCTIONS)
            _libcuda.append((library, found if all(found) else None))
        except (OSError, AttributeError):
            _libcuda.append((None, None))
    return _libcuda[0][1]


def _ptx_params(ptx: str) -> list[tuple[str, bool]] | None:
    """``(type, is a pointer)`` of each parameter of the PTX's kernel entry, or None."""
    match = _PTX_ENTRY.search(ptx)
    if match is None:
        return None
    params = []
    for declaration in match.group(1).split(","):
        tokens = declaration.split()
        if len(tokens) < 3 or tokens[0] != ".param":
            return None
        params.append((tokens[1], ".ptr" in tokens))
    return params


def _direct_template(entry: _CompiledLaunch) -> tuple | None:
    """What a direct launch of ``entry``'s compiled kernel takes from it: ``(CUfunction, threads per block, shared
    bytes, PDL, ((positional argument, type), ...) of its parameters)``, or None when the replay must call Triton's
    launcher: a kernel Triton launches with more than the parameters and PDL (scratch memory, clusters, a cooperative
    grid, tensor descriptors, instrumentation), a signature type not modelled, or a PTX entry that does not declare
    exactly the parameters Triton's packing rules give."""
    compiled = entry.compiled
    metadata = getattr(compiled, "metadata", None)
    function = getattr(compiled, "function", None)
    if metadata is None or type(function) is not int:
        return None
    plain = (
        getattr(metadata, "num_ctas", None) == 1
        and getattr(metadata, "launch_cooperative_grid", True) is False
        and getattr(metadata, "global_scratch_size", None) == 0
        and getattr(metadata, "profile_scratch_size", None) == 0
        and not getattr(metadata, "tensordesc_meta", None)
        and not getattr(metadata, "instrumentation_mode", "")
    )
    try:
        types = list(compiled.src.signature.values())
        ptx = compiled.asm["ptx"]
    except (AttributeError, KeyError, TypeError):
        return None
    positional = len(types) - len(entry.constexprs)
    if not plain or positional < 0 or any(t != "constexpr" for t in types[positional:]):
        return None
    kept = [(i, t) for i, t in enumerate(types[:positional]) if t != "constexpr"]
    expected = []
    for _, t in kept:
        if not isinstance(t, str) or not (t.startswith("*") or t in _DIRECT_SCALARS):
            return None
        expected.append(((".u64",), True) if t.startswith("*") else (_DIRECT_SCALARS[t][0], False))
    expected += [((".u64",), True)] * _DIRECT_SCRATCH
    declared = _ptx_params(ptx if isinstance(ptx, str) else "")
    if declared is None or len(declared) != len(expected):
        return None
    pairs = zip(declared, expected, strict=True)
    if any(kind not in kinds or pointer != want for (kind, pointer), (kinds, want) in pairs):
        return None
    kept = tuple((i, "*" if t.startswith("*") else t) for i, t in kept)
    return function, 32 * metadata.num_warps, metadata.shared, bool(metadata.launch_pdl), kept


def _direct_launch(template: tuple | None, args: tuple) -> tuple | None:
    """A step's direct launch for a launch with ``args`` (csrc/eager.cpp's ``parse_direct``): the driver functions'
    addresses, then the template with each parameter as ``(1, argument)`` (a tensor's address) or ``(0, bits)``;
    None without a direct launch for the active driver, or when an argument is not what its parameter's type takes."""
    driver = direct_launch_driver(launch_cache._driver) if template is not None else None
    if driver is None:
        return None
    *config, kept = template
    params = []
    for index, kind in kept:
        value = args[index]
        if kind == "*":
            if type(value) not in _PLAIN_TENSORS:
                return None
            params.append((1, index))
            continue
        bits = _DIRECT_SCALARS[kind][1](value)
        if bits is None:
            return None
        params.append((0, bits))
    return (driver, *config, (*params, *[(0, 0)] * _DIRECT_SCRATCH))


def native_fill(
    op: EagerOp, covers: Callable | None, globals_read: tuple[str, ...], grad: bool, *args: Any
) -> tuple[Any, tuple | bool | None]:
    """Run ``op``'s Python path once for the native entry point and answer ``(result, plan)``.

    ``plan``: what csrc/eager.cpp replays for every later call with this key (:func:`_plan`); False when it never
    can for this key: ``covers(*args)`` (the op's coverage check: a function of the key too) says no, and then
    ``result`` is NotImplemented and nothing ran; or the path ran an aten op other than an allocation (zero-filled or
    not) or a view; or a kernel reads a module global not named in ``globals_read`` (the replay does not check
    globals per launch as ``JITFunction.run`` does: the op's state callback keys on the values of those it names, so
    that a changed one misses the cache and the Python launch raises Triton's error). None: not this time (a launch
    not in the launch cache yet, a layout the plan does not model).
    """
    if covers is not None and not covers(*args):
        return NotImplemented, False
    recorded: list = []
    watch = _AllocationsOnly()
    outer, _direct.recorded = _direct.recorded, recorded
    _direct.context = None
    try:
        with watch:
            result = _EagerAutograd.apply(op, *args) if grad else op.direct(*args)
    finally:
        _direct.recorded = outer
    context, _direct.context = _direct.context, None
    if not watch.only:
        return result, False
    launches = []
    for kernel, grid, launch_args, kwargs in recorded:
        if type(grid) is not tuple or not 1 <= len(grid) <= 3:
            return result, None
        grid = (*grid, 1, 1)[:3]
        if INTERPRETER:
            launches.append((grid, _interpreted(kernel, tuple(kwargs), len(launch_args)), None, None,
                             tuple(kwargs.values()), launch_args, None))  # fmt: skip
            continue
        entry = launch_cache.entry(kernel, grid, launch_args, kwargs)
        if entry is None:
            return result, None
        if any(name not in globals_read for name, *_ in entry.globals):
            return result, False
        if entry.direct is _MISSING:
            entry.direct = _direct_template(entry)
        launches.append((grid, entry.launcher, entry.function, entry.packed_metadata, entry.constexprs, launch_args,
                         _direct_launch(entry.direct, launch_args)))  # fmt: skip
    return result, _plan(args, result, launches, context if grad else None, watch.zeroed)


def _interpreted(kernel: Any, names: tuple[str, ...], count: int) -> Callable:
    """Under the interpreter, a "launcher" with the compiled launcher's signature that runs ``kernel[grid]``."""

    def launcher(grid_0, grid_1, grid_2, _stream, _function, _metadata, _launch, _enter, _exit, *values) -> None:
        kernel[(grid_0, grid_1, grid_2)](*values[:count], **dict(zip(names, values[count:], strict=True)))

    return launcher


class _NativeContext:
    """The ctx an op's backward gets from a native node: the fill's attributes, the saved tensors, needs_input_grad."""

    def __init__(self, attrs: dict, saved_tensors: tuple, needs_input_grad: tuple) -> None:
        self.__dict__.update(attrs)
        self.saved_tensors = saved_tensors
        self.needs_input_grad = needs_input_grad


def _native_backward(op: EagerOp, attrs: dict, needs_input_grad: tuple, grads: tuple, saved: tuple) -> tuple:
    """A native node's backward: ``op``'s registered backward, one gradient per op argument. A non-differentiable
    output's gradient is None (a Python node would pass zeros; no backward reads them)."""
    result = op.backward(_NativeContext(attrs, saved, needs_input_grad), *grads)
    return result if isinstance(result, tuple) else (result,)


def register_native(
    op: EagerOp, state: Callable, cpu: bool, *, covers: Callable | None = None, globals_read: tuple[str, ...] = ()
) -> None:
    """Give ``op`` a native entry point (csrc/eager.cpp) when the compiled extension has one, with no plans yet.

    ``state``: its launch-state callback (:func:`native_state` with the op's plan settings and the values of the
    kernel globals in ``globals_read``); ``cpu``: take CPU tensors too (the interpreter, the host-overhead probe's
    stand-in GPU); ``covers``: the op's coverage check (the public wrapper's, for an op whose wrapper tries the native
    path before its own checks), a function of the key alone. The contract the op keeps: its Python path's launches,
    allocations and saved tensors are a function of its arguments' types, values and layouts and of ``state``; and
    every kernel goes through :func:`launch`. Called at import by each op module's ``register_ext``, and by
    ``vitfast._ext.load_jit``.
    """
    api = native_api()
    if api is None:
        return
    fill = functools.partial(native_fill, op, covers, globals_read)
    backward = functools.partial(_native_backward, op) if op.backward is not None else None
    op.native = api.native_op(state, fill, backward, cpu)


def native_plans(op: EagerOp) -> tuple[int, int]:
    """``(plans, declined keys)`` of ``op``'s native entry point; (0, 0) without one."""
    return (0, 0) if op.native is None else native_api().native_plans(op.native)


EAGER_OPS: dict[str, EagerOp] = {}  # every op triton_op made, by name ("vitfast::layer_norm_fwd")


def triton_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], EagerOp]:
    """``torch.library.triton_op(name, mutates_args=...)`` returning an :class:`EagerOp` (the eager launch path).

    Only for ops that mutate nothing (anything else raises): the direct path does not bump version counters.
    """
    if mutates_args:
        raise ValueError(f"{name}: the eager launch path takes only ops that mutate nothing.")

    def register(fn: Callable) -> EagerOp:
        op = EAGER_OPS[name] = EagerOp(torch.library.triton_op(name, mutates_args=mutates_args)(fn), fn)
        return op

    return register


def kernel_can_run(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernels can take these tensors: all on a CUDA GPU, or all on the CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    # is_cuda / is_cpu rather than a set of device types: this runs twice per eager call (coverage, then the op)
    cuda = cpu = False
    for t in tensors:
        if t is None:
            continue
        if t.is_cuda:
            cuda = True
        elif INTERPRETER and t.is_cpu:
            cpu = True
        else:
            return False
    return cuda != cpu


def rows_2d(t: torch.Tensor, cols: int) -> tuple[torch.Tensor, int, int]:
    """``(rows, n_rows, row_stride)``: ``t`` as ``[n_rows, cols]`` rows with unit column stride, for a kernel that
    reads its rows through a pointer and a row stride (copied only when no view has a unit column stride).

    On the direct eager path a contiguous ``t`` is handed over as it is (the kernel sees its address alone, and its
    rows are ``cols`` apart), which saves the ~1.5 us of a ``reshape`` per tensor and launch. Anywhere else (the
    registered op, traced) the reshape runs as it always did.
    """
    if _direct.depth and cols and t.is_contiguous():
        return t, t.numel() // cols, cols
    rows = t.reshape(-1, cols)
    if rows.stride(-1) != 1 and cols != 1:
        rows = rows.contiguous()
    return rows, rows.shape[0], rows.stride(0)


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, its sizes passed as separate ints.

    The same tensor, for about half the host time: torch's argument parser takes ~1.5 us longer over a ``torch.Size``
    or tuple than over ints (CPU, torch 2.14), and an eager launch allocates each of its outputs this way.
    """
    if shape:
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.empty((), dtype=dtype, device=device)


_MEMO_SIZE = 4096  # entries per memoized function: a few per (op, shape, dtype); cleared, never grown, past it


def eager_memo(fn: Callable) -> Callable:
    """Memoize a launcher's pure function of call metadata (ints, bools, dtypes) on the direct eager path only.

    For the launch decisions a launcher derives from shapes alone (block sizes, grid, num_warps, programs), which
    cost ~2-5 us of Python per launch and repeat at every step of a model. ``fn`` must be a pure function of its
    arguments (hashable values that determine the result: no tensor; a module setting it reads that can change, such
    as one a test sets, passed in as an argument too; one type per argument, as ``1 == True == 1.0`` in a key).
    Outside an :class:`EagerOp`'s direct call (the registered op under ``torch.compile``, opcheck, fake tensors,
    functorch, and the launchers called on their own), ``fn`` runs as written, so symbolic shapes and their guards
    are what they always were. ``fn.cache_clear()`` empties the memo.
    """
    memo: dict[tuple, Any] = {}

    @functools.wraps(fn)
    def memoized(*args: Any) -> Any:
        if not _direct.depth:
            return fn(*args)
        try:
            return memo[args]
        except KeyError:
            pass
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        result = memo[args] = fn(*args)
        return result

    memoized.cache_clear = memo.clear  # type: ignore[attr-defined]
    memoized.memo = memo  # type: ignore[attr-defined]
    return memoized


def log_fallback(op: str, reason: str) -> None:
    """Say once per (op, reason), at debug level, that a call outside a kernel's coverage ran the reference."""
    if (op, reason) not in _logged:
        _logged.add((op, reason))
        logger.debug("vitfast %s: %s; running the reference implementation.", op, reason)


# ------------------------------------------------------------------------------- programmatic dependent launch
# With PDL (sm_90+) a kernel may start while the one before it in the stream still runs, which hides the launch gap
# between graph nodes. Every kernel that can be launched so takes a ``PDL: tl.constexpr = False`` parameter and calls
# :func:`pdl_prologue` first: it waits for the previous grid to complete (and its memory to be visible) before its
# first global access, whatever it reads or writes. Only plain eager launches (graph capture included) inside
# :func:`use_pdl` set it; traced launches (torch.compile, opcheck) and the interpreter never do.

if HAS_TRITON:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # a Triton without grid dependency control: PDL is never turned on (pdl_supported)
        gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """The first statement of every kernel that takes ``PDL``: nothing unless ``PDL`` (then inline PTX, which the
    interpreter cannot run and which no launch sets there).

    The wait blocks until the grid this one depends on has completed and flushed its memory, so that every global
    read and write after it is ordered after the previous kernel, also one that is not ours. Because every program
    waits before it exits, this grid completes only after its predecessor did: a chain of PDL launches stays ordered
    as a plain stream is. The trigger then lets the next kernel be scheduled onto free SMs while this one runs; it
    orders no memory (the next kernel's own wait does), and placed after the wait it keeps at most two grids in
    flight.
    """
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


class _PdlState(threading.local):
    on = False


_pdl = _PdlState()


def _takes_pdl(kernel: Any) -> bool:
    """Whether ``kernel`` has the ``PDL`` parameter; kept on the kernel object (a JITFunction's hash is its source
    hash, too slow to key a dict with on every launch)."""
    takes = getattr(kernel, "_vitfast_takes_pdl", None)
    if takes is None:
        takes = kernel._vitfast_takes_pdl = "PDL" in getattr(kernel, "arg_names", ())
    return takes


def _add_pdl(kernel: Any, kwargs: dict) -> None:
    """To a kernel that takes it, pass ``PDL`` always (the launch cache keys on every constexpr) and, with
    ``PDL=True``, ``launch_pdl=True``: a Triton compile option (``CUDAOptions.launch_pdl``, Triton 3.6 and 3.8), so
    part of the specialization, which the compiled kernel's launcher reads to set the
    PROGRAMMATIC_STREAM_SERIALIZATION launch attribute."""
    takes = getattr(kernel, "_vitfast_takes_pdl", None)
    if takes is None:
        takes = _takes_pdl(kernel)
    if takes:
        kwargs["PDL"] = on = _pdl.on
        if on:
            kwargs["launch_pdl"] = True


def pdl_supported(device: torch.device | str) -> bool:
    """Whether kernels on ``device`` can be launched with PDL: Triton with grid dependency control, not its
    interpreter, and an NVIDIA GPU of compute capability 9.0 or above (``griddepcontrol`` is sm_90 PTX; a ROCm
    build's "cuda" device is an AMD GPU)."""
    device = torch.device(device)
    if not HAS_TRITON or INTERPRETER or gdc_wait is None or device.type != "cuda" or torch.version.hip is not None:
        return False
    if not torch.cuda.is_available():
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    if "launch_pdl" not in CUDAOptions.__dataclass_fields__:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


@contextlib.contextmanager
def use_pdl(device: torch.device | str, enabled: bool = True) -> Iterator[bool]:
    """Launch this thread's eager kernel calls with PDL inside the block, where :func:`pdl_supported` says it can
    run (elsewhere the block runs as without it); yields whether PDL is on."""
    previous = _pdl.on
    _pdl.on = bool(enabled) and pdl_supported(device)
    try:
        yield _pdl.on
    finally:
        _pdl.on = previous
