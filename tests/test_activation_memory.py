"""The activation-memory probe (benchmarks/activation_memory.py): what it counts, and patched vs timm on a tiny ViT."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Mlp

import vitfast
from benchmarks.activation_memory import FAMILIES, TARGETS, block_bytes, saved_bytes

pytest.importorskip("triton")


def test_counts_each_saved_storage_once_and_no_parameters() -> None:
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    # Linear saves its input (and its weight, a parameter: not counted); x * x saves x twice: one storage
    assert saved_bytes(linear, lambda: linear(x)) == x.untyped_storage().nbytes()
    square = torch.nn.Identity()
    square.forward = lambda t: t * t
    assert saved_bytes(square, lambda: square(x)) == x.untyped_storage().nbytes()
    with torch.no_grad():
        assert saved_bytes(linear, lambda: linear(x)) == 0


@pytest.mark.parametrize("name", list(FAMILIES.values()), ids=list(FAMILIES))
def test_patched_block_meets_the_target_by_recomputing(name: str) -> None:
    """Narrow copies of the four families (64 wide, 5 tokens): the recomputing patch meets each family's target,
    and it is the recomputation that meets it (``recompute=False`` saves more)."""
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=0, img_size=32, embed_dim=64, num_heads=2)
    image = torch.randn(1, 3, 32, 32)
    timm_bytes = block_bytes(model, image, "reference")
    recomputing = block_bytes(vitfast.patch(copy.deepcopy(model)), image, "triton")
    plain = block_bytes(vitfast.patch(model, recompute=False), image, "triton")
    family = next(family for family, timm_name in FAMILIES.items() if timm_name == name)
    assert 0 < recomputing <= TARGETS[family] * timm_bytes
    assert recomputing < plain


def test_patched_mlp_saves_one_hidden_tensor_and_gives_the_same_gradients() -> None:
    """timm ``Mlp``: fc1's output is saved, GELU's output is recomputed in backward (fc2's GEMM is not run again);
    gradients equal timm's bit for bit."""
    torch.manual_seed(0)
    mlp = Mlp(24, 96)
    patched = vitfast.patch(copy.deepcopy(mlp))
    x = torch.randn(2, 7, 24, requires_grad=True)
    hidden_bytes = 2 * 7 * 96 * 4
    input_bytes = x.untyped_storage().nbytes()
    assert saved_bytes(mlp, lambda: mlp(x)) == input_bytes + 2 * hidden_bytes
    assert saved_bytes(patched, lambda: patched(x)) == input_bytes + hidden_bytes
    grad_out = torch.randn(2, 7, 24)
    results = []
    for module in (mlp, patched):
        out = module(x)
        results.append((out, *torch.autograd.grad(out, (x, *module.parameters()), grad_out)))
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
