"""vitfast.training: layer-decay parameter groups (timm parity), the cosine schedule, block masks, the EVA-02 MIM
loss, and the examples/finetune.py script end to end."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay as timm_param_groups_layer_decay

import vitfast
from vitfast.training import BlockMaskGenerator, cosine_lr_schedule, eva02_mim_loss, param_groups_layer_decay

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


def _grouping(model: torch.nn.Module, groups: list[dict], scale_key: str = "lr_scale") -> list[tuple]:
    """Groups as comparable values: (sorted parameter names, lr scale, weight decay), sorted."""
    names = {id(param): name for name, param in model.named_parameters()}
    return sorted((tuple(sorted(names[id(p)] for p in g["params"])), g[scale_key], g["weight_decay"]) for g in groups)


def _layer_of(model: torch.nn.Module, groups: list[dict], scale_key: str = "lr_scale") -> dict[str, tuple]:
    """Parameter name -> (lr scale, weight decay) of its group."""
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(p)]: (g[scale_key], g["weight_decay"]) for g in groups for p in g["params"]}


# ---------------------------------------------------------------- layer-wise lr decay groups

TIMM_MODELS = {
    # timm's default for Beit / Eva is average pooling (fc_norm, no final norm); ViT pools the class token (norm)
    "vit_small_patch16_224": dict(depth=3, img_size=32),
    "beitv2_base_patch16_224": dict(depth=2, img_size=32, embed_dim=64, num_heads=2),
    "eva02_tiny_patch14_224": dict(depth=2, img_size=28),
    "vit_base_patch16_224": dict(depth=2, img_size=32, embed_dim=64, num_heads=2, global_pool="avg", fc_norm=True),
    # headless, class-token pooling (MAE's encoder): nothing after the final norm, so the top layer is block L
    "vit_large_patch16_224": dict(depth=2, img_size=32, embed_dim=64, num_heads=2, num_classes=0),
}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_layer_decay_groups_equal_timm(name: str) -> None:
    model = timm.create_model(name, **TIMM_MODELS[name])
    expected = _grouping(
        model,
        timm_param_groups_layer_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65),
    )
    ours = _grouping(model, param_groups_layer_decay(model, 0.05, 0.65, final_norm_in_last_block=True))
    assert ours == expected
    has_final_norm = any(n.startswith("norm.") for n, _ in model.named_parameters())
    default = _grouping(model, param_groups_layer_decay(model, 0.05, 0.65))
    # BEiT / MAE / EVA's convention (the default) differs from timm's only in where the final `norm` goes
    assert (default == expected) is not has_final_norm


def test_layer_decay_groups_on_a_vitfast_model() -> None:
    model = vitfast.create_model("vit_small_patch16_224", depth=2)
    groups = param_groups_layer_decay(model, weight_decay=0.1, layer_decay=0.5)
    layer_of = _layer_of(model, groups)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(layer_of) == sorted(trainable)  # every trainable parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    expected = {
        "cls_token": (0.125, 0.0),
        "pos_embed": (0.125, 0.0),
        "patch_embed.proj.weight": (0.125, 0.1),
        "patch_embed.proj.bias": (0.125, 0.0),
        "blocks.0.attn.qkv.weight": (0.25, 0.1),
        "blocks.0.attn.qkv.bias": (0.25, 0.0),
        "blocks.0.norm1.weight": (0.25, 0.0),
        "blocks.1.mlp.fc2.weight": (0.5, 0.1),
        "blocks.1.mlp.fc2.bias": (0.5, 0.0),
        "norm.weight": (1.0, 0.0),
        "head.weight": (1.0, 0.1),
        "head.bias": (1.0, 0.0),
    }
    assert {name: layer_of[name] for name in expected} == expected
    assert [g["layer_id"] for g in groups] == sorted(g["layer_id"] for g in groups)
    assert {g["layer_id"] for g in groups} == {0, 1, 2, 3}
    # the last block's final norm moves to layer L with timm's convention
    timm_style = _layer_of(model, param_groups_layer_decay(model, 0.1, 0.5, final_norm_in_last_block=True))
    assert timm_style["norm.weight"] == (0.5, 0.0) and timm_style["head.weight"] == (1.0, 0.1)


def test_vitfast_models_group_like_their_timm_counterparts() -> None:
    """Same parameter names in vitfast and timm, so the same grouping (BEiT v2: rel-pos tables, gammas, q/v bias)."""
    kwargs = dict(depth=2, img_size=32, embed_dim=64, num_heads=2, num_classes=5)
    ours = vitfast.create_model("beitv2_base_patch16_224", **kwargs)
    reference = timm.create_model("beitv2_base_patch16_224", **kwargs)
    assert _grouping(ours, param_groups_layer_decay(ours)) == _grouping(reference, param_groups_layer_decay(reference))
    layer_of = _layer_of(ours, param_groups_layer_decay(ours, layer_decay=0.5))
    assert layer_of["blocks.1.attn.relative_position_bias_table"] == (0.5, 0.0)
    assert layer_of["blocks.0.gamma_1"] == (0.25, 0.0)


def test_mim_model_groups_and_exclusions() -> None:
    model = vitfast.create_model("eva02_tiny_patch14_224_mim", depth=2, img_size=56)
    model.blocks[0].norm1.requires_grad_(False)
    groups = param_groups_layer_decay(
        model, 0.05, 0.5, no_weight_decay_list=("blocks.1.attn.*",), lr_scale_key="layer_scale"
    )
    assert all("layer_scale" in g and "lr_scale" not in g for g in groups)
    scale = _layer_of(model, groups, scale_key="layer_scale")
    assert scale["mask_token"] == (0.125, 0.0)
    assert scale["lm_head.weight"] == (1.0, 0.05)
    assert scale["norm.weight"] == (1.0, 0.0)
    assert scale["blocks.0.attn.qkv.weight"] == (0.25, 0.05)
    assert scale["blocks.1.attn.qkv.weight"] == (0.5, 0.0)  # excluded by the pattern
    assert "blocks.0.norm1.weight" not in scale  # frozen


def test_layer_decay_groups_reject_bad_arguments() -> None:
    model = vitfast.create_model("vit_small_patch16_224", depth=1, img_size=32)
    with pytest.raises(ValueError, match="layer_decay must be > 0"):
        param_groups_layer_decay(model, layer_decay=0.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups_layer_decay(model, weight_decay=-0.1)
    with pytest.raises(ValueError, match="no parameters named 'blocks"):
        param_groups_layer_decay(torch.nn.Linear(3, 4))


def test_plain_torch_optimizer_and_cosine_schedule_apply_lr_scale() -> None:
    model = vitfast.create_model(
        "vit_small_patch16_224", depth=2, img_size=32, embed_dim=32, num_heads=2, num_classes=3
    )
    groups = param_groups_layer_decay(model, layer_decay=0.5)
    optimizer = torch.optim.AdamW(groups, lr=0.01)
    scheduler = cosine_lr_schedule(optimizer, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)

    def factor(step: int) -> float:  # written out from the contract
        if step < 2:
            return (step + 1) / 2
        progress = min(1.0, (step - 2) / 8)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    image = torch.randn(2, 3, 32, 32)
    for step in range(12):
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(0.01 * group["lr_scale"] * factor(step), rel=1e-12)
        model(image).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    assert factor(6) == pytest.approx(0.55) and factor(11) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_lr_schedule(optimizer, total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_lr_schedule(optimizer, total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        cosine_lr_schedule(optimizer, total_steps=5, min_lr_ratio=1.5)


# ---------------------------------------------------------------- block-wise masks


def _components(mask: np.ndarray) -> int:
    """4-connected components of a 2D bool array (independent flood fill)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            row, col = stack.pop()
            for r, c in ((row + 1, col), (row - 1, col), (row, col + 1), (row, col - 1)):
                if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] and not seen[r, c]:
                    seen[r, c] = True
                    stack.append((r, c))
    return count


