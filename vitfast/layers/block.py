"""The pre-norm transformer block shared by all families."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitfast import ops
from vitfast.layers.attention import Attention
from vitfast.layers.drop import DropPath
from vitfast.layers.norm import LayerNorm

__all__ = ["Block"]


class Block(nn.Module):
    """``x + drop_path(gamma_1 * attn(norm1(x)))`` then ``x + drop_path(gamma_2 * mlp(norm2(x)))``.

    The first residual add and ``norm2`` run as one fused op (:func:`vitfast.ops.layer_norm_residual`).

    ``gamma_1``/``gamma_2`` (layer scale, timm's BEiT/EVA names) exist only when ``layer_scale_init`` is set.
    With ``grad_checkpointing`` on, the block recomputes its activations in backward, also when called directly.
    """

    def __init__(
        self,
        dim: int,
        attn: Attention,
        mlp: nn.Module,
        norm_eps: float = 1e-6,
        layer_scale_init: float | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = mlp
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.grad_checkpointing = False

    def _forward(
        self, x: torch.Tensor, grid: tuple[int, int] | None, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        branch = self.drop_path1(self.attn(self.norm1(x), grid=grid, rope=rope))
        # residual add, layer scale and norm2 in one pass; drop path scales whole samples, so it commutes with gamma
        normed, x = ops.layer_norm_residual(x, branch, self.gamma_1, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        branch = self.mlp(normed)
        if self.gamma_2 is not None:
            branch = self.gamma_2 * branch
        return x + self.drop_path2(branch)

    def forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int] | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, grid, rope, use_reentrant=False)
        return self._forward(x, grid, rope)
