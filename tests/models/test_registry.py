"""Registry: every model instantiates, parameter counts match timm and the seed tables, names and aliases resolve."""

from __future__ import annotations

import pytest
import timm
import torch

import vitfast
from vitfast.layers import DropPath
from vitfast.models import UnknownModelError, get_entry, list_aliases
from vitfast.models._info import model_info

ALL_MODELS = vitfast.list_models()


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_instantiates_with_timm_parameter_count(name: str) -> None:
    entry = get_entry(name)
    with torch.device("meta"):
        ours = vitfast.create_model(name)
        assert ours.pretrained_cfg["architecture"] == name
        if entry.timm_name is None:
            return
        kwargs = {**entry.timm_kwargs, "num_classes": ours.num_classes}
        reference = timm.create_model(entry.timm_name, **kwargs)
    extra = sum(p.numel() for n, p in ours.named_parameters() if n.startswith(("mask_token", "lm_head")))
    assert _num_params(ours) - extra == _num_params(reference)
    ours_keys = {k for k in ours.state_dict() if not k.startswith(("mask_token", "lm_head"))}
    assert ours_keys == set(reference.state_dict())


# Parameter counts published in the seed documents, counted without the absolute position embedding and class
# token (as those tables do). Two-decimal figures: seeds/002 (PaddleClas ViT, 1000-class head); whole millions:
# seeds/000 (foundation models, embeddings without a head) and seeds/004 (EVA-02, MIM encoders).
SEED_PARAMS_M = {
    "ViT_small_patch16_224": 48.60,
    "ViT_base_patch16_224": 86.42,
    "ViT_base_patch16_384": 86.42,
    "ViT_base_patch32_384": 88.19,
    "ViT_large_patch16_224": 304.12,
    "ViT_large_patch16_384": 304.12,
    "ViT_large_patch32_384": 306.48,
    "CLIP_vit_base_patch16_224": 85,
    "CLIP_vit_base_patch32_224": 87,
    "CLIP_vit_large_patch14_224": 302,
    "CLIP_vit_large_patch14_336": 302,
    "BEiTv2_vit_base_patch16_224": 85,
    "BEiTv2_vit_base_patch16_224_ft21k": 85,
    "BEiTv2_vit_large_patch16_224": 303,
    "BEiTv2_vit_large_patch16_224_ft21k": 303,
    "MoCoV3_vit_small": 21,
    "MoCoV3_vit_base": 85,
    "MAE_vit_base_patch16": 85,
    "MAE_vit_large_patch16": 303,
    "MAE_vit_huge_patch14": 630,
    "EVA_vit_giant_patch14": 1010,
    "CAE_vit_base_patch16_224": 85,
    "eva02_Ti_pt_in21k_p14": 6,
    "eva02_S_pt_in21k_p14": 22,
    "eva02_B_pt_in21k_p14": 86,
    "eva02_B_pt_in21k_p14to16": 86,
    "eva02_L_pt_in21k_p14": 304,
    "eva02_L_pt_m38m_p14to16": 304,
    "eva02_large_patch14_448": 304,
}


@pytest.mark.parametrize(("name", "expected"), sorted(SEED_PARAMS_M.items()))
def test_parameter_counts_match_seed_tables(name: str, expected: float) -> None:
    millions = model_info(name).num_params_without_pos / 1e6
    tolerance = 0.005 if isinstance(expected, float) else 1.0  # the tables' own precision
    assert abs(millions - expected) < tolerance, f"{name}: {millions:.3f}M, seed table says {expected}M"


def test_issue_examples() -> None:
    counts = {
        name: model_info(name).num_params_without_pos / 1e6
        for name in (
            "vit_base_patch16_224",
            "ViT_small_patch16_224",
            "mae_vit_huge_patch14",
            "eva_giant_patch14_224",
            "eva02_large_patch14_448",
        )
    }
    assert round(counts["vit_base_patch16_224"], 1) == 86.4
    assert round(counts["ViT_small_patch16_224"], 1) == 48.6
    assert int(counts["mae_vit_huge_patch14"]) == 630
    assert int(counts["eva_giant_patch14_224"] - 1.408) == 1010  # without its 1000-class head
    assert int(counts["eva02_large_patch14_448"]) == 304


SEED_NAMES = [
    "CLIP_vit_base_patch16_224",
    "BEiTv2_vit_large_patch16_224_ft21k",
    "MoCoV3_vit_small",
    "MAE_vit_huge_patch14",
    "EVA_vit_giant_patch14",
    "CAE_vit_base_patch16_224",
    "ViT_base_patch16_384",
    "eva02_L_pt_m38m_p14",
    "eva02_B_pt_in21k_medft_in21k_ft_in1k_p14",
    "vit_base_p16",
]


