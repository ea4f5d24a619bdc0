"""Stochastic depth."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DropPath", "drop_path_rates"]


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Linearly increasing rates from 0 at the first block to ``max_rate`` at the last (the BEiT/timm rule)."""
    if depth <= 1:
        return [0.0] * depth
    return [max_rate * i / (depth - 1) for i in range(depth)]


class DropPath(nn.Module):
    """Drops the whole residual branch per sample with probability ``p`` during training, rescaling the rest."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}.")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
