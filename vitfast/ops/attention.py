"""Multi-head self-attention for ViTs, with optional 2D RoPE and BEiT relative position bias.

Contract shared by every implementation of the ``attention`` op:

- ``q``, ``k``, ``v``: ``[B, H, N, D]``, same dtype; non-causal; softmax in fp32 or better;
- ``scale``: multiplies ``q @ k^T`` (default ``D ** -0.5``);
- ``rope``: optional ``(cos, sin)`` fp32 ``[N - num_prefix_tokens, D]`` tables (:mod:`vitfast.ops.rope` layout, or
  ``[N - num_prefix_tokens, D // 2]`` with one angle per pair), applied to ``q`` and ``k`` for tokens
  ``num_prefix_tokens:``;
- ``rel_pos_bias_table`` ``[num_relative_positions, H]`` with ``rel_pos_index`` ``[N, N]`` (int32 or int64): the
  additive bias ``table[index[i, j], h]`` of BEiT, gathered per head;
- or ``bias``: a dense additive ``[H, N, N]`` bias, the same for every image (for a constant relative position bias,
  gathered once: ``gather_rel_pos_bias(table, index, aligned=True)``, as the inference engine can at capture);
- ``dropout_p``: attention dropout, applied only when non-zero (fused kernels support ``0.0`` only).

The Triton kernels (flash-attention 2: online softmax in fp32, one pass over the keys per query block, no ``N x N``
matrix in memory) cover fp16 / bf16 / fp32, head dims :data:`KERNEL_HEAD_DIMS`, any ``N`` and any strides of
``q``, ``k``, ``v`` (the packed-qkv and split-projection views are read in place). RoPE is applied before them, once
per token, by :func:`vitfast.ops.rope.rope_2d_qk` (one pass over q and k; its outputs are in the layout the kernels
and SDPA read in place): rotating inside the kernels redid each key tile's rotation once per query tile and lost to
this order on an H100. The bias is streamed per score tile from a dense ``[H, N, N]`` tensor: the table path gathers
it once per call (one small launch, in ``q``'s dtype, rows padded to 16 elements so tiles load 16 bytes at a time and
Triton pipelines them); the index values are not range-checked. Its gradient (``sum_b dS[b]``) comes from a kernel in
which each program owns one tile of one head and loops over the batch (no atomics), then one ``index_add_`` into the
table. The output is allocated ``[B, N, H, D]`` and returned as its ``[B, H, N, D]`` view, so the layer's
``out.transpose(1, 2).reshape(B, N, C)`` costs nothing. Anything else (dropout, other dtypes or head dims,
cross-attention shapes, devices the kernels cannot take) runs the reference.
Gradients flow to ``q``, ``k``, ``v`` and the bias table (or the dense bias); the RoPE tables are constants (no
gradient).
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
    eager_memo,
    kernel_can_run,
    launch,
    log_fallback,
    native_state,
    next_power_of_2,
    pdl_prologue,
    register_native,
    tl,
    triton,
    triton_op,
    widen_bf16_dot,
)
from vitfast.ops.rope import _check_qk, _rope_2d_qk_dispatch, rope_2d_ref

__all__ = ["KERNEL_HEAD_DIMS", "attention", "attention_bwd", "attention_fwd", "attention_ref", "gather_rel_pos_bias"]

# Head dims of the ViT families (REFERENCE.md section 4) that the kernels are built and tested for; tiles pad D to the
# next power of 2 (80 and 88 and 96 -> 128) with masks.
KERNEL_HEAD_DIMS = (32, 64, 80, 88, 96, 128)


def gather_rel_pos_bias(table: torch.Tensor, index: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """Materialize the BEiT bias ``[H, N, N]`` from ``table`` ``[num_rel, H]`` and ``index`` ``[N, N]``.

    ``aligned=True``: the ``[H, N, N]`` view of an ``[H, N, N rounded up to 16]`` tensor, whose rows start on 16-byte
    boundaries: the layout in which the kernels stream a dense ``bias`` (``attention(..., bias=...)``) 16 bytes per
    load. Differentiable either way.
    """
    num_tokens = index.shape[0]
    gathered = table[index.reshape(-1)].reshape(num_tokens, num_tokens, -1).permute(2, 0, 1)
    if aligned:
        return _aligned_empty(table.shape[1], num_tokens, table.dtype, table.device).copy_(gathered)
    # contiguous: SDPA's efficient kernels take a dense mask; a strided one sends it to a much slower path
    return gathered.contiguous()


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
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch attention (RoPE as elementwise ops, bias materialized, then SDPA); returns ``[B, H, N, D]``.

    ``bias``: a dense ``[H, N, N]`` additive bias instead of the table and index.
    """
    if rope is not None:
        cos, sin = rope
        q = rope_2d_ref(q, cos, sin, num_prefix_tokens)
        k = rope_2d_ref(k, cos, sin, num_prefix_tokens)
    if rel_pos_bias_table is not None:
        bias = gather_rel_pos_bias(rel_pos_bias_table, rel_pos_index)
    if bias is not None:
        bias = bias.unsqueeze(0).to(q.dtype)
        if torch.compiler.is_exporting() and dropout_p == 0.0:
            # torch.onnx's decomposition of SDPA with a float mask (its CPU flash kernel) breaks the export of the
            # reshape after it ("Cannot view a tensor ..."; timm's Beit fails alike): export the attention as matmuls
            scores = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
            return (scores + bias).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


# ----------------------------------------------------------------------------------------------------------- kernels
# The kernels stream one dense additive bias [H, N, N] (any strides; the launchers gather BEiT's table into rows
# padded to 16 elements, so that its tiles load 16 bytes at a time and Triton pipelines them like K and V; the dK/dV
# kernel streams the transposed bias, gathered so, for the same reason). Each kernel keeps only per-row pointers and
# per-column offsets live across its loop and builds each 2D tile pointer inside it (2D pointer tiles held through
# the loop cost registers the score tiles need). A program's rows past N read row N - 1 (clamped: in bounds, their
# results are dropped at the store), so only the loop's last tile, when N is not a multiple of the tile, masks its
# loads and scores: the loop runs over the full tiles with MASK_* = False and the step function is called once more
# for the tail (MASK_ALL, for fp32: every tile masked and no tail, see _loop_flags). The optional bias is a constexpr
# branch (BIAS). Scores live in base 2 (``qk_scale_log2 = scale * log2(e)``, the bias times log2(e)) so that exp2
# serves the softmax; the saved lse is natural. ``dot_dtype`` is the input dtype, except under the interpreter for
# bf16: its tl.dot mishandles bf16 (numpy has no bf16), so there the already-rounded bf16 operands are widened to
# fp32, which gives the exact products a bf16 MMA accumulates in fp32. fp32 inputs use PRECISION="ieee" (the default
# tf32 would miss the fp32 reference by ~1e-3).

