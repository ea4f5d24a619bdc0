"""Multi-head self-attention for ViTs, with optional 2D RoPE and BEiT relative position bias.

Contract shared by every implementation of the ``attention`` op:

- ``q``, ``k``, ``v``: ``[B, H, N, D]``, same dtype; non-causal; softmax in fp32 or better;
- ``scale``: multiplies ``q @ k^T`` (default ``D ** -0.5``);
- ``rope``: optional ``(cos, sin)`` fp32 ``[N - num_prefix_tokens, D]`` tables (:mod:`vitfast.ops.rope` layout, or
  ``[N - num_prefix_tokens, D // 2]`` with one angle per pair), applied to ``q`` and ``k`` for tokens
  ``num_prefix_tokens:``;
- ``rel_pos_bias_table`` ``[num_relative_positions, H]`` with ``rel_pos_index`` ``[N, N]`` (int64): the additive bias
  ``table[index[i, j], h]`` of BEiT, gathered per head;
- ``dropout_p``: attention dropout, applied only when non-zero (fused kernels support ``0.0`` only).

The Triton kernels (flash-attention 2: online softmax in fp32, one pass over the keys per query block, no ``N x N``
matrix in memory) cover fp16 / bf16 / fp32, head dims :data:`KERNEL_HEAD_DIMS`, any ``N`` and any strides of
``q``, ``k``, ``v`` (the packed-qkv and split-projection views are read in place). RoPE is applied before them, once
per token, by :func:`vitfast.ops.rope.rope_2d_qk` (one pass over q and k; its outputs are in the layout the kernels
and SDPA read in place): rotating inside the kernels redid each key tile's rotation once per query tile and lost to
this order on an H100. The bias is gathered from the table per score tile; ``rel_pos_index`` may also be int32
(half the reads), and its values are not range-checked. The output is allocated ``[B, N, H, D]`` and returned as its
``[B, H, N, D]`` view, so the layer's ``out.transpose(1, 2).reshape(B, N, C)`` costs nothing. Anything else
(dropout, other dtypes or head dims, cross-attention shapes, devices the kernels cannot take) runs the reference.
Gradients flow to ``q``, ``k``, ``v`` and the bias table; the RoPE tables are constants (no gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitfast.backend import dispatch, register_impl
from vitfast.ops._triton import (
    HAS_TRITON,
    INTERPRETER,
    KERNEL_DTYPES,
    cdiv,
    kernel_can_run,
    launch,
    log_fallback,
    next_power_of_2,
    tl,
    triton,
    triton_op,
    widen_bf16_dot,
)
from vitfast.ops.rope import _check_qk, rope_2d_qk, rope_2d_ref

__all__ = ["KERNEL_HEAD_DIMS", "attention", "attention_bwd", "attention_fwd", "attention_ref", "gather_rel_pos_bias"]

# Head dims of the ViT families (REFERENCE.md section 4) that the kernels are built and tested for; tiles pad D to the
# next power of 2 (80 and 88 and 96 -> 128) with masks.
KERNEL_HEAD_DIMS = (32, 64, 80, 88, 96, 128)


def gather_rel_pos_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Materialize the BEiT bias ``[H, N, N]`` from ``table`` ``[num_rel, H]`` and ``index`` ``[N, N]``."""
    num_tokens = index.shape[0]
    # contiguous: SDPA's efficient kernels take a dense mask; a strided one sends it to a much slower path
    return table[index.reshape(-1)].reshape(num_tokens, num_tokens, -1).permute(2, 0, 1).contiguous()


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_prefix_tokens: int = 0,
    rel_pos_bias_table: torch.Tensor | None = None,
    rel_pos_index: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Plain-PyTorch attention (RoPE as elementwise ops, bias materialized, then SDPA); returns ``[B, H, N, D]``."""
    if rope is not None:
        cos, sin = rope
        q = rope_2d_ref(q, cos, sin, num_prefix_tokens)
        k = rope_2d_ref(k, cos, sin, num_prefix_tokens)
    bias = None
    if rel_pos_bias_table is not None:
        bias = gather_rel_pos_bias(rel_pos_bias_table, rel_pos_index).unsqueeze(0).to(q.dtype)
        if torch.compiler.is_exporting() and dropout_p == 0.0:
            # torch.onnx's decomposition of SDPA with a float mask (its CPU flash kernel) breaks the export of the
            # reshape after it ("Cannot view a tensor ..."; timm's Beit fails alike): export the attention as matmuls
            scores = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
            return (scores + bias).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


# ----------------------------------------------------------------------------------------------------------- kernels
# All three kernels keep only per-row pointers and per-column offsets live across their loop and build each 2D tile
# pointer inside it (2D pointer tiles held through the loop cost registers the score tiles need). The optional
# features are constexpr branches (BIAS, BIAS_GRAD). Scores live in base 2 (``qk_scale_log2 = scale *
# log2(e)``, the bias times log2(e)) so that exp2 serves the softmax; the saved lse is natural. ``dot_dtype`` is the
# input dtype, except under the interpreter for bf16: its tl.dot mishandles bf16 (numpy has no bf16), so there the
# already-rounded bf16 operands are widened to fp32, which gives the exact products a bf16 MMA accumulates in fp32.
# fp32 inputs use PRECISION="ieee" (the default tf32 would miss the fp32 reference by ~1e-3).

if HAS_TRITON:
    _LOG2E = tl.constexpr(math.log2(math.e))
    _LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, Table, Index,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_table_r, stride_table_h, stride_index_m, stride_index_n,
    num_heads, seq_len, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BIAS: tl.constexpr, WIDEN_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, head); online softmax over all key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    dot_dtype = tl.float32 if WIDEN_DOT else Q.dtype.element_ty
    queries = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # [BLOCK_M, 1]
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)[None, :]
    queries_ok = queries < seq_len
    cols_ok = cols < HEAD_DIM
    q_rows = Q + off_b * stride_qb + off_h * stride_qh + queries * stride_qn
    k_head = K + off_b * stride_kb + off_h * stride_kh
    v_head = V + off_b * stride_vb + off_h * stride_vh
    q = tl.load(q_rows + cols * stride_qd, mask=queries_ok & cols_ok, other=0.0).to(dot_dtype)
    if BIAS:
        index_rows = Index + queries * stride_index_m
        table_head = Table + off_h * stride_table_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        keys = (start_n + offs_n)[:, None]  # [BLOCK_N, 1]
        keys_ok = keys < seq_len
        key_cols = (start_n + offs_n)[None, :]  # [1, BLOCK_N]: the same keys along the score tile's columns
        k = tl.load(k_head + keys * stride_kn + cols * stride_kd, mask=keys_ok & cols_ok, other=0.0)
        s = tl.dot(q, tl.trans(k.to(dot_dtype)), input_precision=PRECISION)
        s = s * tl.cast(qk_scale_log2, tl.float32)
        if BIAS:
            tile_ok = queries_ok & (key_cols < seq_len)
            rel = tl.load(index_rows + key_cols * stride_index_n, mask=tile_ok, other=0).to(tl.int32)
            s += tl.load(table_head + rel * stride_table_r, mask=tile_ok, other=0.0).to(tl.float32) * _LOG2E
        s = tl.where(key_cols < seq_len, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + keys * stride_vn + cols * stride_vd, mask=keys_ok & cols_ok, other=0.0)
        p = p.to(V.dtype.element_ty).to(dot_dtype)
        acc = tl.dot(p, v.to(dot_dtype), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + queries * stride_on + cols * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=queries_ok & cols_ok)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(Lse + pid_bh * seq_len + rows, (m_i + tl.log2(l_i)) * _LN2, mask=rows < seq_len)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, Out, GradOut, Lse, Delta, GradQ, GradBias, Table, Index,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_table_r, stride_table_h, stride_index_m, stride_index_n,
    num_heads, seq_len, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, WIDEN_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: dQ of BLOCK_M query rows, looping over the key blocks (no atomics on dQ).

    It also writes ``delta = rowsum(dO * O)`` for the dK/dV kernel that runs next (one launch fewer than a separate
    preprocessing kernel) and, for the table gradient, adds dS into the fp32 ``[H, N, N]`` buffer (B-way contention).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    dot_dtype = tl.float32 if WIDEN_DOT else Q.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    queries = rows[:, None]
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)[None, :]
    queries_ok = queries < seq_len
    cols_ok = cols < HEAD_DIM

    o = tl.load(
        Out + off_b * stride_ob + off_h * stride_oh + queries * stride_on + cols * stride_od,
        mask=queries_ok & cols_ok,
        other=0.0,
    )
    do = tl.load(
        GradOut + off_b * stride_gb + off_h * stride_gh + queries * stride_gn + cols * stride_gd,
        mask=queries_ok & cols_ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * seq_len + rows, delta, mask=rows < seq_len)
    lse_log2 = tl.load(Lse + pid_bh * seq_len + rows, mask=rows < seq_len, other=0.0) * _LOG2E
    do = do.to(dot_dtype)

    q_rows = Q + off_b * stride_qb + off_h * stride_qh + queries * stride_qn
    k_head = K + off_b * stride_kb + off_h * stride_kh
    v_head = V + off_b * stride_vb + off_h * stride_vh
    q = tl.load(q_rows + cols * stride_qd, mask=queries_ok & cols_ok, other=0.0).to(dot_dtype)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BIAS:
        index_rows = Index + queries * stride_index_m
        table_head = Table + off_h * stride_table_h
    if BIAS_GRAD:
        grad_bias_rows = GradBias + off_h * seq_len * seq_len + queries * seq_len

    for start_n in range(0, seq_len, BLOCK_N):
        keys = (start_n + offs_n)[:, None]
        keys_ok = keys < seq_len
        key_cols = (start_n + offs_n)[None, :]
        k = tl.load(k_head + keys * stride_kn + cols * stride_kd, mask=keys_ok & cols_ok, other=0.0)
        k = k.to(dot_dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = s * tl.cast(qk_scale_log2, tl.float32)
        if BIAS:
            tile_ok = queries_ok & (key_cols < seq_len)
            rel = tl.load(index_rows + key_cols * stride_index_n, mask=tile_ok, other=0).to(tl.int32)
            s += tl.load(table_head + rel * stride_table_r, mask=tile_ok, other=0.0).to(tl.float32) * _LOG2E
        # masked keys get p = 0 exactly (their zero-filled scores could otherwise overflow exp2 against a small lse)
        s = tl.where(key_cols < seq_len, s, float("-inf"))
        p = tl.exp2(s - lse_log2[:, None])
        v = tl.load(v_head + keys * stride_vn + cols * stride_vd, mask=keys_ok & cols_ok, other=0.0)
        dp = tl.dot(do, tl.trans(v.to(dot_dtype)), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tile_ok = queries_ok & (key_cols < seq_len)
            tl.atomic_add(grad_bias_rows + key_cols, ds, mask=tile_ok, sem="relaxed")
        ds = ds.to(Q.dtype.element_ty).to(dot_dtype)
        dq = tl.dot(ds, k, dq, input_precision=PRECISION)

    dq_rows = GradQ + off_b * stride_dqb + off_h * stride_dqh + queries * stride_dqn
    tl.store(
        dq_rows + cols * stride_dqd,
        (dq * tl.cast(scale, tl.float32)).to(GradQ.dtype.element_ty),
        mask=queries_ok & cols_ok,
    )


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, Table, Index,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_table_r, stride_table_h, stride_index_m, stride_index_n,
    num_heads, seq_len, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BIAS: tl.constexpr, WIDEN_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: dK and dV of BLOCK_N key rows, looping over the query blocks with transposed score tiles."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    dot_dtype = tl.float32 if WIDEN_DOT else Q.dtype.element_ty
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]  # [BLOCK_N, 1]
    offs_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)[None, :]
    keys_ok = keys < seq_len
    cols_ok = cols < HEAD_DIM

    k_rows = K + off_b * stride_kb + off_h * stride_kh + keys * stride_kn
    q_head = Q + off_b * stride_qb + off_h * stride_qh
    do_head = GradOut + off_b * stride_gb + off_h * stride_gh
    k = tl.load(k_rows + cols * stride_kd, mask=keys_ok & cols_ok, other=0.0).to(dot_dtype)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + keys * stride_vn + cols * stride_vd
    v = tl.load(v_ptrs, mask=keys_ok & cols_ok, other=0.0).to(dot_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BIAS:
        index_rows = Index + keys * stride_index_n  # transposed tiles: index[query, key] with keys along rows
        table_head = Table + off_h * stride_table_h

    for start_m in range(0, seq_len, BLOCK_M):
        rows = start_m + offs_m
        queries = rows[:, None]
        queries_ok = queries < seq_len
        query_cols = rows[None, :]  # [1, BLOCK_M]: the same queries along the transposed score tile's columns
        q = tl.load(q_head + queries * stride_qn + cols * stride_qd, mask=queries_ok & cols_ok, other=0.0)
        q = q.to(dot_dtype)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        st = st * tl.cast(qk_scale_log2, tl.float32)
        tile_ok = keys_ok & (query_cols < seq_len)
        if BIAS:
            rel = tl.load(index_rows + query_cols * stride_index_m, mask=tile_ok, other=0).to(tl.int32)
            st += tl.load(table_head + rel * stride_table_r, mask=tile_ok, other=0.0).to(tl.float32) * _LOG2E
        # p = 0 exactly outside the N x N square (no overflow of exp2 in the discarded padding rows either)
        st = tl.where(tile_ok, st, float("-inf"))
        lse_log2 = tl.load(Lse + pid_bh * seq_len + rows, mask=rows < seq_len, other=0.0) * _LOG2E
        delta = tl.load(Delta + pid_bh * seq_len + rows, mask=rows < seq_len, other=0.0)
        pt = tl.exp2(st - lse_log2[None, :])
        do = tl.load(do_head + queries * stride_gn + cols * stride_gd, mask=queries_ok & cols_ok, other=0.0)
        do = do.to(dot_dtype)
        dv = tl.dot(pt.to(Q.dtype.element_ty).to(dot_dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = (pt * (dpt - delta[None, :])).to(Q.dtype.element_ty).to(dot_dtype)
        dk = tl.dot(dst, q, dk, input_precision=PRECISION)

    dk_rows = GradK + off_b * stride_dkb + off_h * stride_dkh + keys * stride_dkn
    tl.store(
        dk_rows + cols * stride_dkd,
        (dk * tl.cast(scale, tl.float32)).to(GradK.dtype.element_ty),
        mask=keys_ok & cols_ok,
    )
    dv_ptrs = GradV + off_b * stride_dvb + off_h * stride_dvh + keys * stride_dvn + cols * stride_dvd
    tl.store(dv_ptrs, dv.to(GradV.dtype.element_ty), mask=keys_ok & cols_ok)


# --------------------------------------------------------------------------------------------------------- launchers


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
) -> None:
    """Raise a ValueError for inputs outside the kernels' contract."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"attention: q, k, v must all be [B, H, N, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}."
        )
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"attention: q, k, v must share one dtype among float16, bfloat16, float32, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}."
        )
    _, heads, seq_len, head_dim = q.shape
    if head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"attention: head dim {head_dim} is not one of the kernels' {KERNEL_HEAD_DIMS}.")
    if (rel_pos_bias_table is None) != (rel_pos_index is None):
        raise ValueError("attention: rel_pos_bias_table and rel_pos_index must be given together.")
    if rel_pos_bias_table is not None:
        if rel_pos_bias_table.dim() != 2 or rel_pos_bias_table.shape[1] != heads:
            raise ValueError(
                f"attention: rel_pos_bias_table must be [num_relative_positions, H={heads}], got "
                f"{list(rel_pos_bias_table.shape)}."
            )
        if not rel_pos_bias_table.is_floating_point():
            raise ValueError(f"attention: rel_pos_bias_table must be a float tensor, got {rel_pos_bias_table.dtype}.")
        if tuple(rel_pos_index.shape) != (seq_len, seq_len) or rel_pos_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"attention: rel_pos_index must be an int64 (or int32) [N, N] = [{seq_len}, {seq_len}] tensor, got "
                f"{rel_pos_index.dtype} {list(rel_pos_index.shape)}."
            )
    if any(t is not None and t.device != q.device for t in (k, v, rel_pos_bias_table, rel_pos_index)):
        raise ValueError("attention: all tensors must be on one device.")


