"""BEiT relative position bias: the index that maps token pairs to table rows, and table resizing."""

from __future__ import annotations

import torch

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


def _beit_source_offsets(src: int, dst: int) -> list[float]:
    """Positions BEiT assigns to the ``src`` relative offsets of one axis when resizing to ``dst`` offsets.

    Offsets grow geometrically away from 0 with the ratio ``q`` (found by bisection in [1.01, 1.5]) for which the
    ``src // 2`` outermost source offsets span the ``dst // 2`` target ones, so the near offsets, which carry most of
    the bias, keep their unit spacing.
    """
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        ratio = (low + high) / 2.0
        span = (1.0 - ratio ** (src // 2)) / (1.0 - ratio)
        if span > dst // 2:
            high = ratio
        else:
            low = ratio
    positive, position = [], 1.0
    for step in range(src // 2):
        positive.append(position)
        position += ratio ** (step + 1)
    return [-p for p in reversed(positive)] + [0.0] + positive


def _linear_interp_matrix(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``M`` ``[len(target), len(source)]``: piecewise-linear interpolation on the sorted, uneven ``source`` points,
    constant beyond its ends."""
    right = torch.bucketize(target, source).clamp(max=len(source) - 1)
    left = (right - 1).clamp(min=0)
    span = source[right] - source[left]
    weight_right = torch.where(span > 0, (target - source[left]) / span.clamp(min=1e-12), torch.ones_like(target))
    weight_right = weight_right.clamp(0.0, 1.0)
    matrix = torch.zeros(len(target), len(source), dtype=source.dtype)
    rows = torch.arange(len(target))
    matrix.index_put_((rows, left), 1.0 - weight_right, accumulate=True)
    matrix.index_put_((rows, right), weight_right, accumulate=True)
    return matrix


def resize_rel_pos_bias_table(
    table: torch.Tensor, old_window: tuple[int, int], new_window: tuple[int, int]
) -> torch.Tensor:
    """Resize a ``[num_rel, H]`` table from ``old_window`` to ``new_window`` as BEiT (and timm) do.

    The source offsets of each axis are laid out geometrically (:func:`_beit_source_offsets`) and the table is
    linearly interpolated from them at the integer target offsets, which is timm's ``resize_rel_pos_bias_table``
    (its default, scipy-free path). Plain bicubic resampling of the offset grid gives another, wrong, bias. The three
    cls entries are kept. Differentiable (two interpolation matrices), so it also serves a training forward at a new
    resolution.
    """
    old_window, new_window = tuple(old_window), tuple(new_window)
    if old_window == new_window:
        return table
    expected = num_relative_positions(old_window)
    if table.shape[0] != expected:
        raise ValueError(
            f"relative position table has {table.shape[0]} rows; a {old_window[0]}x{old_window[1]} window needs "
            f"{expected}."
        )
    num_heads = table.shape[1]
    grid, extra = table[:-NUM_EXTRA], table[-NUM_EXTRA:]
    old_size = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    new_size = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    row_matrix, col_matrix = (
        _linear_interp_matrix(
            torch.tensor(_beit_source_offsets(src, dst), dtype=torch.float64),
            torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64),
        ).to(device=table.device, dtype=torch.float32)
        for src, dst in zip(old_size, new_size, strict=True)
    )
    grid = grid.float().T.reshape(num_heads, *old_size)
    grid = row_matrix @ grid @ col_matrix.T
    grid = grid.reshape(num_heads, new_size[0] * new_size[1]).T.to(table.dtype)
    return torch.cat([grid, extra], dim=0)
