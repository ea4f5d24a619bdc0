"""BEiT v2 (Peng et al., 2022) ViT-B/16 and ViT-L/16.

Differences from the plain ViT: no absolute position embedding; a relative position bias table per block
(``(2 Wh - 1)(2 Ww - 1) + 3`` rows x heads, the three extra rows for cls -> patch, patch -> cls, cls -> cls); a fused
``qkv`` weight without bias plus ``q_bias`` and ``v_bias`` (no key bias); layer scale ``gamma_1`` / ``gamma_2``; mean
pooling of patch tokens followed by ``fc_norm``.
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

_BEIT = dict(
    patch_size=16,
    qkv_layout="fused_qv_bias",
    pos_embed="none",
    rel_pos_bias=True,
    layer_scale_init=1e-5,
    global_pool="avg",
    head_init_scale=0.001,
    fix_init=True,
)


@register_model(
    "beit",
    weights=[
        timm_weights("beitv2_base_patch16_224", "in1k_ft_in22k_in1k", 1000, 224, 0.9, "imagenet", license="apache-2.0"),
        timm_weights("beitv2_base_patch16_224", "in1k_ft_in1k", 1000, 224, 0.9, "imagenet", license="apache-2.0"),
        timm_weights("beitv2_base_patch16_224", "in1k_ft_in22k", 21841, 224, 0.9, "imagenet", license="apache-2.0"),
    ],
    timm="beitv2_base_patch16_224",
)
def beitv2_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """BEiT v2 ViT-B/16 at 224x224."""
    arch = dict(_BEIT, embed_dim=768, depth=12, num_heads=12)
    return build_model("beitv2_base_patch16_224", pretrained, arch, kwargs)


@register_model(
    "beit",
    weights=[
        timm_weights(
            "beitv2_large_patch16_224", "in1k_ft_in22k_in1k", 1000, 224, 0.95, "imagenet", license="apache-2.0"
        ),
        timm_weights("beitv2_large_patch16_224", "in1k_ft_in1k", 1000, 224, 0.95, "imagenet", license="apache-2.0"),
        timm_weights("beitv2_large_patch16_224", "in1k_ft_in22k", 21841, 224, 0.9, "imagenet", license="apache-2.0"),
    ],
    timm="beitv2_large_patch16_224",
)
def beitv2_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """BEiT v2 ViT-L/16 at 224x224."""
    arch = dict(_BEIT, embed_dim=1024, depth=24, num_heads=16)
    return build_model("beitv2_large_patch16_224", pretrained, arch, kwargs)


# PaddleClas foundation BEiT v2 models output the class token after a final norm (timm: global_pool="token")
for _seed_name, _target in (
    ("BEiTv2_vit_base_patch16_224", "beitv2_base_patch16_224"),
    ("BEiTv2_vit_base_patch16_224_ft21k", "beitv2_base_patch16_224"),
    ("BEiTv2_vit_large_patch16_224", "beitv2_large_patch16_224"),
    ("BEiTv2_vit_large_patch16_224_ft21k", "beitv2_large_patch16_224"),
):
    register_alias(
        _seed_name,
        _target,
        weights=paddle_foundation_weights(_seed_name, mean_std="imagenet"),
        num_classes=0,
        global_pool="token",
        note="PaddleClas foundation model: class-token embedding after the final norm",
    )
register_alias("beitv2_base", "beitv2_base_patch16_224", short=True)
register_alias("beitv2_large", "beitv2_large_patch16_224", short=True)