def _bias_args(
    q: torch.Tensor, rel_pos_bias_table: torch.Tensor | None, rel_pos_index: torch.Tensor | None
) -> tuple[list, list]:
    """Pointers and strides of the optional bias; ``q`` stands in for absent ones (their flag keeps them unread)."""
    if rel_pos_bias_table is None:
        return [q, q], [0] * 4
    return [rel_pos_bias_table, rel_pos_index], [*rel_pos_bias_table.stride(), *rel_pos_index.stride()]


def _dot_flags(dtype: torch.dtype) -> dict:
    # see the note above the kernels
    widen = widen_bf16_dot(dtype)
    return {"WIDEN_DOT": widen, "PRECISION": "ieee" if dtype == torch.float32 or widen else "tf32"}


def _head_dim_blocks(head_dim: int) -> dict:
    # Tiles cover D padded to a power of 2 (BLOCK_D; every kernel head dim is at least 32, what tl.dot needs).
    return {"BLOCK_D": next_power_of_2(head_dim)}


def _tiles(head_dim: int, seq_len: int, dtype: torch.dtype, bias: bool) -> dict[str, dict]:
    """Tile sizes (BLOCK_M query rows, BLOCK_N key rows) and launch options of the "fwd", "dq" and "dkdv" kernels."""
    if INTERPRETER:
        # The interpreter's cost is per tile operation, not per element: tiles as large as still give several blocks
        # per sequence (and masked tails: neither 32 nor 64 divides a ViT token count).
        block = 32 if seq_len < 128 else 64
        return {kernel: {"BLOCK_M": block, "BLOCK_N": block} for kernel in ("fwd", "dq", "dkdv")}
    wide = next_power_of_2(head_dim) > 64
    if dtype == torch.float32:
        # fp32 (ieee) dots run on the CUDA cores, and the fp16/bf16 tiles below spill heavily there (ptxas, sm_90):
        # 64 (32 for D padded to 128) rows on the loop-invariant side, 32 streamed
        options = {"num_warps": 8, "num_stages": 2}
        rows = 32 if wide else 64
        return {
            "fwd": {"BLOCK_M": rows, "BLOCK_N": 32, **options},
            "dq": {"BLOCK_M": rows, "BLOCK_N": 32, **options},
            "dkdv": {"BLOCK_M": 32, "BLOCK_N": rows, **options},
        }
    # H100, fp16/bf16. Forward: 128 query rows amortize each K/V tile; 64 keys per step keep the fp32 score tile and
    # the accumulator in registers. Backward, after flash-attention 2: the loop-invariant side is the large one (128
    # query rows for dQ, 128 key rows for dK/dV with its two fp32 accumulators), the streamed side small (32) to bound
    # the four fp32 [M, N] tiles (s, p, dp, ds); D padded to 128 doubles the accumulators: 64 rows then.
    # 8 warps: with 4, the backward and bias kernels exceed 255 registers per thread and spill (ptxas, sm_90).
    # 3 stages of prefetch, 2 where each stage also carries an int64 index tile (bias) or D is padded to 128, which
    # keeps shared memory under ~115 KB.
    options = {"num_warps": 8, "num_stages": 2 if bias or wide else 3}
    rows = 64 if wide else 128
    return {
        "fwd": {"BLOCK_M": 128, "BLOCK_N": 64, **options},
        "dq": {"BLOCK_M": rows, "BLOCK_N": 32, **options},
        "dkdv": {"BLOCK_M": 32, "BLOCK_N": rows, **options},
    }


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None = None,
    rel_pos_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns ``(out, lse)``.

    - ``q``, ``k``, ``v``: ``[B, H, N, D]``, one dtype among fp16 / bf16 / fp32, any strides (read in place);
      ``D`` in :data:`KERNEL_HEAD_DIMS` (RoPE, if any, is applied before: :func:`vitfast.ops.rope.rope_2d_qk`);
    - ``rel_pos_bias_table`` ``[num_rel, H]`` (any float dtype, read in fp32) with ``rel_pos_index`` ``[N, N]``
      (int64 or int32, values in ``[0, num_rel)``: not checked, that would synchronize);
    - ``out``: ``q``'s dtype, the ``[B, H, N, D]`` view of a contiguous ``[B, N, H, D]`` tensor;
    - ``lse``: fp32 ``[B, H, N]`` contiguous, the natural log-sum-exp of each row of scaled, biased scores.

    No dropout: the kernels support ``dropout_p = 0`` only.
    """
    _check_inputs(q, k, v, rel_pos_bias_table, rel_pos_index)
    batch, heads, seq_len, head_dim = q.shape
    out = torch.empty((batch, seq_len, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)
    blocks = _tiles(head_dim, seq_len, q.dtype, rel_pos_bias_table is not None)["fwd"]
    tables, table_strides = _bias_args(q, rel_pos_bias_table, rel_pos_index)
    launch(
        _attention_fwd_kernel,
        (cdiv(seq_len, blocks["BLOCK_M"]), batch * heads),
        q, k, v, out, lse, *tables,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *table_strides,
        heads, seq_len, scale * math.log2(math.e),
        HEAD_DIM=head_dim, BIAS=rel_pos_bias_table is not None,
        **_head_dim_blocks(head_dim), **_dot_flags(q.dtype), **blocks,
    )  # fmt: skip
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None = None,
    rel_pos_index: torch.Tensor | None = None,
    table_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels; returns ``(dq, dk, dv, d_table)``.

    Inputs as :func:`attention_fwd`, plus ``grad_out`` and ``out`` ``[B, H, N, D]`` (any strides) and the forward's
    fp32 ``lse`` ``[B, H, N]`` (contiguous). ``dq``, ``dk``, ``dv``: contiguous ``[B, H, N, D]`` in the input dtype.
    ``d_table``: ``[num_rel, H]`` in the table's dtype when ``table_grad`` (a bias table is required), else an empty
    tensor. The table gradient goes through an fp32 ``[H, N, N]`` buffer (dS summed over the batch with atomics,
    B-way contention) and one ``index_add_``: atomics straight into the ``[num_rel, H]`` table would have each entry
    hit by ~N^2 / num_rel pairs of every batch. Its fp32 sums are not bitwise deterministic; dq, dk, dv are (no
    atomics).
    """
    _check_inputs(q, k, v, rel_pos_bias_table, rel_pos_index)
    if grad_out.shape != q.shape or out.shape != q.shape or grad_out.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(
            f"attention: grad_out and out must be {q.dtype} {list(q.shape)}, got {grad_out.dtype} "
            f"{list(grad_out.shape)} and {out.dtype} {list(out.shape)}."
        )
    batch, heads, seq_len, head_dim = q.shape
    if lse.shape != (batch, heads, seq_len) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"attention: lse must be a contiguous float32 [{batch}, {heads}, {seq_len}] tensor.")
    if table_grad and rel_pos_bias_table is None:
        raise ValueError("attention: table_grad needs a rel_pos_bias_table.")
    dq = torch.empty((batch, heads, seq_len, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    delta = torch.empty_like(lse)
    grad_bias = (
        torch.zeros((heads, seq_len, seq_len), dtype=torch.float32, device=q.device) if table_grad else lse
    )  # lse: an unused stand-in pointer when there is no table gradient
    tiles = _tiles(head_dim, seq_len, q.dtype, rel_pos_bias_table is not None)
    dq_blocks, dkdv_blocks = tiles["dq"], tiles["dkdv"]
    tables, table_strides = _bias_args(q, rel_pos_bias_table, rel_pos_index)
    flags = {
        "HEAD_DIM": head_dim,
        "BIAS": rel_pos_bias_table is not None,
        **_head_dim_blocks(head_dim),
        **_dot_flags(q.dtype),
    }
    scalars = (heads, seq_len, scale * math.log2(math.e), scale)
    # dQ first: it also writes delta = rowsum(dO * O), which the dK/dV kernel reads
    launch(
        _attention_bwd_dq_kernel,
        (cdiv(seq_len, dq_blocks["BLOCK_M"]), batch * heads),
        q, k, v, out, grad_out, lse, delta, dq, grad_bias, *tables,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq.stride(), *table_strides,
        *scalars, BIAS_GRAD=table_grad, **flags, **dq_blocks,
    )  # fmt: skip
    launch(
        _attention_bwd_dkdv_kernel,
        (cdiv(seq_len, dkdv_blocks["BLOCK_N"]), batch * heads),
        q, k, v, grad_out, lse, delta, dk, dv, *tables,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), *table_strides,
        *scalars, **flags, **dkdv_blocks,
    )  # fmt: skip
    return dq, dk, dv, _table_grad(grad_bias, rel_pos_bias_table, rel_pos_index, table_grad, q)


def _table_grad(
    grad_bias: torch.Tensor,
    table: torch.Tensor | None,
    index: torch.Tensor | None,
    table_grad: bool,
    like: torch.Tensor,
) -> torch.Tensor:
    """Scatter the ``[H, N, N]`` bias gradient into the ``[num_rel, H]`` table (in its dtype), or an empty tensor."""
    if not table_grad:
        return like.new_empty(0)
    heads = grad_bias.shape[0]
    summed = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    summed.index_add_(0, index.reshape(-1), grad_bias.reshape(heads, -1).t())
    return summed.to(table.dtype)


def _bnhd_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, H, N, D]`` copied into the kernels' output layout (the view of a contiguous ``[B, N, H, D]``)."""
    batch, heads, seq_len, head_dim = x.shape
    out = torch.empty((batch, seq_len, heads, head_dim), dtype=x.dtype, device=x.device).transpose(1, 2)
    return out.copy_(x)