if HAS_TRITON:
    _LOG2E = tl.constexpr(math.log2(math.e))
    _LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def _scores(
    a, b, bias_ptrs, tile_cols, seq_len, qk_scale_log2,
    BIAS: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """A score tile ``a b^T`` in log2 units, plus the bias tile at ``bias_ptrs`` (the forward's ``S``, the dQ pass's
    ``S``, the dK/dV pass's ``S^T``); with ``MASK``, ``-inf`` where ``tile_cols`` (the tile's column indices) run past
    ``seq_len``, whose bias is not read."""
    s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    s = s * tl.cast(qk_scale_log2, tl.float32)
    if BIAS:
        bias = tl.load(bias_ptrs, mask=tile_cols < seq_len, other=0.0) if MASK else tl.load(bias_ptrs)
        s += bias.to(tl.float32) * _LOG2E
    if MASK:
        s = tl.where(tile_cols < seq_len, s, float("-inf"))
    return s


@triton.jit
def _fwd_key_step(
    q, acc, m_i, l_i, k_head, v_head, bias_rows, start_n, offs_n, cols, cols_ok, seq_len,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_n, qk_scale_log2,
    BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile of the forward's online softmax."""
    keys = (start_n + offs_n)[:, None]  # [BLOCK_N, 1]
    key_cols = (start_n + offs_n)[None, :]  # [1, BLOCK_N]: the same keys along the score tile's columns
    kv_mask = (keys < seq_len) & cols_ok if MASK_KEYS else cols_ok
    k = tl.load(k_head + keys * stride_kn + cols * stride_kd, mask=kv_mask, other=0.0)
    s = _scores(
        q, k.to(DOT_DTYPE), bias_rows + key_cols * stride_bias_n, key_cols, seq_len, qk_scale_log2,
        BIAS, MASK_KEYS, PRECISION,
    )  # fmt: skip
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_head + keys * stride_vn + cols * stride_vd, mask=kv_mask, other=0.0)
    p = p.to(v.dtype).to(DOT_DTYPE)
    acc = tl.dot(p, v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, Bias,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_bias_h, stride_bias_m, stride_bias_n,
    num_heads, seq_len, qk_scale_log2,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BIAS: tl.constexpr, WIDEN_DOT: tl.constexpr, PRECISION: tl.constexpr, MASK_ALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, head); online softmax over all key blocks."""
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    dot_dtype: tl.constexpr = tl.float32 if WIDEN_DOT else Q.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = tl.minimum(rows, seq_len - 1)[:, None]  # [BLOCK_M, 1], clamped (see the note above)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)[None, :]
    cols_ok = cols < HEAD_DIM
    q_rows = Q + tl.multiple_of(off_b * stride_qb + off_h * stride_qh, ALIGN) + rows_in * stride_qn
    k_head = K + tl.multiple_of(off_b * stride_kb + off_h * stride_kh, ALIGN)
    v_head = V + tl.multiple_of(off_b * stride_vb + off_h * stride_vh, ALIGN)
    bias_rows = Bias + off_h * stride_bias_h + rows_in * stride_bias_m
    q = tl.load(q_rows + cols * stride_qd, mask=cols_ok, other=0.0).to(dot_dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_keys = seq_len if MASK_ALL else seq_len - seq_len % BLOCK_N
    for start_n in range(0, full_keys, BLOCK_N):
        acc, m_i, l_i = _fwd_key_step(
            q, acc, m_i, l_i, k_head, v_head, bias_rows, start_n, offs_n, cols, cols_ok, seq_len,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_n, qk_scale_log2,
            BIAS, MASK_ALL, dot_dtype, PRECISION,
        )  # fmt: skip
    if not MASK_ALL and full_keys < seq_len:
        acc, m_i, l_i = _fwd_key_step(
            q, acc, m_i, l_i, k_head, v_head, bias_rows, full_keys, offs_n, cols, cols_ok, seq_len,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_n, qk_scale_log2,
            BIAS, True, dot_dtype, PRECISION,
        )  # fmt: skip

    acc = acc / l_i[:, None]
    queries = rows[:, None]
    o_ptrs = Out + tl.multiple_of(off_b * stride_ob + off_h * stride_oh, ALIGN) + queries * stride_on + cols * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(queries < seq_len) & cols_ok)
    tl.store(Lse + pid_bh * seq_len + rows, (m_i + tl.log2(l_i)) * _LN2, mask=rows < seq_len)


@triton.jit
def _dq_key_step(
    q, do, dq, lse_log2, delta, k_head, v_head, bias_rows, start_n, offs_n, cols, cols_ok, seq_len,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_n, qk_scale_log2,
    BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile of dQ += dS K, with S and dP recomputed."""
    keys = (start_n + offs_n)[:, None]
    key_cols = (start_n + offs_n)[None, :]
    kv_mask = (keys < seq_len) & cols_ok if MASK_KEYS else cols_ok
    k_in = tl.load(k_head + keys * stride_kn + cols * stride_kd, mask=kv_mask, other=0.0)
    k = k_in.to(DOT_DTYPE)
    # masked keys get p = 0 exactly (their zero-filled scores could otherwise overflow exp2 against a small lse)
    s = _scores(
        q, k, bias_rows + key_cols * stride_bias_n, key_cols, seq_len, qk_scale_log2, BIAS, MASK_KEYS, PRECISION
    )  # fmt: skip
    p = tl.exp2(s - lse_log2[:, None])
    v = tl.load(v_head + keys * stride_vn + cols * stride_vd, mask=kv_mask, other=0.0)
    dp = tl.dot(do, tl.trans(v.to(DOT_DTYPE)), input_precision=PRECISION)
    ds = (p * (dp - delta[:, None])).to(k_in.dtype).to(DOT_DTYPE)
    return tl.dot(ds, k, dq, input_precision=PRECISION)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, Out, GradOut, Lse, Delta, GradQ, Bias,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_bias_h, stride_bias_m, stride_bias_n,
    num_heads, seq_len, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BIAS: tl.constexpr, WIDEN_DOT: tl.constexpr, PRECISION: tl.constexpr, MASK_ALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: dQ of BLOCK_M query rows, looping over the key blocks (no atomics on dQ).

    It also writes ``delta = rowsum(dO * O)`` for the dK/dV and bias-gradient kernels that run next (one launch fewer
    than a separate preprocessing kernel).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    dot_dtype: tl.constexpr = tl.float32 if WIDEN_DOT else Q.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = tl.minimum(rows, seq_len - 1)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)[None, :]
    cols_ok = cols < HEAD_DIM

    o = tl.load(
        Out
        + tl.multiple_of(off_b * stride_ob + off_h * stride_oh, ALIGN)
        + rows_in[:, None] * stride_on
        + cols * stride_od,
        mask=cols_ok,
        other=0.0,
    )
    do = tl.load(
        GradOut
        + tl.multiple_of(off_b * stride_gb + off_h * stride_gh, ALIGN)
        + rows_in[:, None] * stride_gn
        + cols * stride_gd,
        mask=cols_ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh * seq_len + rows, delta, mask=rows < seq_len)
    lse_log2 = tl.load(Lse + pid_bh * seq_len + rows_in) * _LOG2E
    do = do.to(dot_dtype)

    q_rows = Q + tl.multiple_of(off_b * stride_qb + off_h * stride_qh, ALIGN) + rows_in[:, None] * stride_qn
    k_head = K + tl.multiple_of(off_b * stride_kb + off_h * stride_kh, ALIGN)
    v_head = V + tl.multiple_of(off_b * stride_vb + off_h * stride_vh, ALIGN)
    bias_rows = Bias + off_h * stride_bias_h + rows_in[:, None] * stride_bias_m
    q = tl.load(q_rows + cols * stride_qd, mask=cols_ok, other=0.0).to(dot_dtype)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_keys = seq_len if MASK_ALL else seq_len - seq_len % BLOCK_N
    for start_n in range(0, full_keys, BLOCK_N):
        dq = _dq_key_step(
            q, do, dq, lse_log2, delta, k_head, v_head, bias_rows, start_n, offs_n, cols, cols_ok, seq_len,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_n, qk_scale_log2,
            BIAS, MASK_ALL, dot_dtype, PRECISION,
        )  # fmt: skip
    if not MASK_ALL and full_keys < seq_len:
        dq = _dq_key_step(
            q, do, dq, lse_log2, delta, k_head, v_head, bias_rows, full_keys, offs_n, cols, cols_ok, seq_len,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bias_n, qk_scale_log2,
            BIAS, True, dot_dtype, PRECISION,
        )  # fmt: skip

    queries = rows[:, None]
    dq_rows = GradQ + tl.multiple_of(off_b * stride_dqb + off_h * stride_dqh, ALIGN) + queries * stride_dqn
    tl.store(
        dq_rows + cols * stride_dqd,
        (dq * tl.cast(scale, tl.float32)).to(GradQ.dtype.element_ty),
        mask=(queries < seq_len) & cols_ok,
    )


