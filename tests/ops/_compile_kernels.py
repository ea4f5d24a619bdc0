"""Compile every vitfast Triton kernel offline for an H100 (sm_90) at the configurations its launcher picks on a GPU.

Run by ``tests/ops/test_kernels_compile.py`` in a fresh interpreter without ``TRITON_INTERPRET`` (Triton's
interpreter, which the test session turns on when there is no GPU, replaces ``@triton.jit`` at import time and never
runs the compiler)::

    python tests/ops/_compile_kernels.py RESULT.json

Each case calls the op's own launchers (``layer_norm_fwd``, ``attention_bwd``, ...) on fake CUDA tensors with the
launch function swapped for a recorder, so the block sizes, ``num_warps``/``num_stages``, constexpr flags, argument
dtypes and integer / alignment specializations are exactly what the launcher would hand to Triton on a GPU. The
recorded launches are compiled by ``JITFunction.warmup`` (compiles, never launches) against a stand-in driver whose
target is ``GPUTarget("cuda", 90, 32)``, in a cold Triton cache. Per kernel: shared memory from Triton's metadata;
registers and local memory per thread from the cubin (``cuobjdump -res-usage``: what the driver reports as
NUM_REGS / LOCAL_SIZE_BYTES when Triton loads the kernel on a GPU, ``n_regs`` and ``n_spills`` = local bytes / 4);
spill stores / loads from the ``ptxas -v`` log that Triton's compile prints.

Writes JSON: ``{"unavailable": reason}`` when the CUDA toolchain is missing, else ``{"triton": version, "launches":
[...], "kernels": [...]}`` where ``kernels`` names every ``@triton.jit`` ``*_kernel`` of the op modules (so that the
test notices a kernel no case compiles).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

# An H100 SXM: the launchers size some grids by the SM count (LayerNorm / SwiGLU backward partial sums).
H100_SM_COUNT = 132
OP_MODULES = ("layer_norm", "attention", "rope", "swiglu", "patch_embed")
DEVICE = "cuda:0"


def _toolchain_problem() -> str | None:
    """Why sm_90 kernels cannot be compiled here (None when they can)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: the interpreter replaces @triton.jit, nothing would be compiled"
    try:
        import triton
        from triton import knobs
        from triton.backends import backends
    except ImportError as exc:
        return f"triton (with its knobs / backends modules) cannot be imported: {exc}"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no NVIDIA backend (backends: {sorted(backends)})"
    for tool in ("ptxas", "cuobjdump"):
        try:
            getattr(knobs.nvidia, tool).path  # noqa: B018 - resolving the tool runs it with --version
        except (RuntimeError, AttributeError) as exc:
            return f"the CUDA tool {tool} is not available to triton {triton.__version__}: {exc}"
    return None