def _reference_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 scaled, biased scores ``[B, H, N, N]``."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if rel_pos_bias_table is not None:
        scores = scores + gather_rel_pos_bias(rel_pos_bias_table, rel_pos_index).float()
    return scores


def _attention_fwd_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`attention_fwd` computes, in plain PyTorch (fp32, ``N x N`` scores in memory)."""
    scores = _reference_scores(q, k, scale, rel_pos_bias_table, rel_pos_index)
    lse = scores.logsumexp(dim=-1)
    out = (scores - lse[..., None]).exp() @ v.float()
    return _bnhd_layout(out.to(q.dtype)), lse


def _attention_bwd_reference(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
    table_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`attention_bwd` computes, in plain PyTorch (fp32, explicit softmax backward)."""
    scores = _reference_scores(q, k, scale, rel_pos_bias_table, rel_pos_index)
    probs = (scores - lse[..., None]).exp()
    grad_out = grad_out.float()
    grad_v = probs.transpose(-1, -2) @ grad_out
    delta = (grad_out * out.float()).sum(dim=-1, keepdim=True)
    grad_scores = probs * (grad_out @ v.float().transpose(-1, -2) - delta)
    grad_q = (grad_scores @ k.float()) * scale
    grad_k = (grad_scores.transpose(-1, -2) @ q.float()) * scale
    d_table = _table_grad(grad_scores.sum(dim=0), rel_pos_bias_table, rel_pos_index, table_grad, q)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), d_table