@triton.jit
def _dkdv_query_step(
    k, v, dk, dv, q_head, do_head, lse_head, delta_head, bias_rows, start_m, offs_m, cols, cols_ok, seq_len,
    stride_qn, stride_qd, stride_gn, stride_gd, stride_bias_n, qk_scale_log2,
    BIAS: tl.constexpr, MASK_QUERIES: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One query tile of dK += dS^T Q and dV += P^T dO, on transposed score tiles (keys along rows)."""
    rows = start_m + offs_m
    queries = rows[:, None]
    query_cols = rows[None, :]  # [1, BLOCK_M]: the same queries along the transposed score tile's columns
    qdo_mask = (queries < seq_len) & cols_ok if MASK_QUERIES else cols_ok
    q_in = tl.load(q_head + queries * stride_qn + cols * stride_qd, mask=qdo_mask, other=0.0)
    q = q_in.to(DOT_DTYPE)
    # p = 0 exactly past the last query (no overflow of exp2 in the discarded columns either)
    st = _scores(
        k, q, bias_rows + query_cols * stride_bias_n, query_cols, seq_len, qk_scale_log2,
        BIAS, MASK_QUERIES, PRECISION,
    )  # fmt: skip
    if MASK_QUERIES:
        lse_log2 = tl.load(lse_head + rows, mask=rows < seq_len, other=0.0) * _LOG2E
        delta = tl.load(delta_head + rows, mask=rows < seq_len, other=0.0)
    else:
        lse_log2 = tl.load(lse_head + rows) * _LOG2E
        delta = tl.load(delta_head + rows)
    pt = tl.exp2(st - lse_log2[None, :])
    do = tl.load(do_head + queries * stride_gn + cols * stride_gd, mask=qdo_mask, other=0.0).to(DOT_DTYPE)
    dv = tl.dot(pt.to(q_in.dtype).to(DOT_DTYPE), do, dv, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = (pt * (dpt - delta[None, :])).to(q_in.dtype).to(DOT_DTYPE)
    dk = tl.dot(dst, q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, BiasT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_bias_h, stride_bias_m, stride_bias_n,
    num_heads, seq_len, qk_scale_log2, scale,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BIAS: tl.constexpr, WIDEN_DOT: tl.constexpr, PRECISION: tl.constexpr, MASK_ALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: dK and dV of BLOCK_N key rows, looping over the query blocks with transposed score tiles."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    dot_dtype: tl.constexpr = tl.float32 if WIDEN_DOT else Q.dtype.element_ty
    key_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keys_in = tl.minimum(key_rows, seq_len - 1)[:, None]  # [BLOCK_N, 1], clamped
    offs_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)[None, :]
    cols_ok = cols < HEAD_DIM

    q_head = Q + tl.multiple_of(off_b * stride_qb + off_h * stride_qh, ALIGN)
    do_head = GradOut + tl.multiple_of(off_b * stride_gb + off_h * stride_gh, ALIGN)
    lse_head = Lse + pid_bh * seq_len
    delta_head = Delta + pid_bh * seq_len
    k_rows = K + tl.multiple_of(off_b * stride_kb + off_h * stride_kh, ALIGN) + keys_in * stride_kn
    k = tl.load(k_rows + cols * stride_kd, mask=cols_ok, other=0.0).to(dot_dtype)
    v_rows = V + tl.multiple_of(off_b * stride_vb + off_h * stride_vh, ALIGN) + keys_in * stride_vn
    v = tl.load(v_rows + cols * stride_vd, mask=cols_ok, other=0.0).to(dot_dtype)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # BiasT is the bias transposed, [H, N keys, N queries]: its tiles load like the forward's (the program's rows
    # clamped, the loop's queries along the unit stride, 16 bytes at a time, pipelined); the bias itself read
    # transposed would load along the program's (clamped) keys, 2 bytes at a time and synchronously
    bias_rows = BiasT + off_h * stride_bias_h + keys_in * stride_bias_m
    full_queries = seq_len if MASK_ALL else seq_len - seq_len % BLOCK_M
    for start_m in range(0, full_queries, BLOCK_M):
        dk, dv = _dkdv_query_step(
            k, v, dk, dv, q_head, do_head, lse_head, delta_head, bias_rows, start_m, offs_m, cols, cols_ok,
            seq_len, stride_qn, stride_qd, stride_gn, stride_gd, stride_bias_n, qk_scale_log2,
            BIAS, MASK_ALL, dot_dtype, PRECISION,
        )  # fmt: skip
    if not MASK_ALL and full_queries < seq_len:
        dk, dv = _dkdv_query_step(
            k, v, dk, dv, q_head, do_head, lse_head, delta_head, bias_rows, full_queries, offs_m, cols, cols_ok,
            seq_len, stride_qn, stride_qd, stride_gn, stride_gd, stride_bias_n, qk_scale_log2,
            BIAS, True, dot_dtype, PRECISION,
        )  # fmt: skip

    keys = key_rows[:, None]
    dk_rows = GradK + tl.multiple_of(off_b * stride_dkb + off_h * stride_dkh, ALIGN) + keys * stride_dkn
    tl.store(
        dk_rows + cols * stride_dkd,
        (dk * tl.cast(scale, tl.float32)).to(GradK.dtype.element_ty),
        mask=(keys < seq_len) & cols_ok,
    )
    dv_ptrs = (
        GradV + tl.multiple_of(off_b * stride_dvb + off_h * stride_dvh, ALIGN) + keys * stride_dvn + cols * stride_dvd
    )
    tl.store(dv_ptrs, dv.to(GradV.dtype.element_ty), mask=(keys < seq_len) & cols_ok)


@triton.jit
def _attention_bwd_dbias_kernel(
    Q, K, V, GradOut, Lse, Delta, Bias, GradBias,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_bias_h, stride_bias_m, stride_bias_n,
    batch, num_heads, seq_len, qk_scale_log2,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, WIDEN_DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: the bias gradient ``sum_b dS[b, h]`` of one BLOCK_M x BLOCK_N tile of one head, looping over the
    batch with S and dP recomputed; it owns its tile of the fp32 ``[H, N, N]`` output (plain stores, no atomics)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_h = tl.program_id(2).to(tl.int64)
    dot_dtype: tl.constexpr = tl.float32 if WIDEN_DOT else Q.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # clamped rows and keys: every load in bounds, unmasked; the store drops what lies outside the N x N square
    rows_in = tl.minimum(rows, seq_len - 1)
    keys_in = tl.minimum(keys, seq_len - 1)
    cols = tl.arange(0, BLOCK_D)[None, :]
    cols_ok = cols < HEAD_DIM
    bias_ptrs = Bias + off_h * stride_bias_h + rows_in[:, None] * stride_bias_m + keys_in[None, :] * stride_bias_n
    bias_log2 = tl.load(bias_ptrs).to(tl.float32) * _LOG2E
    q_rows = Q + tl.multiple_of(off_h * stride_qh, ALIGN) + rows_in[:, None] * stride_qn + cols * stride_qd
    do_rows = GradOut + tl.multiple_of(off_h * stride_gh, ALIGN) + rows_in[:, None] * stride_gn + cols * stride_gd
    k_rows = K + tl.multiple_of(off_h * stride_kh, ALIGN) + keys_in[:, None] * stride_kn + cols * stride_kd
    v_rows = V + tl.multiple_of(off_h * stride_vh, ALIGN) + keys_in[:, None] * stride_vn + cols * stride_vd
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, batch):  # the tile pointers step to the next image (64-bit pointer arithmetic)
        q = tl.load(q_rows, mask=cols_ok, other=0.0).to(dot_dtype)
        k = tl.load(k_rows, mask=cols_ok, other=0.0).to(dot_dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * tl.cast(qk_scale_log2, tl.float32) + bias_log2
        stats = (b * num_heads + off_h) * seq_len + rows_in
        p = tl.exp2(s - (tl.load(Lse + stats) * _LOG2E)[:, None])
        do = tl.load(do_rows, mask=cols_ok, other=0.0).to(dot_dtype)
        v = tl.load(v_rows, mask=cols_ok, other=0.0).to(dot_dtype)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        acc += p * (dp - tl.load(Delta + stats)[:, None])
        q_rows += stride_qb
        k_rows += stride_kb
        do_rows += stride_gb
        v_rows += stride_vb
    out = GradBias + off_h * seq_len * seq_len + rows[:, None] * seq_len + keys[None, :]
    tl.store(out, acc, mask=(rows[:, None] < seq_len) & (keys[None, :] < seq_len))


@triton.jit
def _rel_pos_bias_gather_kernel(
    Table, Index, Bias,
    stride_table_r, stride_table_h, stride_index_m, stride_index_n, stride_bias_h, stride_bias_m,
    num_heads, seq_len,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """One program: BLOCK_M rows of the dense bias of every head, ``bias[h, i, j] = table[index[i, j], h]``."""
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    keys = tl.arange(0, BLOCK_N)[None, :]
    tile_ok = (rows < seq_len) & (keys < seq_len)
    rel = tl.load(Index + rows * stride_index_m + keys * stride_index_n, mask=tile_ok, other=0)
    for h in range(0, num_heads):
        values = tl.load(Table + rel * stride_table_r + h * stride_table_h, mask=tile_ok, other=0.0)
        tl.store(Bias + h * stride_bias_h + rows * stride_bias_m + keys, values.to(Bias.dtype.element_ty), mask=tile_ok)


# --------------------------------------------------------------------------------------------------------- launchers


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
    bias: torch.Tensor | None = None,
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
    _check_bias(heads, seq_len, rel_pos_bias_table, rel_pos_index, bias)
    if any(t is not None and t.device != q.device for t in (k, v, rel_pos_bias_table, rel_pos_index, bias)):
        raise ValueError("attention: all tensors must be on one device.")


def _check_bias(
    heads: int,
    seq_len: int,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """Raise a ValueError for a bias (table + index, or dense) that does not fit ``H`` heads of ``N`` tokens."""
    if (rel_pos_bias_table is None) != (rel_pos_index is None):
        raise ValueError("attention: rel_pos_bias_table and rel_pos_index must be given together.")
    if rel_pos_bias_table is not None:
        if bias is not None:
            raise ValueError(
                "attention: pass either rel_pos_bias_table + rel_pos_index or a dense bias, not both (the dense one "
                "is gather_rel_pos_bias(table, index))."
            )
        if rel_pos_bias_table.dim() != 2 or rel_pos_bias_table.shape[1] != heads:
            raise ValueError(
                f"attention: rel_pos_bias_table must be [num_relative_positions, H={heads}], got "
                f"{list(rel_pos_bias_table.shape)}."
            )
        if not rel_pos_bias_table.is_floating_point():
            raise ValueError(f"attention: rel_pos_bias_table must be a float tensor, got {rel_pos_bias_table.dtype}.")
        if tuple(rel_pos_index.shape) != (seq_len, seq_len) or rel_pos_index.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"attention: rel_pos_index must be an int32 (or int64) [N, N] = [{seq_len}, {seq_len}] tensor, got "
                f"{rel_pos_index.dtype} {list(rel_pos_index.shape)}."
            )
    if bias is not None and (tuple(bias.shape) != (heads, seq_len, seq_len) or not bias.is_floating_point()):
        raise ValueError(
            f"attention: bias must be a float [H, N, N] = [{heads}, {seq_len}, {seq_len}] tensor (one bias for every "
            f"image; squeeze a leading 1), got {bias.dtype} {list(bias.shape)}."
        )


def _aligned_empty(heads: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized ``[H, N, N]`` view of ``[H, N, N rounded up to 16]``: rows start on 16-byte boundaries, so the
    kernels load bias tiles 16 bytes at a time (and Triton pipelines them); N = 197 would allow 2-byte loads only.
    16 elements, not 8: Triton marks an integer argument (the row stride) aligned only when 16 divides it."""
    padded = -(-seq_len // 16) * 16
    return torch.empty((heads, seq_len, padded), dtype=dtype, device=device)[..., :seq_len]


def _gather_dense(table: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`gather_rel_pos_bias` ``(aligned=True)`` in ``dtype``, by one kernel launch."""
    seq_len, heads = index.shape[0], table.shape[1]
    dense = _aligned_empty(heads, seq_len, dtype, table.device)
    # one row per program on a GPU (N programs fill the SMs); 16 under the interpreter, whose cost is per program
    rows = 16 if INTERPRETER else 1
    launch(
        _rel_pos_bias_gather_kernel,
        (cdiv(seq_len, rows),),
        table, index, dense, *table.stride(), *index.stride(), dense.stride(0), dense.stride(1), heads, seq_len,
        BLOCK_M=rows, BLOCK_N=next_power_of_2(seq_len), num_warps=4,
    )  # fmt: skip
    return dense


def _dense_bias(
    q: torch.Tensor,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
    bias: torch.Tensor | None,
    transposed: bool = False,
) -> torch.Tensor | None:
    """The dense ``[H, N, N]`` bias the kernels stream: the table gathered in ``q``'s dtype (the reference and timm
    add the bias in ``q``'s dtype too: SDPA's mask), or ``bias`` as given, or None; ``transposed``: its
    ``[H, N keys, N queries]`` transpose in the aligned layout (what the dK/dV kernel streams)."""
    if rel_pos_bias_table is not None:
        index = rel_pos_index.t() if transposed else rel_pos_index  # the gather reads the index through its strides
        return _gather_dense(rel_pos_bias_table, index, q.dtype)
    if bias is None or not transposed:
        return bias
    return _aligned_empty(*bias.shape[:2], bias.dtype, bias.device).copy_(bias.transpose(1, 2))


def _bias_args(q: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
    """Pointer and strides of the optional dense bias; ``q`` stands in when absent (BIAS = False keeps it unread)."""
    if bias is None:
        return q, [0] * 3
    return bias, list(bias.stride())


def _dot_flags(dtype: torch.dtype) -> dict:
    # see the note above the kernels
    widen = widen_bf16_dot(dtype)
    return {"WIDEN_DOT": widen, "PRECISION": "ieee" if dtype == torch.float32 or widen else "tf32"}


def _loop_flags(dtype: torch.dtype) -> dict:
    # MASK_ALL for fp32: there the masked tail's own copy of the (CUDA-core, ieee) dots took the forward from 80 to
    # 255 registers plus spills and the backward kernels to ~2 KB of spills per thread (ptxas, sm_90); the fp16 /
    # bf16 kernels hold the tail at the same or fewer registers than a loop masking every tile.
    return {"MASK_ALL": dtype == torch.float32}


def _head_dim_blocks(head_dim: int) -> dict:
    # Tiles cover D padded to a power of 2 (BLOCK_D; every kernel head dim is at least 32, what tl.dot needs).
    return {"BLOCK_D": next_power_of_2(head_dim)}


# Query rows per forward program for fp16 / bf16 at N <= FWD_SMALL_N: 64 (with 4 warps) gives ViT-B/16's 197 tokens 4
# query tiles per (batch, head) instead of 2 (96 CTAs instead of 48 at batch 1 on 132 SMs), at the cost of reading
# each K / V tile twice as often. Above it, 128 rows amortize K / V. Which wins at 197 and 257 tokens is a GPU
# measurement (benchmarks/gpu_session.sh, section "attention query tile"); 64 is kept by default because the grid
# fill at batch 1-8 is what the engine's latency rows depend on.
FWD_SMALL_N = 256


def _tiles(head_dim: int, seq_len: int, dtype: torch.dtype) -> dict[str, dict]:
    """Tile sizes (BLOCK_M query rows, BLOCK_N key rows) and launch options of the "fwd", "dq", "dkdv" and "dbias"
    kernels."""
    if INTERPRETER:
        # The interpreter's cost is per tile operation, not per element: tiles as large as still give several blocks
        # per sequence (and masked tails: no power of 2 divides a ViT token count).
        block = 32 if seq_len < 128 else 64 if seq_len < 256 else 128 if seq_len < 512 else 256
        return {kernel: {"BLOCK_M": block, "BLOCK_N": block} for kernel in ("fwd", "dq", "dkdv", "dbias")}
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
            "dbias": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        }
    # H100, fp16/bf16. Forward: 128 query rows amortize each K/V tile (64 at N <= FWD_SMALL_N, see there); 64 keys per
    # step keep the fp32 score tile and the accumulator in registers. Backward, after flash-attention 2: the
    # loop-invariant side is the large one (128 query rows for dQ, 128 key rows for dK/dV with its two fp32
    # accumulators), the streamed side small (32) to bound the four fp32 [M, N] tiles (s, p, dp, ds); D padded to 128
    # doubles the accumulators: 64 rows then. 8 warps: with 4, the backward kernels exceed 255 registers per thread
    # and spill (ptxas, sm_90). 3 stages of prefetch, 2 where D is padded to 128, which keeps shared memory under
    # ~115 KB. The bias gradient holds one fp32 [64, 64] accumulator and the bias tile through its batch loop.
    options = {"num_warps": 8, "num_stages": 2 if wide else 3}
    rows = 64 if wide else 128
    fwd_rows = 64 if seq_len <= FWD_SMALL_N else 128
    fwd_options = {**options, "num_warps": 4} if fwd_rows == 64 else options
    return {
        "fwd": {"BLOCK_M": fwd_rows, "BLOCK_N": 64, **fwd_options},
        "dq": {"BLOCK_M": rows, "BLOCK_N": 32, **options},
        "dkdv": {"BLOCK_M": 32, "BLOCK_N": rows, **options},
        "dbias": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8 if wide else 4, "num_stages": 2 if wide else 3},
    }


def _head_alignment(element_size: int, strides: tuple[tuple[int, ...], ...]) -> int:
    """What every (batch, head) offset of ``[B, H, N, D]`` tensors with these strides is a multiple of, told to the
    kernels: 16 bytes' worth of elements when all their batch and head strides allow it, else 1. Triton specializes
    integers on divisibility by 16 only, so a head stride of 88 elements (head dim 88, 176 bytes) proved no 16-byte
    alignment and every q / k / v access at that head dim was a 2-byte load, synchronous in the key loop."""
    vector = 16 // element_size
    return vector if all(s[0] % vector == 0 and s[1] % vector == 0 for s in strides) else 1


@eager_memo
def _fwd_plan(
    batch: int,
    heads: int,
    seq_len: int,
    head_dim: int,
    dtype: torch.dtype,
    element_size: int,
    strides: tuple[tuple[int, ...], ...],
    has_bias: bool,
    settings: tuple,
) -> tuple[tuple[int, int], dict]:
    """``(grid, constexprs and launch options)`` of the forward kernel for q, k, v, out of these ``strides``;
    ``settings``: the module settings :func:`_tiles` reads (``INTERPRETER``, ``FWD_SMALL_N``), in the memo's key."""
    blocks = _tiles(head_dim, seq_len, dtype)["fwd"]
    options = {
        "HEAD_DIM": head_dim,
        "ALIGN": _head_alignment(element_size, strides),
        "BIAS": has_bias,
        **_head_dim_blocks(head_dim),
        **_dot_flags(dtype),
        **_loop_flags(dtype),
        **blocks,
    }
    return (cdiv(seq_len, blocks["BLOCK_M"]), batch * heads), options


@eager_memo
def _bwd_plan(
    batch: int,
    heads: int,
    seq_len: int,
    head_dim: int,
    dtype: torch.dtype,
    element_size: int,
    strides: tuple[tuple[int, ...], ...],
    settings: tuple,
) -> tuple[dict, dict, dict, dict, dict]:
    """``(tiles, flags, dq launch, dkdv launch, grids)`` of the backward kernels (see :func:`_fwd_plan`)."""
    tiles = _tiles(head_dim, seq_len, dtype)
    flags = {
        "HEAD_DIM": head_dim,
        "ALIGN": _head_alignment(element_size, strides),
        **_head_dim_blocks(head_dim),
        **_dot_flags(dtype),
    }
    loop_flags = _loop_flags(dtype)
    dq_blocks, dkdv_blocks, dbias_blocks = tiles["dq"], tiles["dkdv"], tiles["dbias"]
    grids = {
        "dq": (cdiv(seq_len, dq_blocks["BLOCK_M"]), batch * heads),
        "dkdv": (cdiv(seq_len, dkdv_blocks["BLOCK_N"]), batch * heads),
        "dbias": (cdiv(seq_len, dbias_blocks["BLOCK_M"]), cdiv(seq_len, dbias_blocks["BLOCK_N"]), heads),
    }
    return tiles, flags, {**flags, **loop_flags, **dq_blocks}, {**flags, **loop_flags, **dkdv_blocks}, grids


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None = None,
    rel_pos_index: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns ``(out, lse)``.

    - ``q``, ``k``, ``v``: ``[B, H, N, D]``, one dtype among fp16 / bf16 / fp32, any strides (read in place);
      ``D`` in :data:`KERNEL_HEAD_DIMS` (RoPE, if any, is applied before: :func:`vitfast.ops.rope.rope_2d_qk`);
    - ``rel_pos_bias_table`` ``[num_rel, H]`` (any float dtype) with ``rel_pos_index`` ``[N, N]`` (int32 or int64,
      values in ``[0, num_rel)``: not checked, that would synchronize): gathered by one launch into a dense bias in
      ``q``'s dtype with 16-byte-aligned rows, which the kernel streams;
    - or ``bias``: a dense float ``[H, N, N]`` (any strides; rows 16-byte aligned and unit column stride let its tiles
      load 16 bytes at a time: :func:`gather_rel_pos_bias` ``(aligned=True)`` builds that) added to every image's
      scores, read in fp32;
    - ``out``: ``q``'s dtype, the ``[B, H, N, D]`` view of a contiguous ``[B, N, H, D]`` tensor;
    - ``lse``: fp32 ``[B, H, N]`` contiguous, the natural log-sum-exp of each row of scaled, biased scores.

    No dropout: the kernels support ``dropout_p = 0`` only.
    """
    _check_inputs(q, k, v, rel_pos_bias_table, rel_pos_index, bias)
    shape, dtype, device = q.shape, q.dtype, q.device
    batch, heads, seq_len, head_dim = shape
    # the [B, H, N, D] view of a contiguous [B, N, H, D] tensor, allocated as such (an empty and a transpose cost
    # twice the host time)
    out_strides = (seq_len * heads * head_dim, head_dim, heads * head_dim, 1)
    out = torch.empty_strided(shape, out_strides, dtype=dtype, device=device)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=device)
    dense = _dense_bias(q, rel_pos_bias_table, rel_pos_index, bias)
    bias_ptr, bias_strides = _bias_args(q, dense)
    strides = (q.stride(), k.stride(), v.stride(), out_strides)
    grid, options = _fwd_plan(
        batch, heads, seq_len, head_dim, dtype, q.element_size(), strides, dense is not None, _settings()
    )
    launch(
        _attention_fwd_kernel, grid, q, k, v, out, lse, bias_ptr,
        *strides[0], *strides[1], *strides[2], *out_strides, *bias_strides,
        heads, seq_len, scale * math.log2(math.e), **options,
    )  # fmt: skip
    return out, lse


def _settings() -> tuple:
    """The module settings the launch plans read (tests change them), for the plans' memo keys."""
    return INTERPRETER, FWD_SMALL_N


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
    bias_grad: bool = False,
    bias: torch.Tensor | None = None,
    dense_bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels; returns ``(dq, dk, dv, d_bias)``.

    Inputs as :func:`attention_fwd`, plus ``grad_out`` and ``out`` ``[B, H, N, D]`` (any strides) and the forward's
    fp32 ``lse`` ``[B, H, N]`` (contiguous). ``dq``, ``dk``, ``dv``: contiguous ``[B, H, N, D]`` in the input dtype.
    ``d_bias`` when ``bias_grad``: the gradient of the bias given, ``[num_rel, H]`` in the table's dtype or
    ``[H, N, N]`` in the dense bias' dtype (:func:`_bias_grad`); with ``dense_bias_grad`` the fp32 ``[H, N, N]``
    gradient of the dense bias instead, so that only kernel launches and allocations run (what the
    ``vitfast::attention_bwd`` op asks for: the native eager path replays it, and its autograd backward scatters);
    else an empty tensor.

    The table is gathered again (one launch) rather than its dense bias kept from the forward, and gathered once more
    transposed for the dK/dV kernel (a dense ``bias`` is copied transposed). The bias gradient ``sum_b dS[b]`` comes
    from a kernel of its own: each program owns one tile of one head's fp32 ``[N, N]`` gradient and loops over the
    batch, recomputing S and dP (no atomics, so that sum is deterministic; no ``[B, H, N, N]`` buffer); one
    ``index_add_`` then scatters it into the table (on CUDA with atomics, ~N^2 / num_rel pairs per entry, not
    batch-way: the table gradient's fp32 sums are not bitwise deterministic there). dq, dk, dv are.
    """
    _check_inputs(q, k, v, rel_pos_bias_table, rel_pos_index, bias)
    if grad_out.shape != q.shape or out.shape != q.shape or grad_out.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(
            f"attention: grad_out and out must be {q.dtype} {list(q.shape)}, got {grad_out.dtype} "
            f"{list(grad_out.shape)} and {out.dtype} {list(out.shape)}."
        )
    batch, heads, seq_len, head_dim = q.shape
    if lse.shape != (batch, heads, seq_len) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"attention: lse must be a contiguous float32 [{batch}, {heads}, {seq_len}] tensor.")
    if bias_grad and rel_pos_bias_table is None and bias is None:
        raise ValueError("attention: bias_grad needs a rel_pos_bias_table or a bias.")
    dtype, device = q.dtype, q.device
    dq = torch.empty(batch, heads, seq_len, head_dim, dtype=dtype, device=device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    delta = torch.empty_like(lse)
    dense = _dense_bias(q, rel_pos_bias_table, rel_pos_index, bias)
    dense_t = _dense_bias(q, rel_pos_bias_table, rel_pos_index, bias, transposed=True)
    bias_ptr, bias_strides = _bias_args(q, dense)
    bias_t_ptr, bias_t_strides = _bias_args(q, dense_t)
    # dq, dk, dv: contiguous
    q_strides, k_strides, v_strides, grad_strides, d_strides = (
        q.stride(),
        k.stride(),
        v.stride(),
        grad_out.stride(),
        dq.stride(),
    )
    out_strides = out.stride()
    tiles, flags, dq_options, dkdv_options, grids = _bwd_plan(
        batch,
        heads,
        seq_len,
        head_dim,
        dtype,
        q.element_size(),
        (q_strides, k_strides, v_strides, out_strides, grad_strides, d_strides),
        _settings(),
    )
    scalars = (heads, seq_len, scale * math.log2(math.e), scale)
    has_bias = dense is not None
    # dQ first: it also writes delta = rowsum(dO * O), which the dK/dV and bias-gradient kernels read
    launch(
        _attention_bwd_dq_kernel, grids["dq"], q, k, v, out, grad_out, lse, delta, dq, bias_ptr,
        *q_strides, *k_strides, *v_strides, *out_strides, *grad_strides, *d_strides, *bias_strides,
        *scalars, BIAS=has_bias, **dq_options,
    )  # fmt: skip
    launch(
        _attention_bwd_dkdv_kernel, grids["dkdv"], q, k, v, grad_out, lse, delta, dk, dv, bias_t_ptr,
        *q_strides, *k_strides, *v_strides, *grad_strides, *d_strides, *d_strides, *bias_t_strides,
        *scalars, BIAS=has_bias, **dkdv_options,
    )  # fmt: skip
    if not bias_grad:
        return dq, dk, dv, q.new_empty(0)
    grad_dense = torch.empty(heads, seq_len, seq_len, dtype=torch.float32, device=device)
    launch(
        _attention_bwd_dbias_kernel, grids["dbias"], q, k, v, grad_out, lse, delta, dense, grad_dense,
        *q_strides, *k_strides, *v_strides, *grad_strides, *bias_strides,
        batch, heads, seq_len, scale * math.log2(math.e),
        **flags, **tiles["dbias"],
    )  # fmt: skip
    if dense_bias_grad:
        return dq, dk, dv, grad_dense
    return dq, dk, dv, _bias_grad(grad_dense, rel_pos_bias_table, rel_pos_index, bias)


def _bias_grad(
    grad_dense: torch.Tensor,
    table: torch.Tensor | None,
    index: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The fp32 ``[H, N, N]`` bias gradient as the gradient of the bias given: scattered into the ``[num_rel, H]``
    table (in its dtype) by one ``index_add_``, or the dense bias' own (in its dtype)."""
    if table is None:
        return grad_dense.to(bias.dtype)
    heads = grad_dense.shape[0]
    summed = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    summed.index_add_(0, index.reshape(-1), grad_dense.reshape(heads, -1).t())
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
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 scaled, biased scores ``[B, H, N, N]`` (the bias in ``q``'s dtype, as the kernels add it)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if rel_pos_bias_table is not None:
        bias = gather_rel_pos_bias(rel_pos_bias_table, rel_pos_index).to(q.dtype)
    if bias is not None:
        scores = scores + bias.float()
    return scores


def _attention_fwd_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`attention_fwd` computes, in plain PyTorch (fp32, ``N x N`` scores in memory)."""
    scores = _reference_scores(q, k, scale, rel_pos_bias_table, rel_pos_index, bias)
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
    bias_grad: bool,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`attention_bwd` computes with ``dense_bias_grad``, in plain PyTorch (fp32, explicit softmax
    backward)."""
    scores = _reference_scores(q, k, scale, rel_pos_bias_table, rel_pos_index, bias)
    probs = (scores - lse[..., None]).exp()
    grad_out = grad_out.float()
    grad_v = probs.transpose(-1, -2) @ grad_out
    delta = (grad_out * out.float()).sum(dim=-1, keepdim=True)
    grad_scores = probs * (grad_out @ v.float().transpose(-1, -2) - delta)
    grad_q = (grad_scores @ k.float()) * scale
    grad_k = (grad_scores.transpose(-1, -2) @ q.float()) * scale
    d_bias = grad_scores.sum(dim=0) if bias_grad else q.new_empty(0)  # fp32 [H, N, N]
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), d_bias


# ------------------------------------------------------------------------------------------------------ registration


@triton_op("vitfast::attention_fwd")
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, k, v, scale, rel_pos_bias_table, rel_pos_index, bias)
    if not kernel_can_run(q, k, v, rel_pos_bias_table, rel_pos_index, bias):
        _check_inputs(q, k, v, rel_pos_bias_table, rel_pos_index, bias)
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
    bias_grad: bool,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (grad_out, q, k, v, out, lse, scale, rel_pos_bias_table, rel_pos_index, bias_grad, bias)
    if not kernel_can_run(grad_out, q, k, v, out, lse, rel_pos_bias_table, rel_pos_index, bias):
        _check_inputs(q, k, v, rel_pos_bias_table, rel_pos_index, bias)
        return _attention_bwd_reference(*args)
    return attention_bwd(*args, dense_bias_grad=True)


# ------------------------------------------------------------------------------------------------------ autograd glue


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, rel_pos_bias_table, rel_pos_index, bias = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, rel_pos_bias_table, rel_pos_index, bias)
    ctx.scale = scale


def _attention_backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):
    q, k, v, out, lse, rel_pos_bias_table, rel_pos_index, bias = ctx.saved_tensors
    # the bias' gradient only when it is wanted (a frozen table, the engine's constant dense bias: not)
    table_grad = rel_pos_bias_table is not None and ctx.needs_input_grad[4]
    dense_grad = bias is not None and ctx.needs_input_grad[6]
    grad_q, grad_k, grad_v, grad_dense = _attention_bwd_op(
        grad_out, q, k, v, out, lse, ctx.scale, rel_pos_bias_table, rel_pos_index, table_grad or dense_grad, bias
    )
    # the dense gradient scattered into the table outside the kernels' op (aten ops: the op stays launches only)
    grad_bias = _bias_grad(grad_dense, rel_pos_bias_table, rel_pos_index, bias) if table_grad or dense_grad else None
    return (
        grad_q,
        grad_k,
        grad_v,
        None,
        grad_bias if table_grad else None,
        None,
        grad_bias if dense_grad else None,
    )


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# the module globals the kernels read (JITFunction.run checks them per launch; the native replay keys on them)
_NATIVE_GLOBALS = ("_LOG2E", "_LN2")


