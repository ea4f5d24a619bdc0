"""Activation memory per block: bytes of the tensors autograd saves for backward, patched vs unpatched timm, on the CPU.

    TRITON_INTERPRET=1 python -m benchmarks.activation_memory   # table, plus markdown + JSON under benchmarks/results/

Each family at its real width (ViT-B/16, BEiT v2-B/16, EVA-02-B/14, CLIP ViT-L/14), depth 2, one 224 image, random
weights: the second block's forward runs inside ``torch.autograd.graph.saved_tensors_hooks`` and every saved tensor's
storage is counted once (views of one storage, or a tensor saved by two nodes, count once), parameters excluded (they
are not activations). Unpatched: timm's own modules (PyTorch). Patched: ``vitfast.patch`` (its default
``recompute=True``, and ``recompute=False`` beside it) with the Triton kernels,
run through Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, which must be set before triton is imported;
the script refuses to run without it); the bytes saved do not depend on where the kernels run. Both in fp32: in bf16
the patched path's statistics (mean, rstd, log-sum-exp) stay fp32, so its ratio there is a little higher.

The breakdown lists each saved storage with the autograd nodes that hold it after the forward (by walking the
block's graph): ``RecomputedLinearBackward(step)`` is a GEMM that recomputes ``step`` (its input) in backward
(:mod:`vitfast.layers.recompute`), ``_EagerAutogradBackward(op)`` a vitfast op. A storage nobody holds any more
was saved by a node that died with its unused output (the LayerNorm whose output a recomputing GEMM re-derives):
still counted, so the figures are an upper bound of what stays alive.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import platform
import sys
from dataclasses import dataclass, field
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


@dataclass
class Saved:
    """One storage autograd saved: its bytes, the shape and dtype of the first tensor saved on it, and the autograd
    nodes that hold it after the forward (empty: saved by a node that no longer exists, e.g. one whose output
    nothing used, but counted, as it was saved)."""

    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    savers: set[str] = field(default_factory=set)


def _record(module: torch.nn.Module, run) -> tuple[dict[int, Saved], object]:
    """The distinct non-parameter storages saved while ``run()`` goes through ``module``'s forward, and its output."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, Saved] = {}
    output = []

    held = []  # every saved storage stays allocated until the end, so that no address is counted for two

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = Saved(storage.nbytes(), tuple(tensor.shape), str(tensor.dtype))
            held.append(storage)
        return tensor

    def pre_hook(_module, _args) -> None:
        hooks.__enter__()

    def post_hook(_module, _args, out) -> None:
        hooks.__exit__(None, None, None)
        output.append(out)

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    handles = (module.register_forward_pre_hook(pre_hook), module.register_forward_hook(post_hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return storages, output[0]


def saved_bytes(module: torch.nn.Module, run) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` goes through ``module``'s forward (no params)."""
    return sum(saved.nbytes for saved in _record(module, run)[0].values())


def _node_label(node) -> str:
    """An autograd node's name, with the op or the recomputed step where the node says which."""
    prologue = getattr(node, "prologue", None)  # vitfast.layers.recompute.RecomputedLinear
    if prologue is not None:
        step = getattr(prologue, "__name__", type(prologue).__name__).strip("_")
        return f"{node.name()}({step})"
    eager_op = getattr(node, "eager_op", None)  # vitfast.ops._triton's eager launch path
    fn = getattr(eager_op, "fn", None)
    if fn is not None:
        return f"{node.name()}({fn.__name__.strip('_')})"
    return node.name()


def _attribute(output: torch.Tensor, storages: dict[int, Saved]) -> None:
    """Fill ``savers``: walk the graph behind ``output`` and look at what each node holds."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        held = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name, None)
                held.extend(value if isinstance(value, tuple | list) else [value])
        with contextlib.suppress(AttributeError, RuntimeError):  # custom autograd.Functions hold saved_tensors
            held.extend(node.saved_tensors)
        for tensor in held:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in storages:
                storages[tensor.untyped_storage().data_ptr()].savers.add(_node_label(node))
        stack.extend(next_node for next_node, _ in node.next_functions)


def block_storages(model: torch.nn.Module, image: torch.Tensor, backend: str) -> dict[int, Saved]:
    """What ``model.blocks[1]`` saves in one forward under ``backend``, attributed to the nodes that hold it."""
    with vitfast.use_backend(backend):
        storages, output = _record(model.blocks[1], lambda: model(image))
    _attribute(output, storages)
    return storages


def block_bytes(model: torch.nn.Module, image: torch.Tensor, backend: str) -> int:
    """Saved bytes of ``model.blocks[1]`` in one forward under ``backend``."""
    return sum(saved.nbytes for saved in block_storages(model, image, backend).values())


def _breakdown(storages: dict[int, Saved]) -> list[dict]:
    rows = sorted(storages.values(), key=lambda saved: -saved.nbytes)
    return [
        {
            "MiB": saved.nbytes / 2**20,
            "shape": list(saved.shape),
            "dtype": saved.dtype,
            "saved by": sorted(saved.savers),
        }
        for saved in rows
    ]


def measure(name: str, image_size: int = 224, depth: int = 2) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(FAMILIES[name], pretrained=False, depth=depth, num_classes=0, img_size=image_size)
    image = torch.randn(1, 3, image_size, image_size)
    timm_saved = block_storages(model, image, "reference")
    plain_saved = block_storages(vitfast.patch(copy.deepcopy(model), recompute=False), image, "triton")
    patched_saved = block_storages(vitfast.patch(copy.deepcopy(model)), image, "triton")
    timm_bytes, plain_bytes, patched_bytes = (
        sum(saved.nbytes for saved in storages.values()) for storages in (timm_saved, plain_saved, patched_saved)
    )
    return {
        "timm_bytes": timm_bytes,
        "patched_no_recompute_bytes": plain_bytes,
        "patched_bytes": patched_bytes,
        "ratio": patched_bytes / timm_bytes,
        "breakdown": {"timm": _breakdown(timm_saved), "patched": _breakdown(patched_saved)},
    }


def _markdown(rows: dict[str, dict], date: str, env: str) -> str:
    lines = [
        f"# Activation memory per block, {date} (CPU, fp32, batch 1 at 224; kernels through Triton's interpreter)",
        "",
        env + ". How to read: the docstring of `benchmarks/activation_memory.py`.",
        "",
        "| family | timm MiB / block | patched, recompute=False | patched (recompute) | patched / timm | target "
        "| met |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        met = "yes" if row["ratio"] <= TARGETS[name] else "no"
        lines.append(
            f"| {name} | {row['timm_bytes'] / 2**20:.2f} | {row['patched_no_recompute_bytes'] / 2**20:.2f} "
            f"| {row['patched_bytes'] / 2**20:.2f} | {row['ratio']:.2f}x | <= {TARGETS[name]}x | {met} |"
        )
    for name, row in rows.items():
        for provider in ("timm", "patched"):
            lines += ["", f"## {name}: what {provider} saves per block", "", "| MiB | shape | dtype | saved by |"]
            lines.append("|---|---|---|---|")
            for saved in row["breakdown"][provider]:
                savers = ", ".join(saved["saved by"]) or "(a node freed after the forward)"
                lines.append(f"| {saved['MiB']:.3f} | {tuple(saved['shape'])} | {saved['dtype']} | {savers} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.activation_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the dated markdown + JSON go")
    parser.add_argument("--suffix", default="", help="appended to the file names: {date}_activation_memory{suffix}")
    args = parser.parse_args(argv)
    if not INTERPRETER:
        parser.error(
            "run it as TRITON_INTERPRET=1 python -m benchmarks.activation_memory (the kernels on CPU tensors)."
        )
    rows = {name: measure(name) for name in FAMILIES}
    date = datetime.date.today().isoformat()
    env = (
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; torch {torch.__version__}, "
        f"timm {timm.__version__}; `TRITON_INTERPRET=1 python -m benchmarks.activation_memory"
        + (f" --suffix {args.suffix}`" if args.suffix else "`")
    )
    text = _markdown(rows, date, env)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{date}_activation_memory{args.suffix}"
    (args.out_dir / f"{stem}.md").write_text(text)
    (args.out_dir / f"{stem}.json").write_text(
        json.dumps({"date": date, "environment": env, "rows": rows, "targets": TARGETS}, indent=1) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
