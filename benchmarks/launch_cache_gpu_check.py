"""On a GPU: the launch cache gives the same results as Triton's own launch, and what an eager call costs the host.

    python benchmarks/launch_cache_gpu_check.py [--json out.jsonl] [--native]

For a few public ops at ViT-B widths (bf16, gradients on): outputs and gradients through the launch cache
(:data:`vitfast.ops._triton.launch_cache`; for an op with a native eager path, csrc/eager.cpp, that path, which
replays the cache's launches) and with it switched off (every launch through ``kernel[grid]``, the Python path)
must be bitwise equal (the relative-position table's gradient, summed with atomics, within bf16's rounding); then
the host time of one eager forward call (mean over back-to-back calls, no synchronization inside, so that the GPU
work hides behind the host's) with the cache on and off, without and with gradients, and on the Python path with
the cache on where the op has a native path, beside aten's nearest op.
The native replay's own launches (cuLaunchKernelEx, on Triton's CUDA driver) against Triton's launcher
(``VITFAST_DIRECT_LAUNCH=0``): both bitwise equal to ``kernel[grid]``, and the host time of each.
``--native``: compile the extension first (``vitfast._ext.load_jit``, CPU sources, ~1-2 min) when no build for this
torch is installed, so that the native path exists. Runs on the CPU under ``TRITON_INTERPRET=1`` too (the cache
is not used there; the equality then checks nothing new).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from vitfast import _ext, ops
from vitfast.backend import use_backend
from vitfast.ops import _triton


def _cases(device: torch.device) -> dict[str, tuple[Callable, Callable, list[torch.Tensor], list[torch.Tensor]]]:
    """name -> (our call, aten's nearest op, the leaves whose gradients are compared bitwise, and those compared
    within bf16's rounding: the relative-position table, whose gradient's index_add_ sums with fp32 atomics on CUDA,
    bitwise deterministic on neither path)."""

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16).requires_grad_()

    # ViT-B/16 at batch 8 on a GPU; a few tokens on the CPU, where the interpreter runs the kernels
    batch, side, heads, width = (8, 14, 12, 768) if device.type == "cuda" else (1, 4, 2, 64)
    tokens = side * side + 1
    x, w, b = leaf(batch, tokens, width), leaf(width), leaf(width)
    gate, up = leaf(batch, tokens, 4 * width), leaf(batch, tokens, 4 * width)
    q, k, v = (leaf(batch, heads, tokens, 64) for _ in range(3))
    cos, sin = ops.rope_2d_table((side, side), 64, device=device)
    fc_w, fc_b = leaf(4 * width, width), leaf(4 * width)
    ln_w, ln_b = leaf(4 * width), leaf(4 * width)
    table = leaf((2 * side - 1) ** 2 + 3, heads)
    index = torch.randint(0, table.shape[0], (tokens, tokens), device=device)
    # the image without a gradient (a model's input); at batch 8 the weight gradient splits its rows (zeroed counters)
    image = torch.randn(batch, 3, 16 * side, 16 * side, device=device, dtype=torch.bfloat16)
    patch_w, patch_b, pos, cls = leaf(width, 3, 16, 16), leaf(width), leaf(1, tokens, width), leaf(1, 1, width)
    return {
        "layer_norm": (lambda: ops.layer_norm(x, w, b), lambda: F.layer_norm(x, (width,), w, b), [x, w, b], []),
        "swiglu": (lambda: ops.swiglu(gate, up), lambda: F.silu(gate), [gate, up], []),
        "swiglu_layer_norm": (
            lambda: ops.swiglu_layer_norm(gate, up, ln_w, ln_b),
            lambda: F.layer_norm(gate, (4 * width,), ln_w, ln_b),
            [gate, up, ln_w, ln_b],
            [],
        ),
        "rope_2d_qk": (lambda: ops.rope_2d_qk(q, k, cos, sin, 1), lambda: torch.mul(q, k), [q, k], []),
        "attention": (lambda: ops.attention(q, k, v), lambda: torch.matmul(q, k.transpose(-1, -2)), [q, k, v], []),
        "linear + GELU": (
            lambda: ops.linear(x, fc_w, fc_b, "gelu"),
            lambda: F.linear(x, fc_w),
            [x, fc_w, fc_b],
            [],
        ),
        "attention + rel-pos bias": (
            lambda: ops.attention(q, k, v, rel_pos_bias_table=table, rel_pos_index=index),
            lambda: torch.matmul(q, k.transpose(-1, -2)),
            [q, k, v],
            [table],
        ),
        "patch_embed_tokens": (
            lambda: ops.patch_embed_tokens(image, patch_w, patch_b, pos, cls),
            lambda: F.linear(x, fc_w),
            [patch_w, patch_b, pos, cls],
            [],
        ),
    }


def _same(got: list[torch.Tensor], expected: list[torch.Tensor], inexact: int) -> bool:
    """Outputs and gradients bitwise equal, the last ``inexact`` gradients within bf16's rounding."""
    exact = len(got) - inexact
    return all(torch.equal(a, b) for a, b in zip(got[:exact], expected[:exact], strict=True)) and all(
        torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)
        for a, b in zip(got[exact:], expected[exact:], strict=True)
    )


