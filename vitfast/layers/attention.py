"""Self-attention for every vitfast family, with timm's parameter names for each projection layout.

``qkv_layout`` picks the projection parameters (and so the state_dict keys):

- ``"fused"``: ``qkv.weight`` + ``qkv.bias`` (ViT, CLIP, MAE, MoCo v3), or no bias with ``qkv_bias=False``;
- ``"fused_qv_bias"``: ``qkv.weight`` + ``q_bias`` + ``v_bias``, no key bias (BEiT v2, CAE, EVA-01, EVA-02 Ti/S);
- ``"split"``: ``q_proj`` (bias), ``k_proj`` (no bias), ``v_proj`` (bias) (EVA-02 B/L).

A key bias only adds a per-query constant to the logits, which softmax ignores, so dropping it is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from vitfast import ops
from vitfast.layers.norm import LayerNorm
from vitfast.layers.patch_embed import to_2tuple
from vitfast.layers.rel_pos import num_relative_positions, relative_position_index, resize_rel_pos_bias_table
from vitfast.layers.rope import Rope2D

__all__ = ["QKV_LAYOUTS", "Attention"]

QKV_LAYOUTS = ("fused", "fused_qv_bias", "split")


class Attention(nn.Module):
    """Multi-head self-attention over ``[B, N, C]`` tokens, the first ``num_prefix_tokens`` of which are not patches.

    Args:
        dim: token width.
        num_heads: number of heads (``dim`` must divide evenly).
        qkv_layout: projection parameters, see the module docstring.
        qkv_bias: bias on the fused projection (``"fused"`` layout only).
        qk_scale: logit scale; default ``head_dim ** -0.5`` (the legacy ViT-S uses ``dim ** -0.5``).
        inner_norm: LayerNorm on the attention output before ``proj`` (EVA-CLIP towers).
        rel_pos_window: patch grid of a per-layer BEiT relative position bias table, or ``None``.
        rope: 2D RoPE settings, or ``None``.
        num_prefix_tokens: leading tokens excluded from RoPE (the class token).
        default_grid: the patch grid assumed when :meth:`forward` is called without one.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_layout: str = "fused",
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        inner_norm: bool = False,
        norm_eps: float = 1e-6,
        rel_pos_window: tuple[int, int] | None = None,
        rope: Rope2D | None = None,
        num_prefix_tokens: int = 1,
        default_grid: tuple[int, int] = (14, 14),
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}.")
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"unknown qkv_layout {qkv_layout!r}; choose one of {QKV_LAYOUTS}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_scale = qk_scale  # None: the kernel's default head_dim ** -0.5
        self.qkv_layout = qkv_layout
        self.num_prefix_tokens = num_prefix_tokens
        self.default_grid = to_2tuple(default_grid)
        self.rope = rope
        if rope is not None and rope.head_dim != self.head_dim:
            raise ValueError(f"RoPE head dim {rope.head_dim} does not match the attention head dim {self.head_dim}.")

        if qkv_layout == "split":
            self.q_proj = nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias and qkv_layout == "fused")
            if qkv_layout == "fused_qv_bias":
                self.q_bias = nn.Parameter(torch.zeros(dim))
                self.v_bias = nn.Parameter(torch.zeros(dim))

        self.window_size = None if rel_pos_window is None else to_2tuple(rel_pos_window)
        if self.window_size is not None:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_positions(self.window_size), num_heads)
            )
            self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)
        else:
            self.relative_position_bias_table = None

        self.attn_drop = attn_drop
        self.norm = LayerNorm(dim, eps=norm_eps) if inner_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``[B, N, C]`` -> ``q, k, v`` each ``[B, heads, N, head_dim]``."""
        batch, num_tokens, _ = x.shape
        if self.qkv_layout == "split":
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            return tuple(t.reshape(batch, num_tokens, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        if self.qkv_layout == "fused_qv_bias":
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
            qkv = nn.functional.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        qkv = qkv.reshape(batch, num_tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _rel_pos_bias(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (table, index) pair for ``grid``: the stored one, or the table resized to a new grid."""
        if grid == self.window_size:
            return self.relative_position_bias_table, self.relative_position_index
        table = resize_rel_pos_bias_table(self.relative_position_bias_table, self.window_size, grid)
        return table, relative_position_index(grid, device=device)

    def forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int] | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend over ``x`` ``[B, N, C]``.

        ``grid`` is the patch grid of the tokens (default: ``default_grid``); ``rope`` the precomputed
        ``(cos, sin)`` tables for it (built here when omitted and this layer uses RoPE).
        """
        batch, num_tokens, channels = x.shape
        grid = self.default_grid if grid is None else grid
        if grid[0] * grid[1] + self.num_prefix_tokens != num_tokens:
            raise ValueError(
                f"{num_tokens} tokens do not match a {grid[0]}x{grid[1]} patch grid plus {self.num_prefix_tokens} "
                "prefix token(s); pass grid=(rows, cols) for inputs at another resolution."
            )
        q, k, v = self.project_qkv(x)
        if self.rope is not None and rope is None:
            rope = self.rope.table(grid, device=x.device)
        table, index = (None, None)
        if self.relative_position_bias_table is not None:
            table, index = self._rel_pos_bias(grid, x.device)
        out = ops.attention(
            q,
            k,
            v,
            scale=self.qk_scale,
            rope=rope if self.rope is not None else None,
            num_prefix_tokens=self.num_prefix_tokens,
            rel_pos_bias_table=table,
            rel_pos_index=index,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(self.norm(out)))
