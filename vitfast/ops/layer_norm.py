"""LayerNorm over the last dimension.

The reference is ``F.layer_norm``, which keeps its statistics in fp32 for half-precision inputs on CUDA. Fused
kernels (and the residual-add variant) register themselves against the ``layer_norm`` op name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitfast.backend import dispatch, register_impl

__all__ = ["layer_norm", "layer_norm_ref"]


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm of ``x`` (any shape ``[..., C]``) with affine ``weight``/``bias`` of shape ``[C]``."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


register_impl("layer_norm", "reference", layer_norm_ref)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over the last dimension through the current backend."""
    return dispatch("layer_norm", x.device)(x, weight, bias, eps)
