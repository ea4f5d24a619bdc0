"""Activation memory per block: bytes of the tensors autograd saves for backward, patched vs unpatched timm, on the CPU.

    TRITON_INTERPRET=1 python -m benchmarks.activation_memory   # table, plus markdown + JSON under benchmarks/results/

Each family at its real width (ViT-B/16, BEiT v2-B/16, EVA-02-B/14, CLIP ViT-L/14), depth 2, one 224 image, random
weights: the second block's forward runs inside ``torch.autograd.graph.saved_tensors_hooks`` and every saved tensor's
storage is counted once (views of one storage, or a tensor saved by two nodes, count once), parameters excluded (they
are not activations). Unpatched: timm's own modules (PyTorch). Patched: ``vitfast.patch`` with the Triton kernels,
run through Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, which must be set before triton is imported;
the script refuses to run without it); the bytes saved do not depend on where the kernels run. Both in fp32: in bf16
the patched path's statistics (mean, rstd, log-sum-exp) stay fp32, so its ratio there is a little higher.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
from pathlib import Path

import timm
import torch

import vitfast
from vitfast.ops._triton import INTERPRETER

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = {
    "ViT-B/16": "vit_base_patch16_224",
    "BEiT v2-B/16": "beitv2_base_patch16_224",
    "EVA-02-B/14": "eva02_base_patch14_224",
    "CLIP ViT-L/14": "vit_large_patch14_clip_224",
}
TARGETS = {"ViT-B/16": 0.7, "BEiT v2-B/16": 0.7, "EVA-02-B/14": 0.6, "CLIP ViT-L/14": 0.7}


def saved_bytes(module: torch.nn.Module, run) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` goes through ``module``'s forward (no params)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def pre_hook(_module, _args) -> None:
        hooks.__enter__()

    def post_hook(_module, _args, _output) -> None:
        hooks.__exit__(None, None, None)

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    handles = (module.register_forward_pre_hook(pre_hook), module.register_forward_hook(post_hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return sum(storages.values())


def block_bytes(model: torch.nn.Module, image: torch.Tensor, backend: str) -> int:
    """Saved bytes of ``model.blocks[1]`` in one forward under ``backend``."""
    with vitfast.use_backend(backend):
        return saved_bytes(model.blocks[1], lambda: model(image))


def measure(name: str, image_size: int = 224, depth: int = 2) -> dict[str, float]:
    torch.manual_seed(0)
    model = timm.create_model(FAMILIES[name], pretrained=False, depth=depth, num_classes=0, img_size=image_size)
    image = torch.randn(1, 3, image_size, image_size)
    timm_bytes = block_bytes(model, image, "reference")
    patched = vitfast.patch(copy.deepcopy(model))
    patched_bytes = block_bytes(patched, image, "triton")
    return {"timm_bytes": timm_bytes, "patched_bytes": patched_bytes, "ratio": patched_bytes / timm_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.activation_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the dated markdown + JSON go")
    args = parser.parse_args(argv)
    if not INTERPRETER:
        parser.error(
            "run it as TRITON_INTERPRET=1 python -m benchmarks.activation_memory (the kernels on CPU tensors)."
        )
    rows = {name: measure(name) for name in FAMILIES}
    date = datetime.date.today().isoformat()
    env = (
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; torch {torch.__version__}, "
        f"timm {timm.__version__}; `TRITON_INTERPRET=1 python -m benchmarks.activation_memory`"
    )
    lines = [
        f"# Activation memory per block, {date} (CPU, fp32, batch 1 at 224; kernels through Triton's interpreter)",
        "",
        env + ". How to read: the docstring of `benchmarks/activation_memory.py`.",
        "",
        "| family | timm MiB / block | patched MiB / block | patched / timm | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        met = "yes" if row["ratio"] <= TARGETS[name] else "no"
        lines.append(
            f"| {name} | {row['timm_bytes'] / 2**20:.2f} | {row['patched_bytes'] / 2**20:.2f} | {row['ratio']:.2f}x "
            f"| <= {TARGETS[name]}x | {met} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{date}_activation_memory.md").write_text(text)
    (args.out_dir / f"{date}_activation_memory.json").write_text(
        json.dumps({"date": date, "environment": env, "rows": rows, "targets": TARGETS}, indent=1) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
