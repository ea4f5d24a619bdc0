"""``linear(x, weight, bias, activation)``: a projection with its bias and activation fused into the GEMM epilogue.

``activation`` is ``None``, ``"gelu"`` (exact, erf) or ``"quick_gelu"`` (``x * sigmoid(1.702 x)``). The reference
is ``F.linear`` followed by the activation: two kernels, and the GEMM output rounded to the input dtype before the
activation reads it back. The Triton kernel keeps the fp32 accumulator through bias and activation and rounds once,
so it is at least as accurate as the reference; STYLE rule 5 checks it against fp64.

Where it is meant to win: the small-batch inference shapes of these models (M = batch x tokens from 50 to ~1600,
K and N from 384 to 6144), where cuBLAS picks tiles that leave most of an H100 idle and the separate activation pass
is one more launch per block. Whether it wins is measured, not assumed: :func:`vitfast.optimize` times the whole
forward with and without these kernels and keeps the faster graph. The backward (training) runs through PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitfast.backend import dispatch, register_impl
from vitfast.ops._triton import (
    HAS_TRITON,
    INTERPRETER,
    KERNEL_DTYPES,
    cdiv,
    eager_memo,
    empty,
    kernel_can_run,
    launch,
    log_fallback,
    rows_2d,
    tl,
    triton,
    triton_op,
)

__all__ = ["ACTIVATIONS", "linear", "linear_ref"]

ACTIVATIONS = (None, "gelu", "quick_gelu")


def _activate_ref(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(x)
    if activation == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return x


def linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` with ``x`` ``[..., K]``, ``weight`` ``[N, K]``, ``bias`` ``[N]``."""
    return _activate_ref(F.linear(x, weight, bias), activation)


@triton.jit
def _linear_fwd_kernel(
    X, W, Bias, Out,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 none, 1 gelu (erf), 2 quick_gelu
    UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # grouped tile order: GROUP_M row-tiles share each weight column-tile while it sits in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rows_ok, cols_ok = rows < M, cols < N
    x_ptrs = X + rows[:, None] * stride_xm + ks[None, :]
    w_ptrs = W + cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(x_ptrs, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=cols_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 2:
        acc = acc * tl.sigmoid(1.702 * acc)
    out_ptrs = Out + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])


def _tile_config(m: int, n: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and warps by problem size (no autotuning: torch.compile and graph capture need fixed launches).

    Small M (batch 1-8 of a ViT, up to ~600 rows): 64 x 64 tiles so that even a 768-wide output gives the grid enough
    programs to cover the SMs (cuBLAS' larger tiles leave most of them idle here), 4 warps and 4 pipeline stages of
    64-deep K slices (3 x 16 KB in flight per program in bf16). Larger M: 128 x 128 tiles, 8 warps, 3 stages: the
    usual Hopper-friendly shape for a compute-bound GEMM. fp32 halves the K depth to stay within shared memory.
    """
    block_k = 32 if dtype == torch.float32 else 64
    if m <= 640:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": block_k, "GROUP_M": 4, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """``x`` ``[..., K]`` (last dim contiguous), ``weight`` ``[N, K]`` contiguous, ``bias`` ``[N]`` -> ``[..., N]``.

    All of one dtype among fp16 / bf16 / fp32; output contiguous in that dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}.")
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., {x.shape[-1]}] and weight {list(weight.shape)} do not match: weight must be [N, K].")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}.")
    k = x.shape[-1]
    rows, m, row_stride = rows_2d(x, k)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n = weight.shape[0]
    out = empty((*x.shape[:-1], n), x.dtype, x.device)
    if m == 0:
        return out
    grid, options = _launch_plan(m, n, x.dtype, activation, INTERPRETER)
    launch(
        _linear_fwd_kernel,
        grid,
        rows,
        weight,
        bias if bias is not None else weight,
        out,
        m,
        n,
        k,
        row_stride,
        weight.stride(0),
        n,
        HAS_BIAS=bias is not None,
        **options,
    )
    return out


@eager_memo
def _launch_plan(m: int, n: int, dtype: torch.dtype, activation: str | None, interpreter: bool) -> tuple[tuple, dict]:
    """``(grid, constexprs and launch options but HAS_BIAS)`` of the forward kernel; ``interpreter``:
    ``INTERPRETER`` (read for UPCAST_DOT), in the memo's key."""
    config = _tile_config(m, n, dtype)
    grid = (cdiv(m, config["BLOCK_M"]) * cdiv(n, config["BLOCK_N"]),)
    options = {
        "ACTIVATION": ACTIVATIONS.index(activation),
        "UPCAST_DOT": interpreter and dtype != torch.float32,
        # fp32 operands would otherwise run in TF32 (10-bit mantissa), far outside fp32 PyTorch's error
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        **config,
    }
    return grid, options


@triton_op("vitfast::linear_fwd")
def _linear_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: int) -> torch.Tensor:
    act = ACTIVATIONS[activation]
    if not kernel_can_run(x, weight, bias):
        return linear_ref(x, weight, bias, act)
    return linear_fwd(x, weight, bias, act)


def _linear_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = ACTIVATIONS[activation]


def _linear_backward(ctx, grad_out: torch.Tensor):
    x, weight, bias = ctx.saved_tensors
    with torch.enable_grad():  # the activation's derivative through autograd on the pre-activation
        pre = F.linear(x.detach(), weight.detach(), None if bias is None else bias.detach()).requires_grad_()
        (grad_pre,) = torch.autograd.grad(_activate_ref(pre, ctx.activation), pre, grad_out)
    grad_x = grad_pre @ weight
    grad_weight = grad_pre.reshape(-1, grad_pre.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    grad_bias = grad_pre.reshape(-1, grad_pre.shape[-1]).sum(0) if bias is not None else None
    return grad_x, grad_weight, grad_bias, None


_linear_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)

register_impl("linear", "reference", linear_ref)

if HAS_TRITON:

    def _linear_triton(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
    ) -> torch.Tensor:
        reason = None
        if not kernel_can_run(x, weight, bias):
            reason = "tensors on a device the kernels cannot run on"
        elif x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            reason = f"dtypes {x.dtype} / {weight.dtype} (kernels: one of fp16, bf16, fp32 for all)"
        elif x.numel() == 0 or x.ndim == 0:
            reason = "empty input"
        if reason is not None:
            log_fallback("linear", reason)
            return linear_ref(x, weight, bias, activation)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}.")
        return _linear_fwd_op(x, weight, bias, ACTIVATIONS.index(activation))

    register_impl("linear", "triton", _linear_triton)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` through the current backend (see the module docstring)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}.")
    return dispatch("linear", x.device)(x, weight, bias, activation)