def _native_state() -> tuple | None:
    # the settings the launch plans read (tests set them), and the globals the kernels read
    return native_state(_settings(), *(getattr(globals()[name], "value", None) for name in _NATIVE_GLOBALS))


def _covers(q, k, v, _scale, rel_pos_bias_table, rel_pos_index, bias) -> bool:
    """Whether the kernels take the call (the wrapper's coverage check, for the native entry point)."""
    return _uncovered(q, k, v, rel_pos_bias_table, rel_pos_index, 0.0, bias) is None


def register_ext(cpu: bool = INTERPRETER) -> None:
    """The native eager entry points of the ops here (csrc/eager.cpp; :func:`~vitfast.ops._triton.register_native`)."""
    register_native(_attention_fwd_op, _native_state, cpu, covers=_covers, globals_read=_NATIVE_GLOBALS)
    register_native(_attention_bwd_op, _native_state, cpu, globals_read=_NATIVE_GLOBALS)


register_ext()


def _uncovered(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_bias_table: torch.Tensor | None,
    rel_pos_index: torch.Tensor | None,
    dropout_p: float,
    bias: torch.Tensor | None = None,
) -> str | None:
    """Why the kernels cannot take this call (then the reference runs), or None."""
    if not kernel_can_run(q, k, v, rel_pos_bias_table, rel_pos_index, bias):
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
    try:
        _check_bias(q.shape[1], seq_len, rel_pos_bias_table, rel_pos_index, bias)
    except ValueError:
        return "a relative position table / index or dense bias of unexpected shape or dtype"
    return None


