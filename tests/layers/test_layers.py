"""Layer-level behaviour not covered by the model parity tests."""

from __future__ import annotations

import pytest
import torch

from vitfast.layers import Attention, DropPath, Mlp, PatchEmbed, Rope2D, sincos_2d_pos_embed


def test_patch_embed_geometry_and_errors() -> None:
    embed = PatchEmbed(img_size=(224, 196), patch_size=14, embed_dim=8)
    assert embed.grid_size == (16, 14) and embed.num_patches == 224
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        PatchEmbed(img_size=225, patch_size=16)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        embed.set_img_size(230)


def test_drop_path_is_identity_in_eval_and_unbiased_in_training() -> None:
    drop = DropPath(0.25)
    x = torch.ones(20000, 4)
    assert drop.eval()(x) is x
    out = drop.train()(x)
    kept = (out[:, 0] > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.02 and torch.allclose(out[out > 0], torch.full_like(out[out > 0], 1 / 0.75))
    with pytest.raises(ValueError, match="drop path rate"):
        DropPath(1.0)


def test_layer_configuration_errors() -> None:
    with pytest.raises(ValueError, match="unknown activation"):
        Mlp(8, 16, act="relu6")
    with pytest.raises(ValueError, match="unknown qkv_layout"):
        Attention(64, 4, qkv_layout="fused_qkv")
    with pytest.raises(ValueError, match="RoPE head dim 32 does not match"):
        Attention(64, 4, rope=Rope2D(32))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed((4, 4), 30)


def test_sincos_table_layout() -> None:
    table = sincos_2d_pos_embed((3, 5), 16)
    assert table.shape == (1, 16, 16)
    assert torch.equal(table[0, 0], torch.zeros(16))
    # token 1 + r * 5 + c: first half encodes the row, second half the column
    row_part, col_part = table[0, 1 + 2 * 5 + 3, :8], table[0, 1 + 2 * 5 + 3, 8:]
    torch.testing.assert_close(row_part, table[0, 1 + 2 * 5 + 0, :8])
    torch.testing.assert_close(col_part, table[0, 1 + 0 * 5 + 3, 8:])
