"""Training helpers for fine-tuning and EVA-02 masked image modeling (MIM) pretraining.

- :func:`param_groups_layer_decay`: BEiT-style layer-wise learning-rate decay + weight-decay parameter groups for
  vitfast models and timm ``VisionTransformer`` / ``Beit`` / ``Eva`` models (timm's ``lr_scale`` convention);
- :func:`cosine_lr_schedule`: warmup + cosine schedule for a plain torch optimizer that applies each group's
  ``lr_scale``;
- :class:`BlockMaskGenerator`: BEiT / EVA block-wise masks with an exact number of masked patches per image;
- :func:`eva02_mim_loss`: EVA-02's feature-regression loss, negative cosine similarity to the teacher's features.

A pretraining step on a vitfast ``*_mim`` model::

    masks = BlockMaskGenerator(model.patch_embed.grid_size, mask_ratio=0.4)
    mask = masks(images.shape[0]).to(images.device)             # bool [B, N]
    pred = model.forward_mim(images, mask)                      # [num_masked, D_teacher]
    with torch.no_grad():
        target = teacher_patch_features(images)                 # [B, N, D_teacher]
    loss = eva02_mim_loss(pred, target, mask=mask)
"""

from __future__ import annotations

import fnmatch
import functools
import math
import random
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BlockMaskGenerator", "cosine_lr_schedule", "eva02_mim_loss", "param_groups_layer_decay"]

