"""Whole models on the Triton kernels against the reference path, outputs and every parameter gradient.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py), so the models are narrow two-block
copies (width 128, 2 heads of 64) at a small input; every fused op is on the path: patch embedding with class token and
position embedding, LayerNorm and LayerNorm + residual, attention with RoPE or relative position bias, SwiGLU packed
and split with its sub-LN. On a GPU the same tests run the compiled kernels in bf16 at full width.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import vitfast
from tests.helpers import assert_kernel_close, randomize_

pytest.importorskip("triton")

FAMILIES = {
    "vit_base_patch16_224": "LN, fused qkv, GELU MLP",
    "beitv2_base_patch16_224": "relative position bias, layer scale, q/v bias",
    "eva02_base_patch14_224": "RoPE, split SwiGLU with sub-LN",
    "eva02_tiny_patch14_224": "RoPE, packed SwiGLU",
}
CUDA = torch.cuda.is_available()


def _run(model, image, backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with vitfast.use_backend(backend):
        out = model(image)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(FAMILIES), ids=[f"{n} ({what})" for n, what in FAMILIES.items()])
def test_two_block_model_on_the_kernels_matches_the_reference(name, caplog) -> None:
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    width = dict(embed_dim=768, num_heads=12) if CUDA else dict(embed_dim=128, num_heads=2)
    model = randomize_(vitfast.create_model(name, depth=2, img_size=112, num_classes=10, **width)).to(device)
    image = torch.randn(2, 3, 112, 112, device=device)

    expected, expected_grads = _run(copy.deepcopy(model).double(), image.double(), "reference")
    baseline, baseline_grads = _run(model.to(dtype), image.to(dtype), "reference")
    with caplog.at_level(logging.DEBUG, logger="vitfast"):
        actual, actual_grads = _run(model, image.to(dtype), "triton")
    fallbacks = [r.getMessage() for r in caplog.records if "reference" in r.getMessage()]
    assert not fallbacks, f"a kernel fell back to the reference: {fallbacks}"

    assert_kernel_close(actual, expected, baseline, what=f"{name} logits")
    assert actual_grads.keys() == expected_grads.keys()
    for key, grad in actual_grads.items():
        assert_kernel_close(grad, expected_grads[key], baseline_grads[key], what=f"{name} grad {key}")
