"""Patch embedding: non-overlapping ``p x p`` patches of an image projected to tokens.

Tokens come out row-major over the patch grid (token ``i * W + j`` is grid row ``i``, column ``j``), which is the
order timm's ``PatchEmbed`` (conv, flatten, transpose) produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitfast.backend import dispatch, register_impl

__all__ = ["patch_embed", "patch_embed_ref"]


def patch_embed_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[B, C, H, W]``, ``weight`` ``[D, C, p, p]`` -> tokens ``[B, (H / p) * (W / p), D]``."""
    patch = weight.shape[-2:]
    return F.conv2d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)


register_impl("patch_embed", "reference", patch_embed_ref)


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Patch embedding through the current backend."""
    return dispatch("patch_embed", x.device)(x, weight, bias)