@pytest.mark.parametrize(
    "grid, ratio, min_block",
    [((14, 14), 0.4, 16), ((16, 16), 0.4, 16), ((7, 9), 0.5, 4), ((4, 4), 0.4, 16), ((3, 5), 0.3, 1)],
)
def test_block_mask_masks_exactly_the_ratio(grid, ratio, min_block) -> None:
    generator = BlockMaskGenerator(grid, ratio, min_block, generator=torch.Generator().manual_seed(1))
    masks = generator(48)
    num_patches = grid[0] * grid[1]
    assert masks.dtype == torch.bool and masks.shape == (48, num_patches)
    assert generator.num_masked == round(ratio * num_patches)
    assert (masks.sum(dim=1) == generator.num_masked).all()


def test_block_masks_are_blocks() -> None:
    generator = BlockMaskGenerator(14, 0.4, generator=torch.Generator().manual_seed(2))
    masks = generator(64).reshape(64, 14, 14).numpy()
    components = [_components(mask) for mask in masks]
    rng = np.random.default_rng(0)
    scattered = [_components(rng.permutation(mask.ravel()).reshape(14, 14)) for mask in masks]
    # 78 masked patches in blocks of >= 16 (plus the odd patch grown onto a block): a handful of components, where the
    # same count scattered at random gives ~25
    assert max(components) <= 6 and np.mean(components) < 2.5
    assert np.mean(scattered) > 15


