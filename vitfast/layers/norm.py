"""Normalization layers."""

from __future__ import annotations

import torch
from torch import nn

from vitfast import ops

__all__ = ["LayerNorm"]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension that runs through ``vitfast.ops.layer_norm``.

    Same parameters and state_dict keys as ``nn.LayerNorm``; the backend is chosen at call time.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)
