"""Kernel-level profile of one forward: which GPU kernels run, how long each takes, and the gap to the floor.

    python benchmarks/profile_block.py vit_base_patch16_224 --batch-size 1 --provider vitfast
    python benchmarks/profile_block.py eva02_large_patch14_448 --batch-size 8 --provider timm-graphs --json out.json

Runs one model (bf16, random weights shared with timm as in ``vitfast bench``) under one ``vitfast bench`` provider
(or ``vitfast-graphs:<backend>``: :func:`vitfast.optimize` captured with that backend), warms it up, then records a
few forwards with ``torch.profiler`` and prints: the kernels of one forward grouped by name (count per forward,
total and mean time), the GPU-busy time against the wall time of a forward (the difference is launch overhead and
gaps), and the two floors of the forward (FLOPs at the measured bf16 matmul rate, weights + activations once over the
measured copy bandwidth). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import vitfast
from vitfast import bench
from vitfast.models._info import model_info


def measured_ceilings() -> tuple[float, float]:
    """(bf16 matmul TFLOP/s, device-to-device copy GB/s counting read + write), measured here."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(512 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)

    def timed(fn, reps=10) -> float:
        fn()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / reps / 1e3

    tflops = 2 * 8192**3 / timed(lambda: a @ b) / 1e12
    gbps = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src)) / 1e9
    return tflops, gbps


def build_call(model_name: str, batch_size: int, provider_name: str):
    device = torch.device("cuda")
    ours, reference = bench.build_models(model_name, device)
    image = torch.randn(batch_size, 3, *ours.config.img_size, device=device)
    if provider_name.startswith("vitfast-graphs:"):  # the engine captured with one backend
        engine = vitfast.optimize(ours, batch_sizes=(batch_size,), backend=provider_name.split(":")[1])
        x = image.to(torch.bfloat16)
        return ours, (lambda: engine(x))
    call, _ = bench.make_call(bench.PROVIDERS[provider_name], ours, reference, image, dtype=torch.bfloat16)
    return ours, call


def profile_forward(call, forwards: int = 5) -> tuple[dict[str, list[float]], float]:
    """Per-kernel-name durations (us) over ``forwards`` forwards, and the median wall time of one forward (us)."""
    _, walls_ms, _ = bench.time_call(call, torch.device("cuda"), warmup=10, reps=20)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(forwards):
            call()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name].append(event.device_time)
    return kernels, statistics.median(walls_ms) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--provider", default="vitfast")
    parser.add_argument("--forwards", type=int, default=5)
    parser.add_argument("--json", help="write the table as JSON here")
    args = parser.parse_args(argv)

    tflops, gbps = measured_ceilings()
    model, call = build_call(args.model, args.batch_size, args.provider)
    kernels, wall_us = profile_forward(call, args.forwards)
    info = model_info(args.model, flops=True)
    flops = info.gflops * 1e9 * args.batch_size
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    # per block, the activations that must cross HBM at least once: x in and out, qkv, attention out, mlp hidden
    cfg = model.config
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    act_bytes = args.batch_size * tokens * (2 * cfg.embed_dim + 3 * cfg.embed_dim + cfg.embed_dim + hidden) * 2
    floor_compute_us = flops / (tflops * 1e12) * 1e6
    floor_memory_us = (weight_bytes + cfg.depth * act_bytes) / (gbps * 1e9) * 1e6

    rows = sorted(
        ((name, len(times) / args.forwards, sum(times) / args.forwards) for name, times in kernels.items()),
        key=lambda row: -row[2],
    )
    busy_us = sum(row[2] for row in rows)
    launches = sum(row[1] for row in rows)
    print(f"\n{args.model} bs={args.batch_size} provider={args.provider} ({torch.cuda.get_device_name()})")
    print(f"measured ceilings: {tflops:.0f} TFLOP/s bf16 matmul, {gbps:.0f} GB/s copy (read + write)")
    print(
        f"forward: wall {wall_us:.0f} us, GPU busy {busy_us:.0f} us, {launches:.0f} kernels "
        f"({launches / cfg.depth:.1f} per block); floors: compute {floor_compute_us:.0f} us, memory "
        f"{floor_memory_us:.0f} us"
    )
    print("| kernel | per forward | total us | us per launch | share |")
    print("|---|---:|---:|---:|---:|")
    for name, count, total in rows[:25]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {count:.0f} | {total:.1f} | {total / count:.2f} | {total / busy_us:.1%} |")
    if args.json:
        with open(args.json, "a") as f:
            record = {
                "model": args.model,
                "batch_size": args.batch_size,
                "provider": args.provider,
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "wall_us": wall_us,
                "busy_us": busy_us,
                "kernels_per_forward": launches,
                "floor_compute_us": floor_compute_us,
                "floor_memory_us": floor_memory_us,
                "matmul_tflops": tflops,
                "copy_gbps": gbps,
                "kernels": [{"name": n, "per_forward": c, "total_us": t} for n, c, t in rows],
            }
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
