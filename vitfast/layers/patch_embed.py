"""Image to patch tokens, with input checks that say what is wrong and what to do."""

from __future__ import annotations

import torch
from torch import nn

from vitfast import ops
from vitfast.layers.pos_embed import resample_patch_embed

__all__ = ["PatchEmbed", "adapt_input_channels", "to_2tuple"]


def to_2tuple(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}.")
    return value


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a patch kernel ``[D, C, p, p]`` trained on ``C`` channels to ``in_chans`` inputs, as timm does.

    One channel: the sum over the ``C`` channels (a grey image through an RGB kernel). Otherwise the kernel's channels
    are tiled up to ``in_chans`` and scaled by ``C / in_chans`` so that an input repeating its channels gives the
    same response.
    """
    source_chans = weight.shape[1]
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}.")
    if in_chans == source_chans:
        return weight
    adapted = weight.float()
    if in_chans == 1:
        adapted = adapted.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // source_chans)
        adapted = adapted.repeat(1, repeats, 1, 1)[:, :in_chans] * (source_chans / in_chans)
    return adapted.to(weight.dtype)


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch size, flattened to tokens ``[B, N, D]`` (parameters ``proj.weight/bias``).

    With ``dynamic_img_size=False`` the input must be exactly ``img_size``; otherwise any size divisible by the
    patch size is accepted and :meth:`grid_size_for` gives its token grid.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.dynamic_img_size = dynamic_img_size
        # timm's PatchEmbed attributes, read by code written for timm: tokens come out flattened ([B, N, D]) and
        # the input size is enforced unless dynamic
        self.flatten = True
        self.output_fmt = "NCHW"
        self.strict_img_size = not dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.set_img_size(img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def grid_size_for(self, x: torch.Tensor) -> tuple[int, int]:
        """Validate an input batch and return its token grid ``(H / p, W / p)``."""
        if x.ndim != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got a tensor of shape {tuple(x.shape)}.")
        if not x.is_floating_point() and x.dtype != torch.uint8:
            raise TypeError(
                f"expected a floating-point image (normalized) or a uint8 one (0-255, normalized by the model with "
                f"the mean/std in model.pretrained_cfg), got {x.dtype}."
            )
        batch, channels, height, width = x.shape
        if batch == 0:
            raise ValueError(f"the image batch is empty (shape {tuple(x.shape)}); pass at least one image.")
        if channels != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {channels} (input shape {tuple(x.shape)}); "
                "images must be [B, C, H, W] with C channels first."
            )
        if not self.dynamic_img_pad and (height % self.patch_size[0] or width % self.patch_size[1]):
            raise ValueError(
                f"input size {height}x{width} is not divisible by the patch size "
                f"{self.patch_size[0]}x{self.patch_size[1]}; resize or crop to a multiple of it, or build the "
                "model with dynamic_img_size=True, dynamic_img_pad=True to zero-pad the right and bottom edges."
            )
        if not self.dynamic_img_size and (height, width) != self.img_size:
            raise ValueError(
                f"input size {height}x{width} does not match the model's {self.img_size[0]}x{self.img_size[1]}; "
                "resize the input, build the model with img_size=..., or pass dynamic_img_size=True."
            )
        return self.dynamic_feat_size((height, width))

    def pad_to_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the right and bottom of ``x`` to a multiple of the patch size (``dynamic_img_pad``)."""
        pad_h = -x.shape[-2] % self.patch_size[0]
        pad_w = -x.shape[-1] % self.patch_size[1]
        return nn.functional.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.patch_embed(x, self.proj.weight, self.proj.bias)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        if self.dynamic_img_pad:
            return -(-img_size[0] // self.patch_size[0]), -(-img_size[1] // self.patch_size[1])
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    @torch.no_grad()
    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """timm's ``PatchEmbed.set_input_size``: a new patch size and / or nominal image size.

        A new patch size resamples the kernel with the FlexiViT pseudo-inverse, as timm does.
        """
        patch_size = self.patch_size if patch_size is None else to_2tuple(patch_size)
        if patch_size != self.patch_size:
            self._resample_kernel(patch_size)
        self.set_img_size(self.img_size if img_size is None else img_size)

    def _resample_kernel(self, patch_size: tuple[int, int]) -> None:
        old = self.proj
        proj = nn.Conv2d(
            self.in_chans, old.out_channels, kernel_size=patch_size, stride=patch_size, bias=old.bias is not None
        ).to(device=old.weight.device, dtype=old.weight.dtype)
        proj.weight.copy_(resample_patch_embed(old.weight, patch_size, method="pinv"))
        if old.bias is not None:
            proj.bias.copy_(old.bias)
        self.proj = proj
        self.patch_size = patch_size

    def set_img_size(self, img_size: int | tuple[int, int]) -> None:
        """Set the nominal input size (the size the position embeddings are stored for)."""
        img_size = to_2tuple(img_size)
        if img_size[0] % self.patch_size[0] or img_size[1] % self.patch_size[1]:
            raise ValueError(
                f"img_size {img_size[0]}x{img_size[1]} is not divisible by the patch size "
                f"{self.patch_size[0]}x{self.patch_size[1]}; choose a multiple of the patch size."
            )
        self.img_size = img_size
        self.grid_size = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
