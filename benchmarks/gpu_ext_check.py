"""GPU check of the compiled extension's CUDA kernels: correctness at full shapes, then timings. Needs a CUDA GPU.

Run from the repository root on the GPU machine (about 2 minutes on an H100, the build included):

    PYTHONPATH=$PWD python benchmarks/gpu_ext_check.py --out benchmarks/results/$(date +%F)_h100_ext.json

The extension is the installed / in-place build when one loads (``python setup.py build_ext --inplace`` puts
vitfast/_C*.so beside the sources), else it is compiled just in time by ``vitfast._ext.load_jit(with_cuda=True)``
for the visible GPU (``$TORCH_CUDA_ARCH_LIST`` overrides; cached in ``~/.cache/torch_extensions``).

(a) Correctness: ``vitfast::preprocess`` bit-exact against ``preprocess_ref`` (batch 8, 224 and 448, image and patch
rows, fp32 / bf16 / fp16); the CUDA LayerNorm (plain and residual, forward and every gradient) within STYLE rule 5
(error at most 2x PyTorch's same-dtype error against fp64, plus the dtype's epsilon) at (rows, width) (8200, 1024),
(12608, 768), (1576, 384), (2056, 1408), (8200, 2730) in bf16 / fp16 / fp32.

(b) Timings, two per case. GPU time per call: the calls captured in a CUDA graph, each on its own copy of the inputs
(256 MiB of copies in all, so every call reads HBM, not L2), median of 15 replays; the basis of GB/s and of the
faster-kernel choice. Eager time per call from Python: triton.testing.do_bench median, launch overhead included (what
an uncompiled small batch pays). Cases: the CUDA C++ LayerNorm vs the Triton one vs F.layer_norm (plain) / the unfused
``x + gamma * branch`` then F.layer_norm (residual), forward and forward+backward, GB/s over the bytes each pass must
move; preprocess of a batch of 8 224x224 images to bf16 vs the PyTorch sequence (permute, to float, / 255, normalize,
cast), as GB/s and as a fraction of a device-to-device copy of the same bytes and of a 1 GiB copy. The closing table
says, per shape, whether the CUDA C++ or the Triton LayerNorm is faster: the numbers behind ``prefer_cuda_kernel`` in
vitfast/ops/layer_norm_ext.py.

Results (device, versions, date, every number) go to the JSON file given by ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

LN_SHAPES = [(8200, 1024), (12608, 768), (1576, 384), (2056, 1408), (8200, 2730)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
EPS = 1e-6


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_extension() -> str:
    from vitfast import _ext

    if _ext.HAS_EXT_CUDA:
        return "installed build"
    start = time.perf_counter()
    _ext.load_jit(with_cuda=True)
    if not _ext.HAS_EXT_CUDA:
        raise SystemExit("the extension loaded without its CUDA kernels")
    return f"just-in-time build, {time.perf_counter() - start:.0f} s"


# ---- (a) correctness --------------------------------------------------------------------------------------------


def check_preprocess() -> list[dict]:
    from vitfast.ops import preprocess_ref

    results = []
    for size in (224, 448):
        images = torch.randint(0, 256, (8, size, size, 3), dtype=torch.uint8, device="cuda")
        images.view(-1)[:768] = torch.arange(256, dtype=torch.uint8, device="cuda").repeat_interleave(3)
        for patch in (0, 14, 16):
            for dtype in DTYPES:
                for stats_name, (mean, std) in (("imagenet", IMAGENET), ("clip", CLIP)):
                    got = torch.ops.vitfast.preprocess(images, list(mean), list(std), patch, dtype)
                    expected = preprocess_ref(images, mean, std, patch, dtype)
                    mismatches = int((got != expected).sum()) if got.shape == expected.shape else -1
                    results.append(
                        {
                            "op": "preprocess",
                            "shape": [8, size, size, 3],
                            "patch": patch,
                            "dtype": _name(dtype),
                            "stats": stats_name,
                            "mismatches": mismatches,
                            "ok": mismatches == 0,
                        }
                    )
    return results


def _grads(outputs, leaves: dict, grad_outputs: list) -> dict:
    wanted = {name: t for name, t in leaves.items() if t is not None}
    grads = torch.autograd.grad(outputs, list(wanted.values()), grad_outputs, allow_unused=True, materialize_grads=True)
    return {**{f"out{i}": o for i, o in enumerate(outputs)}, **dict(zip(wanted, grads, strict=True))}


def _run(fn, inputs: dict, grad_outputs: list, dtype: torch.dtype | None = None) -> dict:
    leaves = {
        name: None if t is None else (t.to(dtype) if dtype else t).detach().clone().requires_grad_()
        for name, t in inputs.items()
    }
    outputs = fn(*leaves.values(), EPS)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    return _grads(outputs, leaves, [g.to(o.dtype) for o, g in zip(outputs, grad_outputs, strict=True)])


def _eager_residual(x, branch, gamma, weight, bias, eps):
    residual = x + gamma * branch
    return F.layer_norm(residual, (x.shape[-1],), weight, bias, eps), residual


def check_layer_norm() -> list[dict]:
    from vitfast.bench import scaled_error

    ln = importlib.import_module("vitfast.ops.layer_norm")
    ext = importlib.import_module("vitfast.ops.layer_norm_ext")
    results = []
    for rows, cols in LN_SHAPES:
        for dtype in DTYPES:
            with torch.device("cuda"):
                x, branch = torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype)
                gamma, weight, bias = (
                    (0.5 + 0.1 * torch.randn(cols)).to(dtype),
                    (1 + 0.1 * torch.randn(cols)).to(dtype),
                    (0.1 * torch.randn(cols)).to(dtype),
                )
                d_out, d_residual = torch.randn(rows, cols), torch.randn(rows, cols)
            variants = {
                "plain": (
                    {"x": x, "weight": weight, "bias": bias},
                    [d_out],
                    ext.layer_norm_ext,
                    ln.layer_norm_ref,
                    ln.layer_norm_ref,
                ),
                "residual": (
                    {"x": x, "branch": branch, "gamma": gamma, "weight": weight, "bias": bias},
                    [d_out, d_residual],
                    ext.layer_norm_residual_ext,
                    _eager_residual,
                    ln.layer_norm_residual_ref,
                ),
            }
            for variant, (inputs, grads, kernel_fn, torch_fn, fp64_fn) in variants.items():
                try:
                    kernel = _run(kernel_fn, inputs, grads)
                except RuntimeError as exc:  # record it and go on: the report should show every failing shape
                    results.append(
                        {
                            "op": f"layer_norm {variant}",
                            "shape": [rows, cols],
                            "dtype": _name(dtype),
                            "failures": [f"raised {exc}".splitlines()[0]],
                            "ok": False,
                        }
                    )
                    continue
                baseline = _run(torch_fn, inputs, grads)
                expected = _run(fp64_fn, inputs, grads, torch.float64)
                worst = 0.0
                failures = []
                for key, want in expected.items():
                    error = scaled_error(kernel[key], want)
                    bound = 2 * scaled_error(baseline[key], want) + torch.finfo(dtype).eps
                    finite = bool(torch.isfinite(kernel[key]).all())
                    worst = max(worst, error / bound)
                    if error > bound or not finite or kernel[key].dtype != baseline[key].dtype:
                        failures.append(f"{key}: error {error:.2e} > bound {bound:.2e}")
                results.append(
                    {
                        "op": f"layer_norm {variant}",
                        "shape": [rows, cols],
                        "dtype": _name(dtype),
                        "worst_error_over_bound": round(worst, 3),
                        "failures": failures,
                        "ok": not failures,
                    }
                )
                del kernel, baseline, expected
    return results


# ---- (b) timings ------------------------------------------------------------------------------------------------


# Each timed call reads its own copy of the inputs, the copies together this large: far more than any L2 (50 MB on
# an H100), so GPU times are HBM times, not L2 replays.
ROTATION_BYTES = 256 * 2**20


def _eager_ms(fn) -> float:
    """Wall time per call as a Python caller sees it (launch overhead included), L2 flushed between calls."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=30, return_mode="median"))