@pytest.mark.parametrize("name", sorted(list_aliases()))
def test_every_alias_resolves(name: str) -> None:
    alias = list_aliases()[name]
    with torch.device("meta"):
        model = vitfast.create_model(name)
    assert model.pretrained_cfg["architecture"] == alias.target
    for key, value in alias.kwargs.items():
        assert getattr(model.config, key) == value


def test_seed_names_resolve_to_the_documented_configs() -> None:
    assert set(SEED_NAMES) <= set(list_aliases())
    with torch.device("meta"):
        eva02 = vitfast.create_model("eva02_B_pt_in21k_medft_in21k_ft_in1k_p14")
        legacy = vitfast.create_model("ViT_small_patch16_224")
        moco = vitfast.create_model("MoCoV3_vit_small")
    assert eva02.pretrained_cfg["tag"] == "mim_in22k_ft_in22k_in1k" and eva02.config.img_size == (448, 448)
    assert legacy.config.embed_dim == 768 and legacy.config.depth == 8 and legacy.config.qk_scale == 768**-0.5
    assert moco.config.norm_eps == 1e-5 and moco.pretrained_cfg["url"].endswith("MOCOV3_vit_small.pdparams")


def test_short_aliases_are_importable_from_the_top_level() -> None:
    short = list_aliases(short_only=True)
    assert {"vit_base", "eva02_large", "eva_giant", "clip_vit_large"} <= set(short)
    from vitfast import eva02_large, eva02_large_patch14_448  # noqa: F401

    for name, alias in short.items():
        entry_point = getattr(vitfast, name)
        with torch.device("meta"):
            model = entry_point(depth=1)
        assert model.pretrained_cfg["architecture"] == alias.target
        assert name in vitfast.__all__
    for name in ALL_MODELS:
        assert getattr(vitfast, name) is get_entry(name).fn


def test_list_models_filters() -> None:
    assert vitfast.list_models("eva02_large*") == [
        "eva02_large_patch14_224",
        "eva02_large_patch14_224_mim",
        "eva02_large_patch14_336",
        "eva02_large_patch14_448",
        "eva02_large_patch16_224_mim",
    ]
    assert vitfast.list_models(family="beit") == ["beitv2_base_patch16_224", "beitv2_large_patch16_224"]
    assert "vit_base_patch16_224.augreg2_in21k_ft_in1k" in vitfast.list_models("vit_base*", pretrained=True)
    assert "EVA_vit_giant_patch14" in vitfast.list_models("eva*", include_aliases=True)
    assert "EVA_vit_giant_patch14" not in vitfast.list_models("eva*")
    families = {get_entry(n).family for n in ALL_MODELS}
    assert families == {"vit", "clip", "mae", "mocov3", "beit", "cae", "eva", "eva02"}


def test_unknown_names_and_tags_suggest_alternatives() -> None:
    with pytest.raises(UnknownModelError, match="Did you mean: eva02_large_patch14_448"):
        vitfast.create_model("eva02_large_patch14_488")
    with pytest.raises(KeyError, match="eva02"):
        vitfast.create_model("eva03")
    with pytest.raises(UnknownModelError, match="known tags: .*augreg2_in21k_ft_in1k"):
        vitfast.create_model("vit_base_patch16_224.nope")


def test_pretrained_tag_selects_weights_and_defaults() -> None:
    with torch.device("meta"):
        mae = vitfast.create_model("vit_base_patch16_224.mae")
        default = vitfast.create_model("vit_base_patch16_224")
        clip = vitfast.create_model("clip_vit_large")
    assert mae.num_classes == 0 and mae.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert mae.pretrained_cfg["hf_hub_id"] == "timm/vit_base_patch16_224.mae"
    assert default.pretrained_cfg["tag"] == "augreg2_in21k_ft_in1k" and default.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    assert clip.num_classes == 768 and clip.pretrained_cfg["hf_hub_id"] == "timm/vit_large_patch14_clip_224.openai"
    for key in ("hf_hub_id", "mean", "std", "input_size", "crop_pct", "interpolation", "num_classes"):
        assert key in default.pretrained_cfg


def test_architecture_overrides() -> None:
    model = vitfast.create_model(
        "vit_base_patch16_224", depth=3, embed_dim=192, num_heads=3, img_size=160, num_classes=10, drop_path_rate=0.2
    )
    assert len(model.blocks) == 3 and model.embed_dim == model.num_features == 192
    assert model.patch_embed.grid_size == (10, 10) and model.pos_embed.shape == (1, 101, 192)
    assert model.pretrained_cfg["input_size"] == (3, 160, 160) and model.pretrained_cfg["num_classes"] == 10
    rates = [b.drop_path1.p if isinstance(b.drop_path1, DropPath) else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 10)
    with pytest.raises(TypeError, match="unknown model argument.*deep.*valid architecture arguments"):
        vitfast.create_model("vit_base_patch16_224", deep=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        vitfast.create_model("vit_base_patch16_224", num_heads=5)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        vitfast.create_model("vit_base_patch16_224", img_size=230)
