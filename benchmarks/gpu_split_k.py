"""GPU check of split-K for proj / fc2 at small batch: is it faster than cuBLAS + the plain residual LayerNorm?

    PYTHONPATH=$PWD python benchmarks/gpu_split_k.py --json OUT.jsonl     # needs a CUDA GPU, ~30 s

One engine step per case, bf16: a projection ``h [rows, K] x W [N, K]^T + bias`` followed by the residual
LayerNorm with a layer scale (``x + gamma * branch``, then LayerNorm), as the ``"kernels-splitk"`` candidate and as
``"kernels-sdpa"`` run it:

- ``cublas``: ``F.linear`` (cuBLAS, bias in its epilogue) then ``ops.layer_norm_residual`` (Triton);
- ``split-K S``: ``ops.linear_split_k`` at S slices then ``ops.layer_norm_residual_partials``, for the count
  ``split_k_splits`` picks on this GPU (``auto``) and for every other count the depth bound allows (to check the rule).

Each variant is captured ten times over in one CUDA graph (the engine replays graphs, so no host launch cost is
counted) and timed by CUDA events around the replay, 30 replays, median per step; the split-K outputs are checked
against the cuBLAS step (scaled error). Shapes: ViT-B/16 at batch 1 / 4 / 8 and ViT-L/16 at batch 1. One JSON line
per (shape, variant) with the device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from vitfast import ops
from vitfast._measure import scaled_error
from vitfast.backend import use_backend
from vitfast.ops._triton import num_sms
from vitfast.ops.linear import SPLIT_K_MAX, SPLIT_K_MIN_DEPTH, split_k_splits

# (model, batch, projection, rows, N, K)
SHAPES = [
    *(("ViT-B/16", b, "proj", 197 * b, 768, 768) for b in (1, 4, 8)),
    *(("ViT-B/16", b, "fc2", 197 * b, 768, 3072) for b in (1, 4, 8)),
    ("ViT-L/16", 1, "proj", 197, 1024, 1024),
    ("ViT-L/16", 1, "fc2", 197, 1024, 4096),
]
STEPS_PER_GRAPH = 10
REPLAYS = 30
EPS = 1e-6


def _median_step_us(step: Callable[[], object]) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile and warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(STEPS_PER_GRAPH):
            step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / STEPS_PER_GRAPH)
    return statistics.median(times)


def _shape_rows(meta: dict, model: str, batch: int, projection: str, rows: int, n: int, k: int) -> list[dict]:
    """Every variant of one shape: a JSON row each."""
    with torch.device("cuda"):
        h = torch.randn(rows, k).bfloat16()
        weight = (torch.randn(n, k) / k**0.5).bfloat16()
        proj_bias, gamma, norm_weight, norm_bias = (torch.randn(n).bfloat16() for _ in range(4))
        x = torch.randn(rows, n).bfloat16()

    def cublas():
        return ops.layer_norm_residual(x, F.linear(h, weight, proj_bias), gamma, norm_weight, norm_bias, EPS)

    def split_k(splits: int):
        partials = ops.linear_split_k(h, weight, splits)
        return ops.layer_norm_residual_partials(x, partials, proj_bias, gamma, norm_weight, norm_bias, EPS)

    auto = split_k_splits(rows, n, k, meta["sms"])
    counts = sorted({auto, *range(2, min(SPLIT_K_MAX, k // SPLIT_K_MIN_DEPTH) + 1)} - {1})
    variants = {"cublas": (cublas, None), **{f"split-K {s}": (lambda s=s: split_k(s), s) for s in counts}}
    out = []
    with torch.inference_mode(), use_backend("triton"):
        expected = cublas()
        for name, (step, splits) in variants.items():
            error = None if splits is None else max(map(scaled_error, step(), expected))
            row = {
                **meta,
                "model": model,
                "batch": batch,
                "projection": projection,
                "rows": rows,
                "n": n,
                "k": k,
                "variant": name,
                "splits": splits,
                "auto_splits": auto,
                "median_us": round(_median_step_us(step), 2),
                "scaled_error_vs_cublas": error,
            }
            out.append(row)
            mark = " (auto)" if splits == auto else ""
            err = "" if error is None else f"  err {error:.1e}"
            print(f"{model} bs {batch} {projection:<4} {name:<12}{mark:<7} {row['median_us']:8.2f} us{err}", flush=True)
    return out


def run(path: str | None) -> None:
    meta = {
        "device": torch.cuda.get_device_name(),
        "sms": num_sms(torch.device("cuda")),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dtype": "bf16",
        "steps_per_graph": STEPS_PER_GRAPH,
        "replays": REPLAYS,
    }
    torch.manual_seed(0)
    for shape in SHAPES:
        rows = _shape_rows(meta, *shape)
        if path:  # appended per shape: a timeout keeps what finished
            with open(path, "a") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="append one JSON line per (shape, variant) to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_split_k.py needs a CUDA GPU.")
    run(args.json)


if __name__ == "__main__":
    main()
