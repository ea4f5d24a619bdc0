"""Absolute position embeddings: fixed 2D sin-cos tables and resampling of learned tables and patch kernels."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

__all__ = ["resample_abs_pos_embed", "resample_patch_embed", "sincos_2d_pos_embed"]

logger = logging.getLogger("vitfast")


def sincos_2d_pos_embed(
    grid_size: tuple[int, int],
    dim: int,
    num_prefix_tokens: int = 1,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fixed 2D sin-cos embedding ``[1, num_prefix_tokens + H * W, dim]`` (MoCo v3 / CAE layout).

    Channels are ``[sin(r * w) | cos(r * w) | sin(c * w) | cos(c * w)]`` for grid row ``r`` and column ``c``, with
    ``w_k = temperature ** (-k / (dim / 4))``; prefix (class) tokens get zeros. For the square grids of MoCo v3 and
    CAE this equals their ``build_2d_sincos_position_embedding``.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(grid_size[0], device=device, dtype=torch.float32)
    cols = torch.arange(grid_size[1], device=device, dtype=torch.float32)
    row_pos, col_pos = torch.meshgrid(rows, cols, indexing="ij")
    row_angles = row_pos.reshape(-1, 1) * omega
    col_angles = col_pos.reshape(-1, 1) * omega
    table = torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=1)
    prefix = torch.zeros(num_prefix_tokens, dim, device=device)
    return torch.cat([prefix, table], dim=0).unsqueeze(0)


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample a learned ``[1, prefix + H * W, D]`` table to a new grid (bicubic, antialiased, in fp32).

    Prefix-token entries are kept as they are. ``old_grid`` defaults to the square grid the table implies.
    """
    num_grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(round(num_grid_tokens**0.5))
        if side * side != num_grid_tokens:
            raise ValueError(
                f"cannot infer the grid of a position embedding with {num_grid_tokens} patch entries; pass old_grid."
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid_tokens:
        raise ValueError(
            f"position embedding has {num_grid_tokens} patch entries, which is not a {old_grid[0]}x{old_grid[1]} grid."
        )
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _resize_matrix(old_size: tuple[int, int], new_size: tuple[int, int]) -> torch.Tensor:
    """``M`` ``[new_n, old_n]`` such that ``M @ x.flatten()`` is the bicubic (antialiased) resize of a patch ``x``."""
    old_n = old_size[0] * old_size[1]
    basis = torch.eye(old_n, dtype=torch.float32).reshape(old_n, 1, *old_size)
    resized = F.interpolate(basis, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    return resized.reshape(old_n, -1).T


def resample_patch_embed(weight: torch.Tensor, new_size: tuple[int, int], method: str = "bicubic") -> torch.Tensor:
    """Resize a patch-embedding kernel ``[D, C, p, p]`` to ``new_size``.

    - ``"bicubic"``: interpolate the kernel itself (how EVA-02's ``p14to16`` checkpoints were made);
    - ``"pinv"``: the FlexiViT pseudo-inverse resize (what timm uses), which keeps ``<w', resize(x)> = <w, x>``
      for every patch ``x`` when the kernel grows.
    """
    new_size = tuple(new_size)
    old_size = tuple(weight.shape[-2:])
    if old_size == new_size:
        return weight
    out_ch, in_ch = weight.shape[:2]
    flat = weight.float().reshape(out_ch * in_ch, 1, *old_size)
    if method == "bicubic":
        resized = F.interpolate(flat, size=new_size, mode="bicubic", align_corners=False)
    elif method == "pinv":
        matrix = _resize_matrix(old_size, new_size)
        resized = (torch.linalg.pinv(matrix.T) @ flat.reshape(out_ch * in_ch, -1).T).T
    else:
        raise ValueError(f"unknown patch-embedding resample method {method!r}; use 'bicubic' or 'pinv'.")
    logger.info("resampled patch embedding %s -> %s (%s)", old_size, new_size, method)
    return resized.reshape(out_ch, in_ch, *new_size).to(weight.dtype)
