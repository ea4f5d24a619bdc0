"""Functional ops. Each file holds one op: its reference, its kernels (when present) and its public function."""

from vitfast.ops.attention import attention, attention_ref, gather_rel_pos_bias
from vitfast.ops.layer_norm import (
    layer_norm,
    layer_norm_ref,
    layer_norm_residual,
    layer_norm_residual_partials,
    layer_norm_residual_partials_ref,
    layer_norm_residual_ref,
)
from vitfast.ops.linear import linear, linear_ref, linear_split_k, linear_split_k_ref
from vitfast.ops.patch_embed import patch_embed, patch_embed_ref, patch_embed_tokens, patch_embed_tokens_ref
from vitfast.ops.preprocess import patch_rows_to_tokens, preprocess, preprocess_ref
from vitfast.ops.rope import rope_2d, rope_2d_qk, rope_2d_qk_ref, rope_2d_ref, rope_2d_table
from vitfast.ops.swiglu import (
    swiglu,
    swiglu_layer_norm,
    swiglu_layer_norm_ref,
    swiglu_packed,
    swiglu_packed_ref,
    swiglu_ref,
)

__all__ = [
    "attention",
    "attention_ref",
    "gather_rel_pos_bias",
    "layer_norm",
    "layer_norm_ref",
    "layer_norm_residual",
    "layer_norm_residual_partials",
    "layer_norm_residual_partials_ref",
    "layer_norm_residual_ref",
    "linear",
    "linear_ref",
    "linear_split_k",
    "linear_split_k_ref",
    "patch_embed",
    "patch_embed_ref",
    "patch_embed_tokens",
    "patch_embed_tokens_ref",
    "patch_rows_to_tokens",
    "preprocess",
    "preprocess_ref",
    "rope_2d",
    "rope_2d_qk",
    "rope_2d_qk_ref",
    "rope_2d_ref",
    "rope_2d_table",
    "swiglu",
    "swiglu_layer_norm",
    "swiglu_layer_norm_ref",
    "swiglu_packed",
    "swiglu_packed_ref",
    "swiglu_ref",
]
