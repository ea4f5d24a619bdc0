"""LayerNorm over the last dimension, alone or fused with the pre-norm residual add.

- ``layer_norm(x, weight, bias, eps)``: ``F.layer_norm`` over the last dimension.
- ``layer_norm_residual(x, branch, gamma, weight, bias, eps)``: the pre-norm block pattern in one pass,
  ``residual_out = x + gamma * branch`` (``gamma`` an optional layer-scale vector) and
  ``normed = LayerNorm(residual_out)``; both are returned.
- ``layer_norm_residual_partials(x, partials, branch_bias, gamma, weight, bias, eps)``: the same, with the branch
  given as the fp32 partial sums ``[S, rows, C]`` of a split-K projection (:func:`vitfast.ops.linear_split_k`) and
  its bias: ``branch = sum(partials) + branch_bias`` is added up in the same pass. Inference only (a kernel of its
  own, no statistics saved, no backward).

One pair of Triton kernels serves both: constexpr flags switch the residual add, the layer scale and the affine
parameters on and off. Statistics (mean, rstd) are always fp32, saved by the forward and read back by the backward;
outputs take the input's dtype. The backward's programs each write fp32 partial sums of the parameter gradients,
which a third kernel adds up and casts in one launch. The kernels hold a whole row in registers, so widths up to
:data:`MAX_WIDTH` run there; anything else (wider rows, fp64, tensors the kernels cannot take) runs the reference
through the dispatch.
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
    gpu_sms,
    kernel_can_run,
    launch,
    log_fallback,
    native_state,
    next_power_of_2,
    pdl_prologue,
    register_native,
    rows_2d,
    tl,
    triton,
    triton_op,
)

__all__ = [
    "MAX_WIDTH",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_bwd",
    "layer_norm_fwd",
    "layer_norm_ref",
    "layer_norm_residual",
    "layer_norm_residual_partials",
    "layer_norm_residual_partials_ref",
    "layer_norm_residual_ref",
]

# Widest row one program normalizes in registers (ViT widths <= 1408, sub-LN MLP widths 2048 / 2730 / 6144).
MAX_WIDTH = 8192
# Elements one program moves per row block: ~4096 on a GPU (see _block_sizes). The interpreter spends ~10 ms of
# Python per program whatever its size, so there a program takes up to 16x more rows; the kernel code is the same.
_TILE = 65536 if INTERPRETER else 4096
# Narrow rows per program at most (only widths <= 64 on a GPU reach it).
_MAX_BLOCK_ROWS = 64
# Programs per SM the launchers aim for. Below it, a program takes fewer rows (down to one), so that ViT-B/16's 197
# rows at batch 1 give 197 programs, not 50 of 4 rows, and the backward's grid has at least this many programs.
# More programs would not add bandwidth: the backward's equal-sized programs leave no tail to balance, and each
# one adds a row of fp32 parameter-gradient partials per parameter, written and read again (ViT-B/16 batch 64:
# 526 programs, weight and bias, 6.5 MB against the residual backward's 77 MB).
_PROGRAMS_PER_SM = 4
# The reduction of the parameter-gradient partials: fp32 columns per program (one 128-byte line per row) and
# partial rows per tile (each column's sum is a tree over a tile's rows, added over tiles in sequence). The
# interpreter takes whole rows per program (its cost is per program, see _TILE).
_REDUCE_COLS = 32
_REDUCE_ROWS = 32
# Longest run of fp32 additions in sequence in a parameter-gradient sum, whose rounding error grows with the run (at
# 64, dgamma over a few hundred rows came out above 2x PyTorch's cascade-summed error in ~1 of 200 random shapes),
# inside one backward program; the programs' partial sums then meet in _layer_norm_bwd_reduce_kernel (element-wise
# over tiles of _REDUCE_ROWS partial rows, then a tree over a tile's rows).
_MAX_CHAIN = 16


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm of ``x`` (any shape ``[..., C]``) with affine ``weight``/``bias`` of shape ``[C]``.

    ``F.layer_norm`` keeps its statistics in fp32 for half-precision inputs (on CUDA and on the CPU) and rounds the
    output once.
    """
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _residual_ref(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    scaled = branch.to(compute_dtype) if gamma is None else gamma.to(compute_dtype) * branch.to(compute_dtype)
    return (x.to(compute_dtype) + scaled).to(x.dtype)


def layer_norm_residual_ref(
    x: torch.Tensor,
    branch: torch.Tensor,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LayerNorm(residual_out), residual_out)``, ``residual_out = x + gamma * branch`` (``gamma``: ``[C]`` or None).

    The sum is computed in fp32 (fp64 for fp64 inputs) and rounded once to ``x``'s dtype, as PyTorch's eager
    elementwise ops compute in fp32 and round their result; eager ``x + gamma * branch`` in half precision also
    rounds the product on its own, which this reference (and the kernel) does not. The LayerNorm then normalizes the
    rounded ``residual_out``, the tensor the next block receives, so ``normed`` is exactly its LayerNorm.
    """
    residual_out = _residual_ref(x, branch, gamma)
    return layer_norm_ref(residual_out, weight, bias, eps), residual_out


def layer_norm_residual_partials_ref(
    x: torch.Tensor,
    partials: torch.Tensor,
    branch_bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`layer_norm_residual_ref` of ``branch = partials.sum(0) + branch_bias`` (fp32, fp64 for fp64 inputs).

    ``partials``: ``[S, rows, C]`` with ``rows = x.numel() / C``; ``branch_bias``: ``[C]`` or None. The branch is
    never rounded to ``x``'s dtype (a cuBLAS projection rounds its output once before the residual add reads it).
    """
    _check_partials(x, partials, branch_bias)
    branch = partials.sum(0, dtype=torch.promote_types(partials.dtype, torch.float32))
    if branch_bias is not None:
        branch = branch + branch_bias.to(branch.dtype)
    return layer_norm_residual_ref(x, branch.reshape(x.shape), gamma, weight, bias, eps)


def _check_partials(x: torch.Tensor, partials: torch.Tensor, branch_bias: torch.Tensor | None) -> None:
    if x.ndim == 0:
        raise ValueError("layer_norm_residual_partials: x must have at least one dimension (the normalized one).")
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    if partials.ndim != 3 or partials.shape[1:] != (rows, cols) or partials.shape[0] < 1:
        raise ValueError(
            f"layer_norm_residual_partials: partials must be [splits, {rows}, {cols}] (split-K sums of x's rows), "
            f"got {tuple(partials.shape)}."
        )
    if branch_bias is not None and branch_bias.shape != (cols,):
        raise ValueError(
            f"layer_norm_residual_partials: branch_bias must have shape ({cols},), got {tuple(branch_bias.shape)}."
        )
    for name, t in (("partials", partials), ("branch_bias", branch_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"layer_norm_residual_partials: {name} is on {t.device}, x on {x.device}.")


@triton.jit
def _center_rows(x, mask, cols):
    """``(x - mean, mean)`` per row of the ``[BLOCK_ROWS, BLOCK_C]`` tile, zero where masked.

    Two passes with a correction: rstd multiplies any error in ``x - mean``, and the mean rounded to fp32 is off by
    up to an ulp, which matters in rows of small spread; the correction takes that error out.
    """
    mean = tl.sum(x, axis=1) / cols
    centered = tl.where(mask, x - mean[:, None], 0.0)
    correction = tl.sum(centered, axis=1) / cols
    return tl.where(mask, centered - correction[:, None], 0.0), mean + correction


@triton.jit
def _normalize_rows(
    x, mask, col, col_mask, row_offset, cols, eps, weight_ptr, bias_ptr, out_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Store ``LayerNorm(x)`` (affine where given) of the fp32 ``[BLOCK_ROWS, BLOCK_C]`` tile; ``(mean, rstd)``."""
    centered, mean = _center_rows(x, mask, cols)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / cols + tl.cast(eps, tl.float32))
    out = centered * rstd[:, None]
    if HAS_WEIGHT:
        out = out * tl.load(weight_ptr + col, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + col, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + row_offset * cols + col[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    return mean, rstd


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,
    branch_ptr,
    gamma_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    residual_out_ptr,
    mean_ptr,
    rstd_ptr,
    rows,
    cols,
    x_row_stride,
    branch_row_stride,
    eps,
    HAS_BRANCH: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_C)
    row_mask = row < rows
    col_mask = col < cols
    mask = row_mask[:, None] & col_mask[None, :]
    # int64 offsets: rows * cols passes 2**31 at large batch sizes (e.g. 256 x 1025 tokens x 8192)
    row_offset = row.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row_offset * x_row_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        branch = tl.load(branch_ptr + row_offset * branch_row_stride + col[None, :], mask=mask, other=0.0)
        branch = branch.to(tl.float32)
        if HAS_GAMMA:
            gamma = tl.load(gamma_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
            branch = branch * gamma[None, :]
        residual = (x + branch).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row_offset * cols + col[None, :], residual, mask=mask)
        # normalize the rounded sum, the tensor handed on, so that normed is exactly LayerNorm(residual_out)
        x = residual.to(tl.float32)
    mean, rstd = _normalize_rows(
        x, mask, col, col_mask, row_offset, cols, eps, weight_ptr, bias_ptr, out_ptr, HAS_WEIGHT, HAS_BIAS
    )
    tl.store(mean_ptr + row, mean, mask=row_mask)
    tl.store(rstd_ptr + row, rstd, mask=row_mask)


@triton.jit
def _layer_norm_partials_fwd_kernel(
    x_ptr,
    partials_ptr,
    branch_bias_ptr,
    gamma_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    residual_out_ptr,
    rows,
    cols,
    x_row_stride,
    eps,
    SPLITS: tl.constexpr,
    HAS_BRANCH_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    # _layer_norm_fwd_kernel's residual variant with the branch added up from SPLITS fp32 partial-sum slices
    # [SPLITS, rows, cols] first; no statistics are written (inference only)
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_C)
    row_mask = row < rows
    col_mask = col < cols
    mask = row_mask[:, None] & col_mask[None, :]
    row_offset = row.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row_offset * x_row_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    # SPLITS is a constexpr so that the slices' loads are unrolled and all in flight at once
    branch = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        offsets = (split * rows + row_offset) * cols + col[None, :]
        branch += tl.load(partials_ptr + offsets, mask=mask, other=0.0)
    if HAS_BRANCH_BIAS:
        branch += tl.load(branch_bias_ptr + col, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        branch = branch * tl.load(gamma_ptr + col, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    residual = (x + branch).to(residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + row_offset * cols + col[None, :], residual, mask=mask)
    # normalize the rounded sum, the tensor handed on, so that normed is exactly LayerNorm(residual_out)
    _normalize_rows(
        residual.to(tl.float32), mask, col, col_mask, row_offset, cols, eps, weight_ptr, bias_ptr, out_ptr,
        HAS_WEIGHT, HAS_BIAS,
    )  # fmt: skip


@triton.jit
def _layer_norm_bwd_kernel(
    d_out_ptr,
    d_residual_ptr,
    x_ptr,
    branch_ptr,
    gamma_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dbranch_ptr,
    partial_ptr,
    rows,
    cols,
    rows_per_program,
    d_out_row_stride,
    d_residual_row_stride,
    x_row_stride,
    branch_row_stride,
    HAS_D_OUT: tl.constexpr,
    HAS_D_RESIDUAL: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GAMMA_SLOT: tl.constexpr,
    WEIGHT_SLOT: tl.constexpr,
    BIAS_SLOT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Each program walks rows_per_program consecutive rows (a multiple of BLOCK_ROWS) and keeps its share of the
    # parameter gradients in fp32 registers; it writes one row of partial sums per parameter into
    # partial_ptr[slot, program, :], which _layer_norm_bwd_reduce_kernel adds up.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    col = tl.arange(0, BLOCK_C)
    col_mask = col < cols
    # 1-D accumulators: each row block's tile is summed over its rows (a tree) before it is added, so a program holds
    # BLOCK_C fp32 values per parameter instead of a BLOCK_ROWS x BLOCK_C tile
    dweight_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dgamma_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    first_row = pid * rows_per_program
    for block_start in range(first_row, first_row + rows_per_program, BLOCK_ROWS):
        row = block_start + tl.arange(0, BLOCK_ROWS)
        row_mask = row < rows
        mask = row_mask[:, None] & col_mask[None, :]
        row_offset = row.to(tl.int64)[:, None]
        dx = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
        if HAS_D_OUT:
            # the forward's statistics read back; x_hat needs no mask: past the row's end d_out reads 0, which takes
            # those columns out of every sum below, and their dx is never stored
            mean = tl.load(mean_ptr + row, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)
            x = tl.load(x_ptr + row_offset * x_row_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
            x_hat = (x - mean[:, None]) * rstd[:, None]
            d_out = tl.load(d_out_ptr + row_offset * d_out_row_stride + col[None, :], mask=mask, other=0.0)
            d_out = d_out.to(tl.float32)
            if HAS_WEIGHT:
                # read where used (an L1 hit after the first row block) rather than held through the loop
                weight = tl.load(weight_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
                d_x_hat = d_out * weight[None, :]
                dweight_acc += tl.sum(d_out * x_hat, axis=0)
            else:
                d_x_hat = d_out
            if HAS_BIAS:
                dbias_acc += tl.sum(d_out, axis=0)
            # dx = rstd * (d_x_hat - mean(d_x_hat) - x_hat * mean(d_x_hat * x_hat)), means over the row
            mean_d_x_hat = tl.sum(d_x_hat, axis=1) / cols
            mean_d_x_hat_x_hat = tl.sum(d_x_hat * x_hat, axis=1) / cols
            dx = (d_x_hat - mean_d_x_hat[:, None] - x_hat * mean_d_x_hat_x_hat[:, None]) * rstd[:, None]
        if HAS_D_RESIDUAL:
            d_residual = tl.load(
                d_residual_ptr + row_offset * d_residual_row_stride + col[None, :], mask=mask, other=0.0
            )
            dx += d_residual.to(tl.float32)
        tl.store(dx_ptr + row_offset * cols + col[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_GAMMA:
            branch = tl.load(branch_ptr + row_offset * branch_row_stride + col[None, :], mask=mask, other=0.0)
            dgamma_acc += tl.sum(dx * branch.to(tl.float32), axis=0)
            gamma = tl.load(gamma_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
            dbranch = dx * gamma[None, :]
            tl.store(
                dbranch_ptr + row_offset * cols + col[None, :], dbranch.to(dbranch_ptr.dtype.element_ty), mask=mask
            )
        elif HAS_BRANCH:
            tl.store(dbranch_ptr + row_offset * cols + col[None, :], dx.to(dbranch_ptr.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(partial_ptr + (WEIGHT_SLOT * programs + pid) * cols + col, dweight_acc, mask=col_mask)
    if HAS_BIAS:
        tl.store(partial_ptr + (BIAS_SLOT * programs + pid) * cols + col, dbias_acc, mask=col_mask)
    if HAS_GAMMA:
        tl.store(partial_ptr + (GAMMA_SLOT * programs + pid) * cols + col, dgamma_acc, mask=col_mask)


@triton.jit
def _layer_norm_bwd_reduce_kernel(
    partial_ptr,
    dgamma_ptr,
    dweight_ptr,
    dbias_ptr,
    programs,
    cols,
    GAMMA_SLOT: tl.constexpr,
    WEIGHT_SLOT: tl.constexpr,
    BIAS_SLOT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    # Program (i, slot): columns [i * BLOCK_COLS, ...) of one parameter's gradient, the sum over the backward's
    # programs of their partial rows, cast to the parameter's dtype. A [BLOCK_P, BLOCK_COLS] accumulator adds tiles
    # element-wise (programs / BLOCK_P additions in sequence per element) and is summed over its rows once at the end.
    slot = tl.program_id(1)
    col = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = col < cols
    acc = tl.zeros([BLOCK_P, BLOCK_COLS], dtype=tl.float32)
    for start in range(0, programs, BLOCK_P):
        partial_row = start + tl.arange(0, BLOCK_P)
        offsets = (slot * programs + partial_row).to(tl.int64)[:, None] * cols + col[None, :]
        acc += tl.load(partial_ptr + offsets, mask=(partial_row < programs)[:, None] & col_mask[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    if slot == GAMMA_SLOT:
        tl.store(dgamma_ptr + col, total.to(dgamma_ptr.dtype.element_ty), mask=col_mask)
    if slot == WEIGHT_SLOT:
        tl.store(dweight_ptr + col, total.to(dweight_ptr.dtype.element_ty), mask=col_mask)
    if slot == BIAS_SLOT:
        tl.store(dbias_ptr + col, total.to(dbias_ptr.dtype.element_ty), mask=col_mask)


def _block_sizes(cols: int, rows: int, sm_count: int | None) -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_C, num_warps)`` for ``rows`` rows of width ``cols``, forward and backward.

    BLOCK_C: the whole row, so the mean and variance are one in-register reduction. BLOCK_ROWS: narrow rows are
    packed several to a program so that each program still moves a tile of ~``_TILE`` elements (a 768-wide row alone
    would leave a large launch dominated by many tiny programs), but on a GPU (``sm_count`` given) halved, down to
    one row, while that gives fewer than ``_PROGRAMS_PER_SM`` programs per SM: few rows (batch 1) then spread over
    every SM. num_warps: ~16 elements per thread and tensor (two 128-bit accesses per 16-bit tensor, four per fp32
    one), which keeps the backward's fp32 accumulators and its operands in registers (up to 16 warps for 8192 wide
    rows), 8 in tiles under 2048 elements.
    """
    block_c = next_power_of_2(cols)
    block_rows = max(1, min(_MAX_BLOCK_ROWS, _TILE // block_c))
    if sm_count is not None:
        while block_rows > 1 and cdiv(rows, block_rows) < _PROGRAMS_PER_SM * sm_count:
            block_rows //= 2
    tile = block_rows * block_c
    # small tiles (one row up to 1024 wide) get up to 4 warps at 8 elements per thread, still one 16-byte access per
    # 16-bit tensor: a lone 1024-wide row on 2 warps spilled 8 bytes in the residual backward (ptxas, sm_90)
    num_warps = min(16, max(1, tile // 512, min(4, tile // 256)))
    return block_rows, block_c, num_warps


def _bwd_grid(rows: int, block_rows: int, sm_count: int | None) -> tuple[int, int, int]:
    """``(programs, rows_per_program, BLOCK_ROWS)`` of the backward; each program writes one row of partial sums.

    On a GPU (``sm_count`` given), ``_PROGRAMS_PER_SM`` programs per SM, or one per row block when there are fewer
    (``_block_sizes`` already shrank the row blocks so that batch-1 rows give more programs than SMs); more when a
    program would otherwise add more than ``_MAX_CHAIN`` row blocks in sequence (a tile's rows add up as a tree).
    The interpreter (``sm_count`` None) adds a tile's rows in sequence too (numpy), so there a program takes at most
    ``_MAX_CHAIN`` rows.
    """
    if sm_count is not None:
        programs = max(_PROGRAMS_PER_SM * sm_count, cdiv(cdiv(rows, block_rows), _MAX_CHAIN))
    else:
        block_rows = min(block_rows, _MAX_CHAIN)
        programs = cdiv(rows, _MAX_CHAIN)
    row_blocks = cdiv(rows, block_rows)
    rows_per_program = cdiv(row_blocks, max(1, min(row_blocks, programs))) * block_rows
    return cdiv(rows, rows_per_program), rows_per_program, block_rows


@eager_memo
def _fwd_plan(cols: int, rows: int, sm_count: int | None, tile: int) -> tuple[int, int, int, int]:
    """``(programs, BLOCK_ROWS, BLOCK_C, num_warps)`` of the forward launch; ``tile``: ``_TILE``, which
    :func:`_block_sizes` reads, in the memo's key (tests set it to the GPU's)."""
    block_rows, block_c, num_warps = _block_sizes(cols, rows, sm_count)
    return cdiv(rows, block_rows), block_rows, block_c, num_warps


@eager_memo
def _bwd_plan(cols: int, rows: int, sm_count: int | None, tile: int) -> tuple[int, int, int, int, int, int]:
    """``(programs, rows_per_program, BLOCK_ROWS, BLOCK_C, num_warps, reduce_cols)`` of the backward launches;
    ``tile`` as in :func:`_fwd_plan`."""
    block_rows, block_c, num_warps = _block_sizes(cols, rows, sm_count)
    programs, rows_per_program, block_rows = _bwd_grid(rows, block_rows, sm_count) if rows else (0, 1, block_rows)
    return programs, rows_per_program, block_rows, block_c, num_warps, reduce_block(cols, sm_count)


def reduce_block(cols: int, sm_count: int | None) -> int:
    """The column tile of :func:`reduce_param_partials`: 32 on a GPU, the whole row elsewhere (the interpreter pays
    per program)."""
    return _REDUCE_COLS if sm_count is not None else next_power_of_2(cols)


_sm_count = gpu_sms  # what the plans read (a module attribute: tests set it, and the native state names it)


def _check_param(name: str, param: torch.Tensor | None, cols: int, device: torch.device) -> None:
    if param is None:
        return
    if param.shape != (cols,):
        raise ValueError(f"layer_norm: {name} must have shape ({cols},), got {tuple(param.shape)}.")
    if param.dtype not in KERNEL_DTYPES:
        raise ValueError(f"layer_norm: {name} must be float16, bfloat16 or float32, got {param.dtype}.")
    if param.device != device:
        raise ValueError(f"layer_norm: {name} is on {param.device}, x on {device}.")


def _check_activation(name: str, t: torch.Tensor | None, shape: torch.Size, device: torch.device) -> None:
    if t is None:
        return
    if t.shape != shape:
        raise ValueError(f"layer_norm: {name} must have x's shape {tuple(shape)}, got {tuple(t.shape)}.")
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"layer_norm: {name} must be float16, bfloat16 or float32, got {t.dtype}.")
    if t.device != device:
        raise ValueError(f"layer_norm: {name} is on {t.device}, x on {device}.")


def _check_x(x: torch.Tensor) -> int:
    if x.ndim == 0:
        raise ValueError("layer_norm: x must have at least one dimension (the normalized one).")
    cols = x.shape[-1]
    if not 1 <= cols <= MAX_WIDTH:
        raise ValueError(f"layer_norm: the kernels take widths 1..{MAX_WIDTH}, got {cols}.")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"layer_norm: x must be float16, bfloat16 or float32, got {x.dtype}.")
    return cols


def layer_norm_fwd(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(out, residual_out, mean, rstd)``.

    - ``x``: ``[..., C]`` fp16/bf16/fp32, ``1 <= C <= MAX_WIDTH``, any strides.
    - ``branch``: None (plain LayerNorm of ``x``) or ``x``'s shape, fp16/bf16/fp32: LayerNorm of
      ``residual_out = x + gamma * branch`` (computed in fp32, rounded once to ``x``'s dtype).
    - ``gamma`` (only with ``branch``), ``weight``, ``bias``: ``[C]`` fp16/bf16/fp32 or None.
    - ``out``: ``x``'s shape and dtype. ``residual_out``: ``x``'s shape and dtype, or empty ``[0]`` without
      ``branch``. ``mean``, ``rstd``: ``x.shape[:-1]`` fp32, statistics of the normalized tensor.
    """
    cols = _check_x(x)
    if gamma is not None and branch is None:
        raise ValueError("layer_norm: gamma (the layer scale of the branch) needs a branch.")
    device, shape = x.device, x.shape
    _check_activation("branch", branch, shape, device)
    _check_param("gamma", gamma, cols, device)
    _check_param("weight", weight, cols, device)
    _check_param("bias", bias, cols, device)

    x_rows, rows, x_stride = rows_2d(x, cols)
    stats_shape = shape[:-1]
    out = empty(shape, x.dtype, device)
    residual_out = empty(shape if branch is not None else (0,), x.dtype, device)
    mean = empty(stats_shape, torch.float32, device)
    rstd = empty(stats_shape, torch.float32, device)
    if rows == 0:
        return out, residual_out, mean, rstd
    branch_rows, _, branch_stride = rows_2d(branch, cols) if branch is not None else (x_rows, rows, x_stride)
    programs, block_rows, block_c, num_warps = _fwd_plan(cols, rows, _sm_count(device), _TILE)
    launch(
        _layer_norm_fwd_kernel,
        (programs,),
        x_rows,
        branch_rows,
        gamma if gamma is not None else x_rows,  # stand-ins for absent tensors are never read (constexpr flags)
        weight if weight is not None else x_rows,
        bias if bias is not None else x_rows,
        out,
        residual_out if branch is not None else out,
        mean,
        rstd,
        rows,
        cols,
        x_stride,
        branch_stride,
        eps,
        HAS_BRANCH=branch is not None,
        HAS_GAMMA=gamma is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out, residual_out, mean, rstd


def layer_norm_residual_partials_fwd(
    x: torch.Tensor,
    partials: torch.Tensor,
    branch_bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the partial-sums forward kernel: ``(out, residual_out)``, both ``x``'s shape and dtype.

    - ``x``: ``[..., C]`` fp16/bf16/fp32, ``1 <= C <= MAX_WIDTH``, any strides.
    - ``partials``: fp32 ``[S, rows, C]``, ``rows = x.numel() / C`` (made contiguous if it is not): the branch is
      ``partials.sum(0) + branch_bias``, in fp32, never rounded.
    - ``branch_bias``, ``gamma``, ``weight``, ``bias``: ``[C]`` fp16/bf16/fp32 or None.
    """
    cols = _check_x(x)
    _check_partials(x, partials, branch_bias)
    if partials.dtype != torch.float32:
        raise ValueError(f"layer_norm_residual_partials: partials must be float32, got {partials.dtype}.")
    for name, param in (("branch_bias", branch_bias), ("gamma", gamma), ("weight", weight), ("bias", bias)):
        _check_param(name, param, cols, x.device)
    x_rows, rows, x_stride = rows_2d(x, cols)
    partials = partials.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out, residual_out
    block_rows, block_c, num_warps = _block_sizes(cols, rows, _sm_count(x.device))
    launch(
        _layer_norm_partials_fwd_kernel,
        (cdiv(rows, block_rows),),
        x_rows,
        partials,
        branch_bias if branch_bias is not None else x_rows,  # stand-ins for absent tensors are never read
        gamma if gamma is not None else x_rows,
        weight if weight is not None else x_rows,
        bias if bias is not None else x_rows,
        out,
        residual_out,
        rows,
        cols,
        x_stride,
        eps,
        SPLITS=partials.shape[0],
        HAS_BRANCH_BIAS=branch_bias is not None,
        HAS_GAMMA=gamma is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out, residual_out


def layer_norm_bwd(
    d_out: torch.Tensor | None,
    d_residual: torch.Tensor | None,
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel and the reduction of its partial sums: ``(dx, dbranch, dgamma, dweight, dbias)``.

    - ``x``: the tensor that was normalized, ``[..., C]`` (``residual_out`` in the residual variant); ``mean``,
      ``rstd``: its fp32 ``x.shape[:-1]`` statistics from :func:`layer_norm_fwd`, read back (not recomputed).
    - ``d_out``: gradient of ``out``, ``d_residual``: of ``residual_out``, added to ``dx``; ``x``'s shape, either may
      be None (no gradient). ``d_residual`` without ``branch``: the residual variant without a layer scale, whose
      ``dbranch`` is ``dx`` itself, so the autograd backward asks for no copy of it.
    - ``branch``, ``gamma``, ``weight``, ``bias``: the forward's inputs (``bias`` is only looked at for its presence
      and dtype; ``branch`` is read only with ``gamma``).
    - ``dx``: ``x``'s shape and dtype, the gradient of the forward's ``x``. ``dbranch`` (``branch``'s dtype),
      ``dgamma``, ``dweight``, ``dbias`` (their parameter's dtype): empty ``[0]`` when that input is None.
      Parameter gradients are reduced over the rows in fp32: per-program partial sums, then one launch that adds
      them up and casts them, all parameters at once.
    """
    cols = _check_x(x)
    if gamma is not None and branch is None:
        raise ValueError("layer_norm: gamma (the layer scale of the branch) needs a branch.")
    device, shape = x.device, x.shape
    _check_activation("d_out", d_out, shape, device)
    _check_activation("d_residual", d_residual, shape, device)
    _check_activation("branch", branch, shape, device)
    _check_param("gamma", gamma, cols, device)
    _check_param("weight", weight, cols, device)
    _check_param("bias", bias, cols, device)
    stats_shape = shape[:-1]
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if stat.shape != stats_shape or stat.dtype != torch.float32 or stat.device != device:
            raise ValueError(
                f"layer_norm: {name} must be float32 of shape {tuple(stats_shape)} on {device}, got "
                f"{stat.dtype} {tuple(stat.shape)} on {stat.device}."
            )

    x_rows, rows, x_stride = rows_2d(x, cols)
    programs, rows_per_program, block_rows, block_c, num_warps, reduce_cols = _bwd_plan(
        cols, rows, _sm_count(device), _TILE
    )
    # the present parameters' rows of partial sums, stacked in one buffer (slot -1: absent)
    gamma_slot, weight_slot, bias_slot = _param_slots(gamma, weight, bias)
    n_params = max(gamma_slot, weight_slot, bias_slot) + 1

    def param_grad(param: torch.Tensor | None) -> torch.Tensor:
        if param is None:
            return empty((0,), x.dtype, device)
        # no rows: nothing to add up, and no kernel writes it
        return torch.zeros_like(param) if programs == 0 else torch.empty_like(param)

    dx = empty(shape, x.dtype, device)
    # without gamma, dbranch is dx (the autograd glue hands dx itself on, this op's outputs may not alias)
    dbranch = empty(shape, branch.dtype, device) if branch is not None else empty((0,), x.dtype, device)
    dgamma, dweight, dbias = param_grad(gamma), param_grad(weight), param_grad(bias)
    if programs == 0:
        return dx, dbranch, dgamma, dweight, dbias
    partial = empty((n_params, programs, cols), torch.float32, device)
    d_out_rows, _, d_out_stride = rows_2d(d_out, cols) if d_out is not None else (x_rows, rows, x_stride)
    d_residual_rows, _, d_residual_stride = (
        rows_2d(d_residual, cols) if d_residual is not None else (x_rows, rows, x_stride)
    )
    branch_rows, _, branch_stride = rows_2d(branch, cols) if branch is not None else (x_rows, rows, x_stride)
    launch(
        _layer_norm_bwd_kernel,
        (programs,),
        d_out_rows,
        d_residual_rows,
        x_rows,
        branch_rows,
        gamma if gamma is not None else x_rows,  # stand-ins for absent tensors are never read (constexpr flags)
        weight if weight is not None else x_rows,
        mean,
        rstd,
        dx,
        dbranch if branch is not None else dx,
        partial if n_params else rstd,
        rows,
        cols,
        rows_per_program,
        d_out_stride,
        d_residual_stride,
        x_stride,
        branch_stride,
        HAS_D_OUT=d_out is not None,
        HAS_D_RESIDUAL=d_residual is not None,
        HAS_BRANCH=branch is not None,
        HAS_GAMMA=gamma is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        GAMMA_SLOT=gamma_slot,
        WEIGHT_SLOT=weight_slot,
        BIAS_SLOT=bias_slot,
        BLOCK_ROWS=block_rows,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    if n_params:
        reduce_param_partials(
            partial,
            (dgamma if gamma is not None else None, dweight if weight is not None else None,
             dbias if bias is not None else None),
            reduce_cols,
        )  # fmt: skip
    return dx, dbranch, dgamma, dweight, dbias


def _param_slots(*params: torch.Tensor | None) -> tuple[int, ...]:
    """Each present parameter's row of the partial sums (in order, from 0), -1 for an absent one."""
    slots, present = [], 0
    for param in params:
        slots.append(present if param is not None else -1)
        present += param is not None
    return tuple(slots)


def reduce_param_partials(
    partial: torch.Tensor, grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], block: int
) -> None:
    """Add up fp32 parameter-gradient partial sums ``partial`` ``[n_params, programs, cols]`` over the programs into
    ``grads`` (gamma's, weight's, bias's: ``[cols]`` each in its dtype, None when absent; the present ones are the
    slots of ``partial`` in that order), by one launch of :func:`_layer_norm_bwd_reduce_kernel` over ``block``-wide
    column tiles. Shared by the LayerNorm and the SwiGLU + sub-LN backward."""
    n_params, programs, cols = partial.shape
    slots = _param_slots(*grads)
    launch(
        _layer_norm_bwd_reduce_kernel,
        (cdiv(cols, block), n_params),
        partial,
        *(grad if grad is not None else partial for grad in grads),  # stand-ins: never written (their slot is -1)
        programs,
        cols,
        GAMMA_SLOT=slots[0],
        WEIGHT_SLOT=slots[1],
        BIAS_SLOT=slots[2],
        BLOCK_P=_REDUCE_ROWS,
        BLOCK_COLS=block,
        num_warps=4,  # 8 fp32 values per thread of the 32 x 32 tile: two 128-bit loads
    )


def _layer_norm_fwd_reference(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`layer_norm_fwd` in PyTorch, for tensors the kernels cannot take (same outputs)."""
    normalized = x if branch is None else _residual_ref(x, branch, gamma)
    var, mean = torch.var_mean(normalized.float(), dim=-1, correction=0)
    out = layer_norm_ref(normalized, weight, bias, eps)
    residual_out = normalized if branch is not None else x.new_empty(0)
    return out, residual_out, mean, torch.rsqrt(var + eps)


def _layer_norm_bwd_reference(
    d_out: torch.Tensor | None,
    d_residual: torch.Tensor | None,
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`layer_norm_bwd` in PyTorch (fp32 math), for tensors the kernels cannot take (same outputs)."""
    x_hat = (x.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    d_out = d_out.float() if d_out is not None else torch.zeros_like(x_hat)
    d_x_hat = d_out * weight.float() if weight is not None else d_out
    dx = d_x_hat - d_x_hat.mean(-1, keepdim=True) - x_hat * (d_x_hat * x_hat).mean(-1, keepdim=True)
    dx = dx * rstd.unsqueeze(-1)
    if d_residual is not None:
        dx = dx + d_residual.float()
    rows = tuple(range(x.ndim - 1))
    # outputs of an op may not alias each other: separate empties, and a copy of dx as dbranch without gamma
    dbranch = x.new_empty(0) if branch is None else (dx.clone() if gamma is None else dx * gamma.float())
    dgamma = x.new_empty(0) if gamma is None else (dx * branch.float()).sum(rows).to(gamma.dtype)
    dweight = x.new_empty(0) if weight is None else (d_out * x_hat).sum(rows).to(weight.dtype)
    dbias = x.new_empty(0) if bias is None else d_out.sum(rows).to(bias.dtype)
    return dx.to(x.dtype), dbranch.to(branch.dtype if branch is not None else x.dtype), dgamma, dweight, dbias


@triton_op("vitfast::layer_norm_fwd")
def _layer_norm_fwd_op(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not kernel_can_run(x, branch, gamma, weight, bias):
        return _layer_norm_fwd_reference(x, branch, gamma, weight, bias, eps)
    return layer_norm_fwd(x, branch, gamma, weight, bias, eps)


@triton_op("vitfast::layer_norm_bwd")
def _layer_norm_bwd_op(
    d_out: torch.Tensor | None,
    d_residual: torch.Tensor | None,
    x: torch.Tensor,
    branch: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not kernel_can_run(d_out, d_residual, x, branch, gamma, weight, bias, mean, rstd):
        return _layer_norm_bwd_reference(d_out, d_residual, x, branch, gamma, weight, bias, mean, rstd)
    return layer_norm_bwd(d_out, d_residual, x, branch, gamma, weight, bias, mean, rstd)


@triton_op("vitfast::layer_norm_residual_partials_fwd")
def _layer_norm_partials_fwd_op(
    x: torch.Tensor,
    partials: torch.Tensor,
    branch_bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not kernel_can_run(x, partials, branch_bias, gamma, weight, bias):
        return layer_norm_residual_partials_ref(x, partials, branch_bias, gamma, weight, bias, eps)
    return layer_norm_residual_partials_fwd(x, partials, branch_bias, gamma, weight, bias, eps)


def layer_norm_setup_context(ctx, inputs, output) -> None:
    x, branch, gamma, weight, bias, _eps = inputs
    _out, residual_out, mean, rstd = output
    # the backward needs the tensor that was normalized: residual_out in the residual variant; the branch itself only
    # with a layer scale (its gradient then needs gamma * ..., and dgamma needs the branch), else just its dtype
    ctx.branch_dtype = None if branch is None else branch.dtype
    saved_branch = branch if gamma is not None else None
    ctx.save_for_backward(x if branch is None else residual_out, saved_branch, gamma, weight, bias, mean, rstd)


def layer_norm_backward(ctx, d_out, d_residual, _d_mean, _d_rstd):
    """The autograd backward of a ``layer_norm_fwd``-shaped op (saved by :func:`layer_norm_setup_context`):
    ``(dx, dbranch, dgamma, dweight, dbias, None)``, None for an absent input.

    Shared by the Triton op here and the CUDA C++ forward (:mod:`vitfast.ops.layer_norm_ext`), whose statistics are
    the same; it calls the :class:`~vitfast.ops._triton.EagerOp` itself, so that an eager backward skips the
    dispatcher too.
    """
    normalized, branch, gamma, weight, bias, mean, rstd = ctx.saved_tensors
    branch_dtype = ctx.branch_dtype
    has_branch = branch_dtype is not None
    if not has_branch:
        d_residual = None  # the empty residual_out placeholder of the plain variant carries no gradient
    if has_branch and gamma is None:
        # residual_out = x + branch: branch's gradient is dx; autograd takes one tensor for both, as for an add
        dx, _, dgamma, dweight, dbias = _layer_norm_bwd_op(
            d_out, d_residual, normalized, None, None, weight, bias, mean, rstd
        )
        dbranch = dx.to(branch_dtype)
    else:
        dx, dbranch, dgamma, dweight, dbias = _layer_norm_bwd_op(
            d_out, d_residual, normalized, branch, gamma, weight, bias, mean, rstd
        )

    def present(grad: torch.Tensor, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return grad if tensor is not None else None

    dbranch = dbranch if has_branch else None
    return dx, dbranch, present(dgamma, gamma), present(dweight, weight), present(dbias, bias), None


_layer_norm_fwd_op.register_autograd(layer_norm_backward, setup_context=layer_norm_setup_context)


def _native_state() -> tuple | None:
    return native_state(_TILE, _sm_count)  # what the launch plans read (tests set them)


def _covers(x, branch, gamma, weight, bias, _eps) -> bool:
    """Whether the forward kernel takes the call (the wrappers' coverage check, for the native entry point)."""
    return _uncovered(x, branch, gamma, weight, bias) is None and (branch is None or branch.shape == x.shape)


def register_ext(cpu: bool = INTERPRETER) -> None:
    """The native eager entry points of the ops here (csrc/eager.cpp; :func:`~vitfast.ops._triton.register_native`)."""
    register_native(_layer_norm_fwd_op, _native_state, cpu, covers=_covers)
    register_native(_layer_norm_bwd_op, _native_state, cpu)
    register_native(_layer_norm_partials_fwd_op, _native_state, cpu)


register_ext()


def _uncovered(x: torch.Tensor, *others: torch.Tensor | None) -> str | None:
    """Why the kernels cannot take this call (None when they can)."""
    if not kernel_can_run(x, *others):
        return "tensors on a device the kernels cannot run on"
    for t in (x, *others):
        if t is not None and t.dtype not in KERNEL_DTYPES:
            return f"dtype {t.dtype} (kernels: float16, bfloat16, float32)"
    if x.ndim == 0 or x.numel() == 0:
        return "empty or 0-d input"
    if x.shape[-1] > MAX_WIDTH:
        return f"width {x.shape[-1]} > {MAX_WIDTH}"
    return None


register_impl("layer_norm", "reference", layer_norm_ref)
register_impl("layer_norm_residual", "reference", layer_norm_residual_ref)
register_impl("layer_norm_residual_partials", "reference", layer_norm_residual_partials_ref)

if HAS_TRITON:

    def _layer_norm_triton(
        x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        result = _layer_norm_fwd_op.native_call(x, None, None, weight, bias, eps)  # covers: _covers
        if result is not NotImplemented:
            return result[0]
        reason = _uncovered(x, weight, bias)
        if reason is not None:
            log_fallback("layer_norm", reason)
            return layer_norm_ref(x, weight, bias, eps)
        return _layer_norm_fwd_op.after_native(x, None, None, weight, bias, eps)[0]

    def _layer_norm_residual_triton(
        x: torch.Tensor,
        branch: torch.Tensor,
        gamma: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        result = _layer_norm_fwd_op.native_call(x, branch, gamma, weight, bias, eps)  # covers: _covers
        if result is not NotImplemented:
            return result[0], result[1]
        reason = _uncovered(x, branch, gamma, weight, bias)
        if reason is None and branch.shape != x.shape:
            reason = "branch broadcast to x's shape"
        if reason is not None:
            log_fallback("layer_norm_residual", reason)
            return layer_norm_residual_ref(x, branch, gamma, weight, bias, eps)
        out, residual_out, _mean, _rstd = _layer_norm_fwd_op.after_native(x, branch, gamma, weight, bias, eps)
        return out, residual_out

    def _layer_norm_residual_partials_triton(
        x: torch.Tensor,
        partials: torch.Tensor,
        branch_bias: torch.Tensor | None,
        gamma: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reason = _uncovered(x, partials, branch_bias, gamma, weight, bias)
        if reason is None and partials.dtype != torch.float32:
            reason = f"partials in {partials.dtype} (the kernel reads float32 ones)"
        if reason is not None:
            log_fallback("layer_norm_residual_partials", reason)
            return layer_norm_residual_partials_ref(x, partials, branch_bias, gamma, weight, bias, eps)
        _check_partials(x, partials, branch_bias)
        return _layer_norm_partials_fwd_op(x, partials, branch_bias, gamma, weight, bias, eps)

    register_impl("layer_norm", "triton", _layer_norm_triton)
    register_impl("layer_norm_residual", "triton", _layer_norm_residual_triton)
    register_impl("layer_norm_residual_partials", "triton", _layer_norm_residual_partials_triton)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over the last dimension through the current backend."""
    return dispatch("layer_norm", x.device, x.shape[-1] if x.ndim else None)(x, weight, bias, eps)


def layer_norm_residual(
    x: torch.Tensor,
    branch: torch.Tensor,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LayerNorm(residual_out), residual_out)`` with ``residual_out = x + gamma * branch``, through the backend.

    The pre-norm block step ``x = x + gamma * branch(...); y = norm(x)`` in one pass; ``gamma`` is the optional
    layer-scale vector ``[C]``. See :func:`layer_norm_residual_ref` for the precision contract.
    """
    return dispatch("layer_norm_residual", x.device, x.shape[-1] if x.ndim else None)(
        x, branch, gamma, weight, bias, eps
    )


def layer_norm_residual_partials(
    x: torch.Tensor,
    partials: torch.Tensor,
    branch_bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`layer_norm_residual` with ``branch = partials.sum(0) + branch_bias``, through the backend.

    ``partials``: the fp32 ``[S, rows, C]`` split-K sums of :func:`vitfast.ops.linear_split_k` for ``x``'s rows;
    ``branch_bias``: the projection's bias ``[C]`` or None. Returns ``(normed, residual_out)``, both ``x``'s shape
    and dtype. Inference only: asking for a gradient raises. See :func:`layer_norm_residual_partials_ref`.
    """
    tensors = (x, partials, branch_bias, gamma, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            "layer_norm_residual_partials is inference only (no backward): call it under torch.no_grad() / "
            "torch.inference_mode(), or add the partial sums up and use layer_norm_residual for training."
        )
    return dispatch("layer_norm_residual_partials", x.device, x.shape[-1] if x.ndim else None)(
        x, partials, branch_bias, gamma, weight, bias, eps
    )
