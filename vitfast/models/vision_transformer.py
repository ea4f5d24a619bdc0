"""One Vision Transformer class, configured per family (ViT, CLIP, MAE, MoCo v3, BEiT v2, CAE, EVA, EVA-02).

All families share the pre-norm block; they differ in projection layout, MLP, position encoding (learned or
sin-cos absolute table, BEiT relative bias, EVA-02 RoPE), layer scale, pooling and head. Module and parameter
names match timm's ``VisionTransformer`` / ``Beit`` / ``Eva`` so their state_dicts load with ``strict=True``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from vitfast import ops
from vitfast.layers import (
    Attention,
    Block,
    LayerNorm,
    Mlp,
    PatchEmbed,
    Rope2D,
    SwiGLU,
    SwiGLUPacked,
    drop_path_rates,
    resample_abs_pos_embed,
    resize_rel_pos_bias_table,
    sincos_2d_pos_embed,
    to_2tuple,
)
from vitfast.layers.rel_pos import relative_position_index

__all__ = ["ViTConfig", "VisionTransformer", "feature_take_indices"]

MLP_KINDS = ("gelu", "quick_gelu", "swiglu", "swiglu_packed")
POS_EMBED_KINDS = ("learn", "sincos", "none")
GLOBAL_POOLS = ("token", "avg", "")


def _check_sizes(cfg: ViTConfig) -> None:
    """Sizes, counts and rates of a config: whole numbers where a layer count or width is meant, in range.

    Checked once, here, where every family's model is configured: a bad value would otherwise surface deep inside
    torch (a modulo by zero, a float given to range()) or, worse, build a model that silently computes nonsense.
    """

    def whole(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def number(value: Any) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    sizes = list(cfg.img_size) if isinstance(cfg.img_size, tuple | list) else [cfg.img_size]
    problems = [
        f"{name} must be a positive whole number, got {value!r}"
        for name, values in (
            ("img_size", sizes),
            ("patch_size", [cfg.patch_size]),
            ("in_chans", [cfg.in_chans]),
            ("embed_dim", [cfg.embed_dim]),
            ("num_heads", [cfg.num_heads]),
        )
        for value in values
        if not (whole(value) and value > 0)
    ]
    problems += [
        f"{name} must be a whole number >= 0, got {value!r}"
        for name, value in (("depth", cfg.depth), ("num_classes", cfg.num_classes), ("mim_head_dim", cfg.mim_head_dim))
        if not (whole(value) and value >= 0)
    ]
    width_ok = whole(cfg.embed_dim) and cfg.embed_dim > 0
    if not (number(cfg.mlp_ratio) and cfg.mlp_ratio > 0 and (not width_ok or int(cfg.embed_dim * cfg.mlp_ratio) > 0)):
        problems.append(f"mlp_ratio must be a positive number giving an MLP width >= 1, got {cfg.mlp_ratio!r}")
    if not (number(cfg.norm_eps) and cfg.norm_eps > 0):
        problems.append(f"norm_eps must be a positive number, got {cfg.norm_eps!r}")
    for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
        value = getattr(cfg, name)
        if not (number(value) and 0 <= value < 1):
            problems.append(f"{name} must be a probability in [0, 1), got {value!r}")
    if not problems and whole(cfg.patch_size) and any(size < cfg.patch_size for size in sizes):
        problems.append(f"img_size {cfg.img_size} is smaller than one patch ({cfg.patch_size} pixels)")
    if problems:
        raise ValueError(f"invalid model configuration: {'; '.join(problems)}.")


@dataclass
class ViTConfig:
    """Architecture of a :class:`VisionTransformer`. Every field can be overridden in ``create_model``."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"  # "token" (class token), "avg" (mean of patch tokens) or "" (no pooling)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp: str = "gelu"  # "gelu", "quick_gelu", "swiglu" (fc1_g/fc1_x) or "swiglu_packed" (fc1 = [gate | up])
    mlp_norm: bool = False  # EVA-02 B/L sub-LN over the hidden width (swiglu only)
    qkv_layout: str = "fused"  # "fused", "fused_qv_bias" or "split", see vitfast.layers.attention
    qkv_bias: bool = True
    qk_scale: float | None = None
    attn_norm: bool = False  # LayerNorm on the attention output before proj (EVA-CLIP)
    norm_eps: float = 1e-6
    layer_scale_init: float | None = None
    pos_embed: str = "learn"  # "learn", "sincos" (fixed, not trained) or "none"
    rel_pos_bias: bool = False  # per-block BEiT relative position bias
    rope: bool = False  # EVA-02 2D RoPE
    rope_ref_grid: tuple[int, int] = (16, 16)
    rope_temperature: float = 10000.0
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP's ln_pre)
    patch_bias: bool | None = None  # default: no bias when pre_norm
    fc_norm: bool | None = None  # norm after pooling instead of before; default: global_pool == "avg"
    mask_token: bool = False  # learned token for masked image modeling
    mim_head_dim: int = 0  # width of the MIM regression head (lm_head); 0: none
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dynamic_img_size: bool = False
    dynamic_img_pad: bool = False  # zero-pad inputs to a multiple of the patch size (with dynamic_img_size)
    head_init_scale: float | None = None
    fix_init: bool = False  # BEiT init: divide attn.proj and mlp.fc2 weights by sqrt(2 * layer)

    def __post_init__(self) -> None:
        _check_sizes(self)
        self.img_size = to_2tuple(self.img_size)
        self.rope_ref_grid = to_2tuple(self.rope_ref_grid)
        checks = [
            (self.mlp in MLP_KINDS, f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}"),
            (self.pos_embed in POS_EMBED_KINDS, f"pos_embed must be one of {POS_EMBED_KINDS}, got {self.pos_embed!r}"),
            (self.global_pool in GLOBAL_POOLS, f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}"),
            (
                self.embed_dim % self.num_heads == 0,
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
            ),
            (self.depth >= 0 and self.num_classes >= 0, "depth and num_classes must be non-negative"),
            (not self.mlp_norm or self.mlp == "swiglu", "mlp_norm (sub-LN) needs mlp='swiglu'"),
            (not self.rope or (self.embed_dim // self.num_heads) % 4 == 0, "RoPE needs a head dim divisible by 4"),
            (not self.mim_head_dim or self.mask_token, "a MIM head (mim_head_dim) needs mask_token=True"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid ViTConfig: {message}.")

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def from_kwargs(cls, base: dict[str, Any], overrides: dict[str, Any]) -> ViTConfig:
        """Merge ``overrides`` into ``base``; an unknown field name raises ``TypeError`` listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"unknown model argument(s) {', '.join(unknown)}; valid architecture arguments are: "
                f"{', '.join(sorted(names))}."
            )
        return cls(**{**base, **overrides})


def feature_take_indices(
    num_blocks: int, indices: int | list[int] | tuple[int, ...] | None = None
) -> tuple[list[int], int]:
    """timm's ``indices`` convention -> (absolute block indices, the largest one).

    ``None``: every block; an int ``n``: the last ``n``; a sequence: those indices, negative ones counted from the end.
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices} asks for the last {indices} blocks; the model has {num_blocks}.")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for index in indices:
            absolute = num_blocks + index if index < 0 else index
            if not 0 <= absolute < num_blocks:
                raise ValueError(f"block index {index} is out of range for a model with {num_blocks} blocks.")
            take.append(absolute)
        if not take:
            raise ValueError("indices is empty; pass None (all blocks), an int (the last n) or block indices.")
    return take, max(take)


def _build_mlp(cfg: ViTConfig) -> nn.Module:
    hidden = cfg.mlp_hidden_dim
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.embed_dim, hidden, sub_norm=cfg.mlp_norm, eps=cfg.norm_eps, drop=cfg.proj_drop_rate)
    if cfg.mlp == "swiglu_packed":
        return SwiGLUPacked(cfg.embed_dim, hidden, drop=cfg.proj_drop_rate)
    return Mlp(cfg.embed_dim, hidden, act=cfg.mlp, drop=cfg.proj_drop_rate)


class VisionTransformer(nn.Module):
    """A Vision Transformer with timm's model API.

    - ``forward_features(x, mask=None)`` -> tokens ``[B, 1 + N, C]`` after the final norm;
    - ``forward_head(tokens, pre_logits=False)`` -> pooled features or logits; ``forward(x)`` does both;
    - ``forward_mim(x, mask)`` -> MIM head predictions for the masked patches (models with ``mim_head_dim``).

    ``mask`` is a bool ``[B, N]`` over patches (row-major grid order); ``True`` replaces that patch embedding by the
    learned ``mask_token`` before position embeddings are added, as BEiT / CAE / EVA-02 pretraining does.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = ViTConfig.from_kwargs(dataclasses.asdict(config) if config else {}, overrides)
        self.config = cfg
        self.family = "vit"
        self.pretrained_cfg: dict[str, Any] = {}
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = 1
        self.num_reg_tokens = 0
        self.has_class_token = True
        self.no_embed_class = False
        self.dynamic_img_size = cfg.dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            cfg.img_size,
            cfg.patch_size,
            cfg.in_chans,
            cfg.embed_dim,
            bias=(not cfg.pre_norm) if cfg.patch_bias is None else cfg.patch_bias,
            dynamic_img_size=cfg.dynamic_img_size,
            dynamic_img_pad=cfg.dynamic_img_pad,
        )
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.mask_token else None
        if cfg.pos_embed == "none":
            self.pos_embed = None
        else:
            num_pos = self.patch_embed.num_patches + self.num_prefix_tokens
            self.pos_embed = nn.Parameter(
                torch.zeros(1, num_pos, cfg.embed_dim), requires_grad=cfg.pos_embed == "learn"
            )
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.rope = (
            Rope2D(cfg.embed_dim // cfg.num_heads, cfg.rope_ref_grid, cfg.rope_temperature) if cfg.rope else None
        )
        self.norm_pre = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()

        self.blocks = nn.ModuleList()
        for rate in drop_path_rates(cfg.drop_path_rate, cfg.depth):
            attn = Attention(
                cfg.embed_dim,
                cfg.num_heads,
                qkv_layout=cfg.qkv_layout,
                qkv_bias=cfg.qkv_bias,
                qk_scale=cfg.qk_scale,
                inner_norm=cfg.attn_norm,
                norm_eps=cfg.norm_eps,
                rel_pos_window=grid if cfg.rel_pos_bias else None,
                rope=self.rope,
                num_prefix_tokens=self.num_prefix_tokens,
                default_grid=grid,
                attn_drop=cfg.attn_drop_rate,
                proj_drop=cfg.proj_drop_rate,
            )
            block = Block(cfg.embed_dim, attn, _build_mlp(cfg), cfg.norm_eps, cfg.layer_scale_init, rate)
            self.blocks.append(block)
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=cfg.embed_dim, reduction=reduction) for i in range(cfg.depth)
        ]

        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.fc_norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.mim_head_dim) if cfg.mim_head_dim else None
        self.init_weights()

    # ------------------------------------------------------------------ initialization

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init in the style of timm / BEiT: truncated normal (std 0.02) linears and embeddings."""
        cfg = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        if cfg.pos_embed == "learn":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        elif cfg.pos_embed == "sincos":
            self.pos_embed.copy_(
                sincos_2d_pos_embed(self.patch_embed.grid_size, cfg.embed_dim, device=self.pos_embed.device)
            )
        if cfg.fix_init:
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
        if cfg.head_init_scale is not None and isinstance(self.head, nn.Linear):
            self.head.weight.mul_(cfg.head_init_scale)

    # ------------------------------------------------------------------ timm-style API

    _NOT_SCRIPTABLE = (
        "vitfast models do not support {what}: each op picks its implementation (reference / Triton / "
        "CUDA) in Python at call time and validates input shapes with Python control flow. Export with "
        "torch.export or ONNX instead (vitfast.export.export_model, `vitfast export MODEL OUT`), which trace the "
        "reference path; torch.jit.trace and torch.compile also work."
    )

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(self._NOT_SCRIPTABLE.format(what="torch.jit.script (TorchScript)"))

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    def no_weight_decay(self) -> set[str]:
        """Parameters that optimizers conventionally exclude from weight decay."""
        names = {"cls_token", "pos_embed", "mask_token"}
        names |= {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}
        return {n for n, _ in self.named_parameters() if n in names}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter-group regexes: the stem is layer 0, block ``i`` layer ``i + 1``, the final norm joins
        the last block (timm's ``MATCH_PREV_GROUP``) and what no regex matches (head, ``fc_norm``) comes last.

        ``timm.optim.create_optimizer_v2(model, layer_decay=...)`` and ``timm.optim.param_groups_layer_decay`` read it.
        """
        return dict(
            stem=r"^cls_token|reg_token|mask_token|pos_embed|patch_embed|norm_pre|rel_pos_bias",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (saves memory); applies also when blocks are called directly."""
        self.grad_checkpointing = enable
        for block in self.blocks:
            block.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh ``num_classes``-way linear (``0``: identity, returns pooled features)."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}.")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.cls_token
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    @torch.no_grad()
    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """Change the nominal input size and / or the patch size, as timm's ``set_input_size``.

        The position embedding is resampled (bicubic) and the BEiT relative position tables resized (BEiT's
        geometric interpolation) to the new grid; a new patch size resamples the patch kernel with the FlexiViT
        pseudo-inverse (timm's ``resample_patch_embed``).
        """
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        patch = self.patch_embed.patch_size
        self.config.patch_size = patch[0] if patch[0] == patch[1] else patch
        for info in self.feature_info:
            info["reduction"] = patch[0]
        new_grid = self.patch_embed.grid_size
        self.config.img_size = self.patch_embed.img_size
        self.pretrained_cfg = {**self.pretrained_cfg, "input_size": (self.config.in_chans, *self.patch_embed.img_size)}
        if new_grid == old_grid:
            return
        if self.pos_embed is not None:
            resampled = resample_abs_pos_embed(self.pos_embed, new_grid, old_grid, self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)
        for block in self.blocks:
            attn = block.attn
            attn.default_grid = new_grid
            if attn.relative_position_bias_table is not None:
                table = resize_rel_pos_bias_table(attn.relative_position_bias_table, attn.window_size, new_grid)
                attn.relative_position_bias_table = nn.Parameter(table)
                attn.window_size = new_grid
                attn.relative_position_index = relative_position_index(new_grid, device=table.device)

    # ------------------------------------------------------------------ forward

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int]]:
        if isinstance(x, torch.fx.Proxy):
            raise TypeError(self._NOT_SCRIPTABLE.format(what="torch.fx symbolic tracing"))
        grid = self.patch_embed.grid_size_for(x)
        pos_embed = self.pos_embed
        if pos_embed is not None and grid != self.patch_embed.grid_size:
            pos_embed = resample_abs_pos_embed(pos_embed, grid, self.patch_embed.grid_size, self.num_prefix_tokens)
        # uint8 images (0-255) are normalized with the weights' mean/std as the patch embedding reads them
        mean, std = (
            (self.pretrained_cfg["mean"], self.pretrained_cfg["std"]) if x.dtype == torch.uint8 else (None, None)
        )
        if self.patch_embed.dynamic_img_pad:
            if mean is not None:  # pad with zeros of the normalized image, as timm pads its float input
                stats = dict(device=x.device, dtype=torch.float32)
                mean_t, std_t = (torch.tensor(v, **stats).view(-1, 1, 1) for v in (mean, std))
                x = ((x.float() / 255.0 - mean_t) / std_t).to(self.patch_embed.proj.weight.dtype)
                mean = std = None
            x = self.patch_embed.pad_to_patches(x)
        proj = self.patch_embed.proj
        if mask is None:  # patch GEMM, bias, class token and position embedding in one op
            return self.pos_drop(
                ops.patch_embed_tokens(x, proj.weight, proj.bias, pos_embed, self.cls_token, mean, std)
            ), grid
        x = self._apply_mask(ops.patch_embed_tokens(x, proj.weight, proj.bias, None, None, mean, std), mask)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if pos_embed is not None:
            x = x + pos_embed
        return self.pos_drop(x), grid

    def _apply_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mask_token is None:
            raise ValueError(
                "this model has no mask token; build it with mask_token=True (or use a *_mim model) for "
                "masked-image forward passes."
            )
        if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
            raise ValueError(
                f"mask must be a bool tensor of shape [batch, num_patches] = {list(x.shape[:2])}, got "
                f"{mask.dtype} {list(mask.shape)}."
            )
        return torch.where(mask.unsqueeze(-1), self.mask_token, x)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image ``[B, C, H, W]`` -> normalized tokens ``[B, 1 + N, C]`` (class token first)."""
        x, grid = self._embed(x, mask)
        x = self.norm_pre(x)
        rope = self.rope.table(grid, device=x.device) if self.rope is not None else None
        for block in self.blocks:
            x = block(x, grid=grid, rope=rope)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]] | dict[str, Any]:
        """Block outputs for dense tasks, with timm's signature and outputs.

        Args:
            x: image batch ``[B, C, H, W]``.
            indices: ``None`` all blocks, an int ``n`` the last ``n`` blocks, a sequence the listed block indices
                (negative counts from the end).
            return_prefix_tokens: pair each intermediate with its prefix (class) tokens ``[B, 1, C]``.
            norm: apply the final ``norm`` to each intermediate.
            stop_early: skip the blocks after the last requested one.
            output_fmt: ``"NCHW"`` (patch tokens as a ``[B, C, H / p, W / p]`` map) or ``"NLC"`` (``[B, N, C]``).
            intermediates_only: return only the intermediates.
            output_dict: return ``{"image_intermediates", "image_intermediates_prefix"?, "image_features"?}``.

        Returns:
            ``(final normalized tokens, intermediates)``, the intermediates alone, or the dict.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch = x.shape[0]
        x, grid = self._embed(x, None)
        x = self.norm_pre(x)
        rope = self.rope.table(grid, device=x.device) if self.rope is not None else None
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = block(x, grid=grid, rope=rope)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix_tokens = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / the head), as timm does.

        Returns the absolute block indices kept for :meth:`forward_intermediates`.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        if self.global_pool == "token":
            return x[:, 0]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled, normalized features (``pre_logits=True``) or logits."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_mim(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """EVA-02 MIM pretraining forward: ``lm_head`` of the normalized masked patch tokens ``[num_masked, D_t]``."""
        if self.lm_head is None:
            raise ValueError("this model has no MIM head; build it with mim_head_dim > 0 (e.g. an eva02_*_mim model).")
        if not isinstance(mask, torch.Tensor):  # None would run unmasked and regress every token, silently
            raise TypeError(
                f"forward_mim needs a bool mask [batch, num_patches] (True: masked), got {type(mask).__name__}; "
                "vitfast.BlockMaskGenerator(grid, mask_ratio=0.4)(batch_size) makes one."
            )
        tokens = self.forward_features(x, mask=mask)[:, self.num_prefix_tokens :]
        return self.lm_head(tokens[mask])
