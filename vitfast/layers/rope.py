"""The 2D RoPE configuration a model shares with its attention layers (stateless: tables are rebuilt per grid)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitfast.ops.rope import rope_2d_table

__all__ = ["Rope2D"]


@dataclass(frozen=True)
class Rope2D:
    """EVA-02 2D RoPE settings: head dim, reference grid (pretraining scale) and frequency temperature.

    Not an ``nn.Module``: it holds no tensors, so it never appears in a state_dict. Tables are built in fp32 for the
    grid actually seen (see :func:`vitfast.ops.rope.rope_2d_table`).
    """

    head_dim: int
    ref_grid_size: tuple[int, int] = (16, 16)
    temperature: float = 10000.0

    def table(self, grid_size: tuple[int, int], device: torch.device | str | None = None):
        return rope_2d_table(grid_size, self.head_dim, self.ref_grid_size, self.temperature, device=device)
