"""Every model with a timm counterpart: identical keys both ways and identical outputs, fp32 on CPU.

timm's random init is replaced by random values in every parameter (tests.helpers.randomize_), then copied into the
vitfast model with strict=True. Large models run depth-reduced copies (2 blocks, 1 for the slowest); a few small ones
run full depth.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resize_rel_pos_bias_table

import vitfast
from tests.helpers import assert_close_scaled, randomize_
from vitfast.checkpoint import PRETRAINING_ONLY_KEYS
from vitfast.models import get_entry

MIM_ONLY_KEYS = set(PRETRAINING_ONLY_KEYS)
TIMM_MODELS = [name for name in vitfast.list_models() if get_entry(name).timm_name]
# widths of 1024 and more at 336 px and above, and every giant / huge: 8-25 s each on two cores
SLOW_MODELS = {"eva_giant_patch14_224", "eva_giant_patch14_336", "eva_giant_patch14_560", "mae_vit_huge_patch14"}
SLOW_MODELS |= {n for n in TIMM_MODELS if "large_patch14_clip" in n}
SLOW_MODELS |= {"vit_huge_patch14_224", "eva02_large_patch14_336", "eva02_large_patch14_448", "vit_large_patch16_384"}
NUM_CLASSES = 7


def _other_size(img_size: tuple[int, int], patch: int) -> tuple[int, int]:
    """A smaller, non-square size: half the height, half the width plus one patch (multiples of the patch)."""
    height = max(img_size[0] // 2 // patch, 2) * patch
    return height, height + patch


def _build_pair(name: str, depth: int, **overrides):
    entry = get_entry(name)
    reference = timm.create_model(
        entry.timm_name, **{**entry.timm_kwargs, "num_classes": NUM_CLASSES, "depth": depth, **overrides}
    )
    randomize_(reference.eval())
    ours = vitfast.create_model(name, depth=depth, num_classes=NUM_CLASSES, **overrides).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=False)
    extra = MIM_ONLY_KEYS if ours.mask_token is not None else set()
    assert set(result.missing_keys) == extra, f"keys timm lacks: {result.missing_keys}"
    assert not result.unexpected_keys, f"timm keys vitfast lacks: {result.unexpected_keys}"
    ours_state = {k: v for k, v in ours.state_dict().items() if k not in extra}
    reference.load_state_dict(ours_state, strict=True)  # and the other way round
    return ours, reference


def _compare(ours, reference, image: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        features, expected_features = ours.forward_features(image), reference.forward_features(image)
        assert_close_scaled(features, expected_features, what=f"{what} forward_features")
        assert_close_scaled(
            ours.forward_head(features, pre_logits=True),
            reference.forward_head(expected_features, pre_logits=True),
            what=f"{what} pre_logits",
        )
        # the logits from the features (forward() is forward_head(forward_features()) in both): two forwards a size
        # instead of four
        assert_close_scaled(
            ours.forward_head(features), reference.forward_head(expected_features), what=f"{what} logits"
        )


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n for n in TIMM_MODELS]
)
def test_matches_timm_at_default_and_other_size(name: str) -> None:
    default = vitfast.create_model(name, depth=0)
    img_size, patch = default.config.img_size, default.config.patch_size
    batch = 1 if img_size[0] * img_size[1] > 336 * 336 else 2

    # one block for the slowest (giant / huge / large CLIP at 336 px): every block component still runs, at half the
    # cost of two (CI's 15 minutes on two cores); the others chain two
    depth = 1 if name in SLOW_MODELS else 2
    ours, reference = _build_pair(name, depth=depth)
    _compare(ours, reference, torch.randn(batch, 3, *img_size), f"{name} at {img_size}")

    other = _other_size(img_size, patch)
    ours, reference = _build_pair(name, depth=depth, img_size=other)
    _compare(ours, reference, torch.randn(2, 3, *other), f"{name} at {other}")


@pytest.mark.parametrize(
    "name",
    [
        "vit_small_patch16_224",
        "eva02_tiny_patch14_224",
        pytest.param("beitv2_base_patch16_224", marks=pytest.mark.slow),
    ],
)
def test_matches_timm_at_full_depth(name: str) -> None:
    ours, reference = _build_pair(name, depth=12)
    _compare(ours, reference, torch.randn(2, 3, 224, 224), f"{name} full depth")


@pytest.mark.parametrize(
    "name",
    ["vit_base_patch16_224", "vit_base_patch16_clip_quickgelu_224", "eva02_base_patch14_224", "eva02_tiny_patch14_336"],
)
def test_dynamic_img_size_matches_timm(name: str) -> None:
    """Built at the default size, run at another: position embedding resampling and RoPE tables as timm does."""
    ours, reference = _build_pair(name, depth=2, dynamic_img_size=True)
    config = ours.config
    other = _other_size(config.img_size, config.patch_size)
    _compare(ours, reference, torch.randn(2, 3, *other), f"{name} dynamic at {other}")
    _compare(ours, reference, torch.randn(1, 3, *config.img_size), f"{name} dynamic at the default size")


def test_beit_dynamic_img_size_resizes_the_relative_position_tables() -> None:
    """timm's Beit has no dynamic size; the reference is a Beit built at the new size with the resized tables."""
    ours = randomize_(
        vitfast.create_model("beitv2_base_patch16_224", depth=2, num_classes=NUM_CLASSES, dynamic_img_size=True)
    ).eval()
    new_size = (112, 176)
    new_window = (new_size[0] // 16, new_size[1] // 16)
    reference = timm.create_model("beitv2_base_patch16_224", depth=2, num_classes=NUM_CLASSES, img_size=new_size).eval()
    state = ours.state_dict()
    for key in [k for k in state if k.endswith("relative_position_bias_table")]:
        new_shape = ((2 * new_window[0] - 1) * (2 * new_window[1] - 1) + 3, state[key].shape[1])
        state[key] = resize_rel_pos_bias_table(state[key], new_window, new_shape, old_window_size=(14, 14))
    reference.load_state_dict(state, strict=True)
    _compare(ours, reference, torch.randn(2, 3, *new_size), "beitv2 dynamic")


def test_set_input_size_matches_timm() -> None:
    ours, reference = _build_pair("eva02_tiny_patch14_224", depth=2)
    ours.set_input_size((280, 196))
    reference.set_input_size((280, 196))
    _compare(ours, reference, torch.randn(2, 3, 280, 196), "eva02_tiny after set_input_size")
    ours, reference = _build_pair("beitv2_base_patch16_224", depth=2)
    ours.set_input_size((288, 160))
    reference.set_input_size((288, 160))
    _compare(ours, reference, torch.randn(2, 3, 288, 160), "beitv2_base after set_input_size")
    ours, reference = _build_pair("vit_base_patch16_224", depth=1)
    ours.set_input_size(384)
    reference.set_input_size((384, 384))
    _compare(ours, reference, torch.randn(1, 3, 384, 384), "vit_base after set_input_size")
