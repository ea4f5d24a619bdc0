"""Image preprocessing: uint8 images ``[B, H, W, 3]`` -> the normalized model input, in one pass.

Decoders (PIL, torchvision.io, nvJPEG, DALI) hand out channels-last uint8 images; a model wants a normalized float
``[B, 3, H, W]``. In PyTorch that is several passes (permute, to float, / 255, - mean, / std, cast); the compiled
extension's ``vitfast::preprocess`` (csrc/preprocess.cpp, csrc/cuda/preprocess.cu) reads each byte once and writes
each output value once:

- ``patch_size=0``: the normalized image ``[B, 3, H, W]``, which is what every vitfast model takes::

      x = preprocess(images, mean=cfg["mean"], std=cfg["std"], dtype=torch.bfloat16)
      logits = model(x)                 # model.pretrained_cfg holds mean / std; see vitfast.transforms.for_model

- ``patch_size=p``: patch rows ``[B, N, 3 * p * p]``, row ``n`` the patch at grid row ``n // (W / p)``, column
  ``n % (W / p)`` (tokens row-major, as the patch embedding orders them), values in (channel, ky, kx) order: the
  order of a Conv2d weight ``[D, 3, p, p]`` flattened to ``[D, 3 * p * p]``, so the patch projection is one GEMM,
  ``rows @ proj.weight.flatten(1).T + proj.bias`` (:func:`patch_rows_to_tokens`).

Exactness: in fp32 the result is bit-identical to :func:`preprocess_ref`, ``(x / 255 - mean) / std`` computed in
that order in fp32 (the C++ and CUDA code do the same IEEE operations); bf16 / fp16 outputs are that value rounded
once. mean / std are per channel, in the 0-1 scale of timm's ``pretrained_cfg``.

Without the extension (or with the backend set to ``"reference"``) :func:`preprocess` runs :func:`preprocess_ref`:
same results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vitfast import _ext
from vitfast.backend import get_backend

# the other op of the compiled extension: its Python side registers when the extension is present
from vitfast.ops import layer_norm_ext as _layer_norm_ext  # noqa: F401

__all__ = ["OUTPUT_DTYPES", "patch_rows_to_tokens", "preprocess", "preprocess_ref"]

OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Stats = Sequence[float] | torch.Tensor


def _stats(name: str, values: Stats) -> list[float]:
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != 3:
        raise ValueError(f"preprocess: {name} needs one value per channel (3), got {len(values)}.")
    values = [float(v) for v in values]
    # comparisons rather than math.isfinite, which dynamo does not trace (NaN fails both)
    if not all(-math.inf < v < math.inf for v in values) or (name == "std" and min(values) <= 0):
        what = "positive and finite" if name == "std" else "finite"
        raise ValueError(f"preprocess: {name} must be {what} per channel, got {values}.")
    return values


def preprocess_ref(
    images: torch.Tensor, mean: Stats, std: Stats, patch_size: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> ``[B, 3, H, W]`` (``patch_size=0``) or ``[B, N, 3 * p * p]``, in plain PyTorch.

    ``(x / 255 - mean) / std`` in fp32, in that order, then rounded once to ``dtype``: the formula of timm's eval
    transform (ToTensor's ``/ 255``, then Normalize). The 255 is a tensor on the images' device, not a Python number:
    CUDA divides by a Python number as a multiplication by its reciprocal, which differs from the division for 126 of
    the 256 byte values.
    """
    mean_t = torch.tensor(_stats("mean", mean), dtype=torch.float32, device=images.device).view(3, 1, 1)
    std_t = torch.tensor(_stats("std", std), dtype=torch.float32, device=images.device).view(3, 1, 1)
    scale = torch.tensor(255.0, dtype=torch.float32, device=images.device)
    image = images.permute(0, 3, 1, 2).to(torch.float32)
    normalized = ((image / scale - mean_t) / std_t).to(dtype)
    if patch_size == 0:
        return normalized
    batch, channels, height, width = normalized.shape
    p = patch_size
    grid = normalized.view(batch, channels, height // p, p, width // p, p)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), channels * p * p)


def _check(images: torch.Tensor, patch_size: int, dtype: torch.dtype) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"preprocess: expected a uint8 tensor [B, H, W, 3], got {type(images).__name__}.")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"preprocess: expected uint8 images [B, H, W, 3] (bytes as decoded), got {images.dtype}; for float "
            "images that are already scaled, normalize with (x - mean) / std instead."
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = (
            " (channels first: pass images.permute(0, 2, 3, 1))"
            if images.ndim == 4 and images.shape[1] == 3
            else " (one image [H, W, 3]: pass images[None])"
            if images.ndim == 3 and images.shape[-1] == 3
            else ""
        )
        raise ValueError(
            f"preprocess: expected channels-last images [B, H, W, 3], got shape {tuple(images.shape)}{hint}."
        )
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"preprocess: dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}.")
    if not isinstance(patch_size, int) or patch_size < 0:
        raise ValueError(f"preprocess: patch_size must be an int >= 0 (0: no patches), got {patch_size!r}.")
    height, width = images.shape[1:3]
    if patch_size and (height % patch_size or width % patch_size):
        raise ValueError(
            f"preprocess: the image size {height}x{width} is not a multiple of the patch size {patch_size}; resize "
            "or crop first (vitfast.transforms.for_model does)."
        )


