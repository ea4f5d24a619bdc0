"""How much the timing method moves a launch-bound number: timm ViT-B/16 with CUDA graphs, bf16, batch 1 and 8.

Methods: (a) vitfast bench's (synchronize, event, call, event: one isolated call); (b) events around back-to-back
calls without synchronizing (throughput-like); (c) wall clock around call + synchronize; (d) triton's do_bench
(L2 flushed before each call). Run on a GPU: python benchmarks/timing_methods.py
"""

from __future__ import annotations

import statistics
import time

import timm
import torch
from triton.testing import do_bench


def main() -> None:
    model = timm.create_model("vit_base_patch16_224").cuda().eval().bfloat16()
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    print("| batch | (a) sync + events | (b) events, no sync | (c) wall clock + sync | (d) do_bench |")
    print("|---:|---:|---:|---:|---:|")
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            for _ in range(20):
                compiled(x)
            torch.cuda.synchronize()
            results = []
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(100)]
            for begin, end in events:
                torch.cuda.synchronize()
                begin.record()
                compiled(x)
                end.record()
            torch.cuda.synchronize()
            results.append(statistics.median(b.elapsed_time(e) for b, e in events))
            for begin, end in events:
                begin.record()
                compiled(x)
                end.record()
            torch.cuda.synchronize()
            results.append(statistics.median(b.elapsed_time(e) for b, e in events))
            walls = []
            for _ in range(100):
                start = time.perf_counter()
                compiled(x)
                torch.cuda.synchronize()
                walls.append((time.perf_counter() - start) * 1e3)
            results.append(statistics.median(walls))
            results.append(do_bench(lambda x=x: compiled(x), warmup=25, rep=200, return_mode="median"))
        print(f"| {batch} | " + " | ".join(f"{r:.3f}" for r in results) + " |")


if __name__ == "__main__":
    main()