# ------------------------------------------------------------------------------------------------------ registration


@triton_op("vitfast::attention_fwd")
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k, v, scale, rel_pos_bias_table, rel_pos_index)
    if not kernel_can_run(q, k, v, rel_pos_bias_table, rel_pos_index):
        _check_inputs(q, k, v, rel_pos_bias_table, rel_pos_index)
        return _attention_fwd_reference(*args)
    return attention_fwd(*args)


@triton_op("vitfast::attention_bwd")
def _attention_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
    table_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (grad_out, q, k, v, out, lse, scale, rel_pos_bias_table, rel_pos_index, table_grad)
    if not kernel_can_run(grad_out, q, k, v, out, lse, rel_pos_bias_table, rel_pos_index):
        _check_inputs(q, k, v, rel_pos_bias_table, rel_pos_index)
        return _attention_bwd_reference(*args)
    return attention_bwd(*args)


# ------------------------------------------------------------------------------------------------------ autograd glue


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, rel_pos_bias_table, rel_pos_index = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, rel_pos_bias_table, rel_pos_index)
    ctx.scale = scale


def _attention_backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):
    q, k, v, out, lse, rel_pos_bias_table, rel_pos_index = ctx.saved_tensors
    # the bias table's gradient only when it is wanted
    table_grad = rel_pos_bias_table is not None and ctx.needs_input_grad[4]
    grad_q, grad_k, grad_v, grad_table = _attention_bwd_op(
        grad_out, q, k, v, out, lse, ctx.scale, rel_pos_bias_table, rel_pos_index, table_grad
    )
    return grad_q, grad_k, grad_v, None, grad_table if table_grad else None, None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _uncovered(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
    dropout_p: float,
) -> str | None:
    """Why the kernels cannot take this call (then the reference runs), or None."""
    if not kernel_can_run(q, k, v, rel_pos_bias_table, rel_pos_index):
        return "tensors on a device the kernels cannot take"
    if dropout_p > 0:
        return "dropout_p > 0 (the kernels have no dropout)"
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (kernels: one of float16, bfloat16, float32)"
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return "q, k, v of different shapes (the kernels do self-attention)"
    seq_len, head_dim = q.shape[2], q.shape[3]
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"head dim {head_dim} (kernels: {KERNEL_HEAD_DIMS})"
    if rel_pos_bias_table is not None and (
        rel_pos_bias_table.dim() != 2
        or rel_pos_bias_table.shape[1] != q.shape[1]
        or not rel_pos_bias_table.is_floating_point()
        or tuple(rel_pos_index.shape) != (seq_len, seq_len)
        or rel_pos_index.dtype not in (torch.int32, torch.int64)
    ):
        return "a relative position table / index of unexpected shape or dtype"
    return None


