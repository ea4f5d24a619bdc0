"""2D rotary position embedding (RoPE) as EVA-02 uses it.

Layout (EVA-02 / timm ``RotaryEmbeddingCat`` with interleaved pairs): for head dim ``D`` there are ``D // 4``
frequencies ``f_k = temperature ** (-k / (D // 4))``. A patch at grid row ``i``, column ``j`` of an ``H x W`` grid
gets the positions ``t_h = i / H * ref_h`` and ``t_w = j / W * ref_w`` (the reference grid keeps the pretraining
scale at any resolution), the angle vector ``[t_h * f | t_w * f]`` of length ``D // 2``, and each angle repeated
twice so that channel pair ``(2m, 2m + 1)`` rotates by angle ``m``:

    out[2m]     = x[2m] * cos - x[2m + 1] * sin
    out[2m + 1] = x[2m + 1] * cos + x[2m] * sin

The rotation is computed in fp32 and rounded to the input dtype once. Prefix (class) tokens are not rotated.
"""

from __future__ import annotations

import torch

from vitfast.backend import dispatch, register_impl

__all__ = ["rope_2d", "rope_2d_ref", "rope_2d_table"]


def rope_2d_table(
    grid_size: tuple[int, int],
    head_dim: int,
    ref_grid_size: tuple[int, int] = (16, 16),
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` tables, each fp32 ``[H * W, head_dim]`` with tokens in row-major grid order."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}.")
    num_freqs = head_dim // 4
    exponents = torch.arange(num_freqs, device=device, dtype=torch.float32) / num_freqs
    freqs = 1.0 / (temperature**exponents)
    height, width = grid_size
    t_h = torch.arange(height, device=device, dtype=torch.float32) / height * ref_grid_size[0]
    t_w = torch.arange(width, device=device, dtype=torch.float32) / width * ref_grid_size[1]
    angles_h = (t_h[:, None] * freqs).unsqueeze(1).expand(height, width, num_freqs)
    angles_w = (t_w[:, None] * freqs).unsqueeze(0).expand(height, width, num_freqs)
    angles = torch.cat([angles_h, angles_w], dim=-1).reshape(height * width, 2 * num_freqs)
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def rope_2d_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Rotate ``x`` ``[..., N, D]``; the tokens after the prefix use ``cos``/``sin`` ``[N - num_prefix_tokens, D]``."""
    prefix, tokens = x[..., :num_prefix_tokens, :], x[..., num_prefix_tokens:, :]
    tokens32 = tokens.float()
    rotated = torch.stack([-tokens32[..., 1::2], tokens32[..., 0::2]], dim=-1).reshape(tokens32.shape)
    out = (tokens32 * cos + rotated * sin).to(x.dtype)
    return torch.cat([prefix, out], dim=-2) if num_prefix_tokens else out


register_impl("rope_2d", "reference", rope_2d_ref)


def rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Apply 2D RoPE through the current backend (see :func:`rope_2d_ref`)."""
    return dispatch("rope_2d", x.device)(x, cos, sin, num_prefix_tokens)
