"""Split-K projections and the LayerNorm that adds their partial sums up, against fp64 (STYLE rule 5).

Without a GPU both kernels run through Triton's interpreter (tests/conftest.py): small shapes, with the edges that
matter (rows not a multiple of the 64-row tile, widths not a multiple of 64, a K that ends inside a K step, slices of
unequal depth). The same-dtype PyTorch baseline is what the engine runs without split-K: ``F.linear`` (its output
rounded to the dtype) then ``layer_norm_residual``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_kernel_close
from vitfast import ops
from vitfast.backend import use_backend

pytest.importorskip("triton")
linear_module = importlib.import_module("vitfast.ops.linear")
requires_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() or linear_module.INTERPRETER),
    reason="needs Triton on a GPU or under TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6
OPCHECK = ("test_schema", "test_faketensor")


def _gemm_inputs(rows_shape, n, k, dtype):
    x = torch.randn(*rows_shape, k, device=DEVICE).to(dtype)
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    return x, weight


def _slices(x, weight, splits):
    depth = linear_module._split_depth(x.shape[-1], splits)
    rows = x.reshape(-1, x.shape[-1])
    return [(rows[:, s * depth : (s + 1) * depth], weight[:, s * depth : (s + 1) * depth]) for s in range(splits)]


@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows_shape", "n", "k", "splits"),
    [
        ((2, 35), 96, 320, 3),  # 70 rows (two row tiles, the second partial); slices of 128, 128, 64
        ((33,), 136, 200, 2),  # N = 8 x 17 (aligned, not a multiple of 64); slices of 128 and 72 (inside a step)
    ],
)
def test_split_k_partials_match_fp64(rows_shape, n, k, splits, dtype) -> None:
    x, weight = _gemm_inputs(rows_shape, n, k, dtype)
    with torch.no_grad(), use_backend("triton"):
        partials = ops.linear_split_k(x, weight, splits)
    rows = x.numel() // k
    assert partials.dtype == torch.float32 and partials.shape == (splits, rows, n) and partials.is_contiguous()
    # every slice is its own K range's product, not only the total right
    exact = ops.linear_split_k_ref(x.double(), weight.double(), splits)
    baseline = torch.stack([F.linear(xs, ws) for xs, ws in _slices(x, weight, splits)])
    assert_kernel_close(partials, exact, baseline, floor=1e-6, what=f"split-K slices {dtype}")
    assert_kernel_close(partials.sum(0), exact.sum(0), F.linear(x, weight).reshape(rows, n), what=f"sum {dtype}")


@requires_kernels
@pytest.mark.parametrize(
    ("cols", "dtype", "layer_scale"),
    [
        (768, torch.bfloat16, False),
        (1408, torch.float16, True),
        (776, torch.float32, True),  # 8 x 97: aligned, not a power of two
        (1024, torch.bfloat16, True),
    ],
)
def test_layer_norm_residual_partials_matches_fp64(cols, dtype, layer_scale) -> None:
    rows, splits = 197, 3
    x = torch.randn(rows, cols, device=DEVICE).to(dtype)
    partials = torch.randn(splits, rows, cols, device=DEVICE)
    branch_bias = torch.randn(cols, device=DEVICE).to(dtype)
    gamma = (0.5 + 0.1 * torch.randn(cols, device=DEVICE)).to(dtype) if layer_scale else None
    weight = (1 + 0.1 * torch.randn(cols, device=DEVICE)).to(dtype)
    bias = (0.1 * torch.randn(cols, device=DEVICE)).to(dtype)
    with torch.no_grad(), use_backend("triton"):
        normed, residual = ops.layer_norm_residual_partials(x, partials, branch_bias, gamma, weight, bias, EPS)
    params64 = [None if t is None else t.double() for t in (branch_bias, gamma, weight, bias)]
    exact_normed, exact_residual = ops.layer_norm_residual_partials_ref(x.double(), partials.double(), *params64, EPS)
    # the unfused path: the branch rounded to the dtype (as a 16-bit GEMM output is), then layer_norm_residual
    branch = (partials.sum(0) + branch_bias.float()).to(dtype)
    base_normed, base_residual = ops.layer_norm_residual_ref(x, branch, gamma, weight, bias, EPS)
    assert normed.dtype == residual.dtype == dtype and normed.shape == residual.shape == x.shape
    assert_kernel_close(residual, exact_residual, base_residual, what=f"residual_out C={cols} {dtype}")
    assert_kernel_close(normed, exact_normed, base_normed, what=f"normed C={cols} {dtype}")


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_projection_then_norm_end_to_end(dtype) -> None:
    """A proj / fc2 step as the engine runs it: split-K GEMM, then the reduction in the next residual LayerNorm,
    against the same step in fp64 and the cuBLAS path (``F.linear`` with bias, ``layer_norm_residual``)."""
    k, n = 320, 136
    h, proj = _gemm_inputs((1, 197), n, k, dtype)
    x = torch.randn(1, 197, n, device=DEVICE).to(dtype)
    proj_bias, gamma, weight, bias = (torch.randn(n, device=DEVICE).to(dtype) for _ in range(4))
    with torch.no_grad(), use_backend("triton"):
        partials = ops.linear_split_k(h, proj, 2)
        normed, residual = ops.layer_norm_residual_partials(x, partials, proj_bias, gamma, weight, bias, EPS)
    d = [t.double() for t in (h, proj, x, proj_bias, gamma, weight, bias)]
    exact = ops.layer_norm_residual_ref(d[2], F.linear(d[0], d[1], d[3]), *d[4:], EPS)
    baseline = ops.layer_norm_residual_ref(x, F.linear(h, proj, proj_bias), gamma, weight, bias, EPS)
    for got, want, base, what in zip((normed, residual), exact, baseline, ("normed", "residual_out"), strict=True):
        assert_kernel_close(got, want, base, what=f"{what} {dtype}")


def test_split_count_follows_the_sm_count() -> None:
    """On 132 SMs: split where the 64 x 64 tiles leave SMs idle (ViT-B/16 batch 1: 48 tiles), not where they fill
    them (batch 4: 156); every choice within the depth and count bounds and without empty slices."""
    splits = linear_module.split_k_splits
    assert [splits(197 * b, 768, 768, 132) for b in (1, 4, 8, 64)] == [3, 1, 1, 1]  # proj
    assert [splits(197 * b, 768, 3072, 132) for b in (1, 4, 8, 64)] == [3, 1, 1, 1]  # fc2
    assert splits(197, 384, 1536, 132) == 6  # ViT-S fc2: 24 tiles
    assert splits(197, 384, 1536, None) == 6  # off a GPU: an H100's SM count
    assert splits(197, 768, 3072, 16) == 1  # 48 tiles already fill 16 SMs
    assert splits(197, 768, 300, 132) == 1  # K too shallow to cut into two 256-deep slices
    assert splits(8, 64, 8192, 132) == linear_module.SPLIT_K_MAX
    for m, n, k in [(197, 768, 3072), (197, 1024, 4096), (1025, 768, 2048), (50, 384, 1536), (8, 64, 8192)]:
        s = splits(m, n, k, 132)
        depth = linear_module._split_depth(k, s)
        assert 1 <= s <= linear_module.SPLIT_K_MAX and linear_module.cdiv(k, depth) == s
        assert s == 1 or depth >= linear_module.SPLIT_K_MIN_DEPTH


def test_errors() -> None:
    x, weight = torch.randn(5, 64), torch.randn(24, 64)
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear_split_k(x, weight.T.contiguous(), 2)
    with pytest.raises(ValueError, match="splits must be an integer"):
        ops.linear_split_k(x, weight, 0)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.linear_split_k(x, weight.requires_grad_(), 2)
    partials, residual = torch.randn(2, 5, 24), torch.randn(5, 24)
    with pytest.raises(ValueError, match=r"partials must be \[splits, 5, 24\]"):
        ops.layer_norm_residual_partials(residual, partials[:, :4], None, None, None, None)
    with pytest.raises(ValueError, match="branch_bias must have shape"):
        ops.layer_norm_residual_partials(residual, partials, torch.randn(23), None, None, None)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.layer_norm_residual_partials(residual.requires_grad_(), partials, None, None, None, None)


def test_reference_backend_matches_the_sum() -> None:
    """Without the kernels (the reference backend), the same contract: slices that add up to the product, and the
    reduction equal to layer_norm_residual of the summed branch."""
    x, weight = _gemm_inputs((7,), 24, 300, torch.float32)
    with use_backend("reference"), torch.no_grad():
        partials = ops.linear_split_k(x, weight, 3)
        torch.testing.assert_close(partials.sum(0), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        # no count given: split_k_splits' (7 rows, 24 columns: one tile; K 300 allows one 256-deep slice)
        assert ops.linear_split_k(x, weight).shape == (linear_module.split_k_splits(7, 24, 300, None), 7, 24)
        residual, bias = torch.randn(7, 24), torch.randn(24)
        got = ops.layer_norm_residual_partials(residual, partials, bias, None, None, None)
    want = ops.layer_norm_residual_ref(residual, partials.sum(0) + bias, None, None, None, EPS)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@requires_kernels
def test_opcheck() -> None:
    x, weight = _gemm_inputs((9,), 16, 64, torch.float32)
    torch.library.opcheck(torch.ops.vitfast.linear_split_k, (x, weight, 2), test_utils=OPCHECK)
    partials, residual = torch.randn(2, 9, 16, device=DEVICE), torch.randn(9, 16, device=DEVICE)
    params = [torch.randn(16, device=DEVICE) for _ in range(4)]
    torch.library.opcheck(
        torch.ops.vitfast.layer_norm_residual_partials_fwd, (residual, partials, *params, EPS), test_utils=OPCHECK
    )
