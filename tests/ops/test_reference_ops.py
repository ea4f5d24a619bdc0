"""Reference ops against independent computations (fp64 math, timm's implementations)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat
from timm.models.beit import gen_relative_position_index

from tests.helpers import assert_close_scaled
from vitfast import ops
from vitfast.layers import relative_position_index, resize_rel_pos_bias_table


@pytest.mark.parametrize("grid", [(16, 16), (32, 32), (24, 24), (12, 20)])
def test_rope_table_matches_timm_eva(grid) -> None:
    timm_rope = RotaryEmbeddingCat(dim=64, in_pixels=False, feat_shape=list(grid), ref_feat_shape=(16, 16))
    sin, cos = timm_rope.get_embed().chunk(2, dim=-1)
    our_cos, our_sin = ops.rope_2d_table(grid, 64, (16, 16))
    torch.testing.assert_close(our_cos, cos, rtol=0, atol=0)
    torch.testing.assert_close(our_sin, sin, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_apply_matches_timm_and_skips_prefix_tokens(dtype) -> None:
    cos, sin = ops.rope_2d_table((8, 8), 64)
    x = torch.randn(2, 3, 1 + 64, 64).to(dtype)
    out = ops.rope_2d(x, cos, sin, num_prefix_tokens=1)
    # timm rotates in fp32 too; releases before 1.0.30 return the fp32 result, later ones round it to x's dtype
    expected = apply_rot_embed_cat(x[:, :, 1:], torch.cat([sin, cos], dim=-1)).to(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out[:, :, 1:], expected, rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, :1], x[:, :, :1], rtol=0, atol=0)


def test_rope_is_a_rotation_of_channel_pairs() -> None:
    cos, sin = ops.rope_2d_table((5, 7), 32)
    x = torch.randn(4, 35, 32, dtype=torch.float64)
    out = ops.rope_2d_ref(x, cos.double(), sin.double())
    pair_norms = x.reshape(4, 35, 16, 2).norm(dim=-1)
    torch.testing.assert_close(out.reshape(4, 35, 16, 2).norm(dim=-1), pair_norms)
    with pytest.raises(ValueError, match="divisible by 4"):
        ops.rope_2d_table((4, 4), 30)


@pytest.mark.parametrize("window", [(14, 14), (7, 9), (1, 3)])
def test_relative_position_index_matches_timm(window) -> None:
    torch.testing.assert_close(relative_position_index(window), gen_relative_position_index(window), rtol=0, atol=0)


def test_relative_position_table_resize() -> None:
    table = torch.randn(27 * 27 + 3, 4)
    assert resize_rel_pos_bias_table(table, (14, 14), (14, 14)) is table
    constant = torch.full((27 * 27 + 3, 4), 0.25)
    resized = resize_rel_pos_bias_table(constant, (14, 14), (10, 20))
    assert resized.shape == (19 * 39 + 3, 4)
    torch.testing.assert_close(resized, torch.full_like(resized, 0.25))
    torch.testing.assert_close(resize_rel_pos_bias_table(table, (14, 14), (8, 8))[-3:], table[-3:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs 732"):
        resize_rel_pos_bias_table(torch.randn(100, 4), (14, 14), (8, 8))


def _attention_fp64(q, k, v, scale, bias=None):
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.double()
    return logits.softmax(dim=-1) @ v.double()


@pytest.mark.parametrize("head_dim", [32, 64, 80, 88])
def test_attention_reference_with_rope_and_relative_bias(head_dim) -> None:
    batch, heads, grid = 2, 3, (5, 6)
    tokens = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, tokens, head_dim) for _ in range(3))
    table = torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, heads)
    index = relative_position_index(grid)
    rope = ops.rope_2d_table(grid, head_dim) if head_dim % 4 == 0 else None
    out = ops.attention(q, k, v, rope=rope, num_prefix_tokens=1, rel_pos_bias_table=table, rel_pos_index=index)
    bias = torch.stack([table[index, h] for h in range(heads)])
    rq = ops.rope_2d_ref(q.double(), rope[0].double(), rope[1].double(), 1)
    rk = ops.rope_2d_ref(k.double(), rope[0].double(), rope[1].double(), 1)
    expected = _attention_fp64(rq, rk, v, head_dim**-0.5, bias)
    assert_close_scaled(out, expected, tol=2e-6, what="attention fp32 vs fp64")
    with pytest.raises(ValueError, match="given together"):
        ops.attention(q, k, v, rel_pos_bias_table=table)


def test_attention_custom_scale() -> None:
    q, k, v = (torch.randn(1, 2, 10, 16) for _ in range(3))
    assert_close_scaled(ops.attention(q, k, v, scale=0.01), _attention_fp64(q, k, v, 0.01), tol=2e-6)


def test_swiglu_layer_norm_and_patch_embed_references() -> None:
    gate, up = torch.randn(3, 7, 10), torch.randn(3, 7, 10)
    expected = gate.double() * torch.sigmoid(gate.double()) * up.double()
    assert_close_scaled(ops.swiglu(gate, up), expected, tol=1e-6)
    assert_close_scaled(ops.swiglu_packed(torch.cat([gate, up], -1)), expected, tol=1e-6)
    with pytest.raises(ValueError, match="even last dimension"):
        ops.swiglu_packed(torch.randn(2, 5))

    x, weight, bias = torch.randn(4, 2730), torch.randn(2730), torch.randn(2730)
    x64 = x.double()
    normed = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-6)
    assert_close_scaled(ops.layer_norm(x, weight, bias, 1e-6), normed * weight.double() + bias.double(), tol=1e-6)

    image, kernel, kernel_bias = torch.randn(2, 3, 28, 42), torch.randn(8, 3, 14, 14), torch.randn(8)
    patches = F.unfold(image.double(), kernel_size=14, stride=14).transpose(1, 2)  # [B, N, C * 14 * 14], row-major
    expected = patches @ kernel.double().reshape(8, -1).T + kernel_bias.double()
    out = ops.patch_embed(image, kernel, kernel_bias)
    assert out.shape == (2, 6, 8)
    assert_close_scaled(out, expected, tol=1e-6)
