"""2D rotary position embedding (RoPE) as EVA-02 uses it.

Layout (EVA-02 / timm ``RotaryEmbeddingCat`` with interleaved pairs): for head dim ``D`` there are ``D // 4``
frequencies ``f_k = temperature ** (-k / (D // 4))``. A patch at grid row ``i``, column ``j`` of an ``H x W`` grid
gets the positions ``t_h = i / H * ref_h`` and ``t_w = j / W * ref_w`` (the reference grid keeps the pretraining
scale at any resolution), the angle vector ``[t_h * f | t_w * f]`` of length ``D // 2``, and each angle repeated
twice so that channel pair ``(2m, 2m + 1)`` rotates by angle ``m``:

    out[2m]     = x[2m] * cos - x[2m + 1] * sin
    out[2m + 1] = x[2m + 1] * cos + x[2m] * sin

The rotation is computed in fp32 and rounded to the input dtype once. Prefix (class) tokens are not rotated.

:func:`rope_2d_qk` rotates a query and a key tensor ``[B, H, N, D]`` in one pass (the Triton kernel reads both through
their strides, e.g. the views into a packed qkv GEMM output, and writes contiguous rotated copies): the step before
an SDPA call when the rotation is not fused into the attention kernel. Its backward is the inverse rotation, the same
kernel with the sine negated. The tile helpers below also serve the attention kernels, which rotate as they load.
"""

from __future__ import annotations

import torch

from vitfast.backend import dispatch, register_impl
from vitfast.ops._triton import HAS_TRITON, KERNEL_DTYPES, kernel_can_run, launch, log_fallback, tl, triton, triton_op

__all__ = ["rope_2d", "rope_2d_qk", "rope_2d_qk_fwd", "rope_2d_qk_ref", "rope_2d_ref", "rope_2d_table"]


