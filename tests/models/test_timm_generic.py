"""timm's generic per-model checks, run on every registered model that has a timm counterpart.

What timm's own ``tests/test_models.py`` / ``tests/test_optim.py`` assert of every model, here against the timm model
with identical weights (tiny copies: 3 blocks, a 4x5 patch grid, so the whole set fits the CI budget):
forward / backward, ``forward_features`` + ``forward_head``, ``reset_classifier``, ``forward_intermediates`` in its
output formats, ``feature_info``, ``prune_intermediate_layers``, ``features_only=True``, the ``pretrained_cfg`` fields
timm's helpers read, and the layer-decay parameter groups of ``timm.optim.create_optimizer_v2``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import vitfast
from tests.helpers import assert_close_scaled, randomize_
from tests.models.test_parity_timm import MIM_ONLY_KEYS, NUM_CLASSES, TIMM_MODELS, _build_pair
from vitfast.models import get_entry
from vitfast.training import param_groups_layer_decay

DEPTH = 3
# the API checks need the family's structure (projection layout, MLP kind, position encoding, pooling, head), not its
# width: every model runs at width 64 with 2 heads, and models equal at that size are checked once
TINY = dict(embed_dim=64, num_heads=2)


def _tiny_size(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        patch = vitfast.create_model(name, depth=0).config.patch_size
    return 4 * patch, 5 * patch


def _distinct_tiny_models() -> list[str]:
    seen, names = set(), []
    for name in TIMM_MODELS:
        with torch.device("meta"):
            model = vitfast.create_model(name, depth=0, img_size=_tiny_size(name), num_classes=NUM_CLASSES, **TINY)
        config = model.config
        key = (get_entry(name).timm_name.split("_")[0], repr(sorted(dataclasses.asdict(config).items())))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def _tiny_pair(name: str, **overrides):
    size = _tiny_size(name)
    ours, reference = _build_pair(name, depth=DEPTH, img_size=size, **{**TINY, **overrides})
    return ours, reference, torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))


def _assert_trees_close(actual, expected, what: str) -> None:
    assert type(actual) is type(expected), f"{what}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert_close_scaled(actual, expected, what=what)
    elif isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            _assert_trees_close(actual[key], expected[key], f"{what}[{key!r}]")
    else:
        assert len(actual) == len(expected), f"{what}: {len(actual)} items != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_trees_close(a, e, f"{what}[{i}]")


def _groups(model: torch.nn.Module, groups: list[dict], leave_out: frozenset[str] = frozenset()) -> list[tuple]:
    """(sorted parameter names, lr scale, weight decay) per group, sorted; ``leave_out`` names dropped."""
    names = {id(p): n for n, p in model.named_parameters()}
    result = []
    for group in groups:
        group_names = tuple(sorted(names[id(p)] for p in group["params"] if names[id(p)] not in leave_out))
        if group_names:
            result.append((group_names, group["lr_scale"], group["weight_decay"]))
    return sorted(result)


INTERMEDIATE_OPTIONS = [
    dict(),
    dict(indices=2, norm=True),
    dict(indices=[0, -1], output_fmt="NLC", return_prefix_tokens=True),
    dict(indices=[1], stop_early=True, intermediates_only=True),
    dict(indices=(0, 2), output_dict=True, return_prefix_tokens=True),
]


@pytest.mark.parametrize("name", _distinct_tiny_models())
def test_timm_generic_checks(name: str) -> None:
    ours, reference, image = _tiny_pair(name)

    # forward / backward (timm: test_model_forward, test_model_backward): every parameter gets a gradient (but the
    # mask token and MIM head, which only forward_mim uses)
    ours.train()
    out = ours(image)
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in ours.named_parameters() if p.requires_grad and p.grad is None and n not in MIM_ONLY_KEYS]
    assert not missing, f"no gradient for {missing}"
    ours.eval()

    with torch.no_grad():
        # forward_features / forward_head, pre_logits (timm: test_model_default_cfgs)
        features = ours.forward_features(image)
        assert_close_scaled(features, reference.forward_features(image), what="forward_features")
        pooled = ours.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, ours.num_features)
        assert_close_scaled(ours(image), reference(image), what="logits")

        # forward_intermediates with timm's options (timm's Beit / Eva have no output_dict), and feature_info
        timm_options = inspect.signature(reference.forward_intermediates).parameters
        for options in INTERMEDIATE_OPTIONS:
            if not set(options) <= set(timm_options):
                continue
            _assert_trees_close(
                ours.forward_intermediates(image, **options),
                reference.forward_intermediates(image, **options),
                f"forward_intermediates({options})",
            )
        assert ours.feature_info == reference.feature_info
        maps = ours.forward_intermediates(image, intermediates_only=True)
        assert [m.shape[1] for m in maps] == [info["num_chs"] for info in ours.feature_info]
        reductions = [image.shape[-1] // m.shape[-1] for m in maps]
        assert reductions == [info["reduction"] for info in ours.feature_info]

    # the pretrained_cfg fields timm's helpers read point at real modules
    cfg = ours.pretrained_cfg
    assert isinstance(ours.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert ours.get_submodule(cfg["classifier"]) is ours.get_classifier()
    assert cfg["input_size"] == (3, *ours.config.img_size) and "fixed_input_size" in cfg
    # the attributes timm code reads (timm's Beit / Eva lack some of them; ours has all)
    for owner, theirs, attributes in (
        (ours, reference, ("has_class_token", "no_embed_class", "num_reg_tokens", "num_prefix_tokens")),
        (ours, reference, ("grad_checkpointing",)),
        (ours.patch_embed, reference.patch_embed, ("flatten", "strict_img_size", "dynamic_img_pad", "output_fmt")),
        (ours.patch_embed, reference.patch_embed, ("patch_size", "grid_size", "img_size")),
    ):
        for attribute in attributes:
            assert hasattr(owner, attribute), attribute
            if hasattr(theirs, attribute):
                assert getattr(owner, attribute) == getattr(theirs, attribute), attribute

    # layer-wise lr decay: timm's optimizer factory groups both models alike; vitfast's helper agrees
    timm_groups = _groups(reference, create_optimizer_v2(reference, "adamw", lr=1e-3, layer_decay=0.75).param_groups)
    ours_groups = create_optimizer_v2(ours, "adamw", lr=1e-3, layer_decay=0.75).param_groups
    assert _groups(ours, ours_groups, leave_out=frozenset(MIM_ONLY_KEYS)) == timm_groups
    ours_helper = param_groups_layer_decay(ours, 0.05, 0.75, final_norm_in_last_block=True)
    assert _groups(ours, ours_helper) == _groups(
        ours, create_optimizer_v2(ours, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75).param_groups
    )

    # reset_classifier (timm: test_model_default_cfgs): 0 -> pooled features, then a new width
    with torch.no_grad():
        ours.reset_classifier(0)
        assert ours(image).shape == (2, ours.num_features)
        ours.reset_classifier(5)
        assert ours(image).shape == (2, 5)

    # prune_intermediate_layers, then the pruned model's intermediates
    kept = ours.prune_intermediate_layers([0, 1], prune_norm=True)
    assert kept == reference.prune_intermediate_layers([0, 1], prune_norm=True) and len(ours.blocks) == 2
    with torch.no_grad():
        _assert_trees_close(
            ours.forward_intermediates(image), reference.forward_intermediates(image), "pruned forward_intermediates"
        )
        assert_close_scaled(ours(image), reference(image), what="pruned model forward")  # unpooled tokens


def test_features_only_matches_timm() -> None:
    for name, out_indices in (("vit_small_patch16_224", (0, 2)), ("eva02_tiny_patch14_224", 2)):
        ours, reference, image = _tiny_pair(name)
        kwargs = dict(
            depth=DEPTH, img_size=tuple(image.shape[-2:]), features_only=True, out_indices=out_indices, **TINY
        )
        ours_features = vitfast.create_model(name, **kwargs)
        entry = get_entry(name)
        timm_features = timm.create_model(entry.timm_name, **entry.timm_kwargs, **kwargs)
        timm_features.model.load_state_dict(reference.state_dict(), strict=False)
        ours_features.model.load_state_dict(ours.state_dict(), strict=False)
        assert sorted(ours_features.state_dict()) == sorted(timm_features.state_dict())
        ours_features.eval(), timm_features.eval()
        assert ours_features.feature_info.channels() == timm_features.feature_info.channels()
        assert ours_features.feature_info.reduction() == timm_features.feature_info.reduction()
        assert ours_features.feature_info.module_name() == timm_features.feature_info.module_name()
        with torch.no_grad():
            _assert_trees_close(ours_features(image), timm_features(image), f"{name} features_only")


def test_features_only_rejects_other_feature_classes_and_stray_arguments() -> None:
    with pytest.raises(ValueError, match="feature_cls='hook' is not supported"):
        vitfast.create_model("vit_small_patch16_224", depth=1, features_only=True, feature_cls="hook")
    with pytest.raises(TypeError, match="only apply with features_only=True"):
        vitfast.create_model("vit_small_patch16_224", depth=1, out_indices=(0,))
    model = vitfast.create_model("vit_small_patch16_224", depth=2)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(torch.randn(1, 3, 224, 224), indices=[2])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 224, 224), output_fmt="NHWC")


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "eva02_tiny_patch14_224", "beitv2_base_patch16_224"])
def test_set_input_size_with_a_new_patch_size_matches_timm(name: str) -> None:
    ours, reference, _ = _tiny_pair(name)
    ours.set_input_size(img_size=(96, 64), patch_size=8)
    reference.set_input_size(img_size=(96, 64), patch_size=8)
    image = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert_close_scaled(ours(image), reference(image), what=f"{name} after set_input_size(patch_size=8)")
    # the feature stride follows the new patch (timm's feature_info keeps the old one)
    assert [info["reduction"] for info in ours.feature_info] == [8] * DEPTH
    assert ours.pretrained_cfg["input_size"] == (3, 96, 64)


def test_vit_huge_patch14_224_resolves_like_timm() -> None:
    ours = vitfast.create_model("vit_huge_patch14_224", depth=0)
    reference = timm.create_model("vit_huge_patch14_224", depth=0)
    assert (ours.embed_dim, ours.config.patch_size, ours.num_classes) == (1280, 14, reference.num_classes)
    assert ours.pretrained_cfg["hf_hub_id"] == "timm/vit_huge_patch14_224.mae"
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())


def test_torchscript_and_fx_say_what_to_use_instead_and_jit_trace_works() -> None:
    ours, _, image = _tiny_pair("eva02_tiny_patch14_224")
    with pytest.raises(TypeError, match=r"torch.jit.script.*torch.export or ONNX"):
        torch.jit.script(ours)
    with pytest.raises(TypeError, match=r"torch.fx symbolic tracing.*torch.export or ONNX"):
        torch.fx.symbolic_trace(ours)
    with torch.no_grad(), vitfast.use_backend("reference"):
        traced = torch.jit.trace(ours, (image,))
        assert_close_scaled(traced(image), ours(image), what="torch.jit.trace")


@pytest.mark.parametrize("in_chans", [1, 4])
def test_pretrained_weights_adapt_to_other_input_channels_like_timm(in_chans: int, tmp_path, monkeypatch) -> None:
    """The RGB patch kernel of a (mocked, local) pretrained file is summed / tiled as timm's adapt_input_conv does."""
    from safetensors.torch import save_file
    from timm.models import adapt_input_conv

    import vitfast.checkpoint

    rgb = randomize_(vitfast.create_model("vit_small_patch16_224", depth=1, **TINY, img_size=32))
    weights_file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(weights_file))
    monkeypatch.setattr(vitfast.checkpoint, "_download", lambda weights: str(weights_file))

    arch = dict(depth=1, img_size=32, in_chans=in_chans, **TINY)
    ours = vitfast.create_model("vit_small_patch16_224", pretrained=True, **arch)
    reference = timm.create_model("vit_small_patch16_224", **arch)
    state = dict(rgb.state_dict())
    state["patch_embed.proj.weight"] = adapt_input_conv(in_chans, state["patch_embed.proj.weight"])
    reference.load_state_dict(state)
    image = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        assert_close_scaled(ours.eval()(image), reference.eval()(image), what=f"in_chans={in_chans}")


