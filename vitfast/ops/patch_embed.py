"""Patch embedding: non-overlapping ``p x p`` patches of an image projected to tokens.

Tokens come out row-major over the patch grid (token ``i * W + j`` is grid row ``i``, column ``j``), which is the
order timm's ``PatchEmbed`` (conv, flatten, transpose) produces.

:func:`patch_embed_tokens` fuses the whole input stem of a ViT: optional normalization of the image (uint8 images are
normalized on load), the patch projection, its bias, the class token and the position embedding, into one GEMM
``[B * N, C * ph * pw] x [C * ph * pw, D]`` whose A operand is gathered straight from the image (im2col on load, no
unfolded copy) and whose epilogue writes the token buffer ``[B, 1 + N, D]`` directly.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    native_state,
    pdl_prologue,
    plan_sms,
    register_native,
    rows_2d,
    tl,
    triton,
    triton_op,
    widen_bf16_dot,
)

__all__ = ["patch_embed", "patch_embed_ref", "patch_embed_tokens", "patch_embed_tokens_ref"]

ChannelStats = Sequence[float] | torch.Tensor | None


def patch_embed_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[B, C, H, W]``, ``weight`` ``[D, C, p, p]`` -> tokens ``[B, (H / p) * (W / p), D]``."""
    patch = weight.shape[-2:]
    return F.conv2d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)


def _check_tokens_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    mean: ChannelStats,
    std: ChannelStats,
) -> int:
    """Raise a ValueError / TypeError that says what is wrong with the inputs; return the patch count ``N``."""
    if x.ndim != 4:
        raise ValueError(f"expected an image batch [B, C, H, W], got a tensor of shape {tuple(x.shape)}.")
    if weight.ndim != 4:
        raise ValueError(f"expected a patch projection weight [D, C, ph, pw], got shape {tuple(weight.shape)}.")
    if not weight.is_floating_point():
        raise TypeError(f"the patch projection weight must be floating point, got {weight.dtype}.")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"expected a floating-point or uint8 image, got {x.dtype}.")
    if x.is_floating_point() and x.dtype != weight.dtype:
        raise TypeError(
            f"dtype mismatch: image {x.dtype} vs patch weight {weight.dtype}; cast one of them (a uint8 image is "
            "the only input whose dtype may differ from the weight's)."
        )
    embed_dim, channels, patch_h, patch_w = weight.shape
    batch, in_channels, height, width = x.shape
    if in_channels != channels:
        raise ValueError(
            f"expected {channels} input channels, got {in_channels} (input shape {tuple(x.shape)}); images must be "
            "[B, C, H, W] with C channels first."
        )
    if height == 0 or width == 0 or height % patch_h or width % patch_w:
        raise ValueError(
            f"input size {height}x{width} is not a positive multiple of the patch size {patch_h}x{patch_w}; resize "
            "or crop to a multiple of it."
        )
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: pass both (per-channel, 0-1 scale) or neither.")
    if x.dtype == torch.uint8 and mean is None:
        raise ValueError(
            "a uint8 image needs mean and std (per channel, in the 0-1 scale of timm's pretrained_cfg, e.g. "
            "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) to be normalized on load."
        )
    for name, stats in (("mean", mean), ("std", std)):
        count = None if stats is None else stats.numel() if isinstance(stats, torch.Tensor) else len(stats)
        if count is not None and count != channels:
            raise ValueError(f"{name} must have one value per channel ({channels}), got {count}.")
    num_patches = (height // patch_h) * (width // patch_w)
    params = {"bias": (bias, (embed_dim,)), "cls_token": (cls_token, (1, 1, embed_dim))}
    for name, (param, shape) in params.items():
        if param is not None and tuple(param.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(param.shape)}.")
    if pos_embed is not None:
        lengths = (num_patches, num_patches + 1) if cls_token is not None else (num_patches,)
        if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != embed_dim:
            raise ValueError(f"pos_embed must have shape [1, L, {embed_dim}], got {list(pos_embed.shape)}.")
        if pos_embed.shape[1] not in lengths:
            expected = " or ".join(str(n) for n in lengths)
            raise ValueError(
                f"pos_embed has {pos_embed.shape[1]} positions; the {height}x{width} image has {num_patches} patches, "
                f"so expected {expected} (N + 1 includes the class token's position, which needs a cls_token). "
                "Resample it for the new grid first (vitfast.layers.resample_abs_pos_embed)."
            )
    for name, param in (("bias", bias), ("pos_embed", pos_embed), ("cls_token", cls_token)):
        if param is not None and param.dtype != weight.dtype:
            raise TypeError(f"dtype mismatch: {name} is {param.dtype} but the patch weight is {weight.dtype}.")
    for name, tensor in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed), ("cls_token", cls_token)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but the image is on {x.device}.")
    return num_patches


