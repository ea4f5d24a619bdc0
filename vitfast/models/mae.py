"""MAE (He et al., 2022) pretrained ViT encoders: ViT-B/16, ViT-L/16 and ViT-H/14 (head dim 80).

Plain ViT architecture without a classifier (the pretraining decoder is not part of the encoder); features are
the class token after the final norm, as timm's ``vit_*_224.mae`` models give them.
"""

from __future__ import annotations

from typing import Any

from vitfast.models._registry import (
    build_model,
    paddle_foundation_weights,
    register_alias,
    register_model,
    timm_weights,
)
from vitfast.models.vision_transformer import VisionTransformer


def _mae(name: str, arch: dict[str, Any], pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    return build_model(name, pretrained, arch, kwargs)


@register_model(
    "mae",
    weights=[timm_weights("vit_base_patch16_224", "mae", 0, 224, 0.9, "imagenet", license="cc-by-nc-4.0")],
    timm="vit_base_patch16_224",
)
def mae_vit_base_patch16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MAE-pretrained ViT-B/16 encoder."""
    return _mae("mae_vit_base_patch16", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), pretrained, kwargs)


@register_model(
    "mae",
    weights=[timm_weights("vit_large_patch16_224", "mae", 0, 224, 0.9, "imagenet", license="cc-by-nc-4.0")],
    timm="vit_large_patch16_224",
)
def mae_vit_large_patch16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MAE-pretrained ViT-L/16 encoder."""
    arch = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _mae("mae_vit_large_patch16", arch, pretrained, kwargs)


@register_model(
    "mae",
    weights=[timm_weights("vit_huge_patch14_224", "mae", 0, 224, 0.9, "imagenet", license="cc-by-nc-4.0")],
    timm="vit_huge_patch14_224",
)
def mae_vit_huge_patch14(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MAE-pretrained ViT-H/14 encoder (head dim 80)."""
    arch = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
    return _mae("mae_vit_huge_patch14", arch, pretrained, kwargs)


# PaddleClas foundation models use Paddle's default LayerNorm eps 1e-5 (timm and the MAE release use 1e-6)
for _seed_name, _target in (
    ("MAE_vit_base_patch16", "mae_vit_base_patch16"),
    ("MAE_vit_large_patch16", "mae_vit_large_patch16"),
    ("MAE_vit_huge_patch14", "mae_vit_huge_patch14"),
):
    register_alias(
        _seed_name,
        _target,
        weights=paddle_foundation_weights(_seed_name, mean_std="imagenet"),
        norm_eps=1e-5,
        note="PaddleClas foundation model (LayerNorm eps 1e-5)",
    )
register_alias("mae_base", "mae_vit_base_patch16", short=True)
register_alias("mae_large", "mae_vit_large_patch16", short=True)
register_alias("mae_huge", "mae_vit_huge_patch14", short=True)
