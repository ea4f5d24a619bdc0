"""Autograd Functions that save less for backward by recomputing cheap steps there (used by :func:`vitfast.patch`).

A pre-norm block's GEMMs each save their input for the weight gradient: ``qkv`` and ``fc1`` the LayerNorm outputs,
``fc2`` the activation (GELU, SwiGLU, SwiGLU + sub-LN). Those inputs are one elementwise or row-wise step away from
tensors that backward keeps anyway (the block input, the residual branch, ``fc1``'s output), so
:class:`RecomputedLinear` saves those instead and runs the step again in backward (flash-attn's
``recompute_output``): ``F.linear(prologue(*inputs), *weights(*params))`` saves ``inputs`` and ``params`` only.
``weights`` may build the weight (q / k / v or ``fc1_g`` / ``fc1_x`` concatenated, zero-padded widths): it runs
again in backward too, so the concatenated copy is not kept between forward and backward either.

Extra work in backward, per GEMM that uses it: the prologue once more (a LayerNorm forward: read ``[N, C]``, write
``[N, C]``; GELU / SwiGLU / SwiGLU + sub-LN: read the hidden input, write ``[N, hidden]``) and the weight build (a
copy of the weight) -- no GEMM runs twice. The prologue's backward is the op's own (autograd through the recomputed
call). Everything recomputed must be deterministic (no active dropout), which the callers check, so the recomputation
is the forward bit for bit (same inputs, same autocast state, and grad mode on in both, so that the backend's
``"auto"``, which chooses by grad mode, runs the same implementation).

:class:`ResidualNorm` is the pre-norm residual step ``(LayerNorm(x + gamma * branch), x + gamma * branch)`` saving
``x`` and ``branch`` rather than the sum: when the normalized output is consumed by :class:`RecomputedLinear`
(through :func:`normalization_of`), its backward is the residual add's alone (elementwise).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vitfast import ops

__all__ = [
    "Normalization",
    "RecomputedLinear",
    "ResidualNorm",
    "has_hooks",
    "normalization_of",
    "normalized_linear",
    "recomputed_linear",
    "tag_normalization",
]

_AUTOCAST_TYPES = (torch.float16, torch.bfloat16, torch.float32)
_TAG = "_vitfast_normalization"


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast_as(
    device_type: str, enabled: bool, dtype: torch.dtype | None = None
) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, dtype, enabled)``, or no context where autocast is in that state already:
    entering one cost ~25 us of host time on a 2-core machine, and a recomputing GEMM asked for three per step
    (``benchmarks/results/2026-12-02_step_host.md``)."""
    if torch.is_autocast_enabled(device_type) == enabled and (
        not enabled or torch.get_autocast_dtype(device_type) == dtype
    ):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


# the autograd engine that torch.autograd.grad calls (torch.autograd.graph._engine_run_backward), or None
_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)


