"""Feed-forward blocks: GELU / QuickGELU MLP and the two SwiGLU weight layouts of EVA-02.

Parameter names follow timm (``fc1``/``fc2``; ``fc1_g``/``fc1_x``; ``norm`` for the EVA-02 sub-LN) so that
checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitfast import ops
from vitfast.layers.norm import LayerNorm

__all__ = ["ACTIVATIONS", "Mlp", "SwiGLU", "SwiGLUPacked"]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` with exact GELU or QuickGELU."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}.")
        self.act_name = act
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(ACTIVATIONS[self.act_name](self.fc1(x)))
        return self.drop(self.fc2(x))

    def extra_repr(self) -> str:
        return f"act={self.act_name}"


class SwiGLUPacked(nn.Module):
    """EVA-02 Ti/S SwiGLU: one ``fc1`` producing ``[gate | up]``, then ``fc2(silu(gate) * up)``."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(ops.swiglu_packed(self.fc1(x)))
        return self.drop(self.fc2(x))


class SwiGLU(nn.Module):
    """EVA-02 B/L SwiGLU: ``fc2(norm(silu(fc1_g(x)) * fc1_x(x)))`` with an optional sub-LN over the hidden width."""

    def __init__(self, dim: int, hidden_dim: int, sub_norm: bool = True, eps: float = 1e-6, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden_dim)
        self.fc1_x = nn.Linear(dim, hidden_dim)
        self.norm = LayerNorm(hidden_dim, eps=eps) if sub_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1_g(x), self.fc1_x(x)
        # The sub-LN fuses with the gating unless an active dropout sits between them.
        if isinstance(self.norm, nn.LayerNorm) and not (self.training and self.drop.p > 0):
            x = ops.swiglu_layer_norm(gate, up, self.norm.weight, self.norm.bias, self.norm.eps)
        else:
            x = self.norm(self.drop(ops.swiglu(gate, up)))
        return self.drop(self.fc2(x))