def _rotated(
    q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``k`` after 2D RoPE (through the backend's ``rope_2d_qk``), or as they are without it."""
    if rope is None:
        return q, k
    return rope_2d_qk(q, k, *rope, num_prefix_tokens)


register_impl("attention", "reference", attention_ref)

if HAS_TRITON:

    def _attention_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_prefix_tokens: int = 0,
        rel_pos_bias_table: torch.Tensor | None = None,
        rel_pos_index: torch.Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        reason = _uncovered(q, k, v, rel_pos_bias_table, rel_pos_index, dropout_p)
        if reason is not None:
            log_fallback("attention", reason)
            return attention_ref(q, k, v, scale, rope, num_prefix_tokens, rel_pos_bias_table, rel_pos_index, dropout_p)
        q, k = _rotated(q, k, rope, num_prefix_tokens)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        out, _ = _attention_fwd_op(q, k, v, scale, rel_pos_bias_table, rel_pos_index)
        return out

    register_impl("attention", "triton", _attention_triton)


def attention_graph_policy(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_prefix_tokens: int = 0,
    rel_pos_bias_table: torch.Tensor | None = None,
    rel_pos_index: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Inside CUDA graphs (the engine's ``"kernels-sdpa"`` candidate, :func:`vitfast.optimize`): RoPE by the one-pass
    :func:`~vitfast.ops.rope.rope_2d_qk` kernel; then the attention kernel with a relative position bias, SDPA
    otherwise.

    Measured on an H100, bf16, whole forwards under CUDA graphs (2026-11-22): with a relative position bias the
    kernel wins (it gathers the bias per tile where SDPA reads a materialized [B, H, N, N] float mask; BEiT v2-B:
    0.80 vs 1.31 ms at batch 1, 1.40 vs 2.01 ms at batch 8); without one SDPA's flash / cuDNN kernels win.
    """
    q, k = _rotated(q, k, rope, num_prefix_tokens)
    if HAS_TRITON and rel_pos_bias_table is not None:
        return _attention_triton(q, k, v, scale, None, 0, rel_pos_bias_table, rel_pos_index, dropout_p)
    return attention_ref(q, k, v, scale, None, 0, rel_pos_bias_table, rel_pos_index, dropout_p)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_prefix_tokens: int = 0,
    rel_pos_bias_table: torch.Tensor | None = None,
    rel_pos_index: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention through the current backend; see the module docstring for the contract."""
    if (rel_pos_bias_table is None) != (rel_pos_index is None):
        raise ValueError("rel_pos_bias_table and rel_pos_index must be given together.")
    if rope is not None:
        _check_qk(q, k, *rope, num_prefix_tokens)
    impl = dispatch("attention", q.device)
    return impl(q, k, v, scale, rope, num_prefix_tokens, rel_pos_bias_table, rel_pos_index, dropout_p)