def _gradients(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grads, allow_unused=True)`` over a recomputed step, by the engine itself.

    torch.autograd.grad's Python side (argument normalization, ``_make_grads``' checks of the grads given) cost more
    host time than the engine's pass over a one-op graph: ~70 of ~120 us on a 2-core machine. These grads are the
    backward's own, each shaped and typed as its output, so those checks have nothing to find."""
    if _ENGINE is None:
        return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    # (tensors, grad_tensors, keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad)
    return _ENGINE.run_backward(tuple(outputs), tuple(grads), False, False, tuple(inputs), True, False)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` as autocast would hand it to a GEMM: floating types it casts go to ``dtype``; None: unchanged."""
    if t is None or dtype is None or t.dtype not in _AUTOCAST_TYPES:
        return t
    return t.to(dtype)


def _as_in_training(fn: Callable, *args):
    """``fn(*args)`` in grad mode on detached tensors (so no graph is built): the backend's ``"auto"`` picks its
    implementations by grad mode, and the forward must run the one the backward's recomputation will run."""
    with torch.enable_grad():
        return fn(*(arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in args))


def _detached(tensors: Sequence[torch.Tensor | None], needs_grad: Sequence[bool]) -> list[torch.Tensor | None]:
    return [t if t is None else t.detach().requires_grad_(need) for t, need in zip(tensors, needs_grad, strict=True)]


class RecomputedLinear(torch.autograd.Function):
    """``F.linear(prologue(*inputs), *weights(*params))`` saving ``inputs`` and ``params``; see the module docstring.

    ``apply(prologue, weights, num_inputs, computed, *inputs, *params)``: ``weights`` returns ``(weight, bias)``
    (bias may be None); ``computed`` is ``prologue(*inputs)`` when the caller has it already (the forward then does
    not run the prologue) or None. Under autocast the GEMM takes autocast's dtype, as ``F.linear`` would.
    """

    @staticmethod
    def forward(ctx, prologue: Callable, weights: Callable, num_inputs: int, computed, *tensors):
        inputs, params = tensors[:num_inputs], tensors[num_inputs:]
        device_type = tensors[0].device.type
        ctx.autocast = _autocast_state(device_type)
        ctx.prologue, ctx.weights, ctx.num_inputs = prologue, weights, num_inputs
        activation = _as_in_training(prologue, *inputs) if computed is None else computed
        weight, bias = weights(*params)
        ctx.gemm_dtype = ctx.autocast[2] if ctx.autocast[1] and activation.dtype in _AUTOCAST_TYPES else None
        ctx.save_for_backward(*tensors)
        with _autocast_as(device_type, False):
            return torch.nn.functional.linear(
                _cast(activation, ctx.gemm_dtype), _cast(weight, ctx.gemm_dtype), _cast(bias, ctx.gemm_dtype)
            )

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        tensors = _detached(saved, needs)
        inputs, params = tensors[: ctx.num_inputs], tensors[ctx.num_inputs :]
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        with torch.enable_grad(), _autocast_as(device_type, autocast_enabled, autocast_dtype):
            activation = ctx.prologue(*inputs)
            weight, bias = ctx.weights(*params)
        dtype = ctx.gemm_dtype
        grad_rows = grad.reshape(-1, grad.shape[-1])
        outputs, output_grads = [], []
        with _autocast_as(device_type, False):
            if activation.requires_grad:
                d_activation = grad_rows.mm(_cast(weight.detach(), dtype))
                outputs.append(activation)
                output_grads.append(d_activation.view(activation.shape).to(activation.dtype))
            if weight.requires_grad:
                # the transposes of aten's addmm backward, so that an fp32 gradient is timm's bit for bit
                rows = _cast(activation.detach(), dtype).reshape(-1, activation.shape[-1])
                outputs.append(weight)
                output_grads.append(rows.t().mm(grad_rows).t().to(weight.dtype))
            if bias is not None and bias.requires_grad:
                outputs.append(bias)
                output_grads.append(grad_rows.sum(0).to(bias.dtype))
        wanted = [t for t in tensors if t is not None and t.requires_grad]
        found = iter(_gradients(outputs, wanted, output_grads) if outputs else ())
        return (
            None,
            None,
            None,
            None,
            *(next(found, None) if t is not None and t.requires_grad else None for t in tensors),
        )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _weight_and_bias(weight: torch.Tensor, bias: torch.Tensor | None = None):
    return weight, bias


def recomputed_linear(
    prologue: Callable | None,
    inputs: Sequence[torch.Tensor],
    weights: Callable | None,
    params: Sequence[torch.Tensor | None],
    computed: torch.Tensor | None = None,
) -> torch.Tensor:
    """:class:`RecomputedLinear` with defaults: ``prologue`` None is the identity (one input), ``weights`` None takes
    ``params`` as ``(weight, bias)``. ``computed``: the prologue's forward result when the caller has it."""
    prologue = _identity if prologue is None else prologue
    weights = _weight_and_bias if weights is None else weights
    if computed is not None:
        computed = computed.detach()  # its gradient reaches the inputs through the recomputation
    return RecomputedLinear.apply(prologue, weights, len(inputs), computed, *inputs, *params)


@dataclass(frozen=True)
class Normalization:
    """How a LayerNorm output was made: ``fn(*inputs)``, with the inputs' versions then (an in-place change since
    makes the recipe stale, and :func:`normalization_of` then ignores it)."""

    fn: Callable
    inputs: tuple[torch.Tensor | None, ...]
    versions: tuple[int, ...]


@dataclass(frozen=True)
class _Tag:
    # weak references: a tagged tensor kept by the caller (features returned by a model) must not keep its
    # LayerNorm's input alive after the GEMM that reads it has run
    fn: Callable
    inputs: tuple[weakref.ref | None, ...]
    versions: tuple[int, ...]
    output_version: int


def _versions(tensors: Sequence[torch.Tensor | None]) -> tuple[int, ...]:
    return tuple(-1 if t is None else t._version for t in tensors)


def tag_normalization(output: torch.Tensor, fn: Callable, inputs: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Record on ``output`` that it is ``fn(*inputs)``, so that the GEMM reading it can recompute it in backward."""
    refs = tuple(None if t is None else weakref.ref(t) for t in inputs)
    setattr(output, _TAG, _Tag(fn, refs, _versions(inputs), output._version))
    return output


def normalization_of(x: torch.Tensor) -> Normalization | None:
    """The recipe :func:`tag_normalization` put on ``x``, if it still describes ``x`` (its inputs alive, nothing
    changed in place since)."""
    tag = getattr(x, _TAG, None)
    if tag is None or x._version != tag.output_version:
        return None
    inputs = tuple(None if ref is None else ref() for ref in tag.inputs)
    dead = any(ref is not None and t is None for t, ref in zip(inputs, tag.inputs, strict=True))
    if dead or _versions(inputs) != tag.versions:
        return None
    return Normalization(tag.fn, inputs, tag.versions)


def normalized_linear(x: torch.Tensor, weights: Callable | None, params: Sequence[torch.Tensor | None]):
    """``F.linear(x, *weights(*params))`` saving what recomputes ``x`` (its LayerNorm's inputs when it is tagged,
    ``x`` itself otherwise) and ``params``: never ``x`` when it is a LayerNorm output, never a built weight."""
    recipe = normalization_of(x)
    if recipe is None:
        return recomputed_linear(None, (x,), weights, params)
    return recomputed_linear(recipe.fn, recipe.inputs, weights, params, computed=x)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (then callers keep the module call rather than its functional form)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class ResidualNorm(torch.autograd.Function):
    """``(LayerNorm(residual), residual)``, ``residual = x + gamma * branch``, through :func:`ops.layer_norm_residual`,
    saving ``x``, ``branch`` and the parameters (not ``residual``, nor the LayerNorm statistics).

    ``apply(eps, x, branch, gamma, weight, bias)``. Backward: when the normalized output got no gradient (its GEMM
    recomputed it from these same inputs, :func:`normalization_of`), the residual add's elementwise gradients; when it
    did (an untagged consumer), the fused op runs again and autograd differentiates it.
    """

    @staticmethod
    def forward(ctx, eps: float, x, branch, gamma, weight, bias):
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, branch, gamma, weight, bias)
        return _as_in_training(ops.layer_norm_residual, x, branch, gamma, weight, bias, eps)

    @staticmethod
    def backward(ctx, d_normed: torch.Tensor | None, d_residual: torch.Tensor | None):
        saved = ctx.saved_tensors
        x, branch, gamma, _weight, _bias = saved
        if d_normed is not None:
            tensors = _detached(saved, ctx.needs_input_grad[1:])
            device_type, autocast_enabled, autocast_dtype = ctx.autocast
            with torch.enable_grad(), _autocast_as(device_type, autocast_enabled, autocast_dtype):
                normed, residual = ops.layer_norm_residual(*tensors, ctx.eps)
            outputs, grads = [normed], [d_normed]
            if d_residual is not None:
                outputs.append(residual)
                grads.append(d_residual)
            wanted = [t for t in tensors if t is not None and t.requires_grad]
            found = iter(_gradients(outputs, wanted, grads))
            return None, *(next(found) if t is not None and t.requires_grad else None for t in tensors)
        if d_residual is None:
            return None, None, None, None, None, None
        d_branch = d_residual if gamma is None else d_residual * gamma
        d_gamma = None
        if gamma is not None and ctx.needs_input_grad[3]:
            rows = tuple(range(d_residual.ndim - 1))
            dtype = torch.promote_types(d_residual.dtype, torch.float32)  # fp32 sums at least, as the fused op
            d_gamma = (d_residual.to(dtype) * branch.to(dtype)).sum(rows).to(gamma.dtype)
        return None, d_residual.to(x.dtype), d_branch.to(branch.dtype), d_gamma, None, None