def test_block_mask_fill_grows_blocks_when_no_block_fits() -> None:
    # 2 rows: a block must be 1 row high, impossible for >= 16 patches with aspect >= 0.3, so every patch comes from
    # the fill, which grows one connected region
    masks = BlockMaskGenerator((2, 20), 0.5, generator=torch.Generator().manual_seed(3))(8)
    assert (masks.sum(dim=1) == 20).all()
    assert all(_components(mask.reshape(2, 20).numpy()) == 1 for mask in masks)


def test_block_mask_is_deterministic() -> None:
    first = BlockMaskGenerator(14, generator=torch.Generator().manual_seed(7))
    second = BlockMaskGenerator(14, generator=torch.Generator().manual_seed(7))
    a, b = first(16), second(16)
    assert torch.equal(a, b)
    assert not torch.equal(first(16), a)  # the generator moves on
    assert len({tuple(row.tolist()) for row in a}) > 1  # rows differ within a batch
    torch.manual_seed(5)
    c = BlockMaskGenerator(14)(4)
    torch.manual_seed(5)
    assert torch.equal(BlockMaskGenerator(14)(4), c)  # no generator: the global torch RNG


def test_block_mask_rejects_bad_arguments() -> None:
    for ratio in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
            BlockMaskGenerator(14, ratio)
    with pytest.raises(ValueError, match="min_patches_per_block"):
        BlockMaskGenerator(14, min_patches_per_block=0)
    with pytest.raises(ValueError, match="min_aspect <= max_aspect"):
        BlockMaskGenerator(14, min_aspect=0.0)
    with pytest.raises(ValueError, match="min_aspect <= max_aspect"):
        BlockMaskGenerator(14, min_aspect=2.0, max_aspect=1.0)
    for grid in ((0, 5), (3, 4, 5), "14"):
        with pytest.raises(ValueError, match="grid must be"):
            BlockMaskGenerator(grid)
    with pytest.raises(ValueError, match="batch must be"):
        BlockMaskGenerator(14)(-1)


def test_block_mask_plugs_into_a_vitfast_mim_model() -> None:
    model = vitfast.create_model("eva02_tiny_patch14_224_mim", depth=1, img_size=70).eval()
    generator = BlockMaskGenerator(model.patch_embed.grid_size, 0.4, min_patches_per_block=4)
    mask = generator(3)
    assert mask.shape == (3, 25) and generator.num_masked == 10
    image = torch.randn(3, 3, 70, 70)
    with torch.no_grad():
        assert model.forward_features(image, mask=mask).shape == (3, 26, 192)
        assert model.forward_mim(image, mask).shape == (30, model.lm_head.out_features)


# ---------------------------------------------------------------- EVA-02 MIM loss


