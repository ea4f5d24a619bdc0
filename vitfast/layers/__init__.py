"""Drop-in ``nn.Module`` building blocks on top of ``vitfast.ops``."""

from vitfast.layers.attention import Attention
from vitfast.layers.block import Block
from vitfast.layers.drop import DropPath, drop_path_rates
from vitfast.layers.mlp import Mlp, SwiGLU, SwiGLUPacked
from vitfast.layers.norm import LayerNorm
from vitfast.layers.patch_embed import PatchEmbed, adapt_input_channels, to_2tuple
from vitfast.layers.pos_embed import resample_abs_pos_embed, resample_patch_embed, sincos_2d_pos_embed
from vitfast.layers.rel_pos import relative_position_index, resize_rel_pos_bias_table
from vitfast.layers.rope import Rope2D

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerNorm",
    "Mlp",
    "PatchEmbed",
    "Rope2D",
    "SwiGLU",
    "SwiGLUPacked",
    "adapt_input_channels",
    "drop_path_rates",
    "relative_position_index",
    "resample_abs_pos_embed",
    "resample_patch_embed",
    "resize_rel_pos_bias_table",
    "sincos_2d_pos_embed",
    "to_2tuple",
]