def _rotated(
    q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``k`` after 2D RoPE (through the backend's ``rope_2d_qk``), or as they are without it. The tables
    were checked by :func:`attention` (its entry point), so not again here."""
    if rope is None:
        return q, k
    return _rope_2d_qk_dispatch(q, k, *rope, num_prefix_tokens)


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
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        call = _attention_fwd_op  # the op's native entry point first where it may take the call
        if rope is None and not dropout_p and q.ndim == 4:
            call = _attention_fwd_op.after_native  # tried here: not asked twice
            native_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
            result = _attention_fwd_op.native_call(q, k, v, native_scale, rel_pos_bias_table, rel_pos_index, bias)
            if result is not NotImplemented:  # covers: _covers
                return result[0]
        reason = _uncovered(q, k, v, rel_pos_bias_table, rel_pos_index, dropout_p, bias)
        if reason is not None:
            log_fallback("attention", reason)
            return attention_ref(
                q, k, v, scale, rope, num_prefix_tokens, rel_pos_bias_table, rel_pos_index, dropout_p, bias=bias
            )
        q, k = _rotated(q, k, rope, num_prefix_tokens)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        out, _ = call(q, k, v, scale, rel_pos_bias_table, rel_pos_index, bias)
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
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inside CUDA graphs (the engine's ``"kernels-sdpa"`` candidate, :func:`vitfast.optimize`): RoPE by the one-pass
    :func:`~vitfast.ops.rope.rope_2d_qk` kernel; then the attention kernel with a relative position bias (table +
    index, or the dense ``bias`` the engine gathers once at capture), SDPA otherwise.

    Measured on an H100, bf16, whole forwards under CUDA graphs (2026-11-22): with a relative position bias the
    kernel wins (it gathers the bias per tile where SDPA reads a materialized [B, H, N, N] float mask; BEiT v2-B:
    0.80 vs 1.31 ms at batch 1, 1.40 vs 2.01 ms at batch 8); without one SDPA's flash / cuDNN kernels win.
    """
    q, k = _rotated(q, k, rope, num_prefix_tokens)
    if HAS_TRITON and (rel_pos_bias_table is not None or bias is not None):
        return _attention_triton(q, k, v, scale, None, 0, rel_pos_bias_table, rel_pos_index, dropout_p, bias)
    return attention_ref(q, k, v, scale, None, 0, rel_pos_bias_table, rel_pos_index, dropout_p, bias=bias)


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
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention through the current backend; see the module docstring for the contract.

    ``bias``: a dense additive ``[H, N, N]`` bias instead of ``rel_pos_bias_table`` + ``rel_pos_index``, for a
    constant bias gathered once (``ops.gather_rel_pos_bias(table, index, aligned=True)``, e.g. by the inference
    engine at capture) rather than per call; passed on to the backend's implementation only when given.
    """
    if rope is not None:
        _check_qk(q, k, *rope, num_prefix_tokens)
    impl = dispatch("attention", q.device, q.shape[-1] if q.ndim else None)  # the training table's width: head dim
    args = (q, k, v, scale, rope, num_prefix_tokens, rel_pos_bias_table, rel_pos_index, dropout_p)
    if bias is None:
        if (rel_pos_bias_table is None) != (rel_pos_index is None):
            raise ValueError("rel_pos_bias_table and rel_pos_index must be given together.")
        return impl(*args)
    _check_bias(q.shape[1], q.shape[-2], rel_pos_bias_table, rel_pos_index, bias)
    return impl(*args, bias=bias)
