"""Per-op micro-benchmarks at the shapes the model zoo meets (REFERENCE.md section 4), forward and forward+backward.

Providers, side by side in one pytest-benchmark group per (op, shape, pass):

- ``vitfast``: the op with ``set_backend("triton")`` (our kernels; a shape they do not cover runs the reference);
- ``torch``: what a user runs instead (F.layer_norm, silu * up, the conv + cat + add, RoPE as fp32 elementwise ops,
  RoPE + SDPA with its default backend choice and a materialized bias);
- ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` (attention only): SDPA pinned to one backend, without RoPE (the
  bar the fused-RoPE kernel has to clear) or with the materialized float bias where the backend takes one;
- ``torch-compile``: ``torch.compile`` of the reference.

GPU shapes run in bf16; one small fp32 forward case per op runs on the CPU. For the memory-bound ops the GPU rows
carry ``GB/s`` (bytes that must cross HBM at least once, over the median time) in ``extra_info``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import CUDA, NO_GPU, synchronized
from vitfast import ops
from vitfast.backend import use_backend
from vitfast.layers import relative_position_index
from vitfast.layers.rel_pos import num_relative_positions

PROVIDERS = ("vitfast", "torch", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "torch-compile")
PASSES = ("fwd", "fwd+bwd")


def _randn(*shape, device, dtype, grad):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _vitfast(fn: Callable, device: str) -> Callable:
    """The op through vitfast: the Triton kernels on a GPU, the default backend (the reference) on the CPU."""
    if device != "cuda":
        return fn

    def run():
        with use_backend("triton"):
            return fn()

    return run


def _layer_norm(shape, device, dtype, grad):
    x = _randn(*shape, device=device, dtype=dtype, grad=grad)
    w, b = (_randn(shape[-1], device=device, dtype=dtype, grad=grad) for _ in range(2))
    compiled = torch.compile(ops.layer_norm_ref)
    providers = {
        "vitfast": _vitfast(lambda: ops.layer_norm(x, w, b, 1e-6), device),
        "torch": lambda: F.layer_norm(x, (shape[-1],), w, b, 1e-6),
        "torch-compile": lambda: compiled(x, w, b, 1e-6),
    }
    return providers, 2 * x.numel() * x.element_size()  # read x, write the output


def _layer_norm_residual(shape, device, dtype, grad):
    x, branch = (_randn(*shape, device=device, dtype=dtype, grad=grad) for _ in range(2))
    gamma, w, b = (_randn(shape[-1], device=device, dtype=dtype, grad=grad) for _ in range(3))

    def unfused():
        residual = x + gamma * branch
        return F.layer_norm(residual, (shape[-1],), w, b, 1e-6), residual

    compiled = torch.compile(unfused)
    providers = {
        "vitfast": _vitfast(lambda: ops.layer_norm_residual(x, branch, gamma, w, b, 1e-6), device),
        "torch": unfused,
        "torch-compile": compiled,
    }
    return providers, 4 * x.numel() * x.element_size()  # read x and branch, write normed and the residual


def _sides(tokens: int) -> tuple[int, int]:
    side = int(round((tokens - 1) ** 0.5))
    return side, side


def _attention(shape, device, dtype, grad):
    batch, heads, tokens, head_dim, extra = shape
    q, k, v = (_randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, grad=grad) for _ in range(3))
    kwargs = {}
    if extra == "rope":
        kwargs = {"rope": ops.rope_2d_table(_sides(tokens), head_dim, device=device), "num_prefix_tokens": 1}
    elif extra == "relbias":
        grid = _sides(tokens)
        table = _randn(num_relative_positions(grid), heads, device=device, dtype=dtype, grad=grad)
        kwargs = {"rel_pos_bias_table": table, "rel_pos_index": relative_position_index(grid, device=device)}
    compiled = torch.compile(ops.attention_ref)
    providers = {
        "vitfast": _vitfast(lambda: ops.attention(q, k, v, **kwargs), device),
        "torch": lambda: ops.attention_ref(q, k, v, **kwargs),  # RoPE as elementwise ops, bias materialized, SDPA
        "torch-compile": lambda: compiled(q, k, v, **kwargs),
    }
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bias = None
    if extra == "relbias":
        bias = ops.gather_rel_pos_bias(kwargs["rel_pos_bias_table"], kwargs["rel_pos_index"]).unsqueeze(0)
    backends = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    for name, backend in backends.items():
        if bias is not None and backend == SDPBackend.FLASH_ATTENTION:
            continue  # the flash backend takes no additive mask

        def pinned(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

        providers[name] = pinned
    return providers, None


def _swiglu(shape, device, dtype, grad):
    gate, up = (_randn(*shape, device=device, dtype=dtype, grad=grad) for _ in range(2))
    compiled = torch.compile(ops.swiglu_ref)
    providers = {
        "vitfast": _vitfast(lambda: ops.swiglu(gate, up), device),
        "torch": lambda: F.silu(gate) * up,
        "torch-compile": lambda: compiled(gate, up),
    }
    return providers, 3 * gate.numel() * gate.element_size()  # read gate and up, write the product


def _swiglu_layer_norm(shape, device, dtype, grad):
    gate, up = (_randn(*shape, device=device, dtype=dtype, grad=grad) for _ in range(2))
    w, b = (_randn(shape[-1], device=device, dtype=dtype, grad=grad) for _ in range(2))
    compiled = torch.compile(ops.swiglu_layer_norm_ref)
    providers = {
        "vitfast": _vitfast(lambda: ops.swiglu_layer_norm(gate, up, w, b, 1e-6), device),
        "torch": lambda: F.layer_norm(F.silu(gate) * up, (shape[-1],), w, b, 1e-6),
        "torch-compile": lambda: compiled(gate, up, w, b, 1e-6),
    }
    return providers, 3 * gate.numel() * gate.element_size()


def _rope(shape, device, dtype, grad):
    batch, heads, tokens, head_dim = shape
    # q and k as the engine hands them over: views into the packed qkv GEMM output [B, N, 3, H, D]
    qkv = _randn(batch, tokens, 3, heads, head_dim, device=device, dtype=dtype, grad=grad)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    cos, sin = ops.rope_2d_table(_sides(tokens), head_dim, device=device)
    compiled = torch.compile(ops.rope_2d_qk_ref)
    providers = {
        "vitfast": _vitfast(lambda: ops.rope_2d_qk(q, k, cos, sin, 1), device),
        "torch": lambda: ops.rope_2d_qk_ref(q, k, cos, sin, 1),
        "torch-compile": lambda: compiled(q, k, cos, sin, 1),
    }
    return providers, 4 * q.numel() * q.element_size()  # read q and k, write both rotated


def _patch_embed(shape, device, dtype, grad):
    batch, size, patch, dim = shape
    x = _randn(batch, 3, size, size, device=device, dtype=dtype, grad=False)
    weight = _randn(dim, 3, patch, patch, device=device, dtype=dtype, grad=grad)
    bias = _randn(dim, device=device, dtype=dtype, grad=grad)
    cls_token = _randn(1, 1, dim, device=device, dtype=dtype, grad=grad)
    pos_embed = _randn(1, 1 + (size // patch) ** 2, dim, device=device, dtype=dtype, grad=grad)

    def unfused():
        tokens = F.conv2d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)
        return torch.cat([cls_token.expand(batch, -1, -1), tokens], dim=1) + pos_embed

    compiled = torch.compile(unfused)
    providers = {
        "vitfast": _vitfast(lambda: ops.patch_embed_tokens(x, weight, bias, pos_embed, cls_token), device),
        "torch": unfused,
        "torch-compile": compiled,
    }
    return providers, None


# op -> (setup, GPU shapes, CPU shape)
CASES = {
    "layer_norm": (_layer_norm, [(8 * 1025, 1024), (64 * 197, 768), (8 * 1025, 2730)], (7, 384)),
    "layer_norm_residual": (_layer_norm_residual, [(8 * 1025, 1024), (64 * 197, 768)], (7, 384)),
    "attention": (
        _attention,
        [
            (8, 16, 1025, 64, "rope"),
            (8, 16, 1025, 64, None),
            (64, 12, 197, 64, None),
            (64, 12, 197, 64, "relbias"),
            (64, 16, 257, 64, "rope"),
            (8, 16, 257, 80, None),
            (8, 16, 257, 88, None),
        ],
        (1, 2, 50, 32, "rope"),
    ),
    "swiglu": (_swiglu, [(8 * 1025, 2730)], (7, 64)),
    "swiglu_layer_norm": (_swiglu_layer_norm, [(8 * 1025, 2730)], (7, 64)),
    "rope_2d_qk": (_rope, [(8, 16, 1025, 64), (1, 16, 1025, 64)], (1, 2, 50, 32)),
    "patch_embed": (_patch_embed, [(8, 448, 14, 1024), (64, 224, 16, 768)], (1, 56, 14, 32)),
}


def _outputs(result) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else [t for t in result if isinstance(t, torch.Tensor)]


def _bench(benchmark, op: str, shape, provider: str, device: str, dtype, passes: str, rounds: int) -> None:
    make = CASES[op][0]
    providers, bytes_moved = make(shape, device, dtype, passes == "fwd+bwd")
    if provider not in providers:
        pytest.skip(f"{provider} does not apply to {op} {shape}")
    forward = providers[provider]
    if passes == "fwd+bwd":
        grads = [torch.randn_like(t) for t in _outputs(forward())]

        def candidate():
            torch.autograd.backward(_outputs(forward()), grads)

    else:

        def candidate():
            with torch.no_grad():
                return forward()

    benchmark.group = f"{op} {shape} {str(dtype).removeprefix('torch.')} {passes}"
    timed = synchronized(candidate, device)
    timed()  # compile and autotune outside the timed rounds
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=5, iterations=1)
    if bytes_moved and passes == "fwd" and benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(bytes_moved / benchmark.stats.stats.median / 1e9, 1)


GPU_CASES = [(op, shape) for op, (_, shapes, _) in CASES.items() for shape in shapes]


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("op", "shape"), GPU_CASES, ids=[f"{op}-{shape}" for op, shape in GPU_CASES])
def test_gpu_op(benchmark, op, shape, provider, passes):
    if not CUDA:
        pytest.skip(NO_GPU)
    _bench(benchmark, op, shape, provider, "cuda", torch.bfloat16, passes, rounds=100)


@pytest.mark.parametrize("provider", ["vitfast", "torch"])
@pytest.mark.parametrize("op", list(CASES))
def test_cpu_op(benchmark, op, provider):
    """The CPU case: the reference path (``vitfast`` falls back to it, or runs the kernels under the interpreter)."""
    _bench(benchmark, op, CASES[op][2], provider, "cpu", torch.float32, "fwd", rounds=5)