# Parameters that feed the first block: layer 0. `rel_pos_bias` is BEiT's shared relative position bias (timm's stem
# regex counts it there too), `norm_pre` CLIP's ln_pre, `rope` any learned rotary table.
_STEM = re.compile(
    r"^(cls_token|reg_token|dist_token|mask_token|pos_embed|patch_embed|norm_pre|rel_pos_bias|rope)(\.|$)"
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_FINAL_NORM = re.compile(r"^norm\.")


def _layer_id(name: str, num_layers: int, final_norm_in_last_block: bool) -> int:
    if _STEM.match(name):
        return 0
    block = _BLOCK.match(name)
    if block:
        return int(block.group(1)) + 1
    if final_norm_in_last_block and _FINAL_NORM.match(name):
        return num_layers
    return num_layers + 1  # norm, fc_norm, head, lm_head and anything else after the blocks


def _no_weight_decay_by_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.endswith("_token") or "pos_embed" in leaf or leaf == "relative_position_bias_table"


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    no_weight_decay_list: Iterable[str] = (),
    lr_scale_key: str = "lr_scale",
    final_norm_in_last_block: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay (BEiT / MAE / EVA fine-tuning recipe).

    Layers, for a model with ``L`` blocks named ``blocks.<i>`` (vitfast, timm ``VisionTransformer`` / ``Beit`` /
    ``Eva``): layer 0 holds what comes before the blocks (``cls_token``, ``reg_token``, ``mask_token``,
    ``pos_embed``, ``patch_embed``, ``norm_pre``, a shared ``rel_pos_bias``); ``blocks.<i>.*`` is layer ``i + 1``;
    everything else (``norm``, ``fc_norm``, ``head``, ``lm_head``) is layer ``L + 1``. A parameter of layer ``k``
    gets ``lr_scale = layer_decay ** (K - k)``, where ``K`` is the highest layer that holds parameters: 1 for the
    head, ``layer_decay ** (L + 1)`` for the embeddings of a model with a head. A headless model (``num_classes=0``,
    MAE) with ``final_norm_in_last_block=True`` has nothing after block ``L``, so ``K = L`` there, as in timm.

    ``final_norm_in_last_block=True`` puts the final ``norm.*`` in layer ``L`` instead, as timm's ``group_matcher``
    does (its ``MATCH_PREV_GROUP`` on ``^norm``); the default follows the official BEiT / MAE / EVA code. With it, the
    groups equal ``timm.optim.param_groups_layer_decay(model, weight_decay, model.no_weight_decay(), layer_decay=...)``
    on timm ViT / Beit / Eva models; the two conventions differ only for models with a final ``norm`` (token pooling).

    No weight decay for: parameters with ``ndim <= 1`` (biases, norms, layer-scale gammas, ``q_bias``/``v_bias``);
    names whose last component ends with ``_token`` or contains ``pos_embed``; ``relative_position_bias_table``;
    names matched (``fnmatch`` patterns, exact names included) by ``model.no_weight_decay()`` when the model defines
    it, and by ``no_weight_decay_list``. Frozen parameters (``requires_grad=False``) are left out.

    Returns one group per (layer, decay / no decay) that has parameters, ordered by layer, each a dict with
    ``params``, ``weight_decay``, ``lr_scale_key`` (the scale) and ``layer_id``. timm's schedulers multiply each
    group's learning rate by ``group["lr_scale"]``; with a plain torch optimizer use :func:`cosine_lr_schedule`
    (or set ``group["lr"] = lr * group["lr_scale"]`` yourself): the optimizer keeps the extra keys and ignores them.

    Raises ``ValueError`` for ``layer_decay <= 0``, ``weight_decay < 0`` or a model without ``blocks.<i>`` parameters.
    """
    if not layer_decay > 0:
        raise ValueError(f"layer_decay must be > 0 (1.0 disables the decay), got {layer_decay}.")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    named = list(model.named_parameters())
    block_ids = {int(m.group(1)) for name, _ in named if (m := _BLOCK.match(name))}
    if not block_ids:
        raise ValueError(
            f"{type(model).__name__} has no parameters named 'blocks.<i>.*'; layer-wise decay needs a ViT-style model "
            "whose transformer blocks are the top-level ModuleList 'blocks' (vitfast, timm VisionTransformer/Beit/Eva)."
        )
    num_layers = max(block_ids) + 1
    no_decay_patterns = list(no_weight_decay_list)
    if hasattr(model, "no_weight_decay"):
        no_decay_patterns += list(model.no_weight_decay())

    # the top layer is the last one that holds parameters (frozen ones included, as timm's grouping counts them)
    layers = {name: _layer_id(name, num_layers, final_norm_in_last_block) for name, _ in named}
    top_layer = max(layers.values())
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        layer = layers[name]
        decays = not (
            param.ndim <= 1
            or _no_weight_decay_by_name(name)
            or any(fnmatch.fnmatch(name, pattern) for pattern in no_decay_patterns)
        )
        group = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "weight_decay": weight_decay if decays else 0.0,
                lr_scale_key: layer_decay ** (top_layer - layer),
                "layer_id": layer,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def _warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, lr_scale: float
) -> float:
    if step < warmup_steps:
        return lr_scale * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr_scale * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_lr_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    lr_scale_key: str = "lr_scale",
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay, per step, applying each group's ``lr_scale``.

    Group ``g`` with base learning rate ``lr_g`` (its ``lr`` when the scheduler is built) runs at
    ``lr_g * g[lr_scale_key] * f(step)`` (scale 1 for a group without the key), where ``f`` rises linearly to 1 over
    the first ``warmup_steps`` steps (``(step + 1) / warmup_steps``, so no step runs at zero) and then follows a
    half cosine from 1 to ``min_lr_ratio`` at ``step == total_steps``, where it stays. Call ``scheduler.step()``
    after each ``optimizer.step()``. Raises ``ValueError`` for ``total_steps < 1``,
    ``warmup_steps`` outside ``[0, total_steps]`` or ``min_lr_ratio`` outside ``[0, 1]``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
    factors = [
        functools.partial(
            _warmup_cosine_factor,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            lr_scale=group.get(lr_scale_key, 1.0),
        )
        for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _grid_pair(grid: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    pair = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"grid must be a positive int or a pair (rows, columns) of positive ints, got {grid!r}.")
    return pair


class BlockMaskGenerator:
    """BEiT / EVA block-wise masking: ``generator(batch)`` -> bool ``[batch, rows * cols]``, row-major patch order.

    Every row masks exactly ``num_masked = round(mask_ratio * rows * cols)`` patches (Python's ``round``). Blocks are
    added as in BEiT's ``MaskingGenerator``: a rectangle of area uniform in ``[min_patches_per_block, still to
    mask]`` and aspect ratio log-uniform in ``[min_aspect, max_aspect]`` (``max_aspect`` defaults to
    ``1 / min_aspect``), strictly smaller than the grid on both sides, placed uniformly, accepted if it adds at least
    one new patch and no more than are still to mask; 10 failed tries end the block phase. BEiT then stops short of
    the ratio; here the few patches still missing are taken one at a time among the unmasked neighbours
    (4-connected) of the masked ones, so they grow the existing blocks instead of scattering single patches.

    Randomness: each call draws one seed from ``generator`` (the global torch RNG when ``None``, so
    ``torch.manual_seed`` makes it reproducible) and runs Python's ``random.Random`` from it: equal generator
    states give equal masks. The masks are built on the CPU (a few blocks per image: ~0.3 ms per image at 14x14 on
    one core, so build them in DataLoader workers for large batches); ``device`` moves the result. The output is the
    ``mask`` of vitfast's ``forward_features(x, mask=mask)`` and ``forward_mim(x, mask)`` (True = replaced by the
    mask token).

    Raises ``ValueError`` for a bad grid, ``mask_ratio`` outside ``(0, 1)``, ``min_patches_per_block < 1`` or
    aspect bounds that are not ``0 < min_aspect <= max_aspect``.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        mask_ratio: float = 0.4,
        min_patches_per_block: int = 16,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.rows, self.cols = _grid_pair(grid)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        if not (isinstance(min_patches_per_block, int) and min_patches_per_block >= 1):
            raise ValueError(f"min_patches_per_block must be an int >= 1, got {min_patches_per_block!r}.")
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if not (min_aspect > 0 and max_aspect is not None and max_aspect >= min_aspect):
            raise ValueError(
                f"need 0 < min_aspect <= max_aspect, got min_aspect={min_aspect}, max_aspect={max_aspect}."
            )
        self.num_patches = self.rows * self.cols
        self.mask_ratio = mask_ratio
        self.num_masked = round(mask_ratio * self.num_patches)
        self.min_patches_per_block = min_patches_per_block
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
        self.generator = generator

    def __repr__(self) -> str:
        low, high = (math.exp(v) for v in self.log_aspect_range)
        return (
            f"BlockMaskGenerator(grid=({self.rows}, {self.cols}), num_masked={self.num_masked}/{self.num_patches}, "
            f"min_patches_per_block={self.min_patches_per_block}, aspect=[{low:.3g}, {high:.3g}])"
        )

    def __call__(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        if not (isinstance(batch, int) and batch >= 0):
            raise ValueError(f"batch must be an int >= 0, got {batch!r}.")
        seed_device = self.generator.device if self.generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (), generator=self.generator, device=seed_device))
        rng = random.Random(seed)
        masks = np.zeros((batch, self.rows, self.cols), dtype=bool)
        for mask in masks:
            self._fill(mask, rng)
        return torch.from_numpy(masks.reshape(batch, self.num_patches)).to(device)

    def _fill(self, mask: np.ndarray, rng: random.Random) -> None:
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, rng, self.num_masked - count)
            if added == 0:
                break
            count += added
        for _ in range(self.num_masked - count):
            self._add_neighbour(mask, rng)

    def _add_block(self, mask: np.ndarray, rng: random.Random, max_new: int) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_patches_per_block, max_new)
            aspect = math.exp(rng.uniform(*self.log_aspect_range))
            height = round(math.sqrt(area * aspect))
            width = round(math.sqrt(area / aspect))
            if height >= self.rows or width >= self.cols:
                continue
            top = rng.randint(0, self.rows - height)
            left = rng.randint(0, self.cols - width)
            region = mask[top : top + height, left : left + width]
            new = height * width - int(region.sum())
            if 0 < new <= max_new:
                region[...] = True
                return new
        return 0

    @staticmethod
    def _add_neighbour(mask: np.ndarray, rng: random.Random) -> None:
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        candidates = np.flatnonzero(grown & ~mask)
        if candidates.size == 0:  # nothing masked yet (or everything): any free patch
            candidates = np.flatnonzero(~mask)
        mask.flat[candidates[rng.randrange(candidates.size)]] = True


