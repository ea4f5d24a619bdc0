"""SwiGLU gating, ``silu(gate) * up``, in the two weight layouts EVA-02 checkpoints use, and fused with its sub-LN.

- split: separate ``gate`` and ``up`` tensors (EVA-02 B/L: ``fc1_g`` and ``fc1_x``);
- packed: one tensor ``[..., 2 * hidden]`` whose first half is the gate (EVA-02 Ti/S: ``fc1``);
- ``swiglu_layer_norm``: ``LayerNorm(silu(gate) * up)`` over the hidden width (EVA-02 B/L sub-LN before ``fc2``).

EVA-02 hidden widths are ``int(dim * 8 / 3)``: 512 (Ti), 1024 (S), 2048 (B), 2730 (L). 2730 makes rows that are not
16-byte aligned in 16-bit dtypes: GEMMs slow down and kernels fall back to scalar accesses. So the engine runs
EVA-02-L's MLP zero-padded to 2736 and ``swiglu_layer_norm(..., width=2730)`` takes that layout: ``gate`` and ``up``
``[..., 2736]`` (views of the padded fc1 output), ``weight`` and ``bias`` ``[2730]`` or zero-padded ``[2736]``;
statistics over the 2730 true columns; the output ``[..., 2736]`` with zeros in the padding, ready for fc2's
zero-padded weight (no ``F.pad``); with padded parameters every access is 16 bytes wide. Its gradients are zero in
the padding. (``swiglu`` needs no such mode: ``silu(0) * 0`` is exactly 0 in padded columns.)

The Triton kernels compute ``silu`` and the LayerNorm statistics in fp32 and write outputs in the input dtype. The
split and packed forms share one kernel per direction: it takes row strides, and the packed form reads (and, in the
backward, writes) the two halves of one buffer at a column offset, so packed inputs are never copied and ``d_x`` is
written in place, without a concatenation.

Rounding point of the fused op: the unfused PyTorch path materializes ``silu(gate) * up`` as a tensor of the input
dtype and normalizes that tensor. The fused kernels round the product to the input dtype before the statistics and
the normalization too (silu and the product themselves in fp32, as in the ``swiglu`` kernel), so the fused op is the
LayerNorm of exactly what the ``swiglu`` kernel returns; the backward recomputes the product the same way instead of
saving it. For fp32 inputs the rounding is a no-op.
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
from vitfast.ops.layer_norm import reduce_block, reduce_param_partials

__all__ = [
    "aligned_width",
    "swiglu",
    "swiglu_layer_norm",
    "swiglu_layer_norm_ref",
    "swiglu_packed",
    "swiglu_packed_ref",
    "swiglu_ref",
]

MAX_LAYER_NORM_WIDTH = 8192  # one row in registers; wider rows run the reference


def aligned_width(width: int) -> int:
    """``width`` rounded up to a multiple of 8 elements: rows of 16 bytes in 16-bit dtypes (the padded layout)."""
    return -(-width // 8) * 8


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for same-shape tensors."""
    return F.silu(gate) * up


def swiglu_packed_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :h]) * x[..., h:]`` for ``x`` of width ``2 * h``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_layer_norm_ref(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    width: int | None = None,
) -> torch.Tensor:
    """``LayerNorm(silu(gate) * up)`` over the last dimension: exactly the unfused ``norm(swiglu(gate, up))``.

    ``width``: the norm's width when ``gate`` and ``up`` are wider (zero-padded rows, module docstring): the columns
    past it, and those of ``weight`` / ``bias`` past it, are ignored; the output keeps the rows' width, zeros there.
    """
    if width is None:
        return F.layer_norm(F.silu(gate) * up, (gate.shape[-1],), weight, bias, eps)
    weight, bias = (None if p is None else p[:width] for p in (weight, bias))
    out = F.layer_norm(F.silu(gate[..., :width]) * up[..., :width], (width,), weight, bias, eps)
    return _pad_columns(out, gate.shape[-1])


