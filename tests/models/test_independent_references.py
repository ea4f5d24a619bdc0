"""Models timm does not ship (legacy ViT-S, MoCo v3, CAE) and the masked-image forward, checked against references
built here from timm's VisionTransformer / Beit / Eva modules with the right configuration."""

from __future__ import annotations

import math
from functools import partial

import pytest
import timm
import torch
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vitfast
from tests.helpers import assert_close_scaled, randomize_


def moco_sincos_pos_embed(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's ``build_2d_sincos_position_embedding`` as its paper code defines it (square grids, zero cls entry)."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0).unsqueeze(0)


def _compare(ours, reference, image, what):
    with torch.no_grad():
        assert_close_scaled(ours.forward_features(image), reference.forward_features(image), what=f"{what} features")
        assert_close_scaled(ours(image), reference(image), what=f"{what} logits")


def test_legacy_vit_small_matches_timm_with_rescaled_queries() -> None:
    """Legacy ViT-S scales logits by 768^-0.5 instead of head_dim^-0.5: timm's ViT with the q rows of qkv scaled by
    sqrt(96 / 768) computes the same function."""
    ours = randomize_(vitfast.create_model("vit_small_patch16_224_legacy", depth=3)).eval()
    reference = TimmViT(
        embed_dim=768,
        depth=3,
        num_heads=8,
        mlp_ratio=3.0,
        qkv_bias=False,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-5),
    ).eval()
    state = ours.state_dict()
    for key in [k for k in state if k.endswith("attn.qkv.weight")]:
        state[key] = state[key].clone()
        state[key][:768] *= math.sqrt(96 / 768)
    reference.load_state_dict(state, strict=True)
    _compare(ours, reference, torch.randn(2, 3, 224, 224), "legacy ViT-S")
    assert sum(p.numel() for p in vitfast.create_model("vit_small_patch16_224_legacy").parameters()) == 48_754_408


@pytest.mark.parametrize(("name", "dim", "heads"), [("mocov3_vit_small", 384, 12), ("mocov3_vit_base", 768, 12)])
def test_mocov3_matches_timm_vit_with_frozen_sincos(name: str, dim: int, heads: int) -> None:
    ours = vitfast.create_model(name, depth=2, num_classes=5).eval()
    assert not ours.pos_embed.requires_grad
    torch.testing.assert_close(ours.pos_embed.detach(), moco_sincos_pos_embed(14, dim), rtol=0, atol=0)
    reference = TimmViT(embed_dim=dim, depth=2, num_heads=heads, num_classes=5).eval()
    randomize_(reference)
    state = reference.state_dict()
    state["pos_embed"] = moco_sincos_pos_embed(14, dim)
    reference.load_state_dict(state)
    ours.load_state_dict(state, strict=True)
    _compare(ours, reference, torch.randn(2, 3, 224, 224), name)


def test_cae_matches_timm_beit_with_sincos_abs_pos() -> None:
    ours = vitfast.create_model("cae_base_patch16_224", depth=2, num_classes=5).eval()
    torch.testing.assert_close(ours.pos_embed.detach(), moco_sincos_pos_embed(14, 768), rtol=0, atol=0)
    reference = Beit(depth=2, num_classes=5, use_abs_pos_emb=True, use_rel_pos_bias=True, init_values=0.1).eval()
    randomize_(reference)
    state = reference.state_dict()
    state["pos_embed"] = moco_sincos_pos_embed(14, 768)
    reference.load_state_dict(state)
    ours.load_state_dict(state, strict=True)
    _compare(ours, reference, torch.randn(2, 3, 224, 224), "CAE")


def _random_mask(batch: int, num_patches: int, ratio: float = 0.4) -> torch.Tensor:
    scores = torch.rand(batch, num_patches)
    return scores < scores.quantile(ratio, dim=1, keepdim=True)


def _timm_masked_features(reference, mask_token, image, mask):
    """Masked forward assembled from timm's modules: replace masked patch embeddings, then the usual pipeline."""
    x = reference.patch_embed(image)
    x = torch.where(mask.unsqueeze(-1), mask_token, x)
    if hasattr(reference, "rope"):  # Eva
        x, rope = reference._pos_embed(x)
        for block in reference.blocks:
            x = block(x, rope=rope)
    else:  # Beit
        x = torch.cat([reference.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if reference.pos_embed is not None:
            x = x + reference.pos_embed
        for block in reference.blocks:
            x = block(x)
    return reference.norm(x)


@pytest.mark.parametrize(
    ("name", "reference_builder"),
    [
        (
            "eva02_base_patch14_224_mim",
            lambda: timm.create_model("eva02_base_patch14_224", depth=2, num_classes=0, global_pool="token"),
        ),
        (
            "eva02_small_patch14_224_mim",
            lambda: timm.create_model("eva02_small_patch14_224", depth=2, num_classes=0, global_pool="token"),
        ),
        (
            "beitv2_base_patch16_224",
            lambda: timm.create_model("beitv2_base_patch16_224", depth=2, num_classes=0, global_pool="token"),
        ),
        (
            "cae_base_patch16_224",
            lambda: Beit(
                depth=2,
                num_classes=0,
                use_abs_pos_emb=True,
                use_rel_pos_bias=True,
                init_values=0.1,
                global_pool="token",
            ),
        ),
    ],
)
def test_masked_forward_matches_reference(name, reference_builder) -> None:
    reference = randomize_(reference_builder()).eval()
    ours = vitfast.create_model(name, depth=2, num_classes=0, global_pool="token", mask_token=True).eval()
    result = ours.load_state_dict(reference.state_dict(), strict=False)
    assert set(result.missing_keys) <= {"mask_token", "lm_head.weight", "lm_head.bias"} and not result.unexpected_keys
    with torch.no_grad():
        ours.mask_token.normal_()
    image = torch.randn(2, 3, 224, 224)
    mask = _random_mask(2, ours.patch_embed.num_patches)
    with torch.no_grad():
        expected = _timm_masked_features(reference, ours.mask_token, image, mask)
        assert_close_scaled(ours.forward_features(image, mask=mask), expected, what=f"{name} masked")
        unmasked = ours.forward_features(image)
    assert not torch.allclose(unmasked, expected), "the mask must change the features"
    if ours.lm_head is not None:
        predictions = ours.forward_mim(image, mask)
        assert predictions.shape == (int(mask.sum()), ours.lm_head.out_features)
        assert_close_scaled(predictions, ours.lm_head(expected[:, 1:][mask]), what=f"{name} forward_mim")


def test_mask_errors() -> None:
    image = torch.randn(1, 3, 224, 224)
    plain = vitfast.create_model("vit_small_patch16_224", depth=1)
    with pytest.raises(ValueError, match="no mask token"):
        plain.forward_features(image, mask=torch.zeros(1, 196, dtype=torch.bool))
    mim = vitfast.create_model("eva02_tiny_patch14_224_mim", depth=1)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        mim.forward_features(image, mask=torch.zeros(1, 256))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        mim.forward_features(image, mask=torch.zeros(1, 255, dtype=torch.bool))
    with pytest.raises(ValueError, match="no MIM head"):
        vitfast.create_model("beitv2_base_patch16_224", depth=1, mask_token=True).forward_mim(
            image, torch.zeros(1, 196, dtype=torch.bool)
        )
