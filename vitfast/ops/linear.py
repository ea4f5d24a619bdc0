"""``linear(x, weight, bias, activation)``: a projection with its bias and activation fused into the GEMM epilogue.

``activation`` is ``None``, ``"gelu"`` (exact, erf) or ``"quick_gelu"`` (``x * sigmoid(1.702 x)``). The reference
is ``F.linear`` followed by the activation: two kernels, and the GEMM output rounded to the input dtype before the
activation reads it back. The Triton kernel keeps the fp32 accumulator through bias and activation and rounds once,
so it is at least as accurate as the reference; STYLE rule 5 checks it against fp64.

Where it is meant to win: the small-batch inference shapes of these models (M = batch x tokens from 50 to ~1600,
K and N from 384 to 6144), where cuBLAS picks tiles that leave most of an H100 idle and the separate activation pass
is one more launch per block. Whether it wins is measured, not assumed: :func:`vitfast.optimize` times the whole
forward with and without these kernels and keeps the faster graph. The backward (training) runs through PyTorch.

``linear_split_k(x, weight, splits)``: the same GEMM without bias, its K axis cut into ``splits`` slices, each
slice's product written as fp32 partial sums ``[splits, M, N]``. At small M the output tiles alone cannot occupy
every SM (ViT-B/16 at batch 1: 48 tiles of 64 x 64 on 132 SMs); the slices multiply the programs. The partial sums
are added up (with the bias, layer scale and residual) by the LayerNorm that follows the projection
(:func:`vitfast.ops.layer_norm_residual_partials`), so the reduction costs no launch of its own. Inference only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitfast.backend import dispatch, register_impl
from vitfast.ops._triton import (
    HAS_TRITON,
    INTERPRETER,
    KERNEL_DTYPES,
    NOMINAL_SMS,
    cdiv,
    eager_memo,
    empty,
    kernel_can_run,
    launch,
    log_fallback,
    native_state,
    pdl_prologue,
    plan_sms,
    register_native,
    rows_2d,
    tl,
    triton,
    triton_op,
)

__all__ = ["ACTIVATIONS", "linear", "linear_ref", "linear_split_k", "linear_split_k_ref", "split_k_splits"]

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
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of output tile ``pid`` in grouped order: GROUP_M row-tiles share each weight column-tile
    while it sits in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


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
    PDL: tl.constexpr = False,
):  # fmt: skip
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

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


# ------------------------------------------------------------------------------------------------------- split-K

# Output tile of a split-K program: the small-M tile of _tile_config (M here is at most a few thousand rows).
_SPLIT_K_BLOCK = 64
# Depth of a K slice at least (elements): below it, a program's prologue and its [64, 64] fp32 partial-sum store (16
# KB, written and read back by the LayerNorm) weigh as much as its multiply-adds.
SPLIT_K_MIN_DEPTH = 256
# Slices at most: each adds M x N fp32 partial sums written and read again (ViT-B/16 batch 1: 0.6 MB per slice).
SPLIT_K_MAX = 8
# Slices start at multiples of this many K elements: every BLOCK_K (64 in 16-bit, 32 in fp32) divides it.
_SPLIT_K_GRAIN = 64


def _split_k_block_k(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 64


def _split_depth(k: int, splits: int) -> int:
    """K elements per slice: a multiple of :data:`_SPLIT_K_GRAIN`, so that only the last slice can end inside a
    ``BLOCK_K`` step (the same slices in every dtype, which the fp64 reference reproduces)."""
    return cdiv(cdiv(k, _SPLIT_K_GRAIN), splits) * _SPLIT_K_GRAIN


def split_k_splits(m: int, n: int, k: int, sm_count: int | None) -> int:
    """How many K slices ``linear_split_k`` should cut ``[m, k] x [n, k]^T`` into (1: do not split).

    Enough slices for the 64 x 64 output tiles times the slices to give every SM (``sm_count``; None off a GPU: an
    H100's 132) a program, as far as slices at least :data:`SPLIT_K_MIN_DEPTH` deep and at most :data:`SPLIT_K_MAX`
    allow; 1 when the tiles alone fill the SMs. At 3 programs per SM (the kernel's registers and shared memory, see
    the kernel report) every program of one such fill is resident at once. ViT-B/16 at batch 1 (48 tiles): 3
    slices for proj (K 768: 256 deep) and fc2 (K 3072: 1024 deep), 144 programs; from batch 4 (156 tiles) none.

    ``S = 1`` means: the engine runs cuBLAS and the plain ``layer_norm_residual`` for that projection (this kernel
    without a split is the plain Triton GEMM, which cuBLAS beats at every shape measured).
    """
    sms = sm_count if sm_count is not None else NOMINAL_SMS
    tiles = cdiv(m, _SPLIT_K_BLOCK) * cdiv(n, _SPLIT_K_BLOCK)
    if tiles >= sms:
        return 1
    splits = max(1, min(SPLIT_K_MAX, k // SPLIT_K_MIN_DEPTH, cdiv(sms, tiles)))
    # slices are whole 64-element grains: a count the grains cannot share out would leave the last slice empty, so
    # take the count the rounded depth gives
    return cdiv(k, _split_depth(k, splits))


def linear_split_k_ref(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """``[splits, M, N]``: slice ``s`` is ``x[:, K_s] @ weight[:, K_s].T`` in fp32 (fp64 for fp64 inputs), with
    ``x`` flattened to ``M`` rows and ``K_s`` the kernel's slices (multiples of 64 deep; trailing ones may be
    empty, then zero). Their sum over the first axis is ``x @ weight.T`` (no bias)."""
    _check_split_k(x, weight, splits)
    compute = torch.promote_types(x.dtype, torch.float32)
    rows = x.reshape(-1, x.shape[-1]).to(compute)
    weight = weight.to(compute)
    depth = _split_depth(x.shape[-1], splits)
    return torch.stack(
        [F.linear(rows[:, s * depth : (s + 1) * depth], weight[:, s * depth : (s + 1) * depth]) for s in range(splits)]
    )


@triton.jit
def _linear_split_k_kernel(
    X, W, Partials,
    M, N, K, depth,
    stride_xm, stride_wn,
    EVEN_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    # program (tile, split): one [BLOCK_M, BLOCK_N] output tile over K slice [split * depth, (split + 1) * depth),
    # tiles in _grouped_tile's order (the slices of a tile read disjoint weight columns)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok, cols_ok = rows < M, cols < N
    # rows and columns past the edge read row 0 instead of being masked: every load is then unmasked along K (whole
    # 16-byte vectors, pipelined without predicates); those rows and columns are never stored
    safe_rows = tl.where(rows_ok, rows, 0)
    safe_cols = tl.where(cols_ok, cols, 0)
    k_start = split * depth
    k_end = tl.minimum(k_start + depth, K)
    ks = k_start + tl.arange(0, BLOCK_K)
    x_ptrs = X + safe_rows.to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_ptrs = W + safe_cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:  # K a multiple of BLOCK_K: no slice ends inside a step
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = (k0 + tl.arange(0, BLOCK_K)) < k_end
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = Partials + (split.to(tl.int64) * M + rows.to(tl.int64)[:, None]) * N + cols[None, :]
    tl.store(out_ptrs, acc, mask=rows_ok[:, None] & cols_ok[None, :])


def _check_split_k(x: torch.Tensor, weight: torch.Tensor, splits: int) -> None:
    if weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_split_k: x [..., {x.shape[-1] if x.ndim else '?'}] and weight {list(weight.shape)} do not match: "
            "weight must be [N, K]."
        )
    if not isinstance(splits, int) or isinstance(splits, bool) or not 1 <= splits <= x.shape[-1]:
        raise ValueError(f"linear_split_k: splits must be an integer in 1..K={x.shape[-1]}, got {splits!r}.")


def linear_split_k_fwd(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """``x`` ``[..., K]`` (last dim contiguous), ``weight`` ``[N, K]`` (contiguous rows), one dtype of fp16 / bf16 /
    fp32 -> fp32 ``[splits, M, N]`` contiguous, ``M = x.numel() / K``: the partial sums of :func:`linear_split_k_ref`.
    """
    _check_split_k(x, weight, splits)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    m, k = rows.shape
    n = weight.shape[0]
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return partials
    block_k = _split_k_block_k(x.dtype)
    launch(
        _linear_split_k_kernel,
        (cdiv(m, _SPLIT_K_BLOCK) * cdiv(n, _SPLIT_K_BLOCK), splits),
        rows,
        weight,
        partials,
        m,
        n,
        k,
        _split_depth(k, splits),
        rows.stride(0),
        weight.stride(0),
        EVEN_K=k % block_k == 0,
        UPCAST_DOT=INTERPRETER and x.dtype != torch.float32,
        # fp32 operands would otherwise run in TF32 (10-bit mantissa), far outside fp32 PyTorch's error
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=_SPLIT_K_BLOCK,
        BLOCK_N=_SPLIT_K_BLOCK,
        BLOCK_K=block_k,
        GROUP_M=4,
        # 4 warps: one warpgroup's 64 x 64 fp32 accumulator, 32 registers a thread; 4 stages: 3 x 16 KB of bf16
        # operands in flight per program, which is what a lone wave of programs has to hide the HBM latency with
        num_warps=4,
        num_stages=4,
    )
    return partials


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


def _activation_backward(grad_out: torch.Tensor, pre: torch.Tensor, activation: str) -> torch.Tensor:
    """The gradient at the pre-activation ``pre``, written out (no autograd pass over a recomputed activation)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_out, pre)  # F.gelu's own derivative (exact, erf)
    # quick_gelu: d/dx [x sigmoid(a x)] = s (1 + a x (1 - s)), s = sigmoid(a x)
    s = torch.sigmoid(1.702 * pre)
    return grad_out * (s * (1 + 1.702 * pre * (1 - s)))


