"""MoCo v3 (Chen, Xie and He, 2021) ViT-S/16 and ViT-B/16 encoders.

A plain ViT whose position embedding is a fixed 2D sin-cos table with a zero class-token entry (stored, not
trained: ``pos_embed.requires_grad`` is False). ViT-S uses 12 heads of width 32. Not in timm: parity is tested
against timm's ``VisionTransformer`` built with this configuration.
"""

from __future__ import annotations

from typing import Any

from vitfast.models._registry import Weights, build_model, register_alias, register_model
from vitfast.models.vision_transformer import VisionTransformer

_MOCO_URL = "https://dl.fbaipublicfiles.com/moco-v3/{0}/{0}.pth.tar"
_PADDLE_URL = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/foundation_models/{}.pdparams"


def _moco_weights(run: str) -> Weights:
    """The official MoCo v3 release: the base encoder under ``module.base_encoder.`` in ``state_dict``."""
    return Weights("in1k_300ep", url=_MOCO_URL.format(run), num_classes=0, crop_pct=0.875, license="cc-by-nc-4.0")


@register_model("mocov3", weights=[_moco_weights("vit-s-300ep")])
def mocov3_vit_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MoCo v3 ViT-S/16 encoder: width 384, 12 heads of width 32, frozen sin-cos position embedding."""
    arch = dict(patch_size=16, embed_dim=384, depth=12, num_heads=12, pos_embed="sincos", num_classes=0)
    return build_model("mocov3_vit_small", pretrained, arch, kwargs)


@register_model("mocov3", weights=[_moco_weights("vit-b-300ep")])
def mocov3_vit_base(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MoCo v3 ViT-B/16 encoder with a frozen sin-cos position embedding."""
    arch = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pos_embed="sincos", num_classes=0)
    return build_model("mocov3_vit_base", pretrained, arch, kwargs)


# PaddleClas' code names these MOCOV3_* (its docs table spells MoCoV3_*); the weights use Paddle's LayerNorm eps 1e-5
for _size in ("small", "base"):
    _weights = Weights("paddle", url=_PADDLE_URL.format(f"MOCOV3_vit_{_size}"), num_classes=0, crop_pct=0.875)
    for _seed_name in (f"MoCoV3_vit_{_size}", f"MOCOV3_vit_{_size}"):
        register_alias(_seed_name, f"mocov3_vit_{_size}", weights=_weights, norm_eps=1e-5, note="PaddleClas name")
register_alias("mocov3_small", "mocov3_vit_small", short=True)
register_alias("mocov3_base", "mocov3_vit_base", short=True)
