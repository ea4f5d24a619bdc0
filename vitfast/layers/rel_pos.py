"""BEiT relative position bias: the index that maps token pairs to table rows, and table resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["num_relative_positions", "relative_position_index", "resize_rel_pos_bias_table"]

NUM_EXTRA = 3  # table rows for (cls -> patch), (patch -> cls), (cls -> cls)


def num_relative_positions(window: tuple[int, int]) -> int:
    return (2 * window[0] - 1) * (2 * window[1] - 1) + NUM_EXTRA


def relative_position_index(window: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Index ``[N + 1, N + 1]`` (int64) into a ``[num_relative_positions(window), H]`` table, cls token first.

    For patches ``a = (ra, ca)`` and ``b = (rb, cb)`` of a ``Wh x Ww`` window the row is
    ``(ra - rb + Wh - 1) * (2 Ww - 1) + (ca - cb + Ww - 1)``; the last three rows hold cls -> patch, patch -> cls and
    cls -> cls, in that order.
    """
    height, width = window
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    d_row = rows[:, None] - rows[None, :] + height - 1
    d_col = cols[:, None] - cols[None, :] + width - 1
    num_rel = num_relative_positions(window)
    index = torch.empty(height * width + 1, height * width + 1, dtype=torch.long, device=device)
    index[1:, 1:] = d_row * (2 * width - 1) + d_col
    index[0, :] = num_rel - 3
    index[:, 0] = num_rel - 2
    index[0, 0] = num_rel - 1
    return index


def resize_rel_pos_bias_table(
    table: torch.Tensor, old_window: tuple[int, int], new_window: tuple[int, int]
) -> torch.Tensor:
    """Resize a ``[num_rel, H]`` table from ``old_window`` to ``new_window`` (bicubic over the relative-offset grid).

    The three cls entries are kept. Differentiable, so it also serves a training forward at a new resolution.
    """
    if tuple(old_window) == tuple(new_window):
        return table
    expected = num_relative_positions(old_window)
    if table.shape[0] != expected:
        raise ValueError(
            f"relative position table has {table.shape[0]} rows; a {old_window[0]}x{old_window[1]} window needs "
            f"{expected}."
        )
    num_heads = table.shape[1]
    grid, extra = table[:-NUM_EXTRA], table[-NUM_EXTRA:]
    old_h, old_w = 2 * old_window[0] - 1, 2 * old_window[1] - 1
    new_h, new_w = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    grid = grid.float().T.reshape(1, num_heads, old_h, old_w)
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
    grid = grid.reshape(num_heads, new_h * new_w).T.to(table.dtype)
    return torch.cat([grid, extra], dim=0)
