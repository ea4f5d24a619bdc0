"""SwiGLU gating, ``silu(gate) * up``, in the two weight layouts EVA-02 checkpoints use.

- split: separate ``gate`` and ``up`` tensors (EVA-02 B/L: ``fc1_g`` and ``fc1_x``);
- packed: one tensor ``[..., 2 * hidden]`` whose first half is the gate (EVA-02 Ti/S: ``fc1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitfast.backend import dispatch, register_impl

__all__ = ["swiglu", "swiglu_packed", "swiglu_packed_ref", "swiglu_ref"]


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for same-shape tensors."""
    return F.silu(gate) * up


def swiglu_packed_ref(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :h]) * x[..., h:]`` for ``x`` of width ``2 * h``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


register_impl("swiglu", "reference", swiglu_ref)
register_impl("swiglu_packed", "reference", swiglu_packed_ref)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Split-form SwiGLU through the current backend."""
    return dispatch("swiglu", gate.device)(gate, up)


def swiglu_packed(x: torch.Tensor) -> torch.Tensor:
    """Packed-form SwiGLU through the current backend."""
    if x.shape[-1] % 2:
        raise ValueError(f"packed SwiGLU needs an even last dimension, got {x.shape[-1]}.")
    return dispatch("swiglu_packed", x.device)(x)