def rope_2d_table(
    grid_size: tuple[int, int],
    head_dim: int,
    ref_grid_size: tuple[int, int] = (16, 16),
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` tables, each fp32 ``[H * W, head_dim]`` with tokens in row-major grid order."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}.")
    num_freqs = head_dim // 4
    exponents = torch.arange(num_freqs, device=device, dtype=torch.float32) / num_freqs
    freqs = 1.0 / (temperature**exponents)
    height, width = grid_size
    t_h = torch.arange(height, device=device, dtype=torch.float32) / height * ref_grid_size[0]
    t_w = torch.arange(width, device=device, dtype=torch.float32) / width * ref_grid_size[1]
    angles_h = (t_h[:, None] * freqs).unsqueeze(1).expand(height, width, num_freqs)
    angles_w = (t_w[:, None] * freqs).unsqueeze(0).expand(height, width, num_freqs)
    angles = torch.cat([angles_h, angles_w], dim=-1).reshape(height * width, 2 * num_freqs)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def rope_2d_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Rotate ``x`` ``[..., N, D]``; the tokens after the prefix use ``cos``/``sin`` ``[N - num_prefix_tokens, D]``."""
    prefix, tokens = x[..., :num_prefix_tokens, :], x[..., num_prefix_tokens:, :]
    tokens32 = tokens.float()
    rotated = torch.stack([-tokens32[..., 1::2], tokens32[..., 0::2]], dim=-1).reshape(tokens32.shape)
    out = (tokens32 * cos + rotated * sin).to(x.dtype)
    return torch.cat([prefix, out], dim=-2) if num_prefix_tokens else out


def rope_2d_qk_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rope_2d_ref(q), rope_2d_ref(k))``."""
    return rope_2d_ref(q, cos, sin, num_prefix_tokens), rope_2d_ref(k, cos, sin, num_prefix_tokens)


# ----------------------------------------------------------------------------------------------------------- kernels
# Tile helpers, shared with the attention kernels: a tile is BLOCK tokens x BLOCK_PAIRS channel pairs, the even
# channel of each pair at ``even_ptrs`` and the odd one ``stride_d`` further.


@triton.jit
def _rope_angles(Cos, Sin, tokens, pair_cols, stride_rope_n, rotate, num_prefix_tokens):
    """fp32 ``(cos, sin)`` of channel pairs ``pair_cols`` (``[1, BLOCK_PAIRS]``, even channel index) of ``tokens``
    (``[BLOCK, 1]``); the identity (1, 0) where not ``rotate`` (prefix tokens, padding). The tables hold each pair's
    angle on both of its channels (rope.py layout), so the even column serves the pair."""
    offsets = (tokens - num_prefix_tokens) * stride_rope_n + pair_cols
    cos = tl.load(Cos + offsets, mask=rotate, other=1.0).to(tl.float32)
    sin = tl.load(Sin + offsets, mask=rotate, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _load_rotated(even_ptrs, stride_d, mask, cos, sin):
    """2D RoPE on a tile as it loads (even channels at ``even_ptrs``, odd ones ``stride_d`` further): rotated in fp32,
    then rounded to the input dtype as the reference rounds its rotated q/k."""
    x_even = tl.load(even_ptrs, mask=mask, other=0.0)
    x_odd = tl.load(even_ptrs + stride_d, mask=mask, other=0.0)
    even = x_even.to(tl.float32)
    odd = x_odd.to(tl.float32)
    return (even * cos - odd * sin).to(x_even.dtype), (odd * cos + even * sin).to(x_even.dtype)


@triton.jit
def _store_unrotated(even_ptrs, stride_d, mask, grad_even, grad_odd, cos, sin):
    """Store the gradient w.r.t. the unrotated input: the transposed (inverse) rotation of the fp32 halves."""
    dtype = even_ptrs.dtype.element_ty
    tl.store(even_ptrs, (grad_even * cos + grad_odd * sin).to(dtype), mask=mask)
    tl.store(even_ptrs + stride_d, (grad_odd * cos - grad_even * sin).to(dtype), mask=mask)


@triton.jit
def _rope_qk_kernel(
    Q, K, QOut, KOut, Cos, Sin,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_on,
    stride_rope_n, stride_rope_d, num_heads, seq_len, num_prefix_tokens,
    HALF: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, INVERSE: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N tokens of one (batch, head) of both q and k, which share the angles; the outputs are
    contiguous ``[B, H, N, D]``. ``INVERSE`` rotates by the negated angles (the backward)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]  # [BLOCK_N, 1]
    pairs = tl.arange(0, BLOCK_PAIRS)[None, :]  # [1, BLOCK_PAIRS]
    mask = (tokens < seq_len) & (pairs < HALF)
    cos, sin = _rope_angles(
        Cos, Sin, tokens, pairs * (2 * stride_rope_d), stride_rope_n, mask & (tokens >= num_prefix_tokens),
        num_prefix_tokens,
    )  # fmt: skip
    if INVERSE:
        sin = -sin
    out_even = off_b * stride_ob + off_h * stride_oh + tokens * stride_on + 2 * pairs
    q_even_ptrs = Q + off_b * stride_qb + off_h * stride_qh + tokens * stride_qn + pairs * (2 * stride_qd)
    q_even, q_odd = _load_rotated(q_even_ptrs, stride_qd, mask, cos, sin)
    tl.store(QOut + out_even, q_even, mask=mask)
    tl.store(QOut + out_even + 1, q_odd, mask=mask)
    k_even_ptrs = K + off_b * stride_kb + off_h * stride_kh + tokens * stride_kn + pairs * (2 * stride_kd)
    k_even, k_odd = _load_rotated(k_even_ptrs, stride_kd, mask, cos, sin)
    tl.store(KOut + out_even, k_even, mask=mask)
    tl.store(KOut + out_even + 1, k_odd, mask=mask)


def _check_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int) -> None:
    """Raise a ValueError for inputs outside :func:`rope_2d_qk`'s contract (any device, any backend)."""
    if q.dim() < 2 or q.shape != k.shape:
        raise ValueError(f"rope_2d_qk: q and k must be [..., N, D] of one shape, got {list(q.shape)}, {list(k.shape)}.")
    if q.dtype != k.dtype or not q.is_floating_point():
        raise ValueError(f"rope_2d_qk: q and k must share one float dtype, got {q.dtype} and {k.dtype}.")
    seq_len, head_dim = q.shape[-2:]
    if not 0 <= num_prefix_tokens <= seq_len:
        raise ValueError(f"rope_2d_qk: num_prefix_tokens={num_prefix_tokens} is outside [0, N={seq_len}].")
    expected = [seq_len - num_prefix_tokens, head_dim]
    for name, table in (("cos", cos), ("sin", sin)):
        if list(table.shape) != expected or not table.is_floating_point():
            raise ValueError(
                f"rope_2d_qk: the {name} table must be a float [N - num_prefix_tokens, D] = {expected} tensor, got "
                f"{table.dtype} {list(table.shape)}."
            )
    if head_dim % 2:
        raise ValueError(f"rope_2d_qk: the head dim must be even (channel pairs), got {head_dim}.")


def rope_2d_qk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_prefix_tokens: int = 0,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` ``[B, H, N, D]`` (any strides) with the Triton kernel; contiguous outputs of their
    dtype. ``inverse`` rotates by the negated angles (the gradient of the forward rotation)."""
    _check_qk(q, k, cos, sin, num_prefix_tokens)
    if q.dim() != 4:
        raise ValueError(f"rope_2d_qk_fwd: the kernel takes [B, H, N, D] tensors, got {list(q.shape)}.")
    if cos.stride() != sin.stride():  # one offset tile serves both tables
        cos, sin = cos.contiguous(), sin.contiguous()
    batch, heads, seq_len, head_dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q_out.numel() == 0:
        return q_out, k_out
    half = head_dim // 2
    block_pairs = max(2, 1 << (half - 1).bit_length())
    block_n = max(16, 1024 // block_pairs)  # 1K pairs (2K elements) of each tensor per program
    grid = (triton.cdiv(seq_len, block_n), batch * heads)
    launch(
        _rope_qk_kernel, grid, q, k, q_out, k_out, cos, sin,
        *q.stride(), *k.stride(), *q_out.stride()[:3], *cos.stride(),
        heads, seq_len, num_prefix_tokens,
        HALF=half, BLOCK_PAIRS=block_pairs, BLOCK_N=block_n, INVERSE=inverse, num_warps=4,
    )  # fmt: skip
    return q_out, k_out


@triton_op("vitfast::rope_2d_qk")
def _rope_2d_qk_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if not kernel_can_run(q, k, cos, sin):
        q_out, k_out = rope_2d_qk_ref(q, k, cos, -sin if inverse else sin, num_prefix_tokens)
        return q_out.contiguous(), k_out.contiguous()  # new tensors (the reference never returns its input)
    return rope_2d_qk_fwd(q, k, cos, sin, num_prefix_tokens, inverse)


def _rope_2d_qk_setup_context(ctx, inputs, output) -> None:
    _, _, cos, sin, num_prefix_tokens, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.num_prefix_tokens, ctx.inverse = num_prefix_tokens, inverse


def _rope_2d_qk_backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
    cos, sin = ctx.saved_tensors
    d_q, d_k = _rope_2d_qk_op(grad_q, grad_k, cos, sin, ctx.num_prefix_tokens, not ctx.inverse)
    return d_q, d_k, None, None, None, None


_rope_2d_qk_op.register_autograd(_rope_2d_qk_backward, setup_context=_rope_2d_qk_setup_context)


def _rope_2d_qk_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    reason = None
    if not kernel_can_run(q, k, cos, sin):
        reason = "tensors not on one CUDA device (nor on the CPU under the Triton interpreter)"
    elif q.dtype not in KERNEL_DTYPES:
        reason = f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    elif q.dim() != 4:
        reason = f"{q.dim()}-d q / k (the kernel takes [B, H, N, D])"
    if reason is not None:
        log_fallback("rope_2d_qk", reason)
        return rope_2d_qk_ref(q, k, cos, sin, num_prefix_tokens)
    return _rope_2d_qk_op(q, k, cos, sin, num_prefix_tokens, False)


register_impl("rope_2d", "reference", rope_2d_ref)
register_impl("rope_2d_qk", "reference", rope_2d_qk_ref)
if HAS_TRITON:
    register_impl("rope_2d_qk", "triton", _rope_2d_qk_triton)


def rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Apply 2D RoPE through the current backend (see :func:`rope_2d_ref`)."""
    return dispatch("rope_2d", x.device)(x, cos, sin, num_prefix_tokens)


def rope_2d_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys ``[..., N, D]`` with one ``(cos, sin)`` table pair through the current backend: the
    Triton kernel (one pass over both, contiguous outputs) for ``[B, H, N, D]`` on a GPU, else :func:`rope_2d_ref`
    twice. Gradients flow to ``q`` and ``k``; the tables are constants."""
    _check_qk(q, k, cos, sin, num_prefix_tokens)
    return dispatch("rope_2d_qk", q.device)(q, k, cos, sin, num_prefix_tokens)
