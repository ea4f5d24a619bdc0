"""The compiled extension's ops (``pytest benchmarks/test_ext.py --benchmark-only``); the full GPU report with
correctness checks and GB/s is benchmarks/gpu_ext_check.py.

- LayerNorm (plain and residual, bf16, forward and forward+backward): ``cuda-ext`` (the CUDA C++ kernel), ``triton``,
  ``torch`` (F.layer_norm / the unfused ``x + gamma * branch`` then F.layer_norm);
- preprocess, a batch of 8 224x224 uint8 images to bf16: ``vitfast`` (the op) vs ``torch`` (permute, to float,
  / 255, normalize, cast).

GPU cases only: without a GPU every case skips (tests/ops covers the C++ CPU twins).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import CUDA, NO_GPU, synchronized
from vitfast import _ext

ln = importlib.import_module("vitfast.ops.layer_norm")
ext = importlib.import_module("vitfast.ops.layer_norm_ext")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LN_SHAPES = [(8 * 1025, 1024), (8 * 197, 768), (8 * 257, 1408), (8 * 257, 2730)]


@pytest.fixture(scope="module", autouse=True)
def extension():
    if not _ext.HAS_EXT or (CUDA and not _ext.HAS_EXT_CUDA):
        try:
            _ext.load_jit(with_cuda=CUDA)
        except (RuntimeError, OSError) as exc:
            pytest.skip(f"the compiled extension cannot be built here ({exc})")


def _layer_norm_case(variant: str, shape, provider: str):
    rows, cols = shape
    with torch.device("cuda"):
        x, branch = (torch.randn(rows, cols, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
        gamma, weight, bias = (torch.randn(cols, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    if variant == "plain":
        inputs = (x, weight, bias)
        fns = {
            "cuda-ext": lambda: ext.layer_norm_ext(x, weight, bias, 1e-6),
            "triton": lambda: ln._layer_norm_triton(x, weight, bias, 1e-6),
            "torch": lambda: F.layer_norm(x, (cols,), weight, bias, 1e-6),
        }
    else:
        inputs = (x, branch, gamma, weight, bias)

        def unfused():
            residual = x + gamma * branch
            return F.layer_norm(residual, (cols,), weight, bias, 1e-6), residual

        fns = {
            "cuda-ext": lambda: ext.layer_norm_residual_ext(x, branch, gamma, weight, bias, 1e-6),
            "triton": lambda: ln._layer_norm_residual_triton(x, branch, gamma, weight, bias, 1e-6),
            "torch": unfused,
        }
    return fns[provider], inputs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["cuda-ext", "triton", "torch"])
@pytest.mark.parametrize("shape", LN_SHAPES, ids=[f"{r}x{c}" for r, c in LN_SHAPES])
@pytest.mark.parametrize("variant", ["plain", "residual"])
def test_layer_norm(benchmark, variant, shape, provider, passes):
    fn, inputs = _layer_norm_case(variant, shape, provider)
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def run():
        if passes == "fwd":
            with torch.no_grad():
                return fn()
        outputs = fn()
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return torch.autograd.grad(outputs, inputs, [grad] * len(outputs))

    benchmark.group = f"layer_norm {variant} {shape} bf16 {passes}"
    benchmark.pedantic(synchronized(run, "cuda"), rounds=100, warmup_rounds=5, iterations=1)


def _preprocess_case(provider: str, device: str, dtype: torch.dtype):
    images = torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8, device=device)
    mean_t = torch.tensor(MEAN, device=device).view(3, 1, 1)
    std_t = torch.tensor(STD, device=device).view(3, 1, 1)
    if provider == "vitfast":
        return lambda: torch.ops.vitfast.preprocess(images, list(MEAN), list(STD), 0, dtype), images.numel()
    return lambda: ((images.permute(0, 3, 1, 2).float() / 255 - mean_t) / std_t).to(dtype), images.numel()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("provider", ["vitfast", "torch"])
def test_preprocess_gpu(benchmark, provider):
    fn, pixels = _preprocess_case(provider, "cuda", torch.bfloat16)
    benchmark.group = "preprocess 8x224x224 -> bf16"
    benchmark.pedantic(synchronized(fn, "cuda"), rounds=200, warmup_rounds=10, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(pixels * 3 / benchmark.stats.stats.median / 1e9, 1)
