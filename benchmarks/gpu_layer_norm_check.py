"""GPU check of the Triton LayerNorm, forward + backward against PyTorch in bf16. Needs a CUDA GPU (~1 minute).

    PYTHONPATH=$PWD python benchmarks/gpu_layer_norm_check.py --json OUT.jsonl

At (rows, width) (8200, 1024) and (12608, 768) (EVA-02-L/448 and ViT-B/16 at batch 8 / 64), for plain LayerNorm,
the residual variant and the residual variant with a layer scale: every output and gradient against fp64 with STYLE
rule 5's bound (at most 2x PyTorch's same-dtype error plus bf16's epsilon), then the time of forward and of forward +
backward (``triton.testing.do_bench`` median, host time included: what an eager training step pays) for the Triton
op and for PyTorch (``F.layer_norm``; eager ``x + gamma * branch`` then ``F.layer_norm``). The issue's target: the
Triton forward + backward no slower than PyTorch's. One JSON line per case (device, versions, date, every number).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json

import torch
import torch.nn.functional as F
import triton
import triton.testing

from vitfast.bench import scaled_error

ln = importlib.import_module("vitfast.ops.layer_norm")

SHAPES = [(8200, 1024), (12608, 768)]
EPS = 1e-6
DEVICE = "cuda"


def _eager_residual(x, branch, gamma, weight, bias, eps):
    residual = x + (branch if gamma is None else gamma * branch)
    return F.layer_norm(residual, (x.shape[-1],), weight, bias, eps), residual


def _plain_ref(x, gamma, weight, bias, eps):
    return (ln.layer_norm_ref(x, weight, bias, eps),)


def _plain_kernel(x, gamma, weight, bias, eps):
    return (ln._layer_norm_triton(x, weight, bias, eps),)


def _plain_torch(x, gamma, weight, bias, eps):
    return (F.layer_norm(x, (x.shape[-1],), weight, bias, eps),)


VARIANTS = {
    # name: (kernel, PyTorch in bf16, fp64 reference, residual?, layer scale?)
    "plain": (_plain_kernel, _plain_torch, _plain_ref, False, False),
    "residual": (ln._layer_norm_residual_triton, _eager_residual, ln.layer_norm_residual_ref, True, False),
    "residual+gamma": (ln._layer_norm_residual_triton, _eager_residual, ln.layer_norm_residual_ref, True, True),
}


def _inputs(rows: int, cols: int, residual: bool, gamma: bool) -> dict[str, torch.Tensor | None]:
    with torch.device(DEVICE):
        return {
            "x": torch.randn(rows, cols).bfloat16(),
            "branch": torch.randn(rows, cols).bfloat16() if residual else None,
            "gamma": (0.5 + 0.1 * torch.randn(cols)).bfloat16() if gamma else None,
            "weight": (1 + 0.1 * torch.randn(cols)).bfloat16(),
            "bias": (0.1 * torch.randn(cols)).bfloat16(),
        }


def _leaves(inputs: dict, dtype: torch.dtype | None = None) -> dict:
    return {
        k: None if t is None else (t.to(dtype) if dtype else t).detach().requires_grad_() for k, t in inputs.items()
    }


def _call(fn, leaves: dict, residual: bool):
    if residual:
        return fn(*leaves.values(), EPS)
    return fn(leaves["x"], leaves["gamma"], leaves["weight"], leaves["bias"], EPS)


def _outputs_and_grads(fn, leaves: dict, residual: bool, grads: list) -> list[torch.Tensor]:
    outputs = _call(fn, leaves, residual)
    present = [t for t in leaves.values() if t is not None]
    wanted = [g.to(o.dtype) for o, g in zip(outputs, grads, strict=True)]
    return [*outputs, *torch.autograd.grad(outputs, present, wanted)]


def _check(name: str, rows: int, cols: int) -> dict:
    kernel_fn, torch_fn, ref_fn, residual, gamma = VARIANTS[name]
    inputs = _inputs(rows, cols, residual, gamma)
    grads = [torch.randn(rows, cols, device=DEVICE) for _ in range(2 if residual else 1)]
    kernel = _outputs_and_grads(kernel_fn, _leaves(inputs), residual, grads)
    baseline = _outputs_and_grads(torch_fn, _leaves(inputs), residual, grads)
    expected = _outputs_and_grads(ref_fn, _leaves(inputs, torch.float64), residual, grads)
    eps = torch.finfo(torch.bfloat16).eps
    errors = [(scaled_error(k, e), scaled_error(b, e)) for k, b, e in zip(kernel, baseline, expected, strict=True)]
    ok = all(error <= 2 * base + eps for error, base in errors)

    times = {}
    for provider, fn in (("triton", kernel_fn), ("torch", torch_fn)):
        leaves = _leaves(inputs)
        present = [t for t in leaves.values() if t is not None]

        def forward(fn=fn, leaves=leaves):
            with torch.no_grad():
                return _call(fn, leaves, residual)

        def forward_backward(fn=fn, leaves=leaves, present=present):
            outputs = _call(fn, leaves, residual)
            return torch.autograd.grad(outputs, present, [g.bfloat16() for g in grads])

        times[provider] = {
            "fwd_ms": triton.testing.do_bench(forward, return_mode="median"),
            "fwd_bwd_ms": triton.testing.do_bench(forward_backward, return_mode="median"),
        }
    return {
        "case": name,
        "shape": [rows, cols],
        "dtype": "bfloat16",
        "rule5_ok": ok,
        "errors": errors,
        "times": times,
        "fwd_bwd_vs_torch": times["triton"]["fwd_bwd_ms"] / times["torch"]["fwd_bwd_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="JSON-lines file the results are appended to")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_layer_norm_check needs a CUDA GPU.")
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_layer_norm_check.py",
    }
    print(f"{'case':<16} {'shape':<12} rule5 {'triton fwd':>10} {'torch fwd':>10} {'triton f+b':>10} "
          f"{'torch f+b':>10} {'f+b ratio':>9}")  # fmt: skip
    with open(args.json, "a") as out:
        for rows, cols in SHAPES:
            for name in VARIANTS:
                row = {**meta, **_check(name, rows, cols)}
                out.write(json.dumps(row) + "\n")
                t = row["times"]
                print(
                    f"{name:<16} {rows}x{cols:<7} {'ok' if row['rule5_ok'] else 'FAIL':<5} "
                    f"{t['triton']['fwd_ms'] * 1e3:8.1f}us {t['torch']['fwd_ms'] * 1e3:8.1f}us "
                    f"{t['triton']['fwd_bwd_ms'] * 1e3:8.1f}us {t['torch']['fwd_bwd_ms'] * 1e3:8.1f}us "
                    f"{row['fwd_bwd_vs_torch']:8.2f}x"
                )


if __name__ == "__main__":
    main()