class _Sm90Driver:
    """The part of Triton's driver interface that ``JITFunction.warmup`` uses, for a GPU that is not here."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


class _DevicePointer:
    """A tensor argument as Triton's JIT sees it at a launch: its dtype and its address.

    The address is that of a fresh allocation (the CUDA caching allocator aligns them to 512 bytes) plus the view's
    byte offset, so that views like the ``up`` half of a packed tensor lose the 16-byte alignment attribute exactly as
    they would on a GPU.
    """

    _BASE = 1 << 32

    def __init__(self, tensor: torch.Tensor) -> None:
        self.dtype = tensor.dtype
        self._address = self._BASE + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


class _Recorder:
    """Stands in for ``vitfast.ops._triton.launch`` in the op modules: keeps each launch instead of running it."""

    def __init__(self) -> None:
        self.launches: list[tuple[Any, tuple, tuple, dict]] = []

    def __call__(self, kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
        self.launches.append((kernel, tuple(grid), args, kwargs))


def _fake(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=DEVICE)


# --------------------------------------------------------------------------------------------------------- cases
# Each case runs one op's launchers, forward then backward, on the fake CUDA tensors a model would pass (token counts
# and views of REFERENCE.md section 4): the launches it records are what gets compiled.


def _layer_norm_case(width: int, tokens: int, residual: bool, gamma: bool, dtype: torch.dtype) -> None:
    ops = importlib.import_module("vitfast.ops.layer_norm")
    x = _fake(2, tokens, width, dtype=dtype)
    weight, bias = _fake(width, dtype=dtype), _fake(width, dtype=dtype)
    branch = _fake(2, tokens, width, dtype=dtype) if residual else None
    scale = _fake(width, dtype=dtype) if gamma else None
    out, residual_out, _mean, rstd = ops.layer_norm_fwd(x, branch, scale, weight, bias, 1e-6)
    d_residual = torch.empty_like(out) if residual else None
    normalized = residual_out if residual else x
    ops.layer_norm_bwd(torch.empty_like(out), d_residual, normalized, branch, scale, weight, bias, rstd)


def _attention_case(
    head_dim: int, heads: int, tokens: int, rope: bool, bias: bool, dtype: torch.dtype, num_prefix: int = 1
) -> None:
    ops = importlib.import_module("vitfast.ops.attention")
    batch = 2
    # q, k, v as the layers hand them over: views of the packed qkv projection [B, N, 3, H, D]
    qkv = _fake(batch, tokens, 3, heads, head_dim, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    cos = sin = None
    if rope:
        cos, sin = (_fake(tokens - num_prefix, head_dim, dtype=torch.float32) for _ in range(2))
    table = index = None
    if bias:
        side = round((tokens - 1) ** 0.5)
        table = _fake((2 * side - 1) ** 2 + 3, heads, dtype=dtype)  # BEiT: + cls-to-token, token-to-cls, cls-to-cls
        index = _fake(tokens, tokens, dtype=torch.int64)
    scale = head_dim**-0.5
    out, lse = ops.attention_fwd(q, k, v, scale, cos, sin, num_prefix, table, index)
    grad_out = _fake(batch, tokens, heads * head_dim, dtype=dtype).reshape(batch, tokens, heads, head_dim)
    ops.attention_bwd(grad_out.transpose(1, 2), q, k, v, out, lse, scale, cos, sin, num_prefix, table, index, bias)


def _rope_case(head_dim: int, heads: int, tokens: int, dtype: torch.dtype, num_prefix: int = 1) -> None:
    ops = importlib.import_module("vitfast.ops.rope")
    qkv = _fake(2, tokens, 3, heads, head_dim, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    cos, sin = (_fake(tokens - num_prefix, head_dim, dtype=torch.float32) for _ in range(2))
    q_out, k_out = ops.rope_2d_qk_fwd(q, k, cos, sin, num_prefix)
    ops.rope_2d_qk_fwd(q_out, k_out, cos, sin, num_prefix, inverse=True)  # the backward: contiguous gradients


def _swiglu_case(kind: str, width: int, tokens: int, dtype: torch.dtype) -> None:
    ops = importlib.import_module("vitfast.ops.swiglu")
    if kind == "packed":
        x = _fake(2, tokens, 2 * width, dtype=dtype)
        out = ops.swiglu_packed_fwd(x)
        ops.swiglu_packed_bwd(torch.empty_like(out), x)
        return
    gate, up = _fake(2, tokens, width, dtype=dtype), _fake(2, tokens, width, dtype=dtype)
    if kind == "split":
        out = ops.swiglu_fwd(gate, up)
        ops.swiglu_bwd(torch.empty_like(out), gate, up)
        return
    weight, bias = _fake(width, dtype=dtype), _fake(width, dtype=dtype)
    out, mean, rstd = ops.swiglu_layer_norm_fwd(gate, up, weight, bias, 1e-6)
    ops.swiglu_layer_norm_bwd(torch.empty_like(out), gate, up, weight, mean, rstd)


def _patch_embed_case(patch: int, dim: int, image: int, dtype: torch.dtype, uint8: bool = False) -> None:
    ops = importlib.import_module("vitfast.ops.patch_embed")
    num_patches = (image // patch) ** 2
    x = _fake(2, 3, image, image, dtype=torch.uint8 if uint8 else dtype)
    weight = _fake(dim, 3, patch, patch, dtype=dtype)
    bias, cls_token = _fake(dim, dtype=dtype), _fake(1, 1, dim, dtype=dtype)
    pos_embed = _fake(1, num_patches + 1, dim, dtype=dtype)
    mean = std = _fake(3, dtype=torch.float32) if uint8 else None
    out = ops.patch_embed_fwd(x, weight, bias, pos_embed, cls_token, mean, std)
    # no image gradient for a uint8 image: the backward then runs the weight-gradient kernel only
    ops.patch_embed_bwd(torch.empty_like(out), x, weight, mean, std, 1, not uint8, True)


def _case(op: str, label: str, run: Callable[..., None], *args: Any, **kwargs: Any) -> tuple[str, str, Callable]:
    return op, label, functools.partial(run, *args, **kwargs)


BF16, FP32 = torch.bfloat16, torch.float32
LAYER_NORM_WIDTHS = (768, 1024, 2730, 6144)  # ViT-B / ViT-L hidden widths, EVA-02's sub-LN MLP widths
CASES = [
    *(_case("layer_norm", f"C={w} bf16", _layer_norm_case, w, 257, False, False, BF16) for w in LAYER_NORM_WIDTHS),
    *(
        _case("layer_norm", f"residual+gamma C={w} bf16", _layer_norm_case, w, 257, True, True, BF16)
        for w in LAYER_NORM_WIDTHS
    ),
    _case("layer_norm", "residual C=768 bf16", _layer_norm_case, 768, 197, True, False, BF16),
    _case("layer_norm", "C=1024 fp32", _layer_norm_case, 1024, 257, False, False, FP32),
    _case("attention", "D=64 N=197 bf16", _attention_case, 64, 12, 197, False, False, BF16),
    _case("attention", "D=64 N=1025 rope bf16", _attention_case, 64, 16, 1025, True, False, BF16),
    _case("attention", "D=64 N=197 relpos bf16", _attention_case, 64, 12, 197, False, True, BF16),
    _case("attention", "D=88 N=257 bf16", _attention_case, 88, 16, 257, False, False, BF16),
    _case("attention", "D=88 N=257 rope bf16", _attention_case, 88, 16, 257, True, False, BF16),
    _case("attention", "D=88 N=257 relpos bf16", _attention_case, 88, 16, 257, False, True, BF16),
    _case("attention", "D=64 N=197 fp32", _attention_case, 64, 12, 197, False, False, FP32),
    _case("rope", "D=64 N=1025 bf16", _rope_case, 64, 16, 1025, BF16),
    _case("rope", "D=88 N=257 bf16", _rope_case, 88, 16, 257, BF16),
    _case("swiglu", "split h=2730 bf16", _swiglu_case, "split", 2730, 1025, BF16),
    _case("swiglu", "packed h=2730 bf16", _swiglu_case, "packed", 2730, 1025, BF16),
    _case("swiglu", "sub-LN h=2730 bf16", _swiglu_case, "layer_norm", 2730, 1025, BF16),
    _case("swiglu", "sub-LN h=2730 fp32", _swiglu_case, "layer_norm", 2730, 1025, FP32),
    _case("patch_embed", "p=16 D=1024 bf16", _patch_embed_case, 16, 1024, 224, BF16),
    _case("patch_embed", "p=14 D=1024 bf16", _patch_embed_case, 14, 1024, 224, BF16),
    _case("patch_embed", "p=16 D=1024 uint8->bf16", _patch_embed_case, 16, 1024, 224, BF16, uint8=True),
    _case("patch_embed", "p=16 D=1024 fp32", _patch_embed_case, 16, 1024, 224, FP32),
]


# ------------------------------------------------------------------------------------------------------ compiling


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """Registers and stack frame (local memory, where spills go) per thread of the cubin's kernel.

    These are what the driver reports for the loaded kernel (CU_FUNC_ATTRIBUTE_NUM_REGS / LOCAL_SIZE_BYTES), which
    Triton turns into ``n_regs`` and ``n_spills`` (local bytes / 4) on a GPU.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run(
            [cuobjdump, "-res-usage", file.name], check=True, capture_output=True, text=True
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", listing)
    if usage is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{listing}")
    regs, stack, _static_shared, local = (int(value) for value in usage.groups())
    return {"regs": regs, "local_bytes": stack + local}


def _spills(ptxas_log: str) -> dict[str, int]:
    """Spill stores / loads (bytes per thread) from ``ptxas -v``; Triton prints its log with TRITON_DUMP_PTXAS_LOG."""
    found = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if found is None:
        raise RuntimeError(f"no spill line in the ptxas log (is TRITON_DUMP_PTXAS_LOG honoured?):\n{ptxas_log}")
    return {"spill_stores": int(found.group(1)), "spill_loads": int(found.group(2))}


def _blocks(kwargs: dict) -> str:
    return " ".join(f"{name.removeprefix('BLOCK_')}={value}" for name, value in kwargs.items() if "BLOCK" in name)


_compiled: dict[int, dict] = {}


def _compile(kernel: Any, grid: tuple, args: tuple, kwargs: dict, cuobjdump: str) -> dict:
    wrapped = [_DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    ptxas_log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(ptxas_log):
        compiled = kernel.warmup(*wrapped, grid=grid, **kwargs)
    seconds = time.perf_counter() - start
    if id(compiled) in _compiled:  # the specialization of an earlier case: warmup reused its kernel
        return {**_compiled[id(compiled)], "seconds": 0.0, "reused": True}
    metadata = compiled.metadata
    result = {
        "shared": int(metadata.shared),
        "num_warps": int(metadata.num_warps),
        "num_stages": int(metadata.num_stages),
        "target": f"{metadata.target.backend}:{metadata.target.arch}",
        "seconds": round(seconds, 2),
        **_resource_usage(compiled.asm["cubin"], cuobjdump),
        **_spills(ptxas_log.getvalue()),
    }
    _compiled[id(compiled)] = result
    return result


def _kernel_names() -> list[str]:
    from triton.runtime.jit import JITFunction

    names = []
    for module_name in OP_MODULES:
        module = importlib.import_module(f"vitfast.ops.{module_name}")
        names += [
            f"{module_name}.{name}"
            for name, value in vars(module).items()
            if isinstance(value, JITFunction) and name.endswith("_kernel")
        ]
    return names


def main(result_path: str) -> None:
    with tempfile.TemporaryDirectory() as cache_dir:
        # a cold cache: every kernel goes through ptxas, whose log (spills) Triton prints with this knob
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        problem = _toolchain_problem()
        result = {"unavailable": problem} if problem is not None else _compile_all()
    with open(result_path, "w") as file:
        json.dump(result, file, indent=1)


def _compile_all() -> dict:
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton import knobs
    from triton.runtime.driver import driver

    # The launchers ask the GPU for its SM count; give them the H100's (a CPU-only torch has no CUDA runtime).
    torch.cuda.get_device_properties = lambda *_: SimpleNamespace(multi_processor_count=H100_SM_COUNT)
    recorder = _Recorder()
    for module_name in OP_MODULES:
        importlib.import_module(f"vitfast.ops.{module_name}").launch = recorder
    driver.set_active(_Sm90Driver())
    cuobjdump = knobs.nvidia.cuobjdump.path

    results = []
    for op, case, run in CASES:
        recorder.launches.clear()
        try:
            with FakeTensorMode():
                run()
        except Exception:  # a launcher that rejects the case fails the check like a compile error would
            results.append({"op": op, "case": case, "kernel": "(launcher)", "error": traceback.format_exc(limit=4)})
            continue
        for kernel, grid, args, kwargs in recorder.launches:
            row = {"op": op, "case": case, "kernel": kernel.fn.__name__, "blocks": _blocks(kwargs), "grid": list(grid)}
            try:
                row.update(_compile(kernel, grid, args, kwargs, cuobjdump))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"triton": triton.__version__, "launches": results, "kernels": _kernel_names()}


if __name__ == "__main__":
    main(sys.argv[1])
