"""Host time of one eager training step, timm against ``vitfast.patch``, no GPU needed (the stand-in sm_90 driver).

    python -m benchmarks.step_host                 # table, plus markdown + JSON under benchmarks/results/
    python -m benchmarks.step_host --json X.json   # JSON only

Per family, a timm model with the base model's depth (12 blocks) and so its op count, at a tiny size (width 64,
one head of 64, MLP width 64, one image of one patch), in fp32, so that the aten ops compute next to nothing on the
CPU (at four patches and an MLP four times wider, GELU's erf alone cost ~50 us a call on a 2-core machine); one
step is forward, ``sum().backward()``. Variants: timm as it is, and
``vitfast.patch`` with ``recompute=True`` (the default) and ``recompute=False``, the patched ones on the Triton
backend through the host-overhead probe's stand-in GPU (:func:`benchmarks.host_overhead.stand_in_gpu`: our kernels'
launches reach a no-op sm_90 launcher; every aten op runs on the CPU). Median milliseconds of thread CPU time per
step over interleaved repeats (min-max), and each variant's ratio to timm.

How to read it: this is the host's side of a step, what a GPU step costs the CPU that launches it. timm's aten
ops and the aten ops inside ours (GEMMs, reductions) compute on the CPU here, tiny as they are, on both sides of each
ratio; our kernels compute nothing. On a GPU the step takes the longer of the host's time and the device's: a
step whose host time exceeds its GPU time is host-bound (small batches), so a ratio above 1 here costs speed there
only where the GPU work is short.
"""

from __future__ import annotations

import copy
import datetime
import platform
import sys
from collections.abc import Callable

import torch

from benchmarks import host_overhead

# family -> (timm model, its image side: one patch)
FAMILIES = {
    "ViT-B/16": ("vit_base_patch16_224", 16),
    "BEiT v2-B/16": ("beitv2_base_patch16_224", 16),
    "EVA-02-B/14": ("eva02_base_patch14_224", 14),
    "CLIP ViT-B/16": ("vit_base_patch16_clip_224", 16),
}
WIDTH, HEADS, BATCH = 64, 1, 1


def _models(name: str, side: int) -> dict[str, torch.nn.Module]:
    import timm

    import vitfast

    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, embed_dim=WIDTH, num_heads=HEADS, mlp_ratio=1.0, img_size=side)
    variants = {"timm": base}
    for recompute in (True, False):
        patched = copy.deepcopy(base)
        vitfast.patch(patched, recompute=recompute)
        variants[f"patched, recompute={recompute}"] = patched
    return variants


def _step(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model(images).sum().backward()

    return run


def measure(steps: int = 5, repeats: int = 7) -> dict:
    """Every family, timed; ``{"unavailable": why}`` where the stand-in cannot run."""
    problem = host_overhead.unavailable()
    if problem is not None:
        return {"unavailable": problem}
    import timm
    import triton

    rows = []
    with host_overhead.stand_in_gpu():
        for family, (name, side) in FAMILIES.items():
            variants = _models(name, side)
            images = torch.randn(BATCH, 3, side, side)
            timings = host_overhead.time_interleaved(
                {label: _step(model, images) for label, model in variants.items()}, steps, repeats
            )
            ms = {label: {k: v / 1e3 for k, v in t.items()} for label, t in timings.items()}
            row = {"family": family, "model": name, "ms": ms}
            row["ratio"] = {label: t["median"] / ms["timm"]["median"] for label, t in ms.items()}
            rows.append(row)
            print(family, {k: f"{v:.2f}x" for k, v in row["ratio"].items()}, file=sys.stderr, flush=True)
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{host_overhead._cpu_name()}, {platform.system()}, Python {platform.python_version()}",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timm": timm.__version__,
        "shape": {
            "width": WIDTH,
            "heads": HEADS,
            "mlp_ratio": 1.0,
            "batch": BATCH,
            "depth": 12,
            "patches": 1,
            "dtype": "float32",
        },
        "steps": steps,
        "repeats": repeats,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    labels = list(result["rows"][0]["ms"])
    lines = [
        f"# Host time of an eager training step, {result['date']} (no GPU: stand-in sm_90 driver, no-op launch)",
        "",
        f"{result['machine']}; torch {result['torch']}, triton {result['triton']}, timm {result['timm']}; "
        f"`python -m benchmarks.step_host`; 12 blocks, width {WIDTH}, MLP width {WIDTH}, 1 patch, batch {BATCH}, "
        "fp32; median ms "
        f"of thread CPU time per step over {result['repeats']} repeats of {result['steps']} steps (min-max). How "
        "to read: the docstring of `benchmarks/step_host.py`.",
        "",
        "| family | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for row in result["rows"]:
        cells = [
            f"{row['ms'][label]['median']:.2f} ({row['ms'][label]['min']:.2f}-{row['ms'][label]['max']:.2f})"
            + ("" if label == "timm" else f", {row['ratio'][label]:.2f}x")
            for label in labels
        ]
        lines.append(f"| {row['family']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    steps, repeats, json_path, out_dir = host_overhead.parse_args(argv, "benchmarks.step_host", __doc__, "steps", 5)
    return host_overhead.write(measure(steps, repeats), json_path, out_dir, "step_host", markdown)


if __name__ == "__main__":
    sys.exit(main())
