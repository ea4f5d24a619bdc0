"""Which implementation runs each vitfast op.

The backend is looked up every time an op is called, so switching it never requires rebuilding a model:

- ``"reference"``: plain PyTorch, runs on any device;
- ``"triton"``: the Triton kernels (CUDA GPU and the ``triton`` package required; on the CPU only under Triton's
  interpreter, ``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU);
- ``"cuda"``: the compiled CUDA C++ extension (``vitfast._C``);
- ``"auto"`` (default): the fastest implementation measured for the tensor's device. On CUDA that is the compiled
  extension where it is present and the reference otherwise: the Triton kernels lose to PyTorch's own kernels in
  eager mode (each Triton op call costs tens of microseconds of host time, and some backward kernels are slow; H100,
  2026-11-22: ViT-B/16 eager 7.9 vs 4.0 ms at batch 1). They win inside CUDA graphs at small batch, where
  :func:`vitfast.optimize` measures and picks them. In training (a call under grad mode) ``"auto"`` follows
  :data:`TRAINING_TABLE` instead: an implementation runs only where a GPU measured it faster than PyTorch at forward
  + backward, per op and width range, on that device, in eager mode (under ``torch.compile`` the reference, which
  inductor fuses); PyTorch everywhere else. ``python -m benchmarks.training_table`` turns a GPU run of the op
  benchmarks into cells. The table has no cell yet, so training runs PyTorch; run inference under
  ``torch.inference_mode()`` / ``torch.no_grad()`` to get the inference choice.

Set it with :func:`set_backend`, the :func:`use_backend` context manager, or the ``VITFAST_BACKEND`` environment
variable (read once, at the first op call).

Ops register implementations with :func:`register_impl`; layers call ``dispatch(op_name, device)`` through the
functional op in ``vitfast/ops``. An op without an implementation for the chosen backend runs its reference with a
one-time debug log, never an error.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "BACKENDS",
    "TRAINING_TABLE",
    "TrainingCell",
    "dispatch",
    "get_backend",
    "implementations",
    "override_impl",
    "register_impl",
    "set_backend",
    "use_backend",
]

BACKENDS = ("reference", "triton", "cuda", "auto")
ENV_VAR = "VITFAST_BACKEND"

logger = logging.getLogger("vitfast")

_current: str | None = None  # None until set or read from the environment
_impls: dict[str, dict[str, Callable]] = {}
_overrides: dict[str, Callable] = {}
_logged_fallbacks: set[tuple[str, str]] = set()


def _validate(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"Unknown vitfast backend {name!r} (from {origin}); choose one of {', '.join(BACKENDS)}.")
    return name


def _check_available(name: str) -> None:
    """Raise a RuntimeError that says what is missing when an explicitly requested backend cannot run."""
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                f"The 'triton' backend needs the triton package ({exc}). Install it (pip install triton) or use "
                "set_backend('reference') / set_backend('auto')."
            ) from exc
        from vitfast.ops import _triton

        # Under Triton's interpreter (TRITON_INTERPRET=1) the kernels run on CPU tensors: how they are tested.
        if not torch.cuda.is_available() and not _triton.INTERPRETER:
            raise RuntimeError(
                "The 'triton' backend needs a CUDA GPU, and torch.cuda.is_available() is False on this machine. "
                "Use set_backend('reference') or set_backend('auto'), which falls back to the reference path."
            )
    elif name == "cuda":
        from vitfast import _ext

        if not _ext.HAS_EXT:
            raise RuntimeError(
                f"The 'cuda' backend needs vitfast's compiled extension, and {_ext.reason}. Reinstall vitfast from "
                "source with a CUDA toolkit present, or use set_backend('auto')."
            )
        if not _ext.HAS_EXT_CUDA:
            raise RuntimeError(
                "The 'cuda' backend needs the CUDA kernels of vitfast's compiled extension, and this build of it has "
                "only its CPU ops (built without nvcc, or with VITFAST_BUILD_CUDA=0). Rebuild it where nvcc matches "
                "torch's CUDA (pip install --no-build-isolation .), or use set_backend('auto')."
            )
        if not torch.cuda.is_available():
            raise RuntimeError(
                "The 'cuda' backend runs the compiled extension's CUDA kernels, and torch.cuda.is_available() is "
                "False on this machine. Use set_backend('reference') or set_backend('auto')."
            )


def set_backend(name: str) -> None:
    """Choose the backend for all vitfast ops from now on (``"reference"``, ``"triton"``, ``"cuda"`` or ``"auto"``).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when the backend cannot run here.
    """
    global _current
    _check_available(_validate(name, "set_backend"))
    _current = name


def get_backend() -> str:
    """The backend in force: the last :func:`set_backend`, else ``$VITFAST_BACKEND``, else ``"auto"``."""
    global _current
    if _current is None:
        name = _validate(os.environ.get(ENV_VAR, "auto").strip().lower(), f"${ENV_VAR}")
        _check_available(name)
        _current = name
    return _current


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block of code with another backend, restoring the previous one afterwards."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def register_impl(op: str, backend: str, fn: Callable | None = None):
    """Register ``fn`` as the ``backend`` implementation of ``op`` (usable as a decorator)."""
    _validate(backend, f"register_impl({op!r})")

    def _register(impl: Callable) -> Callable:
        _impls.setdefault(op, {})[backend] = impl
        return impl

    return _register(fn) if fn is not None else _register


def implementations(op: str) -> dict[str, Callable]:
    """The registered implementations of ``op`` by backend name (a copy)."""
    if op not in _impls:
        raise KeyError(f"unknown vitfast op {op!r}; known ops: {sorted(_impls)}")
    return dict(_impls[op])


@contextmanager
def override_impl(op: str, fn: Callable) -> Iterator[None]:
    """Run ``fn`` for ``op`` whatever the backend, inside the block (how benchmarks plug in peer libraries)."""
    if op not in _impls:
        raise KeyError(f"unknown vitfast op {op!r}; known ops: {sorted(_impls)}")
    previous = _overrides.get(op)
    _overrides[op] = fn
    try:
        yield
    finally:
        if previous is None:
            del _overrides[op]
        else:
            _overrides[op] = previous


@dataclass(frozen=True)
class TrainingCell:
    """One measured cell of ``"auto"``'s training table: ``backend`` beat PyTorch at forward + backward of ``op``.

    ``min_width`` / ``max_width``: the range of the op's last dimension the measurement covers (inclusive);
    ``device``: ``torch.cuda.get_device_name()`` of the GPU it ran on (the cell applies to that device only);
    ``measured``: ISO date; ``source``: the results file under ``benchmarks/results/`` that holds the timings.
    """

    op: str
    backend: str
    min_width: int
    max_width: int
    device: str
    measured: str
    source: str

    def covers(self, op: str, width: int | None) -> bool:
        return op == self.op and width is not None and self.min_width <= width <= self.max_width


# Empty: no GPU has measured forward + backward of the current kernels faster than PyTorch. The last measurement
# (H100, 2026-11-22, benchmarks/results/2026-11-22_h100_ext.md) had both the CUDA C++ and the Triton LayerNorm
# slower than PyTorch at forward + backward at every shape (e.g. (12608, 768) bf16: 0.69 and 1.53 vs 0.21 ms), and
# the kernels have been rebuilt since. A cell is added only from a GPU run, with its device, date and results file.
TRAINING_TABLE: tuple[TrainingCell, ...] = ()


@functools.cache
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _training_choice(op: str, device: torch.device, width: int | None) -> tuple[str, ...]:
    # The cells compare eager calls. Under torch.compile the reference is what inductor fuses with its neighbours,
    # which no cell has measured against: PyTorch there.
    if device.type != "cuda" or torch.compiler.is_compiling():
        return ()
    cells = [cell for cell in TRAINING_TABLE if cell.covers(op, width)]
    if not cells:
        return ()
    name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    return tuple(cell.backend for cell in cells if cell.device == name)


def _auto_candidates(op: str, device: torch.device, width: int | None) -> tuple[str, ...]:
    if torch.is_grad_enabled():
        return _training_choice(op, device, width)
    return ("cuda",) if device.type == "cuda" else ()


def dispatch(op: str, device: torch.device, width: int | None = None) -> Callable:
    """The implementation of ``op`` that should run for tensors on ``device`` under the current backend.

    ``width``: the size of the op's last dimension, which ``"auto"``'s training table looks up (None: no cell
    applies, PyTorch runs in training).
    """
    if op in _overrides:
        return _overrides[op]
    impls = _impls[op]
    chosen = get_backend()
    if chosen == "reference":
        return impls["reference"]
    candidates = _auto_candidates(op, device, width) if chosen == "auto" else (chosen,)
    for name in candidates:
        if name in impls:
            return impls[name]
    if chosen != "auto" and (op, chosen) not in _logged_fallbacks:
        _logged_fallbacks.add((op, chosen))
        logger.debug("vitfast op %r has no %r implementation; running the reference.", op, chosen)
    return impls["reference"]
