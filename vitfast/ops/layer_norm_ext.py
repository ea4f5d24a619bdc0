"""LayerNorm in CUDA C++ (the compiled extension): the Python side of ``vitfast::layer_norm_ext_fwd``.

Same semantics as the Triton op in :mod:`vitfast.ops.layer_norm` (plain LayerNorm, and the pre-norm residual
variant ``(LayerNorm(x + gamma * branch), x + gamma * branch)`` with the residual rounded once to x's dtype, fp32
statistics); see csrc/layer_norm.cpp for the op contract and csrc/cuda/layer_norm.cuh for the kernels (a warp per
row up to 1536 columns with 16-byte vector loads, a block per row up to :data:`MAX_WIDTH`). An op of another name
than the Triton one (``vitfast::layer_norm_fwd`` is the Triton op), so both can be loaded and compared.

There is no C++ backward: the op's autograd formula is the Triton op's
(:func:`~vitfast.ops.layer_norm.layer_norm_backward`, ``vitfast::layer_norm_bwd``), on the statistics this forward
saves, computed as the Triton forward computes them. The C++ backward it replaced added each element's
parameter-gradient terms into shared memory once per row (a shared load and store per parameter and element;
37-74 KB of accumulators per 4-row block at widths 768-1536) and then summed its partial rows with a torch launch
per parameter; forward + backward measured 1.5-5x PyTorch's on an H100 (:func:`prefer_cuda_kernel`). Rebuilt the
Triton kernel's way (register accumulators, a row block's terms summed as a tree, one reduction launch) it would be
the same algorithm moving the same bytes as the rebuilt Triton backward: a second copy to keep equal, with nothing
left for it to win.

When the extension is loaded this module registers the op's fake implementation and autograd formula, and, when the
extension holds the CUDA kernels, the ``"cuda"`` backend implementations of ``"layer_norm"`` and
``"layer_norm_residual"``. Under backend ``"cuda"`` they run the C++ kernel wherever it covers the call (else the
Triton implementation, itself falling back to the reference); under ``"auto"`` they run it when no gradient is needed
and hand the call to PyTorch otherwise (:func:`prefer_cuda_kernel`, with the measurement behind it): never an error.

:func:`layer_norm_ext` / :func:`layer_norm_residual_ext` call the op directly, on any device (the C++ CPU twin on the
CPU): what the tests and benchmarks use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vitfast import _ext, backend
from vitfast.ops._triton import KERNEL_DTYPES, log_fallback
from vitfast.ops.layer_norm import layer_norm_backward, layer_norm_setup_context

__all__ = [
    "MAX_WIDTH",
    "layer_norm_ext",
    "layer_norm_residual_ext",
    "prefer_cuda_kernel",
    "register_ext",
]

# Widest row the C++ kernels take (csrc/vitfast_ext.h kLayerNormMaxWidth).
MAX_WIDTH = 8192


def prefer_cuda_kernel(*tensors: torch.Tensor | None) -> bool:
    """Whether backend "auto" runs the CUDA C++ LayerNorm on this call (else PyTorch's): the one per-call rule.

    Measured on an H100 in eager mode (``benchmarks/gpu_ext_check.py``, 2026-11-22,
    ``benchmarks/results/2026-11-22_h100_ext_check.json``; times include the host time of one call): the forward
    (plain and residual, rows x width 1576 x 384 to 8200 x 2730, three dtypes) matched or beat ``F.layer_norm`` in
    28 of 30 cases (not 2056 x 1408 bf16 / fp16: 0.013 vs 0.012 ms) and the Triton op in 28 of 30 (e.g. 12608 x 768
    bf16: 0.022 ms vs 0.032 ms PyTorch, 0.19 ms Triton), but
    forward + backward is 1.5-5x slower than PyTorch's (0.49 vs 0.13 ms at 8200 x 1024 bf16). So: the kernel when
    no gradient is needed, PyTorch when one is.
    """
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _fwd_fake(x, branch, gamma, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    residual_out = x.new_empty(x.shape) if branch is not None else x.new_empty(0)
    return x.new_empty(x.shape), residual_out, stats, torch.empty_like(stats)


def layer_norm_ext(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over the last dimension by the compiled op (C++ twin on the CPU, CUDA kernel on a GPU)."""
    return torch.ops.vitfast.layer_norm_ext_fwd(x, None, None, weight, bias, eps)[0]


def layer_norm_residual_ext(
    x: torch.Tensor,
    branch: torch.Tensor,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LayerNorm(residual_out), residual_out)``, ``residual_out = x + gamma * branch``, by the compiled op."""
    out, residual_out, _mean, _rstd = torch.ops.vitfast.layer_norm_ext_fwd(x, branch, gamma, weight, bias, eps)
    return out, residual_out


def _uncovered(x: torch.Tensor, branch: torch.Tensor | None, *params: torch.Tensor | None) -> str | None:
    """Why the CUDA kernel cannot take this call (None when it can)."""
    tensors = [t for t in (x, branch, *params) if t is not None]
    if any(t.device.type != "cuda" for t in tensors):
        return "tensors not all on a CUDA GPU"
    if not _ext.HAS_EXT_CUDA:
        return "the compiled extension has no CUDA kernels"
    if x.dtype not in KERNEL_DTYPES:
        return f"dtype {x.dtype} (kernels: float16, bfloat16, float32)"
    if x.ndim == 0 or x.numel() == 0:
        return "empty or 0-d input"
    if x.shape[-1] > MAX_WIDTH:
        return f"width {x.shape[-1]} > {MAX_WIDTH}"
    if branch is not None and (branch.shape != x.shape or branch.dtype != x.dtype):
        return "branch of another shape or dtype than x"
    for param in params:
        if param is not None and (param.dtype not in (x.dtype, torch.float32) or param.shape != x.shape[-1:]):
            return "a parameter of another shape, or of a dtype other than x's and float32"
    return None


def _hand_over(op: str, reason: str | None, *tensors: torch.Tensor | None) -> Callable | None:
    """The implementation to run instead of the C++ kernel, or None to run it.

    Under "auto" that is the reference (the Triton kernels are not an "auto" choice: slower in eager mode); under an
    explicit "cuda", calls the kernel cannot take go to the Triton implementation when there is one.
    """
    impls = backend.implementations(op)
    auto = backend.get_backend() == "auto"
    if reason is not None:
        log_fallback(op, f"CUDA C++ kernel: {reason}")
        return impls["reference"] if auto else impls.get("triton", impls["reference"])
    if auto and not prefer_cuda_kernel(*tensors):
        return impls["reference"]
    return None


def _layer_norm_cuda(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    other = _hand_over("layer_norm", _uncovered(x, None, weight, bias), x, weight, bias)
    if other is not None:
        return other(x, weight, bias, eps)
    return layer_norm_ext(x, weight, bias, eps)


def _layer_norm_residual_cuda(
    x: torch.Tensor,
    branch: torch.Tensor,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
):
    other = _hand_over(
        "layer_norm_residual", _uncovered(x, branch, gamma, weight, bias), x, branch, gamma, weight, bias
    )
    if other is not None:
        return other(x, branch, gamma, weight, bias, eps)
    return layer_norm_residual_ext(x, branch, gamma, weight, bias, eps)


_registered = {"ops": False, "cuda": False}


def register_ext() -> None:
    """Register the ops' Python side once the extension is loaded (at import, or by ``_ext.load_jit``)."""
    if _ext.HAS_EXT and not _registered["ops"]:
        torch.library.register_fake("vitfast::layer_norm_ext_fwd", _fwd_fake)
        torch.library.register_autograd(
            "vitfast::layer_norm_ext_fwd", layer_norm_backward, setup_context=layer_norm_setup_context
        )
        _registered["ops"] = True
    if _ext.HAS_EXT_CUDA and not _registered["cuda"]:
        backend.register_impl("layer_norm", "cuda", _layer_norm_cuda)
        backend.register_impl("layer_norm_residual", "cuda", _layer_norm_residual_cuda)
        _registered["cuda"] = True


register_ext()
