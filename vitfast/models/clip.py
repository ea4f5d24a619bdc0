"""CLIP image towers (Radford et al., 2021): ViT-B/32, B/16, L/14 and L/14@336, with exact GELU (timm
``vit_*_clip_*``) or QuickGELU ``x * sigmoid(1.702 x)`` (``vit_*_clip_quickgelu_*``, what OpenAI's weights were
trained with).

Differences from the plain ViT: a LayerNorm (``norm_pre``, CLIP's ``ln_pre``) after the position embedding, a
bias-free patch conv, LayerNorm eps 1e-5, and a head that is the image projection (512 or 768 wide, zero bias).
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

_SIZES = {
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def _clip(name: str, size: str, patch: int, img: int, act: str, pretrained: bool, kwargs: dict[str, Any]):
    arch = dict(_SIZES[size], patch_size=patch, img_size=img, pre_norm=True, norm_eps=1e-5, mlp=act)
    return build_model(name, pretrained, arch, kwargs)


@register_model(
    "clip",
    weights=[
        timm_weights(
            "vit_base_patch32_clip_224", "laion2b_ft_in12k_in1k", 1000, 224, 0.9, "clip", license="apache-2.0"
        ),
        timm_weights("vit_base_patch32_clip_224", "laion2b_ft_in1k", 1000, 224, 0.9, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch32_clip_224", "openai_ft_in1k", 1000, 224, 0.9, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch32_clip_224", "laion2b", 512, 224, 0.9, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch32_clip_224", "laion400m_e32", 512, 224, 0.9, "clip", license="mit"),
        timm_weights("vit_base_patch32_clip_224", "datacompxl", 512, 224, 1.0, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch32_clip_224", "metaclip_2pt5b", 512, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_base_patch32_clip_224", "metaclip_400m", 512, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_base_patch32_clip_224", "openai", 512, 224, 0.9, "clip", license="apache-2.0"),
    ],
    timm="vit_base_patch32_clip_224",
)
def vit_base_patch32_clip_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CLIP ViT-B/32 image tower at 224x224, exact GELU."""
    return _clip("vit_base_patch32_clip_224", "base", 32, 224, "gelu", pretrained, kwargs)


