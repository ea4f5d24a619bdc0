"""EVA (Fang et al., 2023) giant/14 and EVA-02 (Fang et al., 2024) tiny / small / base / large.

EVA-01 giant: width 1408, depth 40, 16 heads (head dim 88), MLP width 6144, ``q_bias`` / ``v_bias``, learned absolute
position embedding, mean pooling + ``fc_norm``.

EVA-02: patch 14, MLP width ``int(dim * 8 / 3)`` (512 / 1024 / 2048 / 2730) with SwiGLU, 2D RoPE (reference grid 16x16,
class token not rotated) on top of a learned absolute position embedding. Ti/S: fused ``qkv`` + ``q_bias`` / ``v_bias``
and a packed ``fc1``; B/L: separate ``q_proj`` / ``k_proj`` / ``v_proj`` and ``fc1_g`` / ``fc1_x`` with a sub-LN.

Three kinds of EVA-02 entry points:

- classifiers ``eva02_<size>_patch14_<224|336|448>`` (timm's names; sizes timm lacks are the same architecture);
- MIM pretraining encoders ``eva02_<size>_patch14_224_mim``: final ``norm``, a learned ``mask_token`` and the
  ``lm_head`` that regresses the teacher's (EVA-CLIP) features, as the official ``*_pt_*`` checkpoints hold them;
- ``p14to16`` encoders ``eva02_<base|large>_patch16_224_mim``: the official checkpoints whose 14x14 patch kernel was
  resized to 16x16 by bicubic interpolation (loading a patch-14 checkpoint into them does the same by default;
  ``patch_resample="pinv"`` selects timm's pseudo-inverse resize instead).
"""

from __future__ import annotations

from typing import Any

from vitfast.models._registry import (
    Weights,
    build_model,
    paddle_foundation_weights,
    register_alias,
    register_model,
    timm_weights,
)
from vitfast.models.vision_transformer import VisionTransformer

_EVA_HEAD = dict(global_pool="avg", head_init_scale=0.001, fix_init=True)
_EVA_G = dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408, qkv_layout="fused_qv_bias")

_EVA02_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, qkv_layout="fused_qv_bias", mlp="swiglu_packed"),
    "small": dict(embed_dim=384, depth=12, num_heads=6, qkv_layout="fused_qv_bias", mlp="swiglu_packed"),
    "base": dict(embed_dim=768, depth=12, num_heads=12, qkv_layout="split", mlp="swiglu", mlp_norm=True),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, qkv_layout="split", mlp="swiglu", mlp_norm=True),
}
_EVA02 = dict(mlp_ratio=4 * 2 / 3, rope=True, rope_ref_grid=(16, 16))
_MIM_TARGET_DIM = 1024  # EVA-CLIP g/14 teacher feature width
_MIM = dict(mask_token=True, mim_head_dim=_MIM_TARGET_DIM, global_pool="token", num_classes=0)

_OFFICIAL_HUB = "Yuxin-CV/EVA-02"


def _eva02(name: str, size: str, patch: int, img: int, pretrained: bool, kwargs: dict[str, Any], **extra: Any):
    arch = dict(_EVA02_SIZES[size], **_EVA02, patch_size=patch, img_size=img, **extra)
    return build_model(name, pretrained, arch, kwargs)


def _eva02_mim_weights(tag: str, file: str) -> Weights:
    return Weights(
        tag, hub_id=_OFFICIAL_HUB, filename=f"eva02/pt/{file}.pt", num_classes=0, mean_std="clip", license="mit"
    )