def _channel_stats(stats: ChannelStats, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if stats is None:
        return None
    return torch.as_tensor(stats, dtype=dtype, device=device).reshape(-1)


def _normalize_ref(x: torch.Tensor, out_dtype: torch.dtype, mean: ChannelStats, std: ChannelStats) -> torch.Tensor:
    """``(x / 255 - mean) / std`` for uint8, ``(x - mean) / std`` for float, computed in fp32 (fp64 for fp64)."""
    if mean is None:
        return x
    compute = torch.promote_types(out_dtype, torch.float32)
    mean_t = _channel_stats(mean, compute, x.device).reshape(1, -1, 1, 1)
    std_t = _channel_stats(std, compute, x.device).reshape(1, -1, 1, 1)
    image = x.to(compute)
    if x.dtype == torch.uint8:
        image = image / 255
    return ((image - mean_t) / std_t).to(out_dtype)


def patch_embed_tokens_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    mean: ChannelStats = None,
    std: ChannelStats = None,
) -> torch.Tensor:
    """Image ``[B, C, H, W]`` -> tokens ``[B, 1 + N, D]`` (``[B, N, D]`` without ``cls_token``), in plain PyTorch.

    The model path, step by step: normalize (uint8: ``(x / 255 - mean) / std``; float with mean/std:
    ``(x - mean) / std``), conv with kernel = stride = patch, flatten to tokens, prepend the class token, add
    ``pos_embed``. A ``pos_embed`` of ``N`` positions (no class position) is added to the patch tokens only.
    """
    _check_tokens_inputs(x, weight, bias, pos_embed, cls_token, mean, std)
    image = _normalize_ref(x, weight.dtype, mean, std)
    tokens = patch_embed_ref(image, weight, bias)
    if pos_embed is not None and pos_embed.shape[1] == tokens.shape[1]:
        tokens = tokens + pos_embed
        pos_embed = None
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