def _gpu_ms(calls: list) -> float:
    """GPU time per call, launch overhead excluded: the calls (each on its own copy of the inputs) captured in one
    CUDA graph, replayed; the median replay over the number of calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs recommends
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del graph
    return statistics.median(times)


def _providers(variant: str, x, branch, gamma, weight, bias) -> dict:
    ln = importlib.import_module("vitfast.ops.layer_norm")
    ext = importlib.import_module("vitfast.ops.layer_norm_ext")
    if variant == "plain":
        return {
            "cuda-ext": lambda: ext.layer_norm_ext(x, weight, bias, EPS),
            "triton": lambda: ln._layer_norm_triton(x, weight, bias, EPS),
            "torch": lambda: F.layer_norm(x, (x.shape[-1],), weight, bias, EPS),
        }
    return {
        "cuda-ext": lambda: ext.layer_norm_residual_ext(x, branch, gamma, weight, bias, EPS),
        "triton": lambda: ln._layer_norm_residual_triton(x, branch, gamma, weight, bias, EPS),
        "torch": lambda: _eager_residual(x, branch, gamma, weight, bias, EPS),
    }


def _fwd_bwd(fn, inputs: tuple, grad: torch.Tensor):
    def run():
        outputs = fn()
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        # autograd.grad, not backward: no accumulation into .grad adding to every provider's time
        return torch.autograd.grad(outputs, inputs, [grad] * len(outputs))

    return run


def _time_shape(rows: int, cols: int, dtype: torch.dtype) -> list[dict]:
    element = torch.finfo(dtype).bits // 8 * rows * cols
    copies = max(2, min(16, -(-ROTATION_BYTES // (3 * element))))
    with torch.device("cuda"):
        gamma, weight, bias = (torch.randn(cols, dtype=dtype).requires_grad_() for _ in range(3))
        sets = [
            tuple(torch.randn(rows, cols, dtype=dtype).requires_grad_(grad) for grad in (True, True, False))
            for _ in range(copies)
        ]
    results = []
    # bytes each pass must move at least: plain fwd reads x, writes out; bwd reads x, d_out, writes dx. residual fwd
    # reads x, branch, writes out, residual; bwd reads residual, d_out, d_residual, branch, writes dx, dbranch.
    for variant, fwd_bytes, bwd_bytes in (("plain", 2 * element, 3 * element), ("residual", 4 * element, 6 * element)):
        per_copy = [_providers(variant, x, branch, gamma, weight, bias) for x, branch, _grad in sets]
        inputs = [
            (x, weight, bias) if variant == "plain" else (x, branch, gamma, weight, bias) for x, branch, _grad in sets
        ]
        for provider in per_copy[0]:
            with torch.no_grad():
                fwd_ms = _gpu_ms([fns[provider] for fns in per_copy])
                eager_fwd_ms = _eager_ms(per_copy[0][provider])
            both = [
                _fwd_bwd(fns[provider], ins, grad)
                for fns, ins, (_x, _b, grad) in zip(per_copy, inputs, sets, strict=True)
            ]
            both_ms = _gpu_ms(both)
            eager_both_ms = _eager_ms(both[0])
            results.append(
                {
                    "op": f"layer_norm {variant}",
                    "shape": [rows, cols],
                    "dtype": _name(dtype),
                    "provider": provider,
                    "fwd_ms": round(fwd_ms, 4),
                    "fwd_GBps": round(fwd_bytes / fwd_ms / 1e6, 1),
                    "fwd_bwd_ms": round(both_ms, 4),
                    "fwd_bwd_GBps": round((fwd_bytes + bwd_bytes) / both_ms / 1e6, 1),
                    "eager_fwd_ms": round(eager_fwd_ms, 4),
                    "eager_fwd_bwd_ms": round(eager_both_ms, 4),
                }
            )
    return results


def time_layer_norm() -> list[dict]:
    return [row for rows, cols in LN_SHAPES for dtype in DTYPES for row in _time_shape(rows, cols, dtype)]


def _copies_of(make, count: int) -> list:
    return [make() for _ in range(count)]


def time_preprocess() -> dict:
    mean, std = IMAGENET
    mean_t = torch.tensor(mean, device="cuda").view(3, 1, 1)
    std_t = torch.tensor(std, device="cuda").view(3, 1, 1)
    pixels = 8 * 224 * 224 * 3
    moved = pixels * (1 + 2)  # read uint8, write bf16
    copies = -(-ROTATION_BYTES // pixels)
    batches = _copies_of(lambda: torch.randint(0, 256, (8, 224, 224, 3), dtype=torch.uint8, device="cuda"), copies)

    def ext(images, patch):
        return lambda: torch.ops.vitfast.preprocess(images, list(mean), list(std), patch, torch.bfloat16)

    def sequence(images):
        return lambda: ((images.permute(0, 3, 1, 2).float() / 255 - mean_t) / std_t).to(torch.bfloat16)

    providers = {
        "cuda-ext image bf16": [ext(images, 0) for images in batches],
        "cuda-ext patch16 rows bf16": [ext(images, 16) for images in batches],
        "torch sequence bf16": [sequence(images) for images in batches],
    }
    # reference bandwidths: device-to-device copies moving the same bytes (read + write), rotated the same way, and
    # one large copy
    sources = _copies_of(lambda: torch.empty(moved // 2, dtype=torch.uint8, device="cuda"), copies)
    targets = [torch.empty_like(source) for source in sources]
    copy_same = moved / _gpu_ms([lambda s=s, t=t: t.copy_(s) for s, t in zip(sources, targets, strict=True)]) / 1e6
    large, large_target = (torch.empty(2**30, dtype=torch.uint8, device="cuda") for _ in range(2))
    copy_large = 2 * large.numel() / _gpu_ms([lambda: large_target.copy_(large)]) / 1e6
    result = {"bytes_moved": moved, "copy_same_bytes_GBps": round(copy_same, 1), "copy_1GiB_GBps": round(copy_large, 1)}
    for name, calls in providers.items():
        ms = _gpu_ms(calls)
        rate = moved / ms / 1e6
        result[name] = {
            "ms": round(ms, 4),
            "GBps": round(rate, 1),
            "of_copy_same_bytes": round(rate / copy_same, 3),
            "of_copy_1GiB": round(rate / copy_large, 3),
            "eager_ms": round(_eager_ms(calls[0]), 4),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--skip-timings", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    started = time.perf_counter()
    build = load_extension()
    print(f"extension: {build}", flush=True)
    torch.manual_seed(0)
    correctness = check_preprocess() + check_layer_norm()
    failed = [r for r in correctness if not r["ok"]]
    print(f"correctness: {len(correctness) - len(failed)}/{len(correctness)} checks pass", flush=True)
    for r in failed:
        print("  FAIL", r, flush=True)
    worst = max(r.get("worst_error_over_bound", 0.0) for r in correctness)
    print(f"  LayerNorm: worst error / rule-5 bound = {worst:.3f} (<= 1 passes)", flush=True)
    timing_errors: list[str] = []

    def guarded(timed, empty):  # a timing failure must not cost the correctness report
        try:
            return timed()
        except Exception as exc:
            timing_errors.append(f"{timed.__name__}: {type(exc).__name__}: {exc}")
            print(f"{timed.__name__} failed: {exc}", flush=True)
            return empty

    layer_norm_times = [] if args.skip_timings else guarded(time_layer_norm, [])
    preprocess_times = {} if args.skip_timings else guarded(time_preprocess, {})
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": importlib.import_module("triton").__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extension": build,
        "correctness": correctness,
        "layer_norm_timings": layer_norm_times,
        "preprocess_timings": preprocess_times,
        "timing_errors": timing_errors,
        "seconds": round(time.perf_counter() - started, 1),
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    _print_tables(layer_norm_times, preprocess_times)
    print(f"wrote {args.out} ({report['seconds']} s)")
    sys.exit(1 if failed else 0)


def _print_tables(layer_norm_times: list[dict], preprocess_times: dict) -> None:
    if layer_norm_times:
        print(
            "\nLayerNorm: GPU ms per call (CUDA graph, inputs from HBM) and GB/s, fwd | fwd+bwd; 'faster': cuda-ext vs"
        )
        print(
            "triton on GPU time. In brackets: eager ms per call from Python (launch overhead included), fwd | fwd+bwd"
        )
        keyed = {(r["op"], tuple(r["shape"]), r["dtype"], r["provider"]): r for r in layer_norm_times}
        header = f"{'op':19} {'shape':>12} {'dtype':8}"
        print(f"{header} {'cuda-ext':>31} {'triton':>31} {'torch':>31}  faster fwd|both")
        for op, shape, dtype, _ in sorted({k for k in keyed if k[3] == "torch"}, key=lambda k: (k[0], k[1][1], k[2])):
            cells, rows = [], {}
            for provider in ("cuda-ext", "triton", "torch"):
                r = rows[provider] = keyed[(op, shape, dtype, provider)]
                cells.append(
                    f"{r['fwd_ms']:.3f}({r['fwd_GBps']:.0f})|{r['fwd_bwd_ms']:.3f}({r['fwd_bwd_GBps']:.0f})"
                    f"[{r['eager_fwd_ms']:.2f}|{r['eager_fwd_bwd_ms']:.2f}]"
                )
            fwd = "cuda" if rows["cuda-ext"]["fwd_ms"] <= rows["triton"]["fwd_ms"] else "triton"
            both = "cuda" if rows["cuda-ext"]["fwd_bwd_ms"] <= rows["triton"]["fwd_bwd_ms"] else "triton"
            print(f"{op[11:]:19} {str(shape):>12} {dtype:8} {cells[0]:>31} {cells[1]:>31} {cells[2]:>31}  {fwd}|{both}")
    if preprocess_times:
        moved, same, large = (preprocess_times[k] for k in ("bytes_moved", "copy_same_bytes_GBps", "copy_1GiB_GBps"))
        print(f"\npreprocess, batch 8 224x224 -> bf16 ({moved / 1e6:.1f} MB moved), GPU time (CUDA graph)")
        print(f"  device-to-device copies: {same} GB/s of the same bytes, {large} GB/s of 1 GiB")
        for name, r in preprocess_times.items():
            if isinstance(r, dict):
                share_same, share_large = r["of_copy_same_bytes"], r["of_copy_1GiB"]
                rate = f"{r['ms'] * 1000:.2f} us {r['GBps']:7.1f} GB/s"
                shares = f"{share_same:.0%} | {share_large:.0%} of the copies"
                print(f"  {name:27} {rate}  {shares}; eager {r['eager_ms']:.4f} ms")


if __name__ == "__main__":
    main()
