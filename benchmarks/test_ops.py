"""Per-op micro-benchmarks at the shapes the model zoo meets (REFERENCE.md section 4).

Providers in each group: ``vitfast`` (the op through vitfast's dispatcher: today the reference, later the kernels),
``torch`` (what a user runs instead: F.layer_norm, SDPA, RoPE as timm applies it before SDPA, silu * up, the conv) and
``torch-compile`` (torch.compile of the reference). GPU shapes in bf16; one small fp32 case per op on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import CUDA, NO_GPU, synchronized
from vitfast import ops
from vitfast.layers import relative_position_index

PROVIDERS = ("vitfast", "torch", "torch-compile")


def _layer_norm(shape, device, dtype):
    x = torch.randn(*shape, device=device, dtype=dtype)
    w, b = torch.randn(shape[-1], device=device, dtype=dtype), torch.randn(shape[-1], device=device, dtype=dtype)
    return {
        "vitfast": lambda: ops.layer_norm(x, w, b, 1e-6),
        "torch": lambda: F.layer_norm(x, (shape[-1],), w, b, 1e-6),
        "torch-compile": (torch.compile(ops.layer_norm_ref), (x, w, b, 1e-6)),
    }


def _attention(shape, device, dtype):
    batch, heads, tokens, head_dim, extra = shape
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    kwargs = {}
    if extra == "rope":
        side = int(round((tokens - 1) ** 0.5))
        kwargs = {"rope": ops.rope_2d_table((side, side), head_dim, device=device), "num_prefix_tokens": 1}
    elif extra == "relbias":
        side = int(round((tokens - 1) ** 0.5))
        index = relative_position_index((side, side), device=device)
        table = torch.randn((2 * side - 1) ** 2 + 3, heads, device=device, dtype=dtype)
        kwargs = {"rel_pos_bias_table": table, "rel_pos_index": index}
    return {
        "vitfast": lambda: ops.attention(q, k, v, **kwargs),
        "torch": lambda: ops.attention_ref(q, k, v, **kwargs),  # RoPE as elementwise ops, bias materialized, SDPA
        "torch-compile": (torch.compile(ops.attention_ref), (q, k, v), kwargs),
    }


def _swiglu(shape, device, dtype):
    gate, up = torch.randn(*shape, device=device, dtype=dtype), torch.randn(*shape, device=device, dtype=dtype)
    return {
        "vitfast": lambda: ops.swiglu(gate, up),
        "torch": lambda: F.silu(gate) * up,
        "torch-compile": (torch.compile(ops.swiglu_ref), (gate, up)),
    }


def _rope(shape, device, dtype):
    x = torch.randn(*shape, device=device, dtype=dtype)
    side = int(round((shape[-2] - 1) ** 0.5))
    cos, sin = ops.rope_2d_table((side, side), shape[-1], device=device)
    return {
        "vitfast": lambda: ops.rope_2d(x, cos, sin, 1),
        "torch": lambda: ops.rope_2d_ref(x, cos, sin, 1),
        "torch-compile": (torch.compile(ops.rope_2d_ref), (x, cos, sin, 1)),
    }


def _patch_embed(shape, device, dtype):
    batch, size, patch, dim = shape
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    weight, bias = (
        torch.randn(dim, 3, patch, patch, device=device, dtype=dtype),
        torch.randn(dim, device=device, dtype=dtype),
    )
    return {
        "vitfast": lambda: ops.patch_embed(x, weight, bias),
        "torch": lambda: F.conv2d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2),
        "torch-compile": (torch.compile(ops.patch_embed_ref), (x, weight, bias)),
    }


CASES = {
    "layer_norm": (_layer_norm, [(8 * 1025, 1024), (12608, 768), (8200, 2730)], (7, 384)),
    "attention": (
        _attention,
        [(8, 16, 1025, 64, "rope"), (8, 16, 1025, 64, None), (64, 12, 197, 64, None), (64, 12, 197, 64, "relbias")],
        (1, 2, 50, 32, "rope"),
    ),
    "swiglu": (_swiglu, [(8 * 1025, 2730)], (7, 64)),
    "rope": (_rope, [(8, 16, 1025, 64)], (1, 2, 50, 32)),
    "patch_embed": (_patch_embed, [(8, 448, 14, 1024)], (1, 56, 14, 32)),
}


def _bench(benchmark, op: str, shape, provider: str, device: str, dtype, rounds: int) -> None:
    make, _, _ = CASES[op]
    candidate = make(shape, device, dtype)[provider]
    if isinstance(candidate, tuple):
        compiled, args, *maybe_kwargs = candidate
        kwargs = maybe_kwargs[0] if maybe_kwargs else {}

        def candidate():
            return compiled(*args, **kwargs)

    benchmark.group = f"{op} {shape} {str(dtype).removeprefix('torch.')}"
    timed = synchronized(candidate, device)
    timed()  # compile outside the timed rounds
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=5, iterations=1)


GPU_CASES = [(op, shape) for op, (_, shapes, _) in CASES.items() for shape in shapes]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("op", "shape"), GPU_CASES, ids=[f"{op}-{shape}" for op, shape in GPU_CASES])
def test_gpu_op(benchmark, op, shape, provider):
    if not CUDA:
        pytest.skip(NO_GPU)
    _bench(benchmark, op, shape, provider, "cuda", torch.bfloat16, rounds=100)


@pytest.mark.parametrize("provider", ["vitfast", "torch"])
@pytest.mark.parametrize("op", list(CASES))
def test_cpu_op(benchmark, op, provider):
    _bench(benchmark, op, CASES[op][2], provider, "cpu", torch.float32, rounds=5)