def test_dynamic_img_pad_matches_timm() -> None:
    ours, reference = _build_pair(
        "vit_base_patch16_224", depth=2, img_size=64, dynamic_img_size=True, dynamic_img_pad=True, **TINY
    )
    assert ours.patch_embed.dynamic_img_pad and not ours.patch_embed.strict_img_size
    image = torch.randn(2, 3, 70, 90)  # pads to 80x96: a 5x6 grid
    with torch.no_grad():
        assert_close_scaled(ours(image), reference(image), what="dynamic_img_pad logits")
        _assert_trees_close(
            ours.forward_intermediates(image, indices=1),
            reference.forward_intermediates(image, indices=1),
            "dynamic_img_pad forward_intermediates",
        )
        # uint8 images are normalized before the padding, so the padding is zeros of the normalized image
        pixels = torch.randint(0, 256, (2, 3, 70, 90), dtype=torch.uint8)
        mean, std = (torch.tensor(ours.pretrained_cfg[k]).view(-1, 1, 1) for k in ("mean", "std"))
        assert_close_scaled(ours(pixels), reference((pixels / 255.0 - mean) / std), what="uint8 + dynamic_img_pad")
    with pytest.raises(ValueError, match="dynamic_img_pad=True"):
        vitfast.create_model("vit_base_patch16_224", depth=1, dynamic_img_size=True, **TINY)(image)


