"""2D rotary position embedding (RoPE) as EVA-02 uses it.

Layout (EVA-02 / timm ``RotaryEmbeddingCat`` with interleaved pairs): for head dim ``D`` there are ``D // 4``
frequencies ``f_k = temperature ** (-k / (D // 4))``. A patch at grid row ``i``, column ``j`` of an ``H x W`` grid
gets the positions ``t_h = i / H * ref_h`` and ``t_w = j / W * ref_w`` (the reference grid keeps the pretraining
scale at any resolution), the angle vector ``[t_h * f | t_w * f]`` of length ``D // 2``, and each angle repeated
twice so that channel pair ``(2m, 2m + 1)`` rotates by angle ``m``:

    out[2m]     = x[2m] * cos - x[2m + 1] * sin
    out[2m + 1] = x[2m + 1] * cos + x[2m] * sin

The rotation is computed in fp32 and rounded to the input dtype once. Prefix (class) tokens are not rotated.

:func:`rope_2d_qk` rotates a query and a key tensor ``[B, H, N, D]`` in one pass: the Triton kernel reads both
through their strides (e.g. the head views of a packed qkv GEMM output), one program per block of tokens across all
heads, so that each angle is read once per token and every access moves 16 bytes, and writes rotated copies in the
``[B, N, H, D]`` layout that attention (SDPA, or :mod:`vitfast.ops.attention` for any other caller) reads in place.
Its backward is the inverse rotation, the same kernel with the sine negated. Attention with RoPE is this op followed
by attention without it: rotating inside the attention kernel re-rotated every key tile once per query tile and lost
to this order on an H100 (benchmarks/results/2026-11-22_h100_ops_eager.md).
"""

from __future__ import annotations

import torch

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
)

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
    """Rotate ``x`` ``[..., N, D]``; the tokens after the prefix use ``cos``/``sin`` ``[N - num_prefix_tokens, D]``
    (or ``[N - num_prefix_tokens, D // 2]``, one angle per channel pair)."""
    if cos.shape[-1] * 2 == x.shape[-1]:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
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


@triton.jit
def _rope_qk_kernel(
    Q, K, QOut, KOut, Cos, Sin,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_ob, stride_on,
    stride_rope_n, stride_rope_pair, seq_len, num_prefix_tokens,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
    BLOCK_N: tl.constexpr, INVERSE: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """One program: BLOCK_N tokens of one image, every head of both q and k, which share the angles.

    Each token's heads are read as whole rows of channels (unit stride along D: 16-byte vector loads) and split into
    their (even, odd) channel pairs in registers; the angle of each pair is read once per token for all heads and
    both tensors. The outputs are contiguous ``[B, N, H, D]``. ``INVERSE`` rotates by the negated angles.
    """
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    pid_n = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]  # [BLOCK_N, 1, 1]
    heads = tl.arange(0, BLOCK_H)[None, :, None]  # [1, BLOCK_H, 1]
    channels = tl.arange(0, 2 * BLOCK_PAIRS)[None, None, :]  # [1, 1, 2 * BLOCK_PAIRS]
    pairs = tl.arange(0, BLOCK_PAIRS)[None, None, :]
    mask = (tokens < seq_len) & (heads < HEADS) & (channels < HEAD_DIM)
    # prefix tokens (and padding) get the identity rotation (cos 1, sin 0): copied through exactly
    rotate = (tokens >= num_prefix_tokens) & (tokens < seq_len) & (pairs < HEAD_DIM // 2)
    angle_offsets = (tokens - num_prefix_tokens) * stride_rope_n + pairs * stride_rope_pair
    cos = tl.load(Cos + angle_offsets, mask=rotate, other=1.0).to(tl.float32)  # [BLOCK_N, 1, BLOCK_PAIRS]
    sin = tl.load(Sin + angle_offsets, mask=rotate, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    rows = tokens.to(tl.int64)
    out_offsets = off_b * stride_ob + rows * stride_on + heads * HEAD_DIM + channels
    # Triton proves 16-byte alignment from integer arguments divisible by 16 only; head strides like 88 are
    # multiples of 8 elements (16 bytes) too, which the launcher checks and says here, on the row offsets (a hint
    # on the scalar strides did not reach the loads: D = 88 loaded 16 bits at a time)
    q_rows = tl.multiple_of(off_b * stride_qb + rows * stride_qn + heads * stride_qh, [STRIDE_MULTIPLE] * 3)
    q = tl.load(Q + q_rows + channels, mask=mask, other=0.0)
    tl.store(QOut + out_offsets, _rotate_pairs(q, cos, sin, BLOCK_N, BLOCK_H, BLOCK_PAIRS), mask=mask)
    k_rows = tl.multiple_of(off_b * stride_kb + rows * stride_kn + heads * stride_kh, [STRIDE_MULTIPLE] * 3)
    k = tl.load(K + k_rows + channels, mask=mask, other=0.0)
    tl.store(KOut + out_offsets, _rotate_pairs(k, cos, sin, BLOCK_N, BLOCK_H, BLOCK_PAIRS), mask=mask)


@triton.jit
def _rotate_pairs(x, cos, sin, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """``x`` ``[BLOCK_N, BLOCK_H, 2 * BLOCK_PAIRS]`` with channel pairs ``(2m, 2m + 1)`` rotated by pair ``m``'s
    angle, in fp32, rounded once to ``x``'s dtype."""
    even, odd = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_N, BLOCK_H, BLOCK_PAIRS, 2]))
    rotated = tl.join(even * cos - odd * sin, odd * cos + even * sin)
    return tl.reshape(rotated, [BLOCK_N, BLOCK_H, 2 * BLOCK_PAIRS]).to(x.dtype)


