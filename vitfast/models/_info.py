"""Facts about registered models without allocating their weights: parameter counts, FLOPs, configuration.

Models are built on the ``meta`` device, so even EVA-g (1B parameters) costs no memory or init time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitfast.models._registry import ModelEntry, Weights, create_model, list_models, resolve

__all__ = ["ModelInfo", "alias_table", "markdown_table", "model_info"]


@dataclass
class ModelInfo:
    name: str
    entry: ModelEntry
    weights: Weights | None
    config: Any
    pretrained_cfg: dict[str, Any]
    num_params: int
    num_params_without_pos: int  # without the absolute position embedding and class token (the seed tables' count)
    gflops: float | None  # multiply and add counted separately (torch.utils.flop_counter convention)

    @property
    def architecture(self) -> str:
        cfg = self.config
        mlp = {"gelu": "GELU MLP", "quick_gelu": "QuickGELU MLP", "swiglu": "SwiGLU", "swiglu_packed": "SwiGLU"}[
            cfg.mlp
        ]
        parts = [
            f"patch {cfg.patch_size}",
            f"width {cfg.embed_dim}",
            f"depth {cfg.depth}",
            f"{cfg.num_heads} heads of {cfg.embed_dim // cfg.num_heads}",
            f"{mlp} {cfg.mlp_hidden_dim}" + (" + sub-LN" if cfg.mlp_norm else ""),
        ]
        if cfg.pos_embed != "none":
            parts.append({"learn": "learned abs pos", "sincos": "sin-cos abs pos"}[cfg.pos_embed])
        if cfg.rel_pos_bias:
            parts.append("rel-pos bias")
        if cfg.rope:
            parts.append("2D RoPE")
        if cfg.layer_scale_init is not None:
            parts.append("layer scale")
        return ", ".join(parts)


def model_info(name: str, flops: bool = False, **overrides: Any) -> ModelInfo:
    """Describe ``name`` (model, ``name.tag`` or alias), optionally counting forward FLOPs for one image."""
    entry, weights, _ = resolve(name)
    with torch.device("meta"):
        model = create_model(name, **overrides)
    num_params = sum(p.numel() for p in model.parameters())
    pos = (model.pos_embed.numel() if model.pos_embed is not None else 0) + model.cls_token.numel()
    gflops = None
    if flops:
        x = torch.empty(1, model.config.in_chans, *model.config.img_size, device="meta")
        with FlopCounterMode(display=False) as counter:
            model(x)
        gflops = counter.get_total_flops() / 1e9
    return ModelInfo(name, entry, weights, model.config, model.pretrained_cfg, num_params, num_params - pos, gflops)


def markdown_table() -> str:
    """The README's model table, generated from the registry."""
    rows = [
        "| model | family | params (M) | input | architecture | timm counterpart | pretrained (default tag) |",
        "|---|---|---:|---|---|---|---|",
    ]
    for name in list_models():
        info = model_info(name)
        cfg = info.config
        weights = info.entry.default_weights
        pretrained = f"`{weights.tag}` ({len(info.entry.weights)} tags)" if weights else "-"
        timm_name = info.entry.timm_name or "-"
        if info.entry.timm_kwargs:
            timm_name += " (" + ", ".join(f"{k}={v}" for k, v in info.entry.timm_kwargs.items()) + ")"
        rows.append(
            f"| `{name}` | {info.entry.family} | {info.num_params / 1e6:.2f} | {cfg.img_size[0]}x{cfg.img_size[1]} "
            f"| {info.architecture} | {timm_name} | {pretrained} |"
        )
    return "\n".join(rows)


def alias_table() -> str:
    """The README's alias table (seed-document names and short names), generated from the registry."""
    from vitfast.models._registry import list_aliases

    rows = ["| alias | model | weights | overrides | importable | note |", "|---|---|---|---|---|---|"]
    for name, alias in sorted(list_aliases().items(), key=lambda item: (not item[1].short, item[0].lower())):
        weights = alias.weights.source if isinstance(alias.weights, Weights) else (alias.weights or "default")
        overrides = ", ".join(f"{k}={v}" for k, v in alias.kwargs.items()) or "-"
        importable = "`from vitfast import " + name + "`" if alias.short else "create_model only"
        rows.append(f"| `{name}` | `{alias.target}` | {weights} | {overrides} | {importable} | {alias.note} |")
    return "\n".join(rows)