@triton.jit
def _dot(a, b, acc, IEEE_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32; fp32 operands at full precision, never TF32 (see :func:`_dot_flags`)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee") if IEEE_FP32 else tl.dot(a, b, acc)


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    pos_ptr,
    cls_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    num_rows,
    num_patches,
    embed_dim,
    patch_dim,
    grid_w,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wd,
    stride_wk,
    stride_pos_t,
    stride_pos_d,
    stride_ob,
    stride_ot,
    PATCH_H: tl.constexpr,
    PATCH_W: tl.constexpr,
    NUM_PREFIX: tl.constexpr,
    POS_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One [BLOCK_M patches, BLOCK_N features] tile of the tokens; row ``m`` is patch ``m % N`` of image ``m // N``."""
    pdl_prologue(PDL)  # first: waits for the previous kernel when launched with PDL
    # feature tiles vary fastest: the programs sharing an image tile run together and read it once from DRAM
    num_col_tiles = tl.cdiv(embed_dim, BLOCK_N)
    pid_m = tl.program_id(0) // num_col_tiles
    pid_n = tl.program_id(0) % num_col_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_rows
    col_mask = cols < embed_dim
    batch = (rows // num_patches).to(tl.int64)  # int64: batch * stride can pass 2**31 for large batches
    patch = rows % num_patches
    # top-left pixel of each patch; the K index adds (channel, row in patch, column in patch) to it
    x_rows = batch * stride_xb + (patch // grid_w) * PATCH_H * stride_xh + (patch % grid_w) * PATCH_W * stride_xw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, patch_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < patch_dim
        channel = ks // (PATCH_H * PATCH_W)
        in_patch = ks % (PATCH_H * PATCH_W)
        x_cols = channel * stride_xc + (in_patch // PATCH_W) * stride_xh + (in_patch % PATCH_W) * stride_xw
        a = tl.load(x_ptr + x_rows[:, None] + x_cols[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0)
        if NORMALIZE:
            # masked K columns get scale = shift = 0, so they stay 0 and add nothing to the dot
            scale = tl.load(scale_ptr + channel, mask=k_mask, other=0.0)
            shift = tl.load(shift_ptr + channel, mask=k_mask, other=0.0)
            a = a.to(tl.float32) * scale[None, :] + shift[None, :]
        a = a.to(w_ptr.dtype.element_ty)
        w = tl.load(
            w_ptr + cols[None, :] * stride_wd + ks[:, None] * stride_wk,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = _dot(a, w, acc, IEEE_FP32, UPCAST_DOT)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_POS:
        pos_rows = (patch + POS_OFFSET) * stride_pos_t
        acc += tl.load(pos_ptr + pos_rows[:, None] + cols[None, :] * stride_pos_d, mask=out_mask, other=0.0).to(
            tl.float32
        )
    out_rows = batch * stride_ob + (patch + NUM_PREFIX) * stride_ot
    tl.store(out_ptr + out_rows[:, None] + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    if NUM_PREFIX == 1:
        # The tile holding an image's first patch also writes that image's class token (cls + pos[0]): no second
        # launch, and the store is masked off for every other row, so it costs nothing elsewhere.
        cls = tl.load(cls_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_POS and POS_OFFSET == 1:
            cls += tl.load(pos_ptr + cols * stride_pos_d, mask=col_mask, other=0.0).to(tl.float32)
        cls_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + cls[None, :]
        first = row_mask & (patch == 0)
        tl.store(
            out_ptr + (batch * stride_ob)[:, None] + cols[None, :],
            cls_tile.to(out_ptr.dtype.element_ty),
            mask=first[:, None] & col_mask[None, :],
        )


@triton.jit
def _patch_embed_bwd_dw_kernel(
    grad_ptr,
    x_ptr,
    scale_ptr,
    shift_ptr,
    dw_ptr,
    partials_ptr,
    arrivals_ptr,
    num_rows,
    num_patches,
    embed_dim,
    patch_dim,
    grid_w,
    rows_per_split,
    num_splits,
    stride_gb,
    stride_gt,
    stride_gd,
    stride_xb,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_ps,
    stride_pd,
    PATCH_H: tl.constexpr,
    PATCH_W: tl.constexpr,
    NUM_PREFIX: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    REDUCE_D: tl.constexpr,
):
    """``d_weight[D, K]`` = ``d_patch^T @ patches``, each program over one split of the ``B * N`` patch rows.

    With one split a program writes its tile of ``d_weight``. With several (``SPLIT``), each writes its fp32 partial
    tile, then counts its arrival on the tile's counter; the tile's last program to arrive sums the partials in split
    order (deterministic, whichever program is last) and writes ``d_weight`` in its dtype: one launch, no pass over
    the partials from another kernel, no atomics on data. ``d_weight`` is ``[D, K]``-contiguous; the partials' rows
    are padded to 16 elements (128-bit accesses whatever ``K``: 588 at patch 14).
    """
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_split = tl.program_id(2)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_mask = ds < embed_dim
    k_mask = ks < patch_dim
    channel = ks // (PATCH_H * PATCH_W)
    in_patch = ks % (PATCH_H * PATCH_W)
    x_cols = channel * stride_xc + (in_patch // PATCH_W) * stride_xh + (in_patch % PATCH_W) * stride_xw
    if NORMALIZE:
        scale = tl.load(scale_ptr + channel, mask=k_mask, other=0.0)
        shift = tl.load(shift_ptr + channel, mask=k_mask, other=0.0)

    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    row_start = pid_split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, num_rows)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        batch = (rows // num_patches).to(tl.int64)
        patch = rows % num_patches
        g_rows = batch * stride_gb + (patch + NUM_PREFIX) * stride_gt
        # masked rows load 0 here, which zeroes their (possibly nonzero, normalized) patch values in the dot
        g = tl.load(
            grad_ptr + g_rows[:, None] + ds[None, :] * stride_gd, mask=row_mask[:, None] & d_mask[None, :], other=0.0
        )
        x_rows = batch * stride_xb + (patch // grid_w) * PATCH_H * stride_xh + (patch % grid_w) * PATCH_W * stride_xw
        a = tl.load(x_ptr + x_rows[:, None] + x_cols[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0)
        if NORMALIZE:
            a = a.to(tl.float32) * scale[None, :] + shift[None, :]
        a = a.to(grad_ptr.dtype.element_ty)
        acc = _dot(tl.trans(g), a, acc, IEEE_FP32, UPCAST_DOT)

    mask = d_mask[:, None] & k_mask[None, :]
    if SPLIT:
        # partials masked at their padded width (16 | stride_pd): uniform over each 16 columns, so 128-bit accesses;
        # the padding columns hold zeros (their patch entries loaded as 0) and are never read into d_weight
        padded_mask = d_mask[:, None] & (ks < stride_pd)[None, :]
        tl.store(partials_ptr + pid_split * stride_ps + ds[:, None] * stride_pd + ks[None, :], acc, mask=padded_mask)
        # every thread's partial stored before the arrival (a release at GPU scope) says it is there
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + pid_d * tl.num_programs(1) + pid_k, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            # summed REDUCE_D rows at a time: a [REDUCE_D, BLOCK_K] running sum instead of a second full-tile one
            for d0 in tl.static_range(0, BLOCK_D, REDUCE_D):
                rows = pid_d * BLOCK_D + d0 + tl.arange(0, REDUCE_D)
                rows_ok = (rows < embed_dim)[:, None]
                offsets = rows[:, None] * stride_pd + ks[None, :]
                total = tl.zeros((REDUCE_D, BLOCK_K), dtype=tl.float32)
                for split in range(0, num_splits):
                    # .cg: the other programs' partials come from L2, never from a stale line of this SM's L1
                    total += tl.load(
                        partials_ptr + split * stride_ps + offsets,
                        mask=rows_ok & (ks < stride_pd)[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                out = dw_ptr + rows[:, None] * patch_dim + ks[None, :]
                tl.store(out, total.to(dw_ptr.dtype.element_ty), mask=rows_ok & k_mask[None, :])
    else:
        tl.store(dw_ptr + ds[:, None] * patch_dim + ks[None, :], acc.to(dw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_bwd_dx_kernel(
    grad_ptr,
    w_ptr,
    scale_ptr,
    dx_ptr,
    num_rows,
    num_patches,
    embed_dim,
    patch_dim,
    grid_w,
    stride_gb,
    stride_gt,
    stride_gd,
    stride_wd,
    stride_wk,
    stride_dxb,
    stride_dxc,
    stride_dxh,
    stride_dxw,
    PATCH_H: tl.constexpr,
    PATCH_W: tl.constexpr,
    NUM_PREFIX: tl.constexpr,
    NORMALIZE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``d_patches[B * N, K] = d_patch @ W``, scattered back to image layout (patches do not overlap: no atomics)."""
    # patch-entry tiles vary fastest: the programs sharing a grad_out tile run together and read it once from DRAM
    num_k_tiles = tl.cdiv(patch_dim, BLOCK_K)
    pid_m = tl.program_id(0) // num_k_tiles
    pid_k = tl.program_id(0) % num_k_tiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < num_rows
    k_mask = ks < patch_dim
    batch = (rows // num_patches).to(tl.int64)
    patch = rows % num_patches
    g_rows = batch * stride_gb + (patch + NUM_PREFIX) * stride_gt

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, embed_dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < embed_dim
        g = tl.load(
            grad_ptr + g_rows[:, None] + ds[None, :] * stride_gd, mask=row_mask[:, None] & d_mask[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + ds[:, None] * stride_wd + ks[None, :] * stride_wk, mask=d_mask[:, None] & k_mask[None, :], other=0.0
        )
        acc = _dot(g, w, acc, IEEE_FP32, UPCAST_DOT)

    channel = ks // (PATCH_H * PATCH_W)
    in_patch = ks % (PATCH_H * PATCH_W)
    if NORMALIZE:
        acc *= tl.load(scale_ptr + channel, mask=k_mask, other=0.0)[None, :]
    dx_rows = batch * stride_dxb + (patch // grid_w) * PATCH_H * stride_dxh + (patch % grid_w) * PATCH_W * stride_dxw
    dx_cols = channel * stride_dxc + (in_patch // PATCH_W) * stride_dxh + (in_patch % PATCH_W) * stride_dxw
    tl.store(
        dx_ptr + dx_rows[:, None] + dx_cols[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_mask[:, None] & k_mask[None, :],
    )


# Output tiles of all three kernels: 128 x 128 (8 warps) keeps an H100 SM's tensor cores busy while the 32-deep
# operand slices (the forward's [128, 32] im2col gather: runs of ph * pw contiguous pixels) stay small enough for 3
# pipeline stages. Where those tiles cannot give every SM a program (ViT-B/16 at batch 1 / 8: 12 / 78 forward tiles
# on 132 SMs), 64 x 64 tiles at 4 warps (48 / 300): at small batch the kernels are bound by reading the weight or the
# gradient, which 4x more programs read in parallel. See _tile.
_BIG_TILE, _SMALL_TILE, _SMALL_TILE_WARPS = 128, 64, 4
_STEP = 32  # the reduction dimension's step of every kernel (patch entries, patch rows, features)
# d_weight has only ceil(D / 128) * ceil(K / 128) tiles (48 for ViT-L/16), too few for an H100's 132 SMs: the patch
# rows are split so that about _DW_TARGET_PROGRAMS programs run (two waves at the kernel's one CTA per SM), but each
# split keeps at least _DW_MIN_ROWS_PER_SPLIT rows so that reading its inputs outweighs writing its fp32 partial
# tile. Fewer, longer splits than the four waves before: the tile's last program reads every split's partial back.
_DW_TARGET_PROGRAMS = 264
_DW_MIN_ROWS_PER_SPLIT = 1024
# rows of a tile the last program sums at a time (16 fp32 registers per thread for the running sum at 8 warps)
_DW_REDUCE_D = 32
_NUM_WARPS = 8  # 128 x 128 fp32 accumulators: 64 registers per thread with 8 warps
_NUM_STAGES = 3


def _dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    return {
        # fp32 operands would otherwise run in TF32 on the GPU (10-bit mantissa), far outside fp32 PyTorch's error
        "IEEE_FP32": dtype == torch.float32,
        "UPCAST_DOT": widen_bf16_dot(dtype),
    }


def _scale_shift(
    x: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel fp32 ``scale, shift`` with ``normalized = x * scale + shift`` (folded in fp64: one rounding)."""
    if mean is None or std is None:
        return None
    divisor = 255.0 if x.dtype == torch.uint8 else 1.0
    std64 = std.to(device=x.device, dtype=torch.float64)
    scale = (1.0 / (std64 * divisor)).to(torch.float32)
    shift = (-mean.to(device=x.device, dtype=torch.float64) / std64).to(torch.float32)
    return scale, shift


def patch_embed_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the fused patch-embedding forward.

    ``x`` ``[B, C, H, W]`` (any strides) fp16/bf16/fp32 equal to ``weight``'s dtype, or uint8 with ``mean``/``std``;
    ``weight`` ``[D, C, ph, pw]``; ``bias`` ``[D]``; ``pos_embed`` ``[1, N or 1 + N, D]``; ``cls_token``
    ``[1, 1, D]``; ``mean``/``std`` ``[C]`` (0-1 scale). Returns ``[B, 1 + N, D]`` (``[B, N, D]`` without
    ``cls_token``) in ``weight``'s dtype, contiguous.
    """
    num_patches = _check_tokens_inputs(x, weight, bias, pos_embed, cls_token, mean, std)
    if weight.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the patch-embedding kernel takes fp16/bf16/fp32 weights, got {weight.dtype}.")
    embed_dim, channels, patch_h, patch_w = weight.shape
    batch, _, _, width = x.shape
    num_prefix = 0 if cls_token is None else 1
    tokens = num_prefix + num_patches
    out = torch.empty(batch, tokens, embed_dim, device=x.device, dtype=weight.dtype)
    num_rows = batch * num_patches
    if num_rows == 0:
        return out
    patch_dim = channels * patch_h * patch_w
    weight_2d, _, weight_stride = rows_2d(weight, patch_dim)
    stats = _scale_shift(x, mean, std)
    scale, shift = stats if stats is not None else (weight, weight)  # unused pointers when NORMALIZE is off
    block, num_warps = _tile(num_rows, embed_dim, 1, x.device)
    grid = (cdiv(num_rows, block) * cdiv(embed_dim, block),)
    launch(
        _patch_embed_fwd_kernel,
        grid,
        x,
        weight_2d,
        bias if bias is not None else weight,
        pos_embed if pos_embed is not None else weight,
        cls_token if cls_token is not None else weight,
        scale,
        shift,
        out,
        num_rows,
        num_patches,
        embed_dim,
        patch_dim,
        width // patch_w,
        *x.stride(),
        weight_stride,
        1,
        *(pos_embed.stride()[1:] if pos_embed is not None else (0, 0)),
        tokens * embed_dim,  # out: contiguous
        embed_dim,
        PATCH_H=patch_h,
        PATCH_W=patch_w,
        NUM_PREFIX=num_prefix,
        POS_OFFSET=int(pos_embed is not None and pos_embed.shape[1] == num_patches + 1),
        HAS_BIAS=bias is not None,
        HAS_POS=pos_embed is not None,
        NORMALIZE=stats is not None,
        **_dot_flags(weight.dtype),
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_K=_STEP,
        num_warps=num_warps,
        num_stages=_NUM_STAGES,
    )
    return out


def _tile(rows: int, cols: int, splits: int, device: torch.device) -> tuple[int, int]:
    """``(tile, num_warps)`` of a kernel writing a ``[rows, cols]`` output in square tiles, ``splits`` programs per
    tile: 128 where those programs give every SM one, else 64 (see _BIG_TILE)."""
    if cdiv(rows, _BIG_TILE) * cdiv(cols, _BIG_TILE) * splits >= plan_sms(device):
        return _BIG_TILE, _NUM_WARPS
    return _SMALL_TILE, _SMALL_TILE_WARPS


def _dw_splits(num_rows: int, tiles: int) -> int:
    """Row splits of the weight gradient over ``tiles`` output tiles (see _DW_TARGET_PROGRAMS)."""
    return max(1, min(cdiv(num_rows, _DW_MIN_ROWS_PER_SPLIT), cdiv(_DW_TARGET_PROGRAMS, tiles)))


def _check_grad_out(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, num_prefix: int) -> int:
    embed_dim, _, patch_h, patch_w = weight.shape
    num_patches = (x.shape[2] // patch_h) * (x.shape[3] // patch_w)
    expected = (x.shape[0], num_prefix + num_patches, embed_dim)
    if tuple(grad_out.shape) != expected or grad_out.dtype != weight.dtype:
        raise ValueError(
            f"grad_out must be {weight.dtype} {list(expected)}, got {grad_out.dtype} {list(grad_out.shape)}."
        )
    return num_patches


def patch_embed_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    num_prefix: int,
    needs_x_grad: bool,
    needs_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the patch-embedding backward's kernels (the bias and token gradients: :func:`patch_embed_token_grads`).

    ``grad_out`` ``[B, num_prefix + N, D]`` in ``weight``'s dtype (any strides); ``x``, ``weight``, ``mean``, ``std``
    as in :func:`patch_embed_fwd`. Returns ``(d_x, d_weight)``: ``d_x`` like ``x`` (empty unless ``needs_x_grad``;
    never for uint8), ``d_weight`` like ``weight`` (empty unless ``needs_weight_grad``), accumulated in fp32 and
    rounded once. Only kernel launches and allocations: the native eager path replays it.
    """
    num_patches = _check_grad_out(grad_out, x, weight, num_prefix)
    if needs_x_grad and not x.is_floating_point():
        raise ValueError(f"no image gradient exists for a {x.dtype} image.")
    embed_dim, channels, patch_h, patch_w = weight.shape
    patch_dim = channels * patch_h * patch_w
    grid_w = x.shape[3] // patch_w
    num_rows = x.shape[0] * num_patches
    stats = _scale_shift(x, mean, std)
    scale, shift = stats if stats is not None else (weight, weight)  # unused pointers when NORMALIZE is off

    d_weight = grad_out.new_empty(0)
    if needs_weight_grad:
        big = cdiv(embed_dim, _BIG_TILE) * cdiv(patch_dim, _BIG_TILE)
        block, dw_warps = _tile(embed_dim, patch_dim, _dw_splits(num_rows, big), x.device)
        tiles_d, tiles_k = cdiv(embed_dim, block), cdiv(patch_dim, block)
        splits = _dw_splits(num_rows, tiles_d * tiles_k)
        rows_per_split = cdiv(cdiv(max(num_rows, 1), splits), _STEP) * _STEP
        splits = cdiv(max(num_rows, 1), rows_per_split)
        if num_rows == 0:
            d_weight = torch.zeros_like(weight)
        else:
            d_weight = torch.empty(embed_dim, patch_dim, device=x.device, dtype=weight.dtype)
            split = splits > 1
            # fp32 partial tiles and one arrival counter per d_weight tile, only when the rows are split (else
            # d_weight stands in for both, never read)
            padded = cdiv(patch_dim, 16) * 16
            partials = arrivals = d_weight
            if split:
                partials = torch.empty(splits, embed_dim, padded, device=x.device, dtype=torch.float32)
                arrivals = torch.zeros(tiles_d * tiles_k, device=x.device, dtype=torch.int32)
            launch(
                _patch_embed_bwd_dw_kernel,
                (tiles_d, tiles_k, splits),
                grad_out,
                x,
                scale,
                shift,
                d_weight,
                partials,
                arrivals,
                num_rows,
                num_patches,
                embed_dim,
                patch_dim,
                grid_w,
                rows_per_split,
                splits,
                *grad_out.stride(),
                *x.stride(),
                embed_dim * padded,
                padded,
                PATCH_H=patch_h,
                PATCH_W=patch_w,
                NUM_PREFIX=num_prefix,
                NORMALIZE=stats is not None,
                SPLIT=split,
                **_dot_flags(weight.dtype),
                BLOCK_D=block,
                BLOCK_K=block,
                BLOCK_M=_STEP,
                REDUCE_D=_DW_REDUCE_D,
                num_warps=dw_warps,
                num_stages=_NUM_STAGES,
            )
            d_weight = d_weight.reshape(weight.shape)

    d_x = grad_out.new_empty(0)
    if needs_x_grad:
        d_x = torch.empty_like(x)
        weight_2d = weight.reshape(embed_dim, patch_dim)
        dx_block, dx_warps = _tile(num_rows, patch_dim, 1, x.device)
        if num_rows > 0:
            launch(
                _patch_embed_bwd_dx_kernel,
                (cdiv(num_rows, dx_block) * cdiv(patch_dim, dx_block),),
                grad_out,
                weight_2d,
                scale,
                d_x,
                num_rows,
                num_patches,
                embed_dim,
                patch_dim,
                grid_w,
                *grad_out.stride(),
                *weight_2d.stride(),
                *d_x.stride(),
                PATCH_H=patch_h,
                PATCH_W=patch_w,
                NUM_PREFIX=num_prefix,
                NORMALIZE=stats is not None,
                **_dot_flags(weight.dtype),
                BLOCK_M=dx_block,
                BLOCK_K=dx_block,
                BLOCK_D=_STEP,
                num_warps=dx_warps,
                num_stages=_NUM_STAGES,
            )
    return d_x, d_weight


def patch_embed_token_grads(grad_out: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_bias, d_tokens)`` of the patch embedding, in ``grad_out``'s dtype: ``d_bias`` ``[D]`` (the sum over the
    patch rows), ``d_tokens`` ``[num_prefix + N, D]`` (the sum over the batch: the class-token and position-embedding
    gradients are slices of it), accumulated in fp32 (or wider) and rounded once.

    One memory-bound reduction of ``grad_out`` over the batch: torch's reads grad_out once and is deterministic, so a
    kernel of our own would gain nothing here. It runs in the op's autograd backward, outside the kernels' op.
    """
    token_sums = grad_out.sum(0, dtype=torch.promote_types(grad_out.dtype, torch.float32))
    return token_sums[num_prefix:].sum(0).to(grad_out.dtype), token_sums.to(grad_out.dtype)


def _patch_embed_bwd_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    num_prefix: int,
    needs_x_grad: bool,
    needs_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`patch_embed_bwd` in plain PyTorch (im2col by reshape, two matmuls), for devices the kernels miss."""
    num_patches = _check_grad_out(grad_out, x, weight, num_prefix)
    embed_dim, channels, patch_h, patch_w = weight.shape
    batch, _, height, width = x.shape
    grid_h, grid_w = height // patch_h, width // patch_w
    d_patch = grad_out[:, num_prefix:].reshape(batch * num_patches, embed_dim)
    d_weight = grad_out.new_empty(0)
    if needs_weight_grad:
        image = _normalize_ref(x, weight.dtype, mean, std)
        patches = image.reshape(batch, channels, grid_h, patch_h, grid_w, patch_w).permute(0, 2, 4, 1, 3, 5)
        d_weight = (d_patch.t() @ patches.reshape(batch * num_patches, -1)).reshape(weight.shape)
    d_x = grad_out.new_empty(0)
    if needs_x_grad:
        d_patches = (d_patch @ weight.reshape(embed_dim, -1)).reshape(batch, grid_h, grid_w, channels, patch_h, patch_w)
        d_x = d_patches.permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
        if std is not None:
            compute = torch.promote_types(d_x.dtype, torch.float32)
            d_x = (d_x.to(compute) / std.to(device=x.device, dtype=compute).reshape(1, -1, 1, 1)).to(x.dtype)
    return d_x, d_weight


def _kernel_covers(weight: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    return kernel_can_run(weight, *tensors) and weight.dtype in KERNEL_DTYPES


@triton_op("vitfast::patch_embed_fwd")
def _patch_embed_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
) -> torch.Tensor:
    if not _kernel_covers(weight, x, bias, pos_embed, cls_token, mean, std):
        return patch_embed_tokens_ref(x, weight, bias, pos_embed, cls_token, mean, std)
    return patch_embed_fwd(x, weight, bias, pos_embed, cls_token, mean, std)


@triton_op("vitfast::patch_embed_bwd")
def _patch_embed_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    num_prefix: int,
    needs_x_grad: bool,
    needs_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (grad_out, x, weight, mean, std, num_prefix, needs_x_grad, needs_weight_grad)
    if not _kernel_covers(weight, grad_out, x, mean, std):
        return _patch_embed_bwd_reference(*args)
    return patch_embed_bwd(*args)


def _patch_embed_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, pos_embed, cls_token, mean, std = inputs
    ctx.save_for_backward(x, weight, mean, std)
    ctx.has_bias = bias is not None
    ctx.num_prefix = 0 if cls_token is None else 1
    ctx.pos_len = 0 if pos_embed is None else pos_embed.shape[1]


def _patch_embed_backward(ctx, grad_out: torch.Tensor):
    x, weight, mean, std = ctx.saved_tensors
    needs_x_grad, needs_weight_grad = ctx.needs_input_grad[:2]
    d_x = d_weight = None
    if needs_x_grad or needs_weight_grad:
        d_x, d_weight = _patch_embed_bwd_op(
            grad_out, x, weight, mean, std, ctx.num_prefix, needs_x_grad, needs_weight_grad
        )
    d_bias, d_tokens = patch_embed_token_grads(grad_out, ctx.num_prefix)
    d_pos = d_tokens[d_tokens.shape[0] - ctx.pos_len :].unsqueeze(0) if ctx.pos_len else None
    d_cls = d_tokens[:1].unsqueeze(0) if ctx.num_prefix else None
    return (
        d_x if needs_x_grad else None,
        d_weight if needs_weight_grad else None,
        d_bias if ctx.has_bias else None,
        d_pos,
        d_cls,
        None,  # mean and std are constants of the preprocessing, never trained
        None,
    )


_patch_embed_fwd_op.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup_context)


def _covers(x, weight, bias, pos_embed, cls_token, mean, std) -> bool:
    """Whether the kernel takes a call without mean / std (the wrapper's checks, for the native entry point)."""
    _check_tokens_inputs(x, weight, bias, pos_embed, cls_token, mean, std)
    return (
        mean is None
        and std is None
        and kernel_can_run(x, weight, bias, pos_embed, cls_token)
        and (weight.dtype in KERNEL_DTYPES)
    )


def _native_state() -> tuple | None:
    return native_state(_DW_MIN_ROWS_PER_SPLIT)  # what the launch plans read besides the device (tests set it)


def register_ext(cpu: bool = INTERPRETER) -> None:
    """The native eager entry points of the ops here (csrc/eager.cpp; :func:`~vitfast.ops._triton.register_native`)."""
    register_native(_patch_embed_fwd_op, _native_state, cpu, covers=_covers)
    register_native(_patch_embed_bwd_op, _native_state, cpu)


register_ext()


register_impl("patch_embed", "reference", patch_embed_ref)
register_impl("patch_embed_tokens", "reference", patch_embed_tokens_ref)


def _patch_embed_tokens_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    mean: ChannelStats = None,
    std: ChannelStats = None,
) -> torch.Tensor:
    """The fused kernel where it covers the call, else the reference (logged once per reason)."""
    if mean is None and std is None:
        result = _patch_embed_fwd_op.native_call(x, weight, bias, pos_embed, cls_token, None, None)  # covers: _covers
        if result is not NotImplemented:
            return result
    _check_tokens_inputs(x, weight, bias, pos_embed, cls_token, mean, std)
    stats = [s for s in (mean, std) if isinstance(s, torch.Tensor)]
    if not kernel_can_run(x, weight, bias, pos_embed, cls_token):
        reason = "tensors not all on a CUDA GPU (or on the CPU under the Triton interpreter)"
    elif weight.dtype not in KERNEL_DTYPES:
        reason = f"{weight.dtype} weights (the kernel takes fp16/bf16/fp32)"
    elif any(s.requires_grad for s in stats):
        reason = "mean/std that require grad (the kernel treats them as constants)"
    else:
        mean_t = _channel_stats(mean, torch.float32, x.device)
        std_t = _channel_stats(std, torch.float32, x.device)
        return _patch_embed_fwd_op(x, weight, bias, pos_embed, cls_token, mean_t, std_t)
    log_fallback("patch_embed_tokens", reason)
    return patch_embed_tokens_ref(x, weight, bias, pos_embed, cls_token, mean, std)


if HAS_TRITON:
    register_impl("patch_embed_tokens", "triton", _patch_embed_tokens_triton)


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Patch embedding through the current backend."""
    return dispatch("patch_embed", x.device)(x, weight, bias)


def patch_embed_tokens(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    mean: ChannelStats = None,
    std: ChannelStats = None,
) -> torch.Tensor:
    """Image ``[B, C, H, W]`` -> ViT input tokens ``[B, 1 + N, D]`` (``[B, N, D]`` without ``cls_token``).

    ``x``: float image in ``weight``'s dtype, or uint8 (then ``mean``/``std`` are required, 0-1 scale like timm's
    ``pretrained_cfg``, and normalization ``(x / 255 - mean) / std`` happens on load); ``weight`` ``[D, C, ph, pw]``
    (conv kernel = stride); ``bias`` ``[D]`` or None; ``pos_embed`` ``[1, 1 + N, D]`` (class position included),
    ``[1, N, D]`` (patches only) or None; ``cls_token`` ``[1, 1, D]`` or None. Output in ``weight``'s dtype.
    Gradients flow to ``weight``, ``bias``, ``pos_embed``, ``cls_token`` and a float ``x``; not to ``mean``/``std``.
    """
    return dispatch("patch_embed_tokens", x.device)(x, weight, bias, pos_embed, cls_token, mean, std)
