"""vitfast.optimize() on a GPU: correctness against timm and latency per backend, in one run.

    PYTHONPATH=$PWD python benchmarks/gpu_engine_check.py --models vit_base_patch16_224 --batch-sizes 1,8

For each model and batch size: the engine (tuned, or captured with each backend named) is checked
against timm in fp32 (STYLE rule 5: error at most 2x timm's own bf16 error plus 1e-3) and timed like ``vitfast bench``
(synchronize, event, call, event; median and interquartile range of ``--reps`` calls); timm eager in bf16 is timed in
the same run for scale. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json

import torch

import vitfast
from vitfast import bench


def timed(fn, reps: int) -> tuple[float, float, float]:
    """(median, p25, p75) ms, timed as ``vitfast bench`` times (10 warm-up calls)."""
    _, times, _ = bench.time_call(fn, torch.device("cuda"), warmup=10, reps=reps)
    stats = bench.summarize(times)
    return stats["median_ms"], stats["p25_ms"], stats["p75_ms"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_base_patch16_224")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--backends", default="tuned", help="comma-separated; 'tuned' lets the engine choose")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="let 'tuned' also compile its torch.compile candidates (tens of seconds per model and batch size; the "
        "engine section of gpu_session.sh times them through vitfast bench)",
    )
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in args.models.split(","):
        ours, reference = bench.build_models(name, "cuda")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            image = torch.randn(batch, 3, *ours.config.img_size, device="cuda")
            with torch.inference_mode():
                expected = reference(image).float()
                timm_bf16 = copy.deepcopy(reference).bfloat16()
                timm_error = bench.scaled_error(timm_bf16(image.bfloat16()), expected)
                x = image.bfloat16()
                eager = timed(lambda m=timm_bf16, x=x: m(x), args.reps)
            del timm_bf16
            print(f"{name} bs={batch}: timm eager bf16 {eager[0]:.3f} ms; timm bf16 error {timm_error:.2e}", flush=True)
            for backend in args.backends.split(","):
                choose = None if backend == "tuned" else backend
                engine = vitfast.optimize(ours, batch_sizes=(batch,), backend=choose, compile=args.compile)
                out = engine(x)
                (key,) = engine.choices
                tuning = {name: round(ms, 3) for name, ms in engine.tuning.get(key, {}).items()}
                error = bench.scaled_error(out, expected)
                ok = error <= 2 * timm_error + 1e-3 and bool(torch.isfinite(out).all())
                median, p25, p75 = timed(lambda e=engine, x=x: e(x), args.reps)
                row = {
                    "model": name,
                    "batch_size": batch,
                    "backend": backend,
                    "median_ms": median,
                    "p25_ms": p25,
                    "p75_ms": p75,
                    "timm_eager_ms": eager[0],
                    "error": error,
                    "timm_bf16_error": timm_error,
                    "ok": ok,
                    "choice": engine.choices[key],
                    "tuning_ms": tuning,
                }
                rows.append(row)
                print(
                    f"  engine[{backend}]: {median:.3f} ms ({p25:.3f}-{p75:.3f}); error {error:.2e} "
                    f"{'ok' if ok else 'FAIL'}; chose {engine.choices[key]} {tuning}",
                    flush=True,
                )
                del engine
            torch.cuda.empty_cache()
    if args.json:
        env = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        }
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, **env}) + "\n")


if __name__ == "__main__":
    main()