def eva02_mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """EVA-02's MIM loss: ``-mean(cosine_similarity(pred, target))`` over the masked tokens, in fp32 or wider.

    What the official code computes (baaivision/EVA, ``EVA-02/asuka``): ``engine_for_pretraining.compute_loss`` is
    ``-nn.CosineSimilarity(dim=-1)(output.float(), label.float()).mean()``, so the loss lies in ``[-1, 1]`` and a
    perfect prediction gives -1 (reimplementations that use ``1 - cos`` differ by a constant, same gradient). The
    prediction is the student's ``lm_head`` applied to its final-``norm``-ed masked patch tokens (vitfast:
    ``model.forward_mim(x, mask)``). The target (``clip_wrapper.EVACLIPWrapper.infer_image``) is the EVA-CLIP vision
    tower's output per patch: its final LayerNorm, class token dropped, then its linear ``head`` projection
    (1024-d for EVA-CLIP g/14), selected with the same mask (``labels = clip_features[bool_masked_pos]``). The target
    is not L2-normalized there and does not need to be: cosine similarity ignores the scale of either side.

    Shapes: ``pred`` ``[M, D]`` (any ``[..., D]``); ``target`` the same shape, or with ``mask`` (bool ``[B, N]``)
    the teacher's full patch features ``[B, N, D]``, of which the ``M = mask.sum()`` masked rows are taken in
    row-major order (the order of ``forward_mim``). Inputs of any floating dtype; the math runs in fp32 (fp64 stays
    fp64), norms clamped at 1e-8 as ``nn.CosineSimilarity`` does, so bf16 / fp16 inputs under autocast are safe.
    Returns a 0-dim tensor of that dtype. Raises ``ValueError`` on shape / dtype mismatches or when there are no
    tokens (``M == 0``).
    """
    for label, tensor in (("pred", pred), ("target", target)):
        if not tensor.is_floating_point():
            raise ValueError(f"eva02_mim_loss: {label} must be a floating-point tensor, got {tensor.dtype}.")
    if mask is not None:
        if mask.dtype != torch.bool or target.ndim != 3 or tuple(mask.shape) != tuple(target.shape[:2]):
            raise ValueError(
                "eva02_mim_loss: with a mask, target must be the teacher's patch features [B, N, D] and mask a bool "
                f"[B, N]; got target {tuple(target.shape)} and mask {mask.dtype} {tuple(mask.shape)}."
            )
        target = target[mask]
    if pred.shape != target.shape:
        selected = " (target rows selected by the mask)" if mask is not None else ""
        raise ValueError(
            f"eva02_mim_loss: pred {tuple(pred.shape)} and target{selected} {tuple(target.shape)} must have the same "
            "shape [num_masked_tokens, feature_dim]."
        )
    if pred.ndim < 1 or pred.numel() == 0:
        raise ValueError(f"eva02_mim_loss: no tokens to compare (pred shape {tuple(pred.shape)}).")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    cosine = F.cosine_similarity(pred.to(dtype), target.to(dtype), dim=-1, eps=1e-8)
    return -cosine.mean()
