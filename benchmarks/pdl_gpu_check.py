"""Programmatic dependent launch on a GPU: one model captured with and without it, checked and timed in one run.

    PYTHONPATH=$PWD python benchmarks/pdl_gpu_check.py --json OUT/pdl.jsonl   # ViT-B/16, batch 1, ~1 min

1. The engine tuned as a user gets it with ``compile=False`` (no compile: every other candidate, ``kernels-pdl``
   among them where :func:`vitfast.ops._triton.pdl_supported`): its choice, ``tuning`` (median replay ms of each
   candidate, timed by the engine) and ``skipped``.
2. Two engines fixed to ``kernels-sdpa`` and ``kernels-pdl`` (the same kernels, the second launched with PDL): their
   outputs must be bitwise equal (PDL changes no arithmetic; a kernel touching memory before its wait would race),
   also over repeated replays; then their graphs are timed in interleaved rounds, as the engine times (one replay
   from an idle GPU, median of ``--reps``) and back to back (``--burst`` replays between two events, per replay),
   which is where hidden launch gaps show.

Weights are random (``vitfast.create_model``, nothing downloaded). Needs a CUDA GPU; PDL needs sm_90 or newer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics

import torch

import vitfast
from vitfast._measure import time_call
from vitfast.ops._triton import pdl_supported

PAIR = ("kernels-sdpa", "kernels-pdl")


def _burst_ms(replay, burst: int) -> float:
    """Milliseconds per replay over ``burst`` replays issued back to back."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(burst):
        replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / burst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.manual_seed(0)
    model = vitfast.create_model(args.model).cuda().eval()
    image = torch.randn(args.batch_size, 3, *model.config.img_size, device="cuda")
    row = {
        "model": args.model,
        "batch_size": args.batch_size,
        "pdl_supported": pdl_supported("cuda"),
        "capability": list(torch.cuda.get_device_capability()),
    }

    tuned = vitfast.optimize(model, batch_sizes=(args.batch_size,), compile=False)
    tuned(image)
    ((key, choice),) = tuned.choices.items()
    row.update(choice=choice, tuning_ms=tuned.tuning[key], skipped=tuned.skipped[key])
    print(f"{args.model} bs {args.batch_size}: PDL supported {row['pdl_supported']}; tuned chose {choice}")
    print(f"  engine tuning (median replay ms): { {k: round(v, 4) for k, v in row['tuning_ms'].items()} }")
    if row["skipped"]:
        print(f"  skipped: {row['skipped']}")
    del tuned
    try:
        _compare(model, image, args, row)
    except RuntimeError as exc:  # e.g. a driver that cannot capture PDL launches: recorded, not fatal
        row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  kernels-sdpa vs kernels-pdl failed: {row['error']}")
    if args.json:
        import triton

        row.update(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            device=torch.cuda.get_device_name(),
            torch=torch.__version__,
            cuda=torch.version.cuda,
            triton=triton.__version__,
        )
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


def _compare(model: torch.nn.Module, image: torch.Tensor, args: argparse.Namespace, row: dict) -> None:
    """Part 2 of the module docstring, into ``row``."""
    engines = {name: vitfast.optimize(model, batch_sizes=(args.batch_size,), backend=name) for name in PAIR}
    outputs = {name: engine(image) for name, engine in engines.items()}
    row["bitwise_equal"] = torch.equal(*outputs.values())
    pdl_engine = engines["kernels-pdl"]
    row["replays_stable"] = all(torch.equal(pdl_engine(image), outputs["kernels-pdl"]) for _ in range(50))
    replays = {name: next(iter(engine._captured.values())).graph.replay for name, engine in engines.items()}
    idle = {name: [] for name in PAIR}
    burst = {name: [] for name in PAIR}
    for _ in range(args.rounds):  # interleaved, so that clocks and neighbours affect both alike
        for name, replay in replays.items():
            _, times, _ = time_call(replay, torch.device("cuda"), warmup=5, reps=args.reps)
            idle[name].append(statistics.median(times))
            burst[name].append(_burst_ms(replay, args.burst))
    row["idle_replay_ms"] = {name: statistics.median(values) for name, values in idle.items()}
    row["burst_replay_ms"] = {name: statistics.median(values) for name, values in burst.items()}
    row["idle_rounds_ms"], row["burst_rounds_ms"] = idle, burst
    print(f"  kernels-pdl output bitwise equal to kernels-sdpa: {row['bitwise_equal']}; stable over 50 replays: "
          f"{row['replays_stable']}")  # fmt: skip
    for name in PAIR:
        print(
            f"  {name:<13} replay from idle {row['idle_replay_ms'][name]:.4f} ms, back to back "
            f"{row['burst_replay_ms'][name]:.4f} ms per replay (medians of {args.rounds} rounds)"
        )


if __name__ == "__main__":
    main()