@register_model(
    "clip",
    weights=[
        timm_weights(
            "vit_base_patch16_clip_224", "laion2b_ft_in12k_in1k", 1000, 224, 0.95, "clip", license="apache-2.0"
        ),
        timm_weights(
            "vit_base_patch16_clip_224", "openai_ft_in12k_in1k", 1000, 224, 0.95, "clip", license="apache-2.0"
        ),
        timm_weights("vit_base_patch16_clip_224", "laion2b_ft_in1k", 1000, 224, 1.0, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch16_clip_224", "openai_ft_in1k", 1000, 224, 0.9, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch16_clip_224", "laion2b_ft_in12k", 11821, 224, 0.9, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch16_clip_224", "openai_ft_in12k", 11821, 224, 0.9, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch16_clip_224", "laion2b", 512, 224, 1.0, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch16_clip_224", "laion400m_e32", 512, 224, 1.0, "clip", license="mit"),
        timm_weights("vit_base_patch16_clip_224", "datacompxl", 512, 224, 1.0, "clip", license="apache-2.0"),
        timm_weights("vit_base_patch16_clip_224", "dfn2b", 512, 224, 1.0, "clip", license="apple-ascl"),
        timm_weights("vit_base_patch16_clip_224", "metaclip_2pt5b", 512, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_base_patch16_clip_224", "metaclip_400m", 512, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_base_patch16_clip_224", "openai", 512, 224, 0.9, "clip", license="apache-2.0"),
    ],
    timm="vit_base_patch16_clip_224",
)
def vit_base_patch16_clip_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CLIP ViT-B/16 image tower at 224x224, exact GELU."""
    return _clip("vit_base_patch16_clip_224", "base", 16, 224, "gelu", pretrained, kwargs)


@register_model(
    "clip",
    weights=[
        timm_weights(
            "vit_large_patch14_clip_224", "laion2b_ft_in12k_in1k", 1000, 224, 1.0, "inception", license="apache-2.0"
        ),
        timm_weights(
            "vit_large_patch14_clip_224", "openai_ft_in12k_in1k", 1000, 224, 1.0, "clip", license="apache-2.0"
        ),
        timm_weights(
            "vit_large_patch14_clip_224", "laion2b_ft_in1k", 1000, 224, 1.0, "inception", license="apache-2.0"
        ),
        timm_weights("vit_large_patch14_clip_224", "openai_ft_in1k", 1000, 224, 1.0, "clip", license="apache-2.0"),
        timm_weights(
            "vit_large_patch14_clip_224", "laion2b_ft_in12k", 11821, 224, 1.0, "inception", license="apache-2.0"
        ),
        timm_weights("vit_large_patch14_clip_224", "openai_ft_in12k", 11821, 224, 1.0, "clip", license="apache-2.0"),
        timm_weights("vit_large_patch14_clip_224", "laion2b", 768, 224, 1.0, "inception", license="apache-2.0"),
        timm_weights("vit_large_patch14_clip_224", "laion400m_e32", 768, 224, 1.0, "clip", license="mit"),
        timm_weights("vit_large_patch14_clip_224", "datacompxl", 768, 224, 1.0, "clip", license="apache-2.0"),
        timm_weights("vit_large_patch14_clip_224", "dfn2b_s39b", 768, 224, 1.0, "clip", license="apple-ascl"),
        timm_weights("vit_large_patch14_clip_224", "dfn2b", 768, 224, 1.0, "clip", license="apple-ascl"),
        timm_weights("vit_large_patch14_clip_224", "metaclip_2pt5b", 768, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_large_patch14_clip_224", "metaclip_400m", 768, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_large_patch14_clip_224", "openai", 768, 224, 1.0, "clip", license="apache-2.0"),
        timm_weights("vit_large_patch14_clip_224", "apple_mclip2_dfndr2b", 768, 224, 1.0, "clip", license="apple-amlr"),
    ],
    timm="vit_large_patch14_clip_224",
)
def vit_large_patch14_clip_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CLIP ViT-L/14 image tower at 224x224, exact GELU."""
    return _clip("vit_large_patch14_clip_224", "large", 14, 224, "gelu", pretrained, kwargs)


@register_model(
    "clip",
    weights=[
        timm_weights(
            "vit_large_patch14_clip_336",
            "laion2b_ft_in12k_in1k",
            1000,
            336,
            1.0,
            "inception",
            crop_mode="squash",
            license="apache-2.0",
        ),
        timm_weights(
            "vit_large_patch14_clip_336",
            "openai_ft_in12k_in1k",
            1000,
            336,
            1.0,
            "clip",
            crop_mode="squash",
            license="apache-2.0",
        ),
        timm_weights(
            "vit_large_patch14_clip_336",
            "laion2b_ft_in1k",
            1000,
            336,
            1.0,
            "inception",
            crop_mode="squash",
            license="apache-2.0",
        ),
        timm_weights("vit_large_patch14_clip_336", "openai", 768, 336, 1.0, "clip", license="apache-2.0"),
    ],
    timm="vit_large_patch14_clip_336",
)
def vit_large_patch14_clip_336(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CLIP ViT-L/14 image tower at 336x336, exact GELU."""
    return _clip("vit_large_patch14_clip_336", "large", 14, 336, "gelu", pretrained, kwargs)


@register_model(
    "clip",
    weights=[
        timm_weights("vit_base_patch32_clip_224", "laion400m_e32", 512, 224, 0.9, "clip", license="mit"),
        timm_weights("vit_base_patch32_clip_224", "metaclip_2pt5b", 512, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_base_patch32_clip_224", "metaclip_400m", 512, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_base_patch32_clip_224", "openai", 512, 224, 0.9, "clip", license="apache-2.0"),
    ],
    timm="vit_base_patch32_clip_quickgelu_224",
)
def vit_base_patch32_clip_quickgelu_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CLIP ViT-B/32 image tower at 224x224, QuickGELU."""
    return _clip("vit_base_patch32_clip_quickgelu_224", "base", 32, 224, "quick_gelu", pretrained, kwargs)


@register_model(
    "clip",
    weights=[
        timm_weights("vit_base_patch16_clip_224", "metaclip_2pt5b", 512, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_base_patch16_clip_224", "metaclip_400m", 512, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_base_patch16_clip_224", "openai", 512, 224, 0.9, "clip", license="apache-2.0"),
    ],
    timm="vit_base_patch16_clip_quickgelu_224",
)
def vit_base_patch16_clip_quickgelu_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CLIP ViT-B/16 image tower at 224x224, QuickGELU."""
    return _clip("vit_base_patch16_clip_quickgelu_224", "base", 16, 224, "quick_gelu", pretrained, kwargs)


@register_model(
    "clip",
    weights=[
        timm_weights("vit_large_patch14_clip_224", "dfn2b", 768, 224, 1.0, "clip", license="apple-ascl"),
        timm_weights("vit_large_patch14_clip_224", "metaclip_2pt5b", 768, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_large_patch14_clip_224", "metaclip_400m", 768, 224, 1.0, "clip", license="cc-by-nc-4.0"),
        timm_weights("vit_large_patch14_clip_224", "openai", 768, 224, 1.0, "clip", license="apache-2.0"),
    ],
    timm="vit_large_patch14_clip_quickgelu_224",
)
def vit_large_patch14_clip_quickgelu_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CLIP ViT-L/14 image tower at 224x224, QuickGELU."""
    return _clip("vit_large_patch14_clip_quickgelu_224", "large", 14, 224, "quick_gelu", pretrained, kwargs)


@register_model(
    "clip",
    weights=[
        timm_weights("vit_large_patch14_clip_336", "openai", 768, 336, 1.0, "clip", license="apache-2.0"),
    ],
    timm="vit_large_patch14_clip_quickgelu_336",
)
def vit_large_patch14_clip_quickgelu_336(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CLIP ViT-L/14 image tower at 336x336, QuickGELU."""
    return _clip("vit_large_patch14_clip_quickgelu_336", "large", 14, 336, "quick_gelu", pretrained, kwargs)


for _seed_name, _target, _img in (
    ("CLIP_vit_base_patch32_224", "vit_base_patch32_clip_quickgelu_224", 224),
    ("CLIP_vit_base_patch16_224", "vit_base_patch16_clip_quickgelu_224", 224),
    ("CLIP_vit_large_patch14_224", "vit_large_patch14_clip_quickgelu_224", 224),
    ("CLIP_vit_large_patch14_336", "vit_large_patch14_clip_quickgelu_336", 336),
):
    register_alias(
        _seed_name,
        _target,
        weights=paddle_foundation_weights(_seed_name, img_size=_img, crop_pct=1.0, mean_std="clip"),
        num_classes=0,
        note="PaddleClas foundation model: class-token embedding after the final norm",
    )
register_alias("clip_vit_base", "vit_base_patch16_clip_quickgelu_224", weights="openai", short=True)
register_alias("clip_vit_large", "vit_large_patch14_clip_quickgelu_224", weights="openai", short=True)
register_alias("clip_vit_large_336", "vit_large_patch14_clip_quickgelu_336", weights="openai", short=True)