def _negative_cosine_fp64(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred, target = pred.double(), target.double()
    cosine = (pred * target).sum(-1) / (pred.square().sum(-1).sqrt() * target.square().sum(-1).sqrt())
    return -cosine.mean()


def test_mim_loss_matches_fp64_and_the_official_formula() -> None:
    pred, target = torch.randn(37, 129), torch.randn(37, 129)
    loss = eva02_mim_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(_negative_cosine_fp64(pred, target).item(), abs=1e-6)
    official = -torch.nn.CosineSimilarity(dim=-1)(pred.float(), target.float()).mean()  # EVA-02 compute_loss
    assert torch.equal(loss, official)
    # a perfect prediction is -1, and the target's scale does not matter
    assert eva02_mim_loss(target * 3.0, target).item() == pytest.approx(-1.0, abs=1e-6)
    assert eva02_mim_loss(pred, F.normalize(target, dim=-1)).item() == pytest.approx(loss.item(), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mim_loss_runs_low_precision_inputs_in_fp32(dtype: torch.dtype) -> None:
    pred = torch.randn(41, 257)
    pred, target = pred.to(dtype), (pred + 0.5 * torch.randn(41, 257)).to(dtype)  # loss near -0.9
    loss = eva02_mim_loss(pred, target)
    assert loss.dtype == torch.float32
    exact = _negative_cosine_fp64(pred, target)  # the same rounded inputs, in fp64
    same_dtype = -F.cosine_similarity(pred, target, dim=-1).mean()  # what computing in the input dtype gives
    assert abs(loss.double() - exact).item() <= 1e-6
    assert abs(same_dtype.double() - exact).item() > 1e-5  # so the bound above does tell fp32 math from dtype math


def test_mim_loss_with_mask_selects_the_masked_teacher_rows() -> None:
    mask = BlockMaskGenerator((5, 6), 0.4, min_patches_per_block=4, generator=torch.Generator().manual_seed(0))(3)
    teacher = torch.randn(3, 30, 17)
    pred = torch.randn(int(mask.sum()), 17)
    expected = _negative_cosine_fp64(pred, teacher.reshape(-1, 17)[mask.reshape(-1)])
    assert eva02_mim_loss(pred, teacher, mask=mask).item() == pytest.approx(expected.item(), abs=1e-6)


def test_mim_loss_gradcheck() -> None:
    pred = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(eva02_mim_loss, (pred, target))
    teacher = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])
    assert torch.autograd.gradcheck(lambda p, t: eva02_mim_loss(p, t, mask=mask), (pred, teacher))
    # and the gradient is the fp64 reference's
    loss = eva02_mim_loss(pred, target)
    (grad,) = torch.autograd.grad(loss, pred)
    (expected,) = torch.autograd.grad(_negative_cosine_fp64(pred, target), pred)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_mim_loss_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="must have the same shape"):
        eva02_mim_loss(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="no tokens"):
        eva02_mim_loss(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="floating-point"):
        eva02_mim_loss(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"teacher's patch features \[B, N, D\]"):
        eva02_mim_loss(torch.randn(4, 8), torch.randn(2, 5, 8), mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="selected by the mask"):
        eva02_mim_loss(torch.randn(4, 8), torch.randn(2, 5, 8), mask=torch.ones(2, 5, dtype=torch.bool))


# ---------------------------------------------------------------- examples/finetune.py


def _run_example(args: list[str], prelude: str = "") -> tuple[list[float], subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # run as a user would
    env["VITFAST_BACKEND"] = "reference"
    code = f"import runpy, sys; {prelude}sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLE), *args, "--log-every", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    losses = [float(v) for v in re.findall(r"^step \d+/\d+ loss (\S+)", result.stdout, flags=re.MULTILINE)]
    return losses, result


def test_finetune_example_learns_a_fixed_batch() -> None:
    losses, _ = _run_example(["--steps", "10", "--img-size", "64", "--batch-size", "4", "--fixed-batch"])
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.2 * losses[0]  # 4 images, 10 classes: memorized in a few steps (2.3 -> ~0.003)


def test_finetune_example_mim_without_tqdm_or_torchvision() -> None:
    # both optional packages hidden: no progress bar, synthetic data instead of FakeData
    hide = "sys.modules['tqdm'] = None; sys.modules['torchvision'] = None; "
    losses, result = _run_example(
        ["--mim", "--steps", "3", "--img-size", "56", "--batch-size", "4", "--min-block", "4"], prelude=hide
    )
    assert len(losses) == 3 and all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in losses)
    assert "torchvision is not installed" in result.stderr
    assert "it/s" not in result.stderr and "s/it" not in result.stderr
