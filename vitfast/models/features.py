"""``create_model(..., features_only=True)``: timm's "getter" feature extractor over ``forward_intermediates``.

The wrapper and its ``feature_info`` follow timm's ``FeatureGetterNet`` / ``FeatureInfo`` (same attribute and method
names, same ``model.*`` state_dict keys), so detection and segmentation code written for a timm ViT backbone runs as
it is.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["FeatureGetterNet", "FeatureInfo"]


class FeatureInfo:
    """Per-block feature metadata (``module``, ``num_chs``, ``reduction``) and the blocks a feature model outputs."""

    def __init__(self, feature_info: list[dict[str, Any]], out_indices: list[int] | tuple[int, ...]) -> None:
        self.info = [dict(info, index=i) for i, info in enumerate(copy.deepcopy(feature_info))]
        self.out_indices = tuple(out_indices)

    def from_other(self, out_indices: list[int] | tuple[int, ...]) -> FeatureInfo:
        return FeatureInfo(self.info, out_indices)

    def get(self, key: str, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        """``key`` for each output block (``idx=None``), for the block ``idx``, or for each listed block."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(
        self, keys: list[str] | None = None, idx: int | list[int] | tuple[int, ...] | None = None
    ) -> list[dict[str, Any]] | dict[str, Any]:
        def pick(i: int) -> dict[str, Any]:
            return self.info[i] if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | list[int] | tuple[int, ...] | None = None) -> Any:
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class FeatureGetterNet(nn.Module):
    """A backbone returning the patch-token maps of the ``out_indices`` blocks (timm's ``feature_cls='getter'``).

    The blocks after the last requested one, the head and (unless ``norm``) the final norm are pruned away.
    ``forward(x)`` -> list of ``[B, C, H / p, W / p]`` tensors (``output_fmt="NLC"``: ``[B, N, C]``).
    """

    def __init__(
        self,
        model: nn.Module,
        out_indices: int | list[int] | tuple[int, ...] = 3,
        output_fmt: str = "NCHW",
        norm: bool = False,
        prune: bool = True,
    ) -> None:
        super().__init__()
        if prune:
            # negative indices would be stale after pruning: keep the absolute ones it returns
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        elif isinstance(out_indices, int):
            out_indices = list(range(len(model.blocks) - out_indices, len(model.blocks)))
        self.feature_info = FeatureInfo(model.feature_info, out_indices)
        self.model = model
        self.out_indices = list(out_indices)
        self.output_fmt = output_fmt
        self.norm = norm

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, indices=self.out_indices, norm=self.norm, output_fmt=self.output_fmt, intermediates_only=True
        )