def _full_size_models(max_params: float = 100e6) -> list[str]:
    """Models with a timm counterpart up to ``max_params``, one per distinct full-size architecture."""
    seen, names = set(), []
    for name in TIMM_MODELS:
        with torch.device("meta"):  # shapes only: counting parameters allocates nothing
            model = vitfast.create_model(name)
        params = sum(p.numel() for p in model.parameters())
        key = repr(sorted(dataclasses.asdict(model.config).items()))
        if params <= max_params and key not in seen:
            seen.add(key)
            names.append(name)
    return names


# The whole sweep (28 architectures) takes ~6 min on 2 busy cores, beyond the CI budget: CI runs the three cheapest
# (~11 s), VITFAST_TEST_FULL_SIZE=1 runs them all.
FULL_SIZE_IN_CI = ("vit_small_patch32_224", "vit_base_patch32_224", "eva02_tiny_patch14_224")


@pytest.mark.slow
@pytest.mark.parametrize("name", _full_size_models())
def test_full_size_forward_matches_timm(name: str) -> None:
    """Full width, depth and input size (batch 1): the tiny checks above cannot see a size-specific error."""
    if name not in FULL_SIZE_IN_CI and not os.environ.get("VITFAST_TEST_FULL_SIZE"):
        pytest.skip("full-size sweep: set VITFAST_TEST_FULL_SIZE=1 (about 6 minutes on 2 cores)")
    entry = get_entry(name)
    reference = timm.create_model(entry.timm_name, **{**entry.timm_kwargs, "num_classes": NUM_CLASSES}).eval()
    randomize_(reference)
    ours = vitfast.create_model(name, num_classes=NUM_CLASSES).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=False)
    assert set(result.missing_keys) <= MIM_ONLY_KEYS and not result.unexpected_keys, result
    image = torch.randn(1, 3, *ours.config.img_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_scaled(ours(image), reference(image), what=f"{name} full size")