def _linear_backward(ctx, grad_out: torch.Tensor):
    x, weight, bias = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_pre = grad_out
    if ctx.activation is not None:  # the pre-activation recomputed (not saved: activation memory)
        grad_pre = _activation_backward(grad_out, F.linear(x, weight, bias), ctx.activation)
    rows = grad_pre.reshape(-1, grad_pre.shape[-1])
    grad_x = grad_pre @ weight if needs_x else None
    grad_weight = rows.T @ x.reshape(-1, x.shape[-1]) if needs_weight else None
    grad_bias = rows.sum(0) if bias is not None and needs_bias else None
    return grad_x, grad_weight, grad_bias, None


_linear_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _uncovered(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the GEMM kernel cannot take the call (then the reference runs), or None."""
    if not kernel_can_run(x, weight, bias):
        return "tensors on a device the kernels cannot run on"
    if x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return f"dtypes {x.dtype} / {weight.dtype} (kernels: one of fp16, bf16, fp32 for all)"
    if x.numel() == 0 or x.ndim == 0:
        return "empty input"
    return None


def _covers(x, weight, bias, _activation) -> bool:
    return _uncovered(x, weight, bias) is None


def _native_state() -> tuple | None:
    return native_state(INTERPRETER)  # the launch plans read INTERPRETER (tests set it)


def register_ext(cpu: bool = INTERPRETER) -> None:
    """The native eager entry points of the ops here (csrc/eager.cpp; :func:`~vitfast.ops._triton.register_native`)."""
    register_native(_linear_fwd_op, _native_state, cpu, covers=_covers)
    register_native(_linear_split_k_op, _native_state, cpu)


register_impl("linear", "reference", linear_ref)

if HAS_TRITON:

    def _linear_triton(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
    ) -> torch.Tensor:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}.")
        result = _linear_fwd_op.native_call(x, weight, bias, ACTIVATIONS.index(activation))  # covers: _covers
        if result is not NotImplemented:
            return result
        reason = _uncovered(x, weight, bias)
        if reason is not None:
            log_fallback("linear", reason)
            return linear_ref(x, weight, bias, activation)
        return _linear_fwd_op.after_native(x, weight, bias, ACTIVATIONS.index(activation))

    register_impl("linear", "triton", _linear_triton)


@triton_op("vitfast::linear_split_k")
def _linear_split_k_op(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    if not kernel_can_run(x, weight):
        return linear_split_k_ref(x, weight, splits)
    return linear_split_k_fwd(x, weight, splits)


register_ext()
register_impl("linear_split_k", "reference", linear_split_k_ref)

if HAS_TRITON:

    def _linear_split_k_triton(x: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
        reason = None
        if not kernel_can_run(x, weight):
            reason = "tensors on a device the kernels cannot run on"
        elif x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype:
            reason = f"dtypes {x.dtype} / {weight.dtype} (kernels: one of fp16, bf16, fp32 for both)"
        if reason is not None:
            log_fallback("linear_split_k", reason)
            return linear_split_k_ref(x, weight, splits)
        _check_split_k(x, weight, splits)
        return _linear_split_k_op(x, weight, splits)

    register_impl("linear_split_k", "triton", _linear_split_k_triton)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` through the current backend (see the module docstring)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}.")
    return dispatch("linear", x.device)(x, weight, bias, activation)


def linear_split_k(x: torch.Tensor, weight: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """fp32 partial sums ``[S, M, N]`` of ``x @ weight.T`` over ``S`` slices of K, through the current backend.

    ``splits``: ``S``; None: :func:`split_k_splits` for this shape and device. Inference only: no gradient flows
    (asking for one raises). Add the slices up with :func:`vitfast.ops.layer_norm_residual_partials` (or ``sum(0)``).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise RuntimeError(
            "linear_split_k is inference only (no backward): call it under torch.no_grad() / torch.inference_mode(), "
            "or use ops.linear for training."
        )
    if splits is None:
        _check_split_k(x, weight, 1)
        splits = split_k_splits(x.numel() // max(x.shape[-1], 1), weight.shape[0], x.shape[-1], plan_sms(x.device))
    return dispatch("linear_split_k", x.device)(x, weight, splits)
