"""Multi-head self-attention for ViTs, with optional fused 2D RoPE and BEiT relative position bias.

Contract shared by every implementation of the ``attention`` op:

- ``q``, ``k``, ``v``: ``[B, H, N, D]``, same dtype; non-causal; softmax in fp32 or better;
- ``scale``: multiplies ``q @ k^T`` (default ``D ** -0.5``);
- ``rope``: optional ``(cos, sin)`` fp32 ``[N - num_prefix_tokens, D]`` tables (:mod:`vitfast.ops.rope` layout),
  applied to ``q`` and ``k`` for tokens ``num_prefix_tokens:``;
- ``rel_pos_bias_table`` ``[num_relative_positions, H]`` with ``rel_pos_index`` ``[N, N]`` (int64): the additive bias
  ``table[index[i, j], h]`` of BEiT, gathered per head;
- ``dropout_p``: attention dropout, applied only when non-zero (fused kernels support ``0.0`` only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitfast.backend import dispatch, register_impl
from vitfast.ops.rope import rope_2d_ref

__all__ = ["attention", "attention_ref", "gather_rel_pos_bias"]


def gather_rel_pos_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Materialize the BEiT bias ``[H, N, N]`` from ``table`` ``[num_rel, H]`` and ``index`` ``[N, N]``."""
    num_tokens = index.shape[0]
    # contiguous: SDPA's efficient kernels take a dense mask; a strided one sends it to a much slower path
    return table[index.reshape(-1)].reshape(num_tokens, num_tokens, -1).permute(2, 0, 1).contiguous()


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_prefix_tokens: int = 0,
    rel_pos_bias_table: torch.Tensor | None = None,
    rel_pos_index: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Plain-PyTorch attention (RoPE as elementwise ops, bias materialized, then SDPA); returns ``[B, H, N, D]``."""
    if rope is not None:
        cos, sin = rope
        q = rope_2d_ref(q, cos, sin, num_prefix_tokens)
        k = rope_2d_ref(k, cos, sin, num_prefix_tokens)
    bias = None
    if rel_pos_bias_table is not None:
        bias = gather_rel_pos_bias(rel_pos_bias_table, rel_pos_index).unsqueeze(0).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


register_impl("attention", "reference", attention_ref)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_prefix_tokens: int = 0,
    rel_pos_bias_table: torch.Tensor | None = None,
    rel_pos_index: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention through the current backend; see the module docstring for the contract."""
    if (rel_pos_bias_table is None) != (rel_pos_index is None):
        raise ValueError("rel_pos_bias_table and rel_pos_index must be given together.")
    impl = dispatch("attention", q.device)
    return impl(q, k, v, scale, rope, num_prefix_tokens, rel_pos_bias_table, rel_pos_index, dropout_p)
