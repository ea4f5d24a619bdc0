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

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    "HAS_TRITON",
    "INTERPRETER",
    "KERNEL_DTYPES",
    "kernel_can_run",
    "launch",
    "log_fallback",
    "next_power_of_2",
    "num_sms",
    "plain_eager",
    "tl",
    "triton",
    "triton_op",
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

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

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


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch grids are sized from it); cached per device."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


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

    Under the interpreter, ``wrap_triton`` hands back the plain kernel, which cannot run on the fake tensors that
    shape propagation (opcheck, make_fx) passes in; the outputs are already allocated, so the launch is skipped.
    """
    if not HAS_TRITON:
        raise RuntimeError("vitfast's Triton kernels need the triton package; pip install triton.")
    values = (*args, *kwargs.values())
    if INTERPRETER and any(_is_fake(a) for a in values):
        return
    if plain_eager(values):
        # Plain eager call (CUDA-graph capture included): launch directly. Through wrap_triton, each eager launch
        # dispatches a higher-order op, which cost ~80 us of host time per kernel on an H100 host (2026-11-22:
        # vit_base_patch16_224 bs 1 eager on the kernels 10.5 ms vs 5.1 ms on the reference path), far more than
        # the kernels themselves take.
        kernel[grid](*args, **kwargs)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def plain_eager(args: tuple[Any, ...]) -> bool:
    """Whether a call may skip ``torch.library``'s dispatch: nothing traces it and no transform wraps it.

    Nothing compiling (dynamo), no dispatch mode (fake tensors, make_fx, FlopCounter, opcheck's checks), no functorch
    transform (vmap, grad, functionalize) and only plain tensors (no FakeTensor, DTensor or other subclass) among the
    arguments. Anything else goes through the registered op, which is what those tools are built to see.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, torch.Tensor))


class _EagerAutograd(torch.autograd.Function):
    """The autograd node of an :class:`EagerOp` called eagerly: its registered setup_context and backward, unchanged.

    Same contract as the node ``register_autograd`` builds (one gradient per output, zeros for outputs that got
    none, ``ctx.needs_input_grad`` per op input), without the dispatcher's redispatch around the forward.
    """

    @staticmethod
    def forward(ctx: Any, op: EagerOp, *args: Any) -> Any:
        output = op.fn(*args)
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

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        self.backward = backward
        self.setup_context = setup_context

    def __getattr__(self, name: str) -> Any:  # register_fake, register_kernel, ... of the CustomOpDef
        return getattr(self.op, name)

    def __call__(self, *args: Any) -> Any:
        if not plain_eager(args):
            return self.op(*args)
        if (
            self.backward is not None
            and torch.is_grad_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        ):
            return _EagerAutograd.apply(self, *args)
        return self.fn(*args)


def triton_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], EagerOp]:
    """``torch.library.triton_op(name, mutates_args=...)`` returning an :class:`EagerOp` (the eager launch path).

    Only for ops that mutate nothing (anything else raises): the direct path does not bump version counters.
    """
    if mutates_args:
        raise ValueError(f"{name}: the eager launch path takes only ops that mutate nothing.")

    def register(fn: Callable) -> EagerOp:
        return EagerOp(torch.library.triton_op(name, mutates_args=mutates_args)(fn), fn)

    return register


def kernel_can_run(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernels can take these tensors: all on a CUDA GPU, or all on the CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    devices = {t.device.type for t in tensors if t is not None}
    return devices == {"cuda"} or (INTERPRETER and devices == {"cpu"})


def log_fallback(op: str, reason: str) -> None:
    """Say once per (op, reason), at debug level, that a call outside a kernel's coverage ran the reference."""
    if (op, reason) not in _logged:
        _logged.add((op, reason))
        logger.debug("vitfast %s: %s; running the reference implementation.", op, reason)