def _extension_covers(images: torch.Tensor) -> bool:
    if not _ext.HAS_EXT or get_backend() == "reference":
        return False
    return images.device.type == "cpu" or (images.device.type == "cuda" and _ext.HAS_EXT_CUDA)


def preprocess(
    images: torch.Tensor, mean: Stats, std: Stats, patch_size: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 images ``[B, H, W, 3]`` -> normalized ``[B, 3, H, W]``, or patch rows ``[B, N, 3 * p * p]``.

    Args:
        images: uint8, channels last, on the CPU or a GPU (non-contiguous views are copied first).
        mean, std: three values each, in the 0-1 scale (``model.pretrained_cfg["mean"]`` / ``["std"]``).
        patch_size: 0 for the image; ``p`` for patch rows (H and W multiples of ``p``).
        dtype: torch.float32, torch.bfloat16 or torch.float16.

    Runs the compiled extension when it is loaded for the images' device, else :func:`preprocess_ref` (same values).
    Raises TypeError for non-uint8 images and ValueError for a wrong layout, patch size, dtype or mean / std.
    """
    _check(images, patch_size, dtype)
    mean_values, std_values = _stats("mean", mean), _stats("std", std)
    if _extension_covers(images):
        return torch.ops.vitfast.preprocess(images, mean_values, std_values, patch_size, dtype)
    return preprocess_ref(images, mean_values, std_values, patch_size, dtype)


def patch_rows_to_tokens(rows: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None) -> torch.Tensor:
    """Patch rows ``[B, N, 3 * p * p]`` -> patch tokens ``[B, N, D]`` with a patch-embedding Conv2d's parameters.

    ``proj_weight``: ``[D, 3, p, p]`` (a ViT's ``patch_embed.proj.weight``). Equal to the convolution of the
    normalized image (``F.conv2d(image, weight, bias, stride=p).flatten(2).transpose(1, 2)``); class token and
    position embedding come after, as in the model.
    """
    if rows.shape[-1] != proj_weight[0].numel():
        raise ValueError(
            f"patch rows of {rows.shape[-1]} values do not fit a projection weight {tuple(proj_weight.shape)}."
        )
    return torch.nn.functional.linear(rows, proj_weight.flatten(1), proj_bias)


def _preprocess_fake(
    images: torch.Tensor, mean: list[float], std: list[float], patch_size: int, dtype: torch.dtype
) -> torch.Tensor:
    batch, height, width, _channels = images.shape
    if patch_size == 0:
        return images.new_empty((batch, 3, height, width), dtype=dtype)
    tokens = (height // patch_size) * (width // patch_size)
    return images.new_empty((batch, tokens, 3 * patch_size * patch_size), dtype=dtype)


_registered = False


def register_ext() -> None:
    """Register the fake (meta) implementation of ``vitfast::preprocess`` once the extension is loaded."""
    global _registered
    if _registered or not _ext.HAS_EXT:
        return
    torch.library.register_fake("vitfast::preprocess", _preprocess_fake)
    _registered = True


register_ext()
