"""Plain ViT (Dosovitskiy et al., 2021): the timm ``vit_{small,base,large}_patch{16,32}_{224,384}`` models, the seed's
legacy 48.6M-parameter ``ViT_small_patch16_224``, and mindformers' MAE-finetuned ``vit_base_p16``.

Pre-norm blocks, fused ``qkv`` with bias, exact GELU, learned position embedding with a class-token entry, final
``norm`` then class-token pooling, LayerNorm eps 1e-6.
"""

from __future__ import annotations

from typing import Any

from vitfast.models._registry import Weights, build_model, register_alias, register_model, timm_weights
from vitfast.models.vision_transformer import VisionTransformer

_SIZES = {
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def _vit(name: str, size: str, patch: int, img: int, pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    return build_model(name, pretrained, dict(_SIZES[size], patch_size=patch, img_size=img), kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights(
            "vit_small_patch16_224", "augreg_in21k_ft_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"
        ),
        timm_weights("vit_small_patch16_224", "augreg_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_small_patch16_224", "augreg_in21k", 21843, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_small_patch16_224", "dino", 0, 224, 0.9, "imagenet", license="apache-2.0"),
    ],
    timm="vit_small_patch16_224",
)
def vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 at 224x224."""
    return _vit("vit_small_patch16_224", "small", 16, 224, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights(
            "vit_small_patch16_384", "augreg_in21k_ft_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"
        ),
        timm_weights("vit_small_patch16_384", "augreg_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"),
    ],
    timm="vit_small_patch16_384",
)
def vit_small_patch16_384(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 at 384x384."""
    return _vit("vit_small_patch16_384", "small", 16, 384, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights(
            "vit_small_patch32_224", "augreg_in21k_ft_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"
        ),
        timm_weights("vit_small_patch32_224", "augreg_in21k", 21843, 224, 0.9, "inception", license="apache-2.0"),
    ],
    timm="vit_small_patch32_224",
)
def vit_small_patch32_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/32 at 224x224."""
    return _vit("vit_small_patch32_224", "small", 32, 224, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights(
            "vit_small_patch32_384", "augreg_in21k_ft_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"
        ),
    ],
    timm="vit_small_patch32_384",
)
def vit_small_patch32_384(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/32 at 384x384."""
    return _vit("vit_small_patch32_384", "small", 32, 384, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights(
            "vit_base_patch16_224", "augreg2_in21k_ft_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"
        ),
        timm_weights("vit_base_patch16_224", "augreg_in21k_ft_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch16_224", "orig_in21k_ft_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch16_224", "augreg_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch16_224", "orig_in21k", 0, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch16_224", "augreg_in21k", 21843, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch16_224", "dino", 0, 224, 0.9, "imagenet", license="apache-2.0"),
        timm_weights("vit_base_patch16_224", "mae", 0, 224, 0.9, "imagenet", license="cc-by-nc-4.0"),
    ],
    timm="vit_base_patch16_224",
)
def vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 at 224x224."""
    return _vit("vit_base_patch16_224", "base", 16, 224, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights("vit_base_patch16_384", "augreg_in21k_ft_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch16_384", "orig_in21k_ft_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch16_384", "augreg_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"),
    ],
    timm="vit_base_patch16_384",
)
def vit_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 at 384x384."""
    return _vit("vit_base_patch16_384", "base", 16, 384, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights("vit_base_patch32_224", "augreg_in21k_ft_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch32_224", "augreg_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch32_224", "orig_in21k", 0, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch32_224", "augreg_in21k", 21843, 224, 0.9, "inception", license="apache-2.0"),
    ],
    timm="vit_base_patch32_224",
)
def vit_base_patch32_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/32 at 224x224."""
    return _vit("vit_base_patch32_224", "base", 32, 224, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights("vit_base_patch32_384", "augreg_in21k_ft_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"),
        timm_weights("vit_base_patch32_384", "augreg_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"),
    ],
    timm="vit_base_patch32_384",
)
def vit_base_patch32_384(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/32 at 384x384."""
    return _vit("vit_base_patch32_384", "base", 32, 384, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights(
            "vit_large_patch16_224", "augreg_in21k_ft_in1k", 1000, 224, 0.9, "inception", license="apache-2.0"
        ),
        timm_weights("vit_large_patch16_224", "orig_in21k", 0, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_large_patch16_224", "augreg_in21k", 21843, 224, 0.9, "inception", license="apache-2.0"),
        timm_weights("vit_large_patch16_224", "mae", 0, 224, 0.9, "imagenet", license="cc-by-nc-4.0"),
    ],
    timm="vit_large_patch16_224",
)
def vit_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-L/16 at 224x224."""
    return _vit("vit_large_patch16_224", "large", 16, 224, pretrained, kwargs)


@register_model(
    "vit",
    weights=[  # timm's default tag for this name is the MAE encoder (no classifier)
        timm_weights("vit_huge_patch14_224", "mae", 0, 224, 0.9, "imagenet", license="cc-by-nc-4.0"),
        timm_weights("vit_huge_patch14_224", "orig_in21k", 0, 224, 0.9, "inception", license="apache-2.0"),
    ],
    timm="vit_huge_patch14_224",
)
def vit_huge_patch14_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-H/14 at 224x224 (head dim 80), timm's name for the MAE and original in21k encoders."""
    return _vit("vit_huge_patch14_224", "huge", 14, 224, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights(
            "vit_large_patch16_384", "augreg_in21k_ft_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"
        ),
    ],
    timm="vit_large_patch16_384",
)
def vit_large_patch16_384(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-L/16 at 384x384."""
    return _vit("vit_large_patch16_384", "large", 16, 384, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights("vit_large_patch32_224", "orig_in21k", 0, 224, 0.9, "inception", license="apache-2.0"),
    ],
    timm="vit_large_patch32_224",
)
def vit_large_patch32_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-L/32 at 224x224."""
    return _vit("vit_large_patch32_224", "large", 32, 224, pretrained, kwargs)


@register_model(
    "vit",
    weights=[
        timm_weights("vit_large_patch32_384", "orig_in21k_ft_in1k", 1000, 384, 1.0, "inception", license="apache-2.0"),
    ],
    timm="vit_large_patch32_384",
)
def vit_large_patch32_384(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-L/32 at 384x384."""
    return _vit("vit_large_patch32_384", "large", 32, 384, pretrained, kwargs)


@register_model("vit")
def vit_small_patch16_224_legacy(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Legacy ViT-S/16 (48.6M params): width 768, depth 8, 8 heads, MLP ratio 3, no qkv bias, scale 768^-0.5."""
    arch = dict(
        patch_size=16,
        embed_dim=768,
        depth=8,
        num_heads=8,
        mlp_ratio=3.0,
        qkv_bias=False,
        qk_scale=768**-0.5,
        norm_eps=1e-5,
    )
    return build_model("vit_small_patch16_224_legacy", pretrained, arch, kwargs)


@register_model(
    "vit",
    weights=[
        Weights(
            "mae_ft_in1k",
            url="https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_base.pth",
            crop_pct=0.875,
            license="cc-by-nc-4.0",
        )
    ],
    timm="vit_base_patch16_224",
    timm_kwargs=dict(global_pool="avg"),
)
def vit_base_patch16_224_mae_ft(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 MAE-pretrained and ImageNet-1k fine-tuned (mindformers vit_base_p16): mean pooling + fc_norm."""
    arch = dict(_SIZES["base"], patch_size=16, global_pool="avg")
    return build_model("vit_base_patch16_224_mae_ft", pretrained, arch, kwargs)


for _seed_name in (
    "ViT_base_patch16_224",
    "ViT_base_patch16_384",
    "ViT_base_patch32_384",
    "ViT_large_patch16_224",
    "ViT_large_patch16_384",
    "ViT_large_patch32_384",
):
    register_alias(_seed_name, _seed_name.lower(), note="PaddleClas name")
register_alias("ViT_small_patch16_224", "vit_small_patch16_224_legacy", note="PaddleClas legacy ViT-S (48.6M)")
register_alias("vit_base_p16", "vit_base_patch16_224_mae_ft", note="mindformers name")
register_alias("vit_small", "vit_small_patch16_224", short=True)
register_alias("vit_base", "vit_base_patch16_224", short=True)
register_alias("vit_large", "vit_large_patch16_224", short=True)