def _results(call: Callable, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    out = call()
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return [o.detach() for o in outs] + list(grads)


@contextlib.contextmanager
def python_path() -> Iterator[list]:
    """Every op's native eager path off (the Python eager path runs); yields the ops that had one."""
    ops_with_native = [(op, op.native) for op in _triton.EAGER_OPS.values() if op.native is not None]
    for op, _ in ops_with_native:
        op.native = None
    try:
        yield [op for op, _ in ops_with_native]
    finally:
        for op, native in ops_with_native:
            op.native = native


@contextlib.contextmanager
def triton_launcher() -> Iterator[None]:
    """Native replays through Triton's launcher instead of their own cuLaunchKernelEx (``VITFAST_DIRECT_LAUNCH=0``):
    fresh native entry points whose plans are made inside; the previous ones (and their plans) back on exit."""
    saved = {op: op.native for op in _triton.EAGER_OPS.values()}
    previous = os.environ.get(_triton.DIRECT_ENV)
    os.environ[_triton.DIRECT_ENV] = "0"
    try:
        _ext.register_ops()
        yield
    finally:
        if previous is None:
            os.environ.pop(_triton.DIRECT_ENV, None)
        else:
            os.environ[_triton.DIRECT_ENV] = previous
        for op, native in saved.items():
            op.native = native


def _host_us(call: Callable, grad: bool = False) -> float:
    calls = 200 if torch.cuda.is_available() else 3
    with torch.set_grad_enabled(grad):
        for _ in range(calls // 10):
            call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        elapsed = time.perf_counter() - start
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="append one JSON line per op here")
    parser.add_argument("--native", action="store_true", help="build the extension if needed (native eager path)")
    args = parser.parse_args(argv)
    if args.native:
        from vitfast import _ext

        if not _ext.HAS_EXT:
            print(f"building the extension ({_ext.reason})", flush=True)
            start = time.perf_counter()
            _ext.load_jit(with_cuda=False)
            print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    failures = 0
    with use_backend("triton"):
        for name, (ours, aten, exact, inexact) in _cases(device).items():
            leaves = exact + inexact
            detected = _triton.launch_cache._api
            _triton.launch_cache._api = False  # every launch through kernel[grid]
            try:
                uncached = _results(ours, leaves)
                off_us = _host_us(ours)
            finally:
                _triton.launch_cache._api = detected
            _results(ours, leaves)  # the native path's fill (the Python path)
            cached = _results(ours, leaves)  # its replay: direct launches on Triton's CUDA driver
            equal = _same(cached, uncached, len(inexact))
            with triton_launcher():
                _results(ours, leaves)
                through_launcher = _results(ours, leaves)
                launcher_us, launcher_grad_us = _host_us(ours), _host_us(ours, grad=True)
            equal_launcher = _same(through_launcher, uncached, len(inexact))
            failures += not (equal and equal_launcher)
            with python_path() as natives:
                python_us = _host_us(ours) if natives else None
                python_grad_us = _host_us(ours, grad=True) if natives else None
            row = {
                "op": name,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "versions": f"torch {torch.__version__}, triton {_triton.triton.__version__}",
                "bitwise_equal": equal,
                "bitwise_equal_triton_launcher": equal_launcher,
                "direct_launch": _triton.direct_launch_driver(_triton.launch_cache._driver) is not None,
                "cache_entries": len(_triton.launch_cache.entries),
                "native_ops": len(natives),
                "host_us_cache_on": round(_host_us(ours), 2),
                "host_us_cache_off": round(off_us, 2),
                "host_us_aten": round(_host_us(aten), 2),
                "host_us_cache_on_grad": round(_host_us(ours, grad=True), 2),
                "host_us_aten_grad": round(_host_us(aten, grad=True), 2),
                "host_us_python_path": python_us and round(python_us, 2),
                "host_us_python_path_grad": python_grad_us and round(python_grad_us, 2),
                "host_us_triton_launcher": round(launcher_us, 2),
                "host_us_triton_launcher_grad": round(launcher_grad_us, 2),
            }
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as out:
                    out.write(json.dumps(row) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
