"""End-to-end latency: one group per (model, batch size), the providers of ``vitfast bench`` inside it.

GPU: vit_base_patch16_224, beitv2_base_patch16_224 and eva02_large_patch14_448 at batch 1/4/8/64 in bf16.
CPU: one small case (vit_small_patch16_224, batch 1, fp32) so the suite runs anywhere.
The setup is ``vitfast.bench.make_call``, the same as ``vitfast bench`` uses.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import CUDA, NO_GPU, synchronized
from vitfast import bench

GPU_MODELS = ("vit_base_patch16_224", "beitv2_base_patch16_224", "eva02_large_patch14_448")
GPU_BATCH_SIZES = (1, 4, 8, 64)
GPU_PROVIDERS = (
    "timm-eager",
    "timm-compile",
    "timm-graphs",
    "vitfast",
    "vitfast-graphs",
    "vitfast-reference",
    "xformers",
    "liger",
)


@functools.cache
def _models(name: str, device: str):
    return bench.build_models(name, device)


def _latency(benchmark, model: str, batch_size: int, provider_name: str, device: str, dtype, rounds: int, warmup: int):
    provider = bench.PROVIDERS[provider_name]
    ours, reference = _models(model, device)
    reason = bench.skip_reason(provider, device, reference)
    if reason is not None:
        pytest.skip(f"{provider_name} on {model}: {reason}")
    image = torch.randn(batch_size, 3, *ours.config.img_size, device=device)
    call, _ = bench.make_call(provider, ours, reference, image, dtype=dtype)
    benchmark.group = f"{model} bs={batch_size}"
    benchmark.extra_info.update({"provider": provider_name, "dtype": str(dtype), "batch_size": batch_size})
    timed = synchronized(call, device)
    timed()  # first call (compile / capture) outside the timed rounds
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)


@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("batch_size", GPU_BATCH_SIZES)
@pytest.mark.parametrize("model", GPU_MODELS)
def test_gpu_latency(benchmark, model, batch_size, provider):
    if not CUDA:
        pytest.skip(NO_GPU)
    _latency(benchmark, model, batch_size, provider, "cuda", torch.bfloat16, rounds=50, warmup=10)


@pytest.mark.parametrize("provider", ["timm-eager", "vitfast-reference"])
def test_cpu_latency(benchmark, provider):
    _latency(benchmark, "vit_small_patch16_224", 1, provider, "cpu", torch.float32, rounds=3, warmup=1)
