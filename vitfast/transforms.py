"""Eval-time input transforms driven by a model's pretrained config: timm's eval transform, then one-pass normalize.

::

    transform = vitfast.transforms.for_model("eva02_base_patch14_448.mim_in22k_ft_in22k_in1k", dtype=torch.bfloat16)
    batch = transform([pil_image, other_pil_image])    # [2, 3, 448, 448] bf16, normalized
    logits = model(batch.cuda())                        # or for_model(..., device="cuda"): normalized on the GPU

The steps are timm's (``timm.data.create_transform(**resolve_data_config({}, model=model))``): resize the shorter
side to ``floor(size / crop_pct)`` with the config's interpolation (``crop_mode="squash"``: both sides), center crop
to the input size, ``/ 255``, normalize with the config's mean / std. Resize and crop use torchvision's v2
functional API (``pip install torchvision``; not a dependency of vitfast's core), which on PIL images calls PIL
itself, as timm does: for PIL inputs the result equals timm's in fp32 bit for bit. uint8 arrays / tensors are resized
by torchvision's tensor kernels (antialiased), which differ from PIL's by a few levels of 255 at some pixels. The
normalization is :func:`vitfast.ops.preprocess` (the compiled extension when present), optionally straight to patch
rows (``patches=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vitfast.ops.preprocess import preprocess

__all__ = ["EvalTransform", "data_config", "for_model"]

# timm's defaults (timm.data.constants) for configs that leave a field out
DEFAULT_CROP_PCT = 0.875
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
CROP_MODES = ("center", "squash")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _torchvision() -> tuple[Any, Any]:
    try:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional
    except ImportError as exc:
        raise ImportError(
            "vitfast.transforms resizes and crops images with torchvision, which is not installed: "
            "pip install torchvision (or pip install 'vitfast[examples]')."
        ) from exc
    return functional, InterpolationMode


def _patch_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "patch_size", None)
    if size is None:  # timm models
        size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0] if len(set(size)) == 1 else None
    return size


def data_config(name_or_model: str | nn.Module) -> dict[str, Any]:
    """The eval data config of a vitfast model name (``name``, ``name.tag``, alias) or of a vitfast / timm model.

    Keys: ``input_size`` (C, H, W), ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std`` (timm's
    ``resolve_data_config`` fields, with its defaults) and ``patch_size`` (None when not one square size).
    """
    if isinstance(name_or_model, str):
        from vitfast.models import create_model

        with torch.device("meta"):  # the architecture and config only: no memory, no weights
            model = create_model(name_or_model)
    else:
        model = name_or_model
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return {
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "crop_pct": cfg.get("crop_pct") or DEFAULT_CROP_PCT,
        "crop_mode": cfg.get("crop_mode") or "center",
        "interpolation": cfg.get("interpolation") or "bicubic",
        "mean": tuple(cfg.get("mean", DEFAULT_MEAN)),
        "std": tuple(cfg.get("std", DEFAULT_STD)),
        "patch_size": _patch_size(model),
    }


def _as_resizable(image: Any) -> Any:
    """A PIL image as RGB, or an array / tensor ``[H, W, 3]`` uint8 as a CHW uint8 tensor (torchvision's layout)."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL, without importing it
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected a PIL image or a uint8 array / tensor [H, W, 3], got {type(image).__name__}.")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 image [H, W, 3] (channels last, as decoded), got {image.dtype} of shape "
            f"{tuple(image.shape)}."
        )
    return image.permute(2, 0, 1)


def _hwc_uint8(image: Any) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image.permute(1, 2, 0)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


@dataclass(frozen=True)
class EvalTransform:
    """timm's eval transform for one data config, then :func:`vitfast.ops.preprocess`.

    Call it on a PIL image, a uint8 ``[H, W, 3]`` array or tensor, or a list of them; it returns a batch
    ``[B, 3, H, W]`` (``patch_size`` 0) or patch rows ``[B, N, 3 * p * p]``, in ``dtype``, on ``device``.
    """

    input_size: tuple[int, int]
    crop_pct: float
    crop_mode: str
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dtype: torch.dtype = torch.float32
    patch_size: int = 0
    device: torch.device | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(
                f"dtype must be a floating-point torch.dtype (the normalized pixels), got {self.dtype!r}; use "
                "torch.float32, torch.float16 or torch.bfloat16."
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}.")
        if any(not math.isfinite(s) or s <= 0 for s in self.std):
            raise ValueError(f"std must be positive and finite per channel, got {tuple(self.std)}.")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} is not supported; supported: {', '.join(CROP_MODES)}.")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not supported; supported: {', '.join(INTERPOLATIONS)}."
            )

    @property
    def scale_size(self) -> tuple[int, int]:
        """The size the image is resized to before the center crop (timm: ``floor(size / crop_pct)``)."""
        return tuple(math.floor(side / self.crop_pct) for side in self.input_size)

    def resize_crop(self, image: Any) -> torch.Tensor:
        """One image resized and center-cropped: uint8 ``[H, W, 3]``."""
        functional, modes = _torchvision()
        image = _as_resizable(image)
        mode = getattr(modes, self.interpolation.upper())
        scale_h, scale_w = self.scale_size
        if self.crop_mode == "squash":
            size = [scale_h, scale_w]
        elif scale_h == scale_w:
            size = [scale_h]  # the shorter side, the longer one in proportion
        else:  # timm's ResizeKeepRatio: the smaller of the two ratios, each side rounded
            height, width = functional.get_size(image)
            ratio = min(height / scale_h, width / scale_w)
            size = [round(height / ratio), round(width / ratio)]
        image = functional.resize(image, size, interpolation=mode, antialias=True)
        return _hwc_uint8(functional.center_crop(image, list(self.input_size)))

    def __call__(self, images: Any) -> torch.Tensor:
        batch = images if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("expected at least one image.")
        pixels = torch.stack([self.resize_crop(image) for image in batch])
        if self.device is not None:
            pixels = pixels.to(self.device, non_blocking=True)
        return preprocess(pixels, self.mean, self.std, self.patch_size, self.dtype)


def for_model(
    name_or_model: str | nn.Module,
    dtype: torch.dtype = torch.float32,
    patches: bool = False,
    device: torch.device | str | None = None,
) -> EvalTransform:
    """The eval transform for a model (a vitfast model name / alias, or a vitfast or timm model instance).

    ``patches=True`` returns patch rows ``[B, N, 3 * p * p]`` for the model's patch size instead of the image;
    ``device`` moves the uint8 batch there before normalizing (a quarter of the bytes of an fp32 batch).
    """
    cfg = data_config(name_or_model)
    patch_size = 0
    if patches:
        if cfg["patch_size"] is None:
            raise ValueError("patches=True needs a model with one square patch size.")
        patch_size = cfg["patch_size"]
    channels, height, width = cfg["input_size"]
    if channels != 3:
        raise ValueError(f"for_model handles 3-channel (RGB) models, this one takes {channels} channels.")
    return EvalTransform(
        input_size=(height, width),
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        dtype=dtype,
        patch_size=patch_size,
        device=device,
    )