def _pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` with zero columns appended up to ``width`` (a copy when it is narrower)."""
    return F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t


# Bodies of the torch.library ops for tensors the kernels cannot take (CPU without the interpreter): the same maths
# as the kernels, in PyTorch, at fp32 or better.


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _silu_and_grad(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate)`` and its derivative ``sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))``."""
    sigmoid = torch.sigmoid(gate)
    return gate * sigmoid, sigmoid * (1 + gate * (1 - sigmoid))


def _swiglu_bwd_reference(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    compute = _compute_dtype(gate.dtype)
    silu, silu_grad = _silu_and_grad(gate.to(compute))
    grad = grad.to(compute)
    return (grad * up.to(compute) * silu_grad).to(gate.dtype), (grad * silu).to(up.dtype)


def _swiglu_layer_norm_fwd_reference(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    padded_width = gate.shape[-1]
    gate, up, weight, bias = gate[..., :width], up[..., :width], weight[:width], bias[:width]
    compute = _compute_dtype(gate.dtype)
    stats = F.silu(gate.to(compute)) * up.to(compute)
    product = stats.to(gate.dtype)  # the kernels' rounding point
    stats = product.to(compute)
    mean = stats.mean(-1)
    rstd = torch.rsqrt(stats.var(-1, unbiased=False) + eps)
    out = F.layer_norm(product, (width,), weight, bias, eps)
    return _pad_columns(out, padded_width).contiguous(), mean.float(), rstd.float()


def _swiglu_layer_norm_bwd_reference(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    padded_width, param_width = gate.shape[-1], weight.shape[0]
    gate, up, grad, weight = gate[..., :width], up[..., :width], grad[..., :width], weight[:width]
    compute = _compute_dtype(gate.dtype)
    gate_c, up_c, grad_c = gate.to(compute), up.to(compute), grad.to(compute)
    silu, silu_grad = _silu_and_grad(gate_c)
    product = (silu * up_c).to(gate.dtype).to(compute)  # the kernels' rounding point
    mean, rstd = mean.to(compute).unsqueeze(-1), rstd.to(compute).unsqueeze(-1)
    normalized = (product - mean) * rstd
    weighted_grad = grad_c * weight.to(compute)
    d_product = rstd * (
        weighted_grad
        - normalized * (normalized * weighted_grad).mean(-1, keepdim=True)
        - weighted_grad.mean(-1, keepdim=True)
    )
    d_weight = (grad_c * normalized).reshape(-1, width).sum(0).float()
    d_bias = grad_c.reshape(-1, width).sum(0).float()
    d_gate, d_up = (d_product * up_c * silu_grad).to(gate.dtype), (d_product * silu).to(up.dtype)
    d_params = _pad_columns(torch.stack([d_weight, d_bias]), param_width)
    return _pad_columns(d_gate, padded_width).contiguous(), _pad_columns(d_up, padded_width).contiguous(), d_params


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr,
    up_ptr,  # None when PACKED: the up half is read from gate_ptr at column offset n_cols
    out_ptr,
    n_rows,
    n_cols,
    gate_row_stride,
    up_row_stride,
    out_row_stride,
    PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)[:, None]  # rows * stride overflows int32 for large batches
    cols = cols[None, :]
    gate_offsets = rows * gate_row_stride + cols
    gate = tl.load(gate_ptr + gate_offsets, mask=mask, other=0.0).to(tl.float32)
    if PACKED:
        up = tl.load(gate_ptr + gate_offsets + n_cols, mask=mask, other=0.0).to(tl.float32)
    else:
        up = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + rows * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    grad_ptr,
    gate_ptr,
    up_ptr,  # None when PACKED (read from gate_ptr + n_cols)
    d_gate_ptr,
    d_up_ptr,  # None when PACKED (written to d_gate_ptr + n_cols: one buffer, one mutated kernel argument)
    n_rows,
    n_cols,
    grad_row_stride,
    gate_row_stride,
    up_row_stride,
    d_gate_row_stride,
    d_up_row_stride,
    PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)[:, None]
    cols = cols[None, :]
    grad = tl.load(grad_ptr + rows * grad_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate_offsets = rows * gate_row_stride + cols
    gate = tl.load(gate_ptr + gate_offsets, mask=mask, other=0.0).to(tl.float32)
    if PACKED:
        up = tl.load(gate_ptr + gate_offsets + n_cols, mask=mask, other=0.0).to(tl.float32)
    else:
        up = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    d_up = grad * gate * sigmoid
    d_gate = grad * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    d_gate_offsets = rows * d_gate_row_stride + cols
    tl.store(d_gate_ptr + d_gate_offsets, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)
    if PACKED:
        tl.store(d_gate_ptr + d_gate_offsets + n_cols, d_up.to(d_gate_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(d_up_ptr + rows * d_up_row_stride + cols, d_up.to(d_up_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_layer_norm_fwd_kernel(
    gate_ptr,
    up_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    mean_ptr,
    rstd_ptr,
    n_rows,
    n_cols,
    padded_cols,  # >= n_cols: the row's width in memory; columns past n_cols are padding (read, ignored, written 0)
    param_cols,  # n_cols or padded_cols: the length of weight and bias (zero-padded ones are read 16 bytes at a time)
    gate_row_stride,
    up_row_stride,
    out_row_stride,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    # loads and stores over the padded width (16-byte aligned: vector accesses), statistics over the true one
    mask = row_mask[:, None] & (cols < padded_cols)[None, :]
    valid = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)  # rows * stride overflows int32 for large batches
    offsets = rows[:, None] * gate_row_stride + cols[None, :]
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    offsets = rows[:, None] * up_row_stride + cols[None, :]
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # The unfused path normalizes a tensor of the input dtype: round the product there (module docstring).
    product = (gate * tl.sigmoid(gate) * up).to(gate_ptr.dtype.element_ty).to(tl.float32)
    product = tl.where(valid, product, 0.0)
    mean = tl.sum(product, axis=1) / n_cols
    centered = tl.where(valid, product - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + tl.cast(eps, tl.float32))
    weight = tl.load(weight_ptr + cols, mask=cols < param_cols, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=cols < param_cols, other=0.0).to(tl.float32)
    out = tl.where(valid, centered * rstd[:, None] * weight[None, :] + bias[None, :], 0.0)
    offsets = rows[:, None] * out_row_stride + cols[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _true_width_weight(weight_ptr, cols, col_mask, param_cols):
    """The norm's weight in fp32, zero past its true width: loaded over ``param_cols`` (16-byte loads when the
    parameters are padded too), the padding then zeroed whatever it holds."""
    weight = tl.load(weight_ptr + cols, mask=cols < param_cols, other=0.0, eviction_policy="evict_last")
    return tl.where(col_mask, weight.to(tl.float32), 0.0)


@triton.jit
def _swiglu_ln_bwd_tile(
    grad_ptr, gate_ptr, up_ptr, rows, cols, mask, mean, rstd, grad_row_stride, gate_row_stride, up_row_stride,
    EVICTION: tl.constexpr,
):  # fmt: skip
    """One tile of the sub-LN backward's inputs, loaded: fp32 ``(grad, normalized, gate, up, sigmoid(gate))``, the
    product recomputed exactly as the forward computed it (rounding included), so that it matches the saved
    statistics. Zero outside ``mask``; in padding columns inside it, whatever the inputs give (the caller's weight,
    zero there, and its final column mask keep them out of every result)."""
    grad = tl.load(
        grad_ptr + rows[:, None] * grad_row_stride + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICTION
    )
    grad = grad.to(tl.float32)
    gate = tl.load(
        gate_ptr + rows[:, None] * gate_row_stride + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICTION
    ).to(tl.float32)
    up = tl.load(
        up_ptr + rows[:, None] * up_row_stride + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICTION
    ).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    product = (gate * sigmoid * up).to(gate_ptr.dtype.element_ty).to(tl.float32)
    normalized = (product - mean[:, None]) * rstd[:, None]
    return grad, normalized, gate, up, sigmoid


@triton.jit
def _swiglu_ln_bwd_sums(
    grad_ptr, gate_ptr, up_ptr, weight_ptr, rows, row_mask, mean, rstd, chunk_start, n_cols, padded_cols, param_cols,
    grad_row_stride, gate_row_stride, up_row_stride, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The first pass over one column chunk of a row tile: its share of the two row sums that the gradient needs
    (``sum(w * g)``, ``sum(normalized * w * g)``) and of the parameter gradients (``sum_rows(g * normalized)``,
    ``sum_rows(g)``). The padding columns need no 2-D mask: the weight reads 0 there, so they drop out of the row
    sums, and the caller zeroes the parameter gradients past the true width."""
    cols = chunk_start + tl.arange(0, BLOCK_N)
    mask = row_mask[:, None] & (cols < padded_cols)[None, :]
    grad, normalized, _, _, _ = _swiglu_ln_bwd_tile(
        grad_ptr, gate_ptr, up_ptr, rows, cols, mask, mean, rstd,
        grad_row_stride, gate_row_stride, up_row_stride, "evict_last",  # kept for the second pass
    )  # fmt: skip
    weighted_grad = grad * _true_width_weight(weight_ptr, cols, cols < n_cols, param_cols)[None, :]
    return (
        tl.sum(weighted_grad, axis=1),
        tl.sum(normalized * weighted_grad, axis=1),
        tl.sum(grad * normalized, axis=0),
        tl.sum(grad, axis=0),
    )


@triton.jit
def _swiglu_ln_bwd_grads(
    grad_ptr, gate_ptr, up_ptr, weight_ptr, d_gate_ptr, d_up_ptr, rows, row_mask, mean, rstd, mean_weighted_grad,
    mean_projection, chunk_start, n_cols, padded_cols, param_cols, grad_row_stride, gate_row_stride, up_row_stride,
    d_gate_row_stride, d_up_row_stride, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The second pass over one column chunk of a row tile: ``d_gate`` and ``d_up`` written (zeros in the padding)."""
    cols = chunk_start + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = row_mask[:, None] & (cols < padded_cols)[None, :]
    grad, normalized, gate, up, sigmoid = _swiglu_ln_bwd_tile(
        grad_ptr, gate_ptr, up_ptr, rows, cols, mask, mean, rstd,
        grad_row_stride, gate_row_stride, up_row_stride, "evict_first",  # the tile's last use
    )  # fmt: skip
    d_product = grad * _true_width_weight(weight_ptr, cols, col_mask, param_cols)[None, :]
    d_product = d_product - normalized * mean_projection[:, None] - mean_weighted_grad[:, None]
    d_product = tl.where(col_mask[None, :], d_product * rstd[:, None], 0.0)  # the padding feeds no output
    d_up = d_product * gate * sigmoid
    d_gate = d_product * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    offsets = rows[:, None] * d_gate_row_stride + cols[None, :]
    tl.store(d_gate_ptr + offsets, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)
    offsets = rows[:, None] * d_up_row_stride + cols[None, :]
    tl.store(d_up_ptr + offsets, d_up.to(d_up_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_layer_norm_bwd_kernel(
    grad_ptr,
    gate_ptr,
    up_ptr,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    d_gate_ptr,
    d_up_ptr,
    partial_d_weight_ptr,  # fp32 [n_programs, param_cols]: one row of partial sums per program, summed by the launcher
    partial_d_bias_ptr,  # the same, in the same buffer after all the weight rows
    n_rows,
    n_cols,
    padded_cols,  # as in the forward; the gradients of the padding are written 0
    param_cols,
    rows_per_program,  # a multiple of BLOCK_M
    grad_row_stride,
    gate_row_stride,
    up_row_stride,
    d_gate_row_stride,
    d_up_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # a column chunk
    CHUNKS: tl.constexpr,  # a power of two >= the chunks of a row
):
    # The row is walked in column chunks of BLOCK_N, twice per row tile: the row sums first, then the gradients (the
    # second loads hit L1 / L2: HBM traffic is unchanged). A whole-row block would be a power of two (4096 for
    # EVA-02-L's 2736): a third of its registers and arithmetic padding. The parameter-gradient sums of all chunks
    # are one [CHUNKS, BLOCK_N] accumulator, each chunk's share added to its row (Triton carries no list of tensors
    # through a loop; unrolled per-chunk code had the compiler hoist every chunk's loads: ~150 registers).
    program = tl.program_id(0)
    chunk_ids = tl.arange(0, CHUNKS)[:, None]
    d_weight = tl.zeros((CHUNKS, BLOCK_N), dtype=tl.float32)
    d_bias = tl.zeros((CHUNKS, BLOCK_N), dtype=tl.float32)
    # int64 row bounds make the row indices int64 too: row * stride overflows int32 for large batches.
    row_start = program.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        sum_wg = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_nwg = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for chunk in range(0, tl.cdiv(padded_cols, BLOCK_N)):
            s_wg, s_nwg, dw, db = _swiglu_ln_bwd_sums(
                grad_ptr, gate_ptr, up_ptr, weight_ptr, rows, row_mask, mean, rstd, chunk * BLOCK_N, n_cols,
                padded_cols, param_cols, grad_row_stride, gate_row_stride, up_row_stride, BLOCK_N,
            )  # fmt: skip
            sum_wg += s_wg
            sum_nwg += s_nwg
            d_weight = tl.where(chunk_ids == chunk, d_weight + dw[None, :], d_weight)
            d_bias = tl.where(chunk_ids == chunk, d_bias + db[None, :], d_bias)
        mean_weighted_grad = sum_wg / n_cols
        mean_projection = sum_nwg / n_cols
        for chunk in range(0, tl.cdiv(padded_cols, BLOCK_N)):
            _swiglu_ln_bwd_grads(
                grad_ptr, gate_ptr, up_ptr, weight_ptr, d_gate_ptr, d_up_ptr, rows, row_mask, mean, rstd,
                mean_weighted_grad, mean_projection, chunk * BLOCK_N, n_cols, padded_cols, param_cols,
                grad_row_stride, gate_row_stride, up_row_stride, d_gate_row_stride, d_up_row_stride, BLOCK_N,
            )  # fmt: skip
    cols = chunk_ids * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    d_weight, d_bias = tl.where(cols < n_cols, d_weight, 0.0), tl.where(cols < n_cols, d_bias, 0.0)  # the padding's
    tl.store(partial_d_weight_ptr + program * param_cols + cols, d_weight, mask=cols < param_cols)
    tl.store(partial_d_bias_ptr + program * param_cols + cols, d_bias, mask=cols < param_cols)


def _check_dtype(what: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{what} must be float16, bfloat16 or float32 for the Triton kernel, got {t.dtype}.")


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.ndim == 0 or gate.shape[-1] == 0:
        raise ValueError(f"gate needs a non-empty last dimension, got shape {tuple(gate.shape)}.")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}.")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have the same dtype, got {gate.dtype} and {up.dtype}.")
    _check_dtype("gate", gate)


def _check_packed(x: torch.Tensor) -> None:
    if x.ndim == 0 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"packed SwiGLU needs an even, non-zero last dimension, got shape {tuple(x.shape)}.")
    _check_dtype("x", x)


# Longest run of rows whose parameter gradients a backward program adds in sequence: fp32 rounding error grows with
# the run (the interpreter's numpy also adds a tile's rows in sequence). Programs' partial sums then meet in the
# LayerNorm backward's reduction kernel (layer_norm.reduce_param_partials: 32-row tiles added in sequence, then a
# tree over a tile's rows).
_MAX_CHAIN = 64


def _rows_per_tile(block_n: int) -> int:
    # About 4096 elements per program: narrow rows (EVA-02 Ti: 512) are stacked so that a program's index arithmetic
    # and launch are amortized; a 4096-wide row block is one row. The interpreter pays per program and per loop
    # iteration rather than per element, so there tiles are 16 times taller to keep CPU tests fast: the same code
    # path, with row tails still masked (tests/ops/test_swiglu.py also runs the GPU tile heights). Never over
    # _MAX_CHAIN rows, which a backward program may add in sequence.
    block_m = max(1, 4096 // block_n)
    return min(block_m * 16 if INTERPRETER else block_m, _MAX_CHAIN)


def _elementwise_blocks(n_cols: int) -> tuple[int, int]:
    # BLOCK_N: up to 1024 columns of a row per program (a 2-D grid over row and column blocks), so that wide rows
    # (2730) take three column blocks with one masked tail instead of a 4096-wide block a third empty.
    block_n = min(next_power_of_2(n_cols), 1024)
    return _rows_per_tile(block_n), block_n


@eager_memo
def _elementwise_plan(n_rows: int, n_cols: int, interpreter: bool) -> tuple[tuple[int, int], int, int]:
    """``(grid, BLOCK_M, BLOCK_N)`` of the element-wise kernels; ``interpreter``: ``INTERPRETER``, which
    :func:`_rows_per_tile` reads, in the memo's key (tests switch it off to run the GPU tiles)."""
    block_m, block_n = _elementwise_blocks(n_cols)
    return (cdiv(n_rows, block_m), cdiv(n_cols, block_n)), block_m, block_n


# 256 threads for a ~4096-element tile: 16 elements per thread and tensor (two 16-byte loads in 16-bit dtypes), which
# leaves the backward's fp32 operands in registers; the kernels are memory-bound, more warps buy nothing.
_ELEMENTWISE_NUM_WARPS = 8


def _launch_swiglu_fwd(
    gate: tuple[torch.Tensor, int, int], up: tuple[torch.Tensor, int, int] | None, out: torch.Tensor, n_cols: int
) -> None:
    """``gate``/``up``: ``(rows, n_rows, row_stride)`` of :func:`rows_2d`; ``up`` None means packed; ``out``: contiguous
    ``[..., n_cols]``."""
    gate, n_rows, gate_stride = gate
    if n_rows == 0:
        return
    grid, block_m, block_n = _elementwise_plan(n_rows, n_cols, INTERPRETER)
    up, _, up_row_stride = up if up is not None else (None, n_rows, 0)
    launch(
        _swiglu_fwd_kernel,
        grid,
        gate,
        up,
        out,
        n_rows,
        n_cols,
        gate_stride,
        up_row_stride,
        n_cols,
        PACKED=up is None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=_ELEMENTWISE_NUM_WARPS,
    )


def _launch_swiglu_bwd(
    grad: tuple[torch.Tensor, int, int],
    gate: tuple[torch.Tensor, int, int],
    up: tuple[torch.Tensor, int, int] | None,
    d_gate: torch.Tensor,
    d_up: torch.Tensor | None,
    n_cols: int,
) -> None:
    """Rows as in :func:`_launch_swiglu_fwd`; ``up`` and ``d_up`` None means packed ``gate`` and ``d_gate`` (both
    contiguous, ``[..., n_cols]``, or ``[..., 2 n_cols]`` packed)."""
    (grad, _, grad_stride), (gate, n_rows, gate_stride) = grad, gate
    if n_rows == 0:
        return
    grid, block_m, block_n = _elementwise_plan(n_rows, n_cols, INTERPRETER)
    up, _, up_stride = up if up is not None else (None, n_rows, 0)
    launch(
        _swiglu_bwd_kernel,
        grid,
        grad,
        gate,
        up,
        d_gate,
        d_up,
        n_rows,
        n_cols,
        grad_stride,
        gate_stride,
        up_stride,
        n_cols if d_up is not None else 2 * n_cols,
        0 if d_up is None else n_cols,
        PACKED=up is None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=_ELEMENTWISE_NUM_WARPS,
    )


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with the Triton kernel.

    ``gate``, ``up``: ``[..., h]``, same shape and dtype (float16 / bfloat16 / float32), any row strides (a tensor
    whose rows cannot be viewed with unit column stride is copied). Returns a contiguous ``[..., h]`` tensor of the
    input dtype; silu is computed in fp32.
    """
    _check_pair(gate, up)
    width = gate.shape[-1]
    out = empty(gate.shape, gate.dtype, gate.device)
    _launch_swiglu_fwd(rows_2d(gate, width), rows_2d(up, width), out, width)
    return out


def swiglu_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d_gate, d_up)`` of :func:`swiglu_fwd` for the output gradient ``grad`` (same shape)."""
    _check_pair(gate, up)
    if grad.shape != gate.shape:
        raise ValueError(f"grad must have the shape of gate {tuple(gate.shape)}, got {tuple(grad.shape)}.")
    width = gate.shape[-1]
    d_gate = empty(gate.shape, gate.dtype, gate.device)
    d_up = empty(up.shape, up.dtype, up.device)
    _launch_swiglu_bwd(rows_2d(grad, width), rows_2d(gate, width), rows_2d(up, width), d_gate, d_up, width)
    return d_gate, d_up


def swiglu_packed_fwd(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :h]) * x[..., h:]`` with the Triton kernel, reading both halves of ``x`` in place.

    ``x``: ``[..., 2h]`` float16 / bfloat16 / float32, any row stride. Returns a contiguous ``[..., h]`` tensor of
    ``x``'s dtype.
    """
    _check_packed(x)
    width = x.shape[-1] // 2
    out = empty((*x.shape[:-1], width), x.dtype, x.device)
    _launch_swiglu_fwd(rows_2d(x, 2 * width), None, out, width)
    return out


def swiglu_packed_bwd(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient ``d_x`` of :func:`swiglu_packed_fwd`: contiguous ``[..., 2h]``, ``[d_gate | d_up]`` written in place."""
    _check_packed(x)
    width = x.shape[-1] // 2
    if grad.shape != (*x.shape[:-1], width):
        raise ValueError(
            f"grad must have shape {(*x.shape[:-1], width)} for x {tuple(x.shape)}, got {tuple(grad.shape)}."
        )
    d_x = empty(x.shape, x.dtype, x.device)
    _launch_swiglu_bwd(rows_2d(grad, width), rows_2d(x, 2 * width), None, d_x, None, width)
    return d_x


def _check_layer_norm(
    gate: torch.Tensor, up: torch.Tensor, width: int | None, weight: torch.Tensor, **params: torch.Tensor
) -> tuple[int, int, int]:
    """``(width, padded_width, param_width)``: the norm's width, the rows' width in memory (``gate``'s), and the
    parameters' length (one of the two)."""
    _check_pair(gate, up)
    padded_width = gate.shape[-1]
    if padded_width > MAX_LAYER_NORM_WIDTH:
        raise ValueError(
            f"the fused SwiGLU + LayerNorm kernel takes widths up to {MAX_LAYER_NORM_WIDTH}, got {padded_width}."
        )
    width = padded_width if width is None else width
    if not 0 < width <= padded_width:
        raise ValueError(f"the norm's width must be in [1, {padded_width}] (gate's width), got {width}.")
    param_width = weight.shape[0] if weight.dim() == 1 else -1
    for name, param in {"weight": weight, **params}.items():
        if param.shape != (param_width,) or param_width not in (width, padded_width):
            expected = f"({width},)" if width == padded_width else f"({width},) or ({padded_width},)"
            raise ValueError(f"{name} must have shape {expected}, got {tuple(param.shape)}.")
        _check_dtype(name, param)
    return width, padded_width, param_width


def _backward_chunks(padded_width: int) -> tuple[int, int]:
    """``(BLOCK_N, chunks)`` of the sub-LN backward: a row in at most four power-of-two column chunks, at least 1024
    wide (2736 -> 3 x 1024, 2048 -> 2 x 1024, 8192 -> 4 x 2048)."""
    block_n = min(next_power_of_2(padded_width), max(1024, next_power_of_2(cdiv(padded_width, 4))))
    return block_n, cdiv(padded_width, block_n)


def _vector_rows(padded_width: int, dtype: torch.dtype) -> bool:
    """Whether rows of this width start on 16-byte boundaries, so that 16-bit rows load in 128-bit accesses."""
    return padded_width * torch.finfo(dtype).bits % 128 == 0 and dtype != torch.float32


def _backward_launch(block_m: int, block_n: int, padded_width: int, dtype: torch.dtype) -> dict:
    """Warps and register cap of the sub-LN backward (offline sm_90 compile at EVA-02-L's rows, 2026-12-01).

    16-byte rows: 8 elements per thread of a chunk tile (one 128-bit access per array), capped at 128 registers,
    two CTAs of 8 warps per SM; ptxas alone took 117-154 (154 at the true width 2730 in the padded 2736 layout,
    one CTA). Other rows load scalars anyway: 4 elements per thread, twice the warps.
    """
    if _vector_rows(padded_width, dtype):
        return {"num_warps": min(max(block_m * block_n // 256, 4), 16), "maxnreg": 128}
    return {"num_warps": min(max(block_m * block_n // 128, 4), 16)}


def _row_num_warps(block_m: int, block_n: int) -> int:
    # About 16 fp32 elements per thread and live tile (gate, up, product, normalized row, weight; the d_weight /
    # d_bias accumulators in the backward) keeps clear of register spills: 8 warps for a 4096-element tile, 16 for
    # an 8192-wide row.
    return min(max(block_m * block_n // 512, 4), 16)


def _layer_norm_bwd_programs(n_rows: int, block_m: int, sm_count: int | None) -> int:
    # Each program walks a contiguous range of rows and keeps fp32 partial d_weight / d_bias in registers. On a GPU
    # (sm_count given), 4 programs per SM fill it while the [programs, width] partial-sum buffer stays small, and
    # more when a program would otherwise add over _MAX_CHAIN rows in sequence. The interpreter runs programs one
    # after the other: the fewest that respect _MAX_CHAIN.
    wanted = cdiv(n_rows, _MAX_CHAIN)
    if sm_count is not None:
        wanted = max(wanted, 4 * sm_count)
    return max(1, min(cdiv(n_rows, block_m), wanted))


@eager_memo
def _layer_norm_bwd_plan(
    n_rows: int, padded_width: int, dtype: torch.dtype, sm_count: int | None, interpreter: bool
) -> tuple[int, int, int, int, int, dict]:
    """``(programs, rows_per_program, BLOCK_M, BLOCK_N, CHUNKS, launch options)`` of the sub-LN backward;
    ``interpreter`` as in :func:`_elementwise_plan`."""
    block_n, num_chunks = _backward_chunks(padded_width)
    # half the forward's tile height: tiles of 2048 elements per chunk (2 x 1024 at EVA-02-L), 8 per thread at 8 warps
    block_m = max(1, _rows_per_tile(block_n) // 2)
    rows_per_program = cdiv(n_rows, _layer_norm_bwd_programs(n_rows, block_m, sm_count))
    rows_per_program = cdiv(rows_per_program, block_m) * block_m  # <= _MAX_CHAIN: block_m is a power of 2
    n_programs = cdiv(n_rows, rows_per_program)
    options = _backward_launch(block_m, block_n, padded_width, dtype)
    return n_programs, rows_per_program, block_m, block_n, next_power_of_2(num_chunks), options


@eager_memo
def _layer_norm_fwd_plan(n_rows: int, padded_width: int, interpreter: bool) -> tuple[tuple[int], int, int, int]:
    """``(grid, BLOCK_M, BLOCK_N, num_warps)`` of the sub-LN forward; ``interpreter`` as in
    :func:`_elementwise_plan`."""
    block_n = next_power_of_2(padded_width)  # the whole row in one block: the statistics need all of it
    block_m = _rows_per_tile(block_n)
    return (cdiv(n_rows, block_m),), block_m, block_n, _row_num_warps(block_m, block_n)


def swiglu_layer_norm_fwd(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``LayerNorm(silu(gate) * up)`` over the last dimension with the Triton kernel, whole rows per program.

    ``gate``, ``up``: ``[..., p]``, same shape and dtype (float16 / bfloat16 / float32), ``p <= 8192``, any row
    strides. ``width`` (default ``p``): the norm is over the first ``width`` columns, the others are padding (module
    docstring). ``weight``, ``bias``: ``[width]`` or zero-padded ``[p]``, any of those dtypes. Returns ``(out, mean,
    rstd)``: ``out`` contiguous ``[..., p]`` of the input dtype (zeros in the padding), ``mean`` and ``rstd`` fp32
    ``[...]`` (the statistics of the product, rounded to the input dtype, that the backward reuses).
    """
    width, padded_width, param_width = _check_layer_norm(gate, up, width, weight, bias=bias)
    device, shape = gate.device, gate.shape
    out = empty(shape, gate.dtype, device)
    mean = empty(shape[:-1], torch.float32, device)
    rstd = empty(shape[:-1], torch.float32, device)
    gate_rows, n_rows, gate_stride = rows_2d(gate, padded_width)
    up_rows, _, up_stride = rows_2d(up, padded_width)
    if n_rows == 0:
        return out, mean, rstd
    grid, block_m, block_n, num_warps = _layer_norm_fwd_plan(n_rows, padded_width, INTERPRETER)
    launch(
        _swiglu_layer_norm_fwd_kernel,
        grid,
        gate_rows,
        up_rows,
        weight,
        bias,
        out,
        mean,
        rstd,
        n_rows,
        width,
        padded_width,
        param_width,
        gate_stride,
        up_stride,
        padded_width,
        eps,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out, mean, rstd


def swiglu_layer_norm_bwd(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`swiglu_layer_norm_fwd`: ``(d_gate, d_up, d_params)``.

    ``grad``: ``[..., p]`` like ``gate``; ``mean``, ``rstd``: the fp32 ``[...]`` statistics the forward returned.
    ``d_gate``, ``d_up`` are contiguous in the input dtype (zeros in the padding); ``d_params`` is fp32 ``[2, weight's
    length]``: the weight's and the bias's gradients (summed over rows in fp32 by one reduction of the programs'
    partial sums, zero in the padding; the autograd glue casts them to the parameters' dtypes). The product is
    recomputed, not saved.
    """
    width, padded_width, param_width = _check_layer_norm(gate, up, width, weight)
    if grad.shape != gate.shape:
        raise ValueError(f"grad must have the shape of gate {tuple(gate.shape)}, got {tuple(grad.shape)}.")
    if mean.shape != gate.shape[:-1] or rstd.shape != gate.shape[:-1]:
        raise ValueError(
            f"mean and rstd must have shape {tuple(gate.shape[:-1])}, got {tuple(mean.shape)} and {tuple(rstd.shape)}."
        )
    if mean.dtype != torch.float32 or rstd.dtype != torch.float32:
        raise ValueError(f"mean and rstd must be float32, got {mean.dtype} and {rstd.dtype}.")
    device = gate.device
    d_gate = empty(gate.shape, gate.dtype, device)
    d_up = empty(up.shape, up.dtype, device)
    grad_rows, _, grad_stride = rows_2d(grad, padded_width)
    gate_rows, n_rows, gate_stride = rows_2d(gate, padded_width)
    up_rows, _, up_stride = rows_2d(up, padded_width)
    if n_rows == 0:
        return d_gate, d_up, torch.zeros((2, param_width), dtype=torch.float32, device=device)
    sm_count = gpu_sms(device)
    n_programs, rows_per_program, block_m, block_n, chunks, options = _layer_norm_bwd_plan(
        n_rows, padded_width, gate.dtype, sm_count, INTERPRETER
    )
    # the weight's and the bias's partial sums in one buffer: one reduction launch for both
    partials = empty((2, n_programs, param_width), torch.float32, device)
    launch(
        _swiglu_layer_norm_bwd_kernel,
        (n_programs,),
        grad_rows,
        gate_rows,
        up_rows,
        weight,
        mean.reshape(-1),
        rstd.reshape(-1),
        d_gate,
        d_up,
        partials[0],
        partials[1],
        n_rows,
        width,
        padded_width,
        param_width,
        rows_per_program,
        grad_stride,
        gate_stride,
        up_stride,
        padded_width,
        padded_width,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CHUNKS=chunks,
        num_stages=1,
        **options,
    )
    d_params = empty((2, param_width), torch.float32, device)
    reduce_param_partials(partials, (None, d_params[0], d_params[1]), reduce_block(param_width, sm_count))
    return d_gate, d_up, d_params


@triton_op("vitfast::swiglu_fwd")
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if not kernel_can_run(gate, up):
        return swiglu_ref(gate, up)
    return swiglu_fwd(gate, up)


@triton_op("vitfast::swiglu_bwd")
def _swiglu_bwd_op(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not kernel_can_run(grad, gate, up):
        return _swiglu_bwd_reference(grad, gate, up)
    return swiglu_bwd(grad, gate, up)


@triton_op("vitfast::swiglu_packed_fwd")
def _swiglu_packed_fwd_op(x: torch.Tensor) -> torch.Tensor:
    if not kernel_can_run(x):
        return swiglu_packed_ref(x)
    return swiglu_packed_fwd(x)


@triton_op("vitfast::swiglu_packed_bwd")
def _swiglu_packed_bwd_op(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not kernel_can_run(grad, x):
        return torch.cat(_swiglu_bwd_reference(grad, *x.chunk(2, dim=-1)), dim=-1)
    return swiglu_packed_bwd(grad, x)


@triton_op("vitfast::swiglu_layer_norm_fwd")
def _swiglu_layer_norm_fwd_op(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not kernel_can_run(gate, up, weight, bias):
        _check_layer_norm(gate, up, width, weight, bias=bias)
        return _swiglu_layer_norm_fwd_reference(gate, up, weight, bias, eps, width)
    return swiglu_layer_norm_fwd(gate, up, weight, bias, eps, width)


@triton_op("vitfast::swiglu_layer_norm_bwd")
def _swiglu_layer_norm_bwd_op(
    grad: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not kernel_can_run(grad, gate, up, weight, mean, rstd):
        return _swiglu_layer_norm_bwd_reference(grad, gate, up, weight, mean, rstd, width)
    return swiglu_layer_norm_bwd(grad, gate, up, weight, mean, rstd, width)


def _swiglu_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(grad, gate, up)


def _swiglu_packed_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return _swiglu_packed_bwd_op(grad, x)


def _swiglu_layer_norm_setup_context(ctx, inputs, output) -> None:
    gate, up, weight, bias, _, width = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.bias_dtype, ctx.width = bias.dtype, width
    ctx.save_for_backward(gate, up, weight, mean, rstd)


def _swiglu_layer_norm_backward(ctx, grad: torch.Tensor, _grad_mean: torch.Tensor, _grad_rstd: torch.Tensor):
    """``(d_gate, d_up, d_weight, d_bias, None, None)``."""
    gate, up, weight, mean, rstd = ctx.saved_tensors
    d_gate, d_up, d_params = _swiglu_layer_norm_bwd_op(grad, gate, up, weight, mean, rstd, ctx.width)
    if weight.dtype == ctx.bias_dtype:
        d_params = d_params.to(weight.dtype)  # one cast for both (none for fp32 parameters)
        return d_gate, d_up, d_params[0], d_params[1], None, None
    return d_gate, d_up, d_params[0].to(weight.dtype), d_params[1].to(ctx.bias_dtype), None, None


_swiglu_fwd_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)
_swiglu_packed_fwd_op.register_autograd(_swiglu_packed_backward, setup_context=_swiglu_setup_context)
_swiglu_layer_norm_fwd_op.register_autograd(_swiglu_layer_norm_backward, setup_context=_swiglu_layer_norm_setup_context)


def _native_state() -> tuple | None:
    return native_state(INTERPRETER)  # the launch plans read INTERPRETER (tests set it to run the GPU tiles)


def _swiglu_covers(gate, up) -> bool:
    return _swiglu_unsupported(gate, up) is None


def _swiglu_packed_covers(x) -> bool:
    return _swiglu_unsupported(x, x) is None and x.shape[-1] % 2 == 0


def _swiglu_layer_norm_covers(gate, up, weight, bias, _eps, width) -> bool:
    return _swiglu_layer_norm_uncovered(gate, up, weight, bias, width) is None


def register_ext(cpu: bool = INTERPRETER) -> None:
    """The native eager entry points of the ops here (csrc/eager.cpp; :func:`~vitfast.ops._triton.register_native`)."""
    register_native(_swiglu_fwd_op, _native_state, cpu, covers=_swiglu_covers)
    register_native(_swiglu_packed_fwd_op, _native_state, cpu, covers=_swiglu_packed_covers)
    register_native(_swiglu_layer_norm_fwd_op, _native_state, cpu, covers=_swiglu_layer_norm_covers)
    for op in (_swiglu_bwd_op, _swiglu_packed_bwd_op, _swiglu_layer_norm_bwd_op):
        register_native(op, _native_state, cpu)


register_ext()


def _swiglu_unsupported(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these tensors, or None when they can."""
    if not kernel_can_run(gate, up):
        return "tensors not on a CUDA device (nor on the CPU under the Triton interpreter)"
    if gate.dtype not in KERNEL_DTYPES or up.dtype != gate.dtype:
        return f"dtypes {gate.dtype} / {up.dtype} (the kernels take one of float16, bfloat16, float32)"
    if gate.shape != up.shape:
        return "gate and up of different shapes (broadcasting)"
    if gate.ndim == 0 or gate.shape[-1] == 0:
        return "empty last dimension"
    return None


def _swiglu_layer_norm_uncovered(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, width: int | None
) -> str | None:
    """Why the SwiGLU + sub-LN kernel cannot take these tensors, or None when it can."""
    reason = _swiglu_unsupported(gate, up)
    if reason is None:
        if weight is None or bias is None:
            reason = "LayerNorm without weight or bias"
        elif not kernel_can_run(gate, weight, bias):
            reason = "weight / bias on another device"
        elif weight.dtype not in KERNEL_DTYPES or bias.dtype not in KERNEL_DTYPES:
            reason = f"weight / bias dtypes {weight.dtype} / {bias.dtype}"
        elif gate.shape[-1] > MAX_LAYER_NORM_WIDTH:
            reason = f"width over {MAX_LAYER_NORM_WIDTH}"
        elif weight.shape != bias.shape or weight.shape[-1] not in (width or gate.shape[-1], gate.shape[-1]):
            reason = "weight / bias shape not [width]"
    return reason


def _swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    result = _swiglu_fwd_op.native_call(gate, up)  # covers: _swiglu_covers
    if result is not NotImplemented:
        return result
    reason = _swiglu_unsupported(gate, up)
    if reason is not None:
        log_fallback("swiglu", reason)
        return swiglu_ref(gate, up)
    return _swiglu_fwd_op.after_native(gate, up)


def _swiglu_packed_triton(x: torch.Tensor) -> torch.Tensor:
    result = _swiglu_packed_fwd_op.native_call(x)  # covers: _swiglu_packed_covers
    if result is not NotImplemented:
        return result
    reason = _swiglu_unsupported(x, x)
    if reason is not None:
        log_fallback("swiglu_packed", reason)
        return swiglu_packed_ref(x)
    return _swiglu_packed_fwd_op.after_native(x)


def _swiglu_layer_norm_triton(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    width: int | None = None,
) -> torch.Tensor:
    if gate.ndim:
        result = _swiglu_layer_norm_fwd_op.native_call(gate, up, weight, bias, eps, width or gate.shape[-1])
        if result is not NotImplemented:  # covers: _swiglu_layer_norm_covers
            return result[0]
    reason = _swiglu_layer_norm_uncovered(gate, up, weight, bias, width)
    if reason is not None:
        log_fallback("swiglu_layer_norm", reason)
        return swiglu_layer_norm_ref(gate, up, weight, bias, eps, width)
    return _swiglu_layer_norm_fwd_op.after_native(gate, up, weight, bias, eps, width or gate.shape[-1])[0]


register_impl("swiglu", "reference", swiglu_ref)
register_impl("swiglu_packed", "reference", swiglu_packed_ref)
register_impl("swiglu_layer_norm", "reference", swiglu_layer_norm_ref)
if HAS_TRITON:
    register_impl("swiglu", "triton", _swiglu_triton)
    register_impl("swiglu_packed", "triton", _swiglu_packed_triton)
    register_impl("swiglu_layer_norm", "triton", _swiglu_layer_norm_triton)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Split-form SwiGLU through the current backend."""
    return dispatch("swiglu", gate.device, gate.shape[-1] if gate.ndim else None)(gate, up)


def swiglu_packed(x: torch.Tensor) -> torch.Tensor:
    """Packed-form SwiGLU through the current backend."""
    if x.shape[-1] % 2:
        raise ValueError(f"packed SwiGLU needs an even last dimension, got {x.shape[-1]}.")
    return dispatch("swiglu_packed", x.device, x.shape[-1] // 2 if x.ndim else None)(x)


def swiglu_layer_norm(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    width: int | None = None,
) -> torch.Tensor:
    """``LayerNorm(silu(gate) * up)`` over the last dimension (the EVA-02 B/L sub-LN) through the current backend.

    ``width``: for rows zero-padded past the norm's width (the layout of the module docstring): ``gate`` and ``up``
    are ``[..., p]``, ``p >= width``; ``weight`` and ``bias`` (both required) ``[width]`` or zero-padded ``[p]``; the
    columns past ``width`` are ignored and zero in the ``[..., p]`` output. ``None``: the rows are the norm's width.
    """
    rows_width = gate.shape[-1]
    if width is None:
        for name, param in (("weight", weight), ("bias", bias)):
            if param is not None and param.shape != gate.shape[-1:]:
                raise ValueError(
                    f"swiglu_layer_norm: weight and bias must be [{rows_width}] (the rows' width), got {name} "
                    f"{tuple(param.shape)}; for rows zero-padded past the norm's width pass width=."
                )
    else:
        if not isinstance(width, int) or not 0 < width <= rows_width:
            raise ValueError(
                f"swiglu_layer_norm: width must be an int in [1, {rows_width}] (gate's width), got {width!r}."
            )
        if (
            weight is None
            or bias is None
            or weight.shape != bias.shape
            or weight.shape not in ((width,), (rows_width,))
        ):
            shapes = [None if p is None else tuple(p.shape) for p in (weight, bias)]
            raise ValueError(
                f"swiglu_layer_norm(width={width}) needs weight and bias of one shape, ({width},) or ({rows_width},); "
                f"got {shapes[0]} and {shapes[1]}."
            )
    if gate.shape != up.shape:
        raise ValueError(
            f"swiglu_layer_norm: gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}."
        )
    true_width = width if width is not None else (gate.shape[-1] if gate.ndim else None)
    return dispatch("swiglu_layer_norm", gate.device, true_width)(gate, up, weight, bias, eps, width)