def _check_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int) -> None:
    """Raise a ValueError for inputs outside :func:`rope_2d_qk`'s contract (any device, any backend)."""
    if q.dim() < 2 or q.shape != k.shape:
        raise ValueError(f"rope_2d_qk: q and k must be [..., N, D] of one shape, got {list(q.shape)}, {list(k.shape)}.")
    if q.dtype != k.dtype or not q.is_floating_point():
        raise ValueError(f"rope_2d_qk: q and k must share one float dtype, got {q.dtype} and {k.dtype}.")
    shape = q.shape
    seq_len, head_dim = shape[-2], shape[-1]
    if not 0 <= num_prefix_tokens <= seq_len:
        raise ValueError(f"rope_2d_qk: num_prefix_tokens={num_prefix_tokens} is outside [0, N={seq_len}].")
    rows = seq_len - num_prefix_tokens
    table_shapes = ((rows, head_dim), (rows, head_dim // 2))
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape not in table_shapes or not table.is_floating_point():
            raise ValueError(
                f"rope_2d_qk: the {name} table must be a float [N - num_prefix_tokens, D] = {[rows, head_dim]} tensor "
                f"(or [N - num_prefix_tokens, D // 2] with one angle per pair), got {table.dtype} {list(table.shape)}."
            )
    if cos.shape != sin.shape:
        raise ValueError(f"rope_2d_qk: cos and sin must have one shape, got {list(cos.shape)} and {list(sin.shape)}.")
    if head_dim % 2:
        raise ValueError(f"rope_2d_qk: the head dim must be even (channel pairs), got {head_dim}.")


# Elements of each of q and k one program rotates: ~4096 on a GPU (16 per thread at 4 warps: two 16-byte loads of
# 16-bit values). The interpreter spends its time per program, not per element, so there programs are 16x larger.
_TILE = 65536 if INTERPRETER else 4096


def rope_2d_qk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_prefix_tokens: int = 0,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` ``[B, H, N, D]`` with the Triton kernel; ``inverse`` rotates by the negated angles (the
    gradient of the forward rotation).

    - ``q``, ``k``: any strides with unit stride along ``D`` (anything else is copied first), e.g. the head views of
      a packed ``[B, N, 3, H, D]`` qkv projection, read in place;
    - ``cos``, ``sin``: fp32 ``[N - num_prefix_tokens, D]`` (each pair's angle on both of its channels, as
      :func:`rope_2d_table` builds them; the kernel reads one column per pair) or ``[N - num_prefix_tokens, D // 2]``
      (one column per pair: half the table traffic);
    - outputs: ``q``'s dtype, the ``[B, H, N, D]`` views of contiguous ``[B, N, H, D]`` tensors, the layout a packed
      projection's heads have, which SDPA (flash, cuDNN) and the attention kernel read in place.
    """
    _check_qk(q, k, cos, sin, num_prefix_tokens)
    if q.dim() != 4:
        raise ValueError(f"rope_2d_qk_fwd: the kernel takes [B, H, N, D] tensors, got {list(q.shape)}.")
    q_strides, k_strides = q.stride(), k.stride()
    if q_strides[-1] != 1:
        q = q.contiguous()
        q_strides = q.stride()
    if k_strides[-1] != 1:
        k = k.contiguous()
        k_strides = k.stride()
    cos_strides = cos.stride()
    if cos_strides != sin.stride():  # one offset tile serves both tables
        cos, sin = cos.contiguous(), sin.contiguous()
        cos_strides = cos.stride()
    shape = q.shape
    batch, heads, seq_len, head_dim = shape
    # the [B, H, N, D] view of a contiguous [B, N, H, D] tensor, allocated as such (an empty and a transpose cost
    # twice the host time)
    out_strides = (seq_len * heads * head_dim, head_dim, heads * head_dim, 1)
    q_out = torch.empty_strided(shape, out_strides, dtype=q.dtype, device=q.device)
    k_out = torch.empty_strided(shape, out_strides, dtype=k.dtype, device=k.device)
    if batch * heads * seq_len * head_dim == 0:
        return q_out, k_out
    grid, block_h, block_pairs, block_n, stride_multiple = _rope_plan(
        batch, heads, seq_len, head_dim, q_strides, k_strides, q.element_size()
    )
    pair_stride = cos_strides[1] * (2 if cos.shape[-1] == head_dim else 1)
    launch(
        _rope_qk_kernel, grid, q, k, q_out, k_out, cos, sin,
        q_strides[0], q_strides[2], q_strides[1], k_strides[0], k_strides[2], k_strides[1],
        out_strides[0], out_strides[2], cos_strides[0], pair_stride, seq_len, num_prefix_tokens,
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_PAIRS=block_pairs, BLOCK_N=block_n,
        INVERSE=inverse, STRIDE_MULTIPLE=stride_multiple, num_warps=4,
    )  # fmt: skip
    return q_out, k_out


@eager_memo
def _rope_plan(
    batch: int,
    heads: int,
    seq_len: int,
    head_dim: int,
    q_strides: tuple[int, ...],
    k_strides: tuple[int, ...],
    element_size: int,
) -> tuple[tuple[int, int], int, int, int, int]:
    """``(grid, BLOCK_H, BLOCK_PAIRS, BLOCK_N, STRIDE_MULTIPLE)`` of the rotation kernel."""
    block_h, block_pairs = next_power_of_2(heads), next_power_of_2(head_dim // 2)
    block_n = max(1, _TILE // (block_h * 2 * block_pairs))
    vector = 16 // element_size  # elements in 16 bytes
    strides = (q_strides[0], q_strides[2], q_strides[1], k_strides[0], k_strides[2], k_strides[1])  # hinted offsets
    stride_multiple = vector if all(stride % vector == 0 for stride in strides) else 1
    return (cdiv(seq_len, block_n), batch), block_h, block_pairs, block_n, stride_multiple


@triton_op("vitfast::rope_2d_qk")
def _rope_2d_qk_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if not kernel_can_run(q, k, cos, sin):
        q_out, k_out = rope_2d_qk_ref(q, k, cos, -sin if inverse else sin, num_prefix_tokens)
        return _kernel_layout(q_out), _kernel_layout(k_out)  # new tensors (the reference never returns its input)
    return rope_2d_qk_fwd(q, k, cos, sin, num_prefix_tokens, inverse)


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in the kernel's output layout: ``[B, N, H, D]`` contiguous for 4-d ``[B, H, N, D]``."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 4 else t.contiguous()


def _rope_2d_qk_setup_context(ctx, inputs, output) -> None:
    _, _, cos, sin, num_prefix_tokens, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.num_prefix_tokens, ctx.inverse = num_prefix_tokens, inverse


def _rope_2d_qk_backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
    cos, sin = ctx.saved_tensors
    d_q, d_k = _rope_2d_qk_op(grad_q, grad_k, cos, sin, ctx.num_prefix_tokens, not ctx.inverse)
    return d_q, d_k, None, None, None, None


_rope_2d_qk_op.register_autograd(_rope_2d_qk_backward, setup_context=_rope_2d_qk_setup_context)


def _native_state() -> tuple | None:
    return native_state(_TILE)  # the launch plan reads _TILE


def _covers(q, k, cos, sin, num_prefix_tokens, _inverse) -> bool:
    """Whether the kernel takes the call and :func:`rope_2d_qk`'s argument checks pass (for the native entry point:
    the public wrapper tries it before its own checks, which are a function of the key, so they run once a key)."""
    try:
        _check_qk(q, k, cos, sin, num_prefix_tokens)
    except ValueError:
        return False  # the key stays with the Python path, where the wrapper's check raises
    return _uncovered(q, k, cos, sin) is None


def register_ext(cpu: bool = INTERPRETER) -> None:
    """The native eager entry point of the rotation (csrc/eager.cpp; :func:`~vitfast.ops._triton.register_native`)."""
    register_native(_rope_2d_qk_op, _native_state, cpu, covers=_covers)


register_ext()


def _uncovered(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the kernel cannot take the call (then the reference runs), or None."""
    if not kernel_can_run(q, k, cos, sin):
        return "tensors not on one CUDA device (nor on the CPU under the Triton interpreter)"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    if q.dim() != 4:
        return f"{q.dim()}-d q / k (the kernel takes [B, H, N, D])"
    return None


def _rope_2d_qk_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    result = _rope_2d_qk_op.native_call(q, k, cos, sin, num_prefix_tokens, False)  # covers: _covers
    if result is not NotImplemented:
        return result
    return _rope_2d_qk_python(q, k, cos, sin, num_prefix_tokens)


def _rope_2d_qk_python(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend past the native entry point: the op (its Python eager path), or the reference."""
    reason = _uncovered(q, k, cos, sin)
    if reason is not None:
        log_fallback("rope_2d_qk", reason)
        return rope_2d_qk_ref(q, k, cos, sin, num_prefix_tokens)
    return _rope_2d_qk_op.after_native(q, k, cos, sin, num_prefix_tokens, False)


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
    impl = dispatch("rope_2d_qk", q.device, q.shape[-1] if q.ndim else None)
    if impl is _rope_2d_qk_triton:
        # the native path first: its coverage check (_covers) runs the argument checks at a key's first call (they
        # cost more host time than an aten op: ~4 us against torch.mul's ~3, benchmarks/results/2026-12-02_*)
        result = _rope_2d_qk_op.native_call(q, k, cos, sin, num_prefix_tokens, False)
        if result is not NotImplemented:
            return result
        impl = _rope_2d_qk_python  # the native entry point declined: not tried twice
    _check_qk(q, k, cos, sin, num_prefix_tokens)
    return impl(q, k, cos, sin, num_prefix_tokens)


def _rope_2d_qk_dispatch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_2d_qk` for a caller that has checked the inputs already (``ops.attention`` with ``rope``)."""
    return dispatch("rope_2d_qk", q.device, q.shape[-1])(q, k, cos, sin, num_prefix_tokens)
