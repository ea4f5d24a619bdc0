"""CAE (Chen et al., 2023, "Context Autoencoder") ViT-B/16 encoder, fine-tuning architecture.

BEiT-style blocks (``q_bias`` / ``v_bias`` without key bias, layer scale 0.1, per-block relative position bias)
with a fixed 2D sin-cos absolute position embedding, mean pooling and ``fc_norm``. Not in timm: parity is tested
against timm's ``Beit`` built with this configuration.
"""

from __future__ import annotations

from typing import Any

from vitfast.models._registry import build_model, paddle_foundation_weights, register_alias, register_model
from vitfast.models.vision_transformer import VisionTransformer


@register_model("cae")
def cae_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """CAE ViT-B/16 at 224x224 (sin-cos absolute + relative position bias, layer scale 0.1, mean pooling)."""
    arch = dict(
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        qkv_layout="fused_qv_bias",
        pos_embed="sincos",
        rel_pos_bias=True,
        layer_scale_init=0.1,
        global_pool="avg",
        head_init_scale=0.001,
        fix_init=True,
    )
    return build_model("cae_base_patch16_224", pretrained, arch, kwargs)


# PaddleClas' foundation CAE keeps a learned absolute position embedding and outputs the normed class token
register_alias(
    "CAE_vit_base_patch16_224",
    "cae_base_patch16_224",
    weights=paddle_foundation_weights("CAE_vit_base_patch16_224", mean_std="inception"),
    num_classes=0,
    global_pool="token",
    pos_embed="learn",
    note="PaddleClas foundation model",
)
register_alias("cae_base", "cae_base_patch16_224", short=True)