def _eva_giant(name: str, img: int, pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    return build_model(name, pretrained, dict(_EVA_G, **_EVA_HEAD, img_size=img), kwargs)


@register_model(
    "eva",
    weights=[
        timm_weights("eva_giant_patch14_224", "clip_ft_in1k", 1000, 224, 0.9, "clip", license="mit"),
    ],
    timm="eva_giant_patch14_224",
)
def eva_giant_patch14_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-01 giant/14 at 224x224 (1.0B parameters, head dim 88)."""
    return _eva_giant("eva_giant_patch14_224", 224, pretrained, kwargs)


@register_model(
    "eva",
    weights=[
        timm_weights(
            "eva_giant_patch14_336", "clip_ft_in1k", 1000, 336, 1.0, "clip", crop_mode="squash", license="mit"
        ),
        timm_weights(
            "eva_giant_patch14_336", "m30m_ft_in22k_in1k", 1000, 336, 1.0, "imagenet", crop_mode="squash", license="mit"
        ),
    ],
    timm="eva_giant_patch14_336",
)
def eva_giant_patch14_336(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-01 giant/14 at 336x336 (1.0B parameters, head dim 88)."""
    return _eva_giant("eva_giant_patch14_336", 336, pretrained, kwargs)


@register_model(
    "eva",
    weights=[
        timm_weights(
            "eva_giant_patch14_560", "m30m_ft_in22k_in1k", 1000, 560, 1.0, "imagenet", crop_mode="squash", license="mit"
        ),
    ],
    timm="eva_giant_patch14_560",
)
def eva_giant_patch14_560(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-01 giant/14 at 560x560 (1.0B parameters, head dim 88)."""
    return _eva_giant("eva_giant_patch14_560", 560, pretrained, kwargs)


@register_model(
    "eva02",
    weights=[
        timm_weights("eva02_tiny_patch14_224", "mim_in22k", 0, 224, 0.9, "clip", license="mit"),
    ],
    timm="eva02_tiny_patch14_224",
)
def eva02_tiny_patch14_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Tiny/14 at 224x224."""
    return _eva02("eva02_tiny_patch14_224", "tiny", 14, 224, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    weights=[
        timm_weights("eva02_tiny_patch14_336", "mim_in22k_ft_in1k", 1000, 336, 1.0, "clip", license="mit"),
    ],
    timm="eva02_tiny_patch14_336",
)
def eva02_tiny_patch14_336(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Tiny/14 at 336x336."""
    return _eva02("eva02_tiny_patch14_336", "tiny", 14, 336, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    timm="eva02_tiny_patch14_336",
    timm_kwargs=dict(img_size=448),
)
def eva02_tiny_patch14_448(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Tiny/14 at 448x448."""
    return _eva02("eva02_tiny_patch14_448", "tiny", 14, 448, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    weights=[
        timm_weights("eva02_small_patch14_224", "mim_in22k", 0, 224, 0.9, "clip", license="mit"),
    ],
    timm="eva02_small_patch14_224",
)
def eva02_small_patch14_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Small/14 at 224x224."""
    return _eva02("eva02_small_patch14_224", "small", 14, 224, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    weights=[
        timm_weights("eva02_small_patch14_336", "mim_in22k_ft_in1k", 1000, 336, 1.0, "clip", license="mit"),
    ],
    timm="eva02_small_patch14_336",
)
def eva02_small_patch14_336(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Small/14 at 336x336."""
    return _eva02("eva02_small_patch14_336", "small", 14, 336, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    timm="eva02_small_patch14_336",
    timm_kwargs=dict(img_size=448),
)
def eva02_small_patch14_448(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Small/14 at 448x448."""
    return _eva02("eva02_small_patch14_448", "small", 14, 448, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    weights=[
        timm_weights("eva02_base_patch14_224", "mim_in22k", 0, 224, 0.9, "clip", license="mit"),
    ],
    timm="eva02_base_patch14_224",
)
def eva02_base_patch14_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Base/14 at 224x224."""
    return _eva02("eva02_base_patch14_224", "base", 14, 224, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    timm="eva02_base_patch14_448",
    timm_kwargs=dict(img_size=336),
)
def eva02_base_patch14_336(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Base/14 at 336x336."""
    return _eva02("eva02_base_patch14_336", "base", 14, 336, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    weights=[
        timm_weights(
            "eva02_base_patch14_448",
            "mim_in22k_ft_in22k_in1k",
            1000,
            448,
            1.0,
            "clip",
            crop_mode="squash",
            license="mit",
        ),
        timm_weights("eva02_base_patch14_448", "mim_in22k_ft_in1k", 1000, 448, 1.0, "clip", license="mit"),
        timm_weights(
            "eva02_base_patch14_448", "mim_in22k_ft_in22k", 21841, 448, 1.0, "clip", crop_mode="squash", license="mit"
        ),
    ],
    timm="eva02_base_patch14_448",
)
def eva02_base_patch14_448(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Base/14 at 448x448."""
    return _eva02("eva02_base_patch14_448", "base", 14, 448, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    weights=[
        timm_weights("eva02_large_patch14_224", "mim_in22k", 0, 224, 0.9, "clip", license="mit"),
        timm_weights("eva02_large_patch14_224", "mim_m38m", 0, 224, 0.9, "clip", license="mit"),
    ],
    timm="eva02_large_patch14_224",
)
def eva02_large_patch14_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Large/14 at 224x224."""
    return _eva02("eva02_large_patch14_224", "large", 14, 224, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    timm="eva02_large_patch14_448",
    timm_kwargs=dict(img_size=336),
)
def eva02_large_patch14_336(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Large/14 at 336x336."""
    return _eva02("eva02_large_patch14_336", "large", 14, 336, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    weights=[
        timm_weights(
            "eva02_large_patch14_448",
            "mim_in22k_ft_in22k_in1k",
            1000,
            448,
            1.0,
            "clip",
            crop_mode="squash",
            license="mit",
        ),
        timm_weights(
            "eva02_large_patch14_448",
            "mim_m38m_ft_in22k_in1k",
            1000,
            448,
            1.0,
            "clip",
            crop_mode="squash",
            license="mit",
        ),
        timm_weights("eva02_large_patch14_448", "mim_in22k_ft_in1k", 1000, 448, 1.0, "clip", license="mit"),
        timm_weights("eva02_large_patch14_448", "mim_m38m_ft_in1k", 1000, 448, 1.0, "clip", license="mit"),
        timm_weights(
            "eva02_large_patch14_448", "mim_in22k_ft_in22k", 21841, 448, 1.0, "clip", crop_mode="squash", license="mit"
        ),
        timm_weights(
            "eva02_large_patch14_448", "mim_m38m_ft_in22k", 21841, 448, 1.0, "clip", crop_mode="squash", license="mit"
        ),
    ],
    timm="eva02_large_patch14_448",
)
def eva02_large_patch14_448(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Large/14 at 448x448."""
    return _eva02("eva02_large_patch14_448", "large", 14, 448, pretrained, kwargs, **_EVA_HEAD)


@register_model(
    "eva02",
    weights=[
        _eva02_mim_weights("mim_in22k", "eva02_Ti_pt_in21k_p14"),
    ],
    timm="eva02_tiny_patch14_224",
    timm_kwargs=dict(global_pool="token"),
)
def eva02_tiny_patch14_224_mim(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Tiny/14 MIM pretraining encoder (mask token, final norm, EVA-CLIP regression head)."""
    return _eva02("eva02_tiny_patch14_224_mim", "tiny", 14, 224, pretrained, kwargs, **_MIM)


@register_model(
    "eva02",
    weights=[
        _eva02_mim_weights("mim_in22k", "eva02_S_pt_in21k_p14"),
    ],
    timm="eva02_small_patch14_224",
    timm_kwargs=dict(global_pool="token"),
)
def eva02_small_patch14_224_mim(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Small/14 MIM pretraining encoder (mask token, final norm, EVA-CLIP regression head)."""
    return _eva02("eva02_small_patch14_224_mim", "small", 14, 224, pretrained, kwargs, **_MIM)


@register_model(
    "eva02",
    weights=[
        _eva02_mim_weights("mim_in22k", "eva02_B_pt_in21k_p14"),
    ],
    timm="eva02_base_patch14_224",
    timm_kwargs=dict(global_pool="token"),
)
def eva02_base_patch14_224_mim(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Base/14 MIM pretraining encoder (mask token, final norm, EVA-CLIP regression head)."""
    return _eva02("eva02_base_patch14_224_mim", "base", 14, 224, pretrained, kwargs, **_MIM)


@register_model(
    "eva02",
    weights=[
        _eva02_mim_weights("mim_in22k", "eva02_L_pt_in21k_p14"),
        _eva02_mim_weights("mim_m38m", "eva02_L_pt_m38m_p14"),
    ],
    timm="eva02_large_patch14_224",
    timm_kwargs=dict(global_pool="token"),
)
def eva02_large_patch14_224_mim(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Large/14 MIM pretraining encoder (mask token, final norm, EVA-CLIP regression head)."""
    return _eva02("eva02_large_patch14_224_mim", "large", 14, 224, pretrained, kwargs, **_MIM)


@register_model(
    "eva02",
    weights=[
        _eva02_mim_weights("mim_in22k", "eva02_B_pt_in21k_p14to16"),
    ],
    timm="eva02_base_patch14_224",
    timm_kwargs=dict(global_pool="token", patch_size=16),
)
def eva02_base_patch16_224_mim(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Base p14to16 MIM encoder: patch 16 at 224 (14x14 grid, RoPE reference grid 16x16)."""
    return _eva02("eva02_base_patch16_224_mim", "base", 16, 224, pretrained, kwargs, **_MIM)


@register_model(
    "eva02",
    weights=[
        _eva02_mim_weights("mim_in22k", "eva02_L_pt_in21k_p14to16"),
        _eva02_mim_weights("mim_m38m", "eva02_L_pt_m38m_p14to16"),
    ],
    timm="eva02_large_patch14_224",
    timm_kwargs=dict(global_pool="token", patch_size=16),
)
def eva02_large_patch16_224_mim(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """EVA-02 Large p14to16 MIM encoder: patch 16 at 224 (14x14 grid, RoPE reference grid 16x16)."""
    return _eva02("eva02_large_patch16_224_mim", "large", 16, 224, pretrained, kwargs, **_MIM)


# PaddleMIX / official EVA-02 checkpoint names (seeds/004)
for _size, _letter in (("tiny", "Ti"), ("small", "S"), ("base", "B"), ("large", "L")):
    register_alias(f"eva02_{_letter}_pt_in21k_p14", f"eva02_{_size}_patch14_224_mim", weights="mim_in22k")
for _size, _letter in (("base", "B"), ("large", "L")):
    register_alias(f"eva02_{_letter}_pt_in21k_p14to16", f"eva02_{_size}_patch16_224_mim", weights="mim_in22k")
register_alias("eva02_L_pt_m38m_p14", "eva02_large_patch14_224_mim", weights="mim_m38m")
register_alias("eva02_L_pt_m38m_p14to16", "eva02_large_patch16_224_mim", weights="mim_m38m")
for _seed_name, _target, _tag in (
    ("eva02_B_pt_in21k_medft_in21k_p14", "eva02_base_patch14_448", "mim_in22k_ft_in22k"),
    ("eva02_L_pt_in21k_medft_in21k_p14", "eva02_large_patch14_448", "mim_in22k_ft_in22k"),
    ("eva02_L_pt_m38m_medft_in21k_p14", "eva02_large_patch14_448", "mim_m38m_ft_in22k"),
    ("eva02_Ti_pt_in21k_ft_in1k_p14", "eva02_tiny_patch14_336", "mim_in22k_ft_in1k"),
    ("eva02_S_pt_in21k_ft_in1k_p14", "eva02_small_patch14_336", "mim_in22k_ft_in1k"),
    ("eva02_B_pt_in21k_ft_in1k_p14", "eva02_base_patch14_448", "mim_in22k_ft_in1k"),
    ("eva02_L_pt_in21k_ft_in1k_p14", "eva02_large_patch14_448", "mim_in22k_ft_in1k"),
    ("eva02_L_pt_m38m_ft_in1k_p14", "eva02_large_patch14_448", "mim_m38m_ft_in1k"),
    ("eva02_B_pt_in21k_medft_in21k_ft_in1k_p14", "eva02_base_patch14_448", "mim_in22k_ft_in22k_in1k"),
    ("eva02_L_pt_in21k_medft_in21k_ft_in1k_p14", "eva02_large_patch14_448", "mim_in22k_ft_in22k_in1k"),
    ("eva02_L_pt_m38m_medft_in21k_ft_in1k_p14", "eva02_large_patch14_448", "mim_m38m_ft_in22k_in1k"),
):
    register_alias(_seed_name, _target, weights=_tag, note="EVA-02 release name")
# PaddleClas eva02.py factory names
for _size, _img in (("tiny", 336), ("small", 336), ("base", 448), ("large", 448)):
    register_alias(f"EVA02_{_size}_patch14_{_img}", f"eva02_{_size}_patch14_{_img}", note="PaddleClas name")

# PaddleClas foundation EVA-g: class token after a final norm, LayerNorm eps 1e-5
register_alias(
    "EVA_vit_giant_patch14",
    "eva_giant_patch14_224",
    weights=paddle_foundation_weights("EVA_vit_giant_patch14", mean_std="clip"),
    num_classes=0,
    global_pool="token",
    norm_eps=1e-5,
    note="PaddleClas foundation model (LayerNorm eps 1e-5)",
)
register_alias("eva_giant", "eva_giant_patch14_224", short=True)
register_alias("eva02_tiny", "eva02_tiny_patch14_336", short=True)
register_alias("eva02_small", "eva02_small_patch14_336", short=True)
register_alias("eva02_base", "eva02_base_patch14_448", short=True)
register_alias("eva02_large", "eva02_large_patch14_448", short=True)
