"""The jobs users run first, over image files: :func:`predict` (top-k classes), :func:`validate` (top-1 / top-5 on a
labelled folder) and :func:`embed` (pooled features to a file, resumable). ``vitfast predict|validate|embed`` call them.

Images are decoded by Pillow and prepared by the model's own eval transform (:func:`vitfast.transforms.for_model`),
resized and cropped in the DataLoader's workers as uint8; normalization runs where the model runs. On a GPU the model
runs through :func:`vitfast.optimize` in bf16 by default (``engine="off"``: eager); on the CPU it runs eagerly in
fp32 (``engine="on"`` there runs the engine without CUDA graphs, which is the same eager forward).

An unreadable or non-image file is reported by name and skipped (``strict=True`` stops at it instead). Under
``torchrun --nproc_per_node N`` :func:`validate` shards the files with ``DistributedSampler`` and reduces the results
with ``torch.distributed``: every file is counted exactly once, so N processes report the numbers one process does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["IMAGE_EXTENSIONS", "ImageError", "class_names", "embed", "list_images", "load_model", "predict", "validate"]

logger = logging.getLogger("vitfast")

# torchvision's ImageFolder list (torchvision.datasets.folder.IMG_EXTENSIONS), so predict / embed and validate agree
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ENGINE_MODES = ("auto", "on", "off")


class ImageError(ValueError):
    """An image file that cannot be decoded (raised with ``strict=True``; otherwise it is reported and skipped)."""


# ---------------------------------------------------------------------------------------------- models


def load_model(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    random_init: bool = False,
) -> nn.Module:
    """A model for predict / validate / embed: pretrained weights unless ``checkpoint`` (a file) is given.

    ``name`` is a registered name, ``name.tag``, alias, ``local-dir:PATH`` or ``hf-hub:ORG/NAME``. ``random_init``
    skips the weights (timing runs only: the predictions mean nothing).
    """
    from vitfast.models import create_model, resolve

    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if checkpoint is not None:
        return create_model(name, checkpoint_path=checkpoint, **kwargs)
    if random_init:
        return create_model(name, **kwargs)
    if not name.startswith(("hf-hub:", "local-dir:")):
        _, weights, _ = resolve(name)
        if weights is None:
            raise ValueError(
                f"{name} has no pretrained weights registered, so its predictions would be random. Pass your own "
                f"weights (--checkpoint FILE, or a folder saved with vitfast.save_pretrained as 'local-dir:PATH'); "
                f"`vitfast list --pretrained` lists models with weights."
            )
    return create_model(name, pretrained=True, **kwargs)


def _as_model(model: nn.Module | str) -> nn.Module:
    return load_model(model) if isinstance(model, str) else model


def class_names(model: nn.Module) -> tuple[list[str] | None, list[str] | None]:
    """(label names, descriptions) for the model's head, or (None, None) when unknown.

    Label names saved with the model (``pretrained_cfg["label_names"]``, see :func:`vitfast.save_pretrained`) come
    first; otherwise an ImageNet-1k / 12k / 21k / 22k head (by its width) gets timm's ``ImageNetInfo`` synsets and
    descriptions when timm is installed. Without either, classes are shown by index.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    num_classes = getattr(model, "num_classes", 0)
    if cfg.get("label_names"):
        names = list(cfg["label_names"])
        descriptions = cfg.get("label_descriptions") or {}
        return names, [descriptions.get(n, n) for n in names]
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:
        return None, None
    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return None, None
    info = ImageNetInfo(subset)
    return list(info.label_names()), [info.index_to_description(i) for i in range(num_classes)]


def _require_head(model: nn.Module, job: str) -> None:
    if not getattr(model, "num_classes", 0):
        raise ValueError(
            f"the model has no classifier head (num_classes=0): it is an embedding model and cannot {job}. Use "
            "`vitfast embed` for its features, or load a checkpoint with a head (--checkpoint FILE --num-classes N)."
        )


@dataclass
class _Runner:
    """The model where it runs: device, dtype, engine or eager, and the normalization of uint8 batches."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    engine: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        from vitfast.ops.preprocess import preprocess

        pixels = pixels.to(self.device, non_blocking=True)
        return self.model(preprocess(pixels, self.mean, self.std, 0, self.dtype)).float()


def _placement(
    device: torch.device | str | None, engine: str, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype, bool]:
    """Where and how the model runs: (device, dtype, through the engine), from the options and the hardware."""
    if engine not in ENGINE_MODES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_MODES)}, got {engine!r}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    return (
        device,
        dtype or (torch.bfloat16 if on_gpu else torch.float32),
        engine == "on" or (engine == "auto" and on_gpu),
    )


def _runner(
    model: nn.Module,
    transform: Any,
    device: torch.device | str | None,
    engine: str,
    dtype: torch.dtype | None,
    batch_size: int,
) -> _Runner:
    device, dtype, use_engine = _placement(device, engine, dtype)
    if use_engine:
        from vitfast.engine import optimize

        # no inductor candidate: its compile (tens of seconds to minutes per model and shape) would dominate a
        # one-shot command; the kernel candidates capture in seconds
        module: nn.Module = optimize(model.eval(), batch_sizes=(batch_size,), dtype=dtype, device=device, compile=False)
        # capture (and tune) the batch size now, before any timing: a one-time cost, not the engine's speed
        with torch.no_grad():
            module(torch.zeros(batch_size, 3, *transform.input_size, device=device, dtype=dtype))
    else:
        first = next(model.parameters(), None)
        in_place = first is None or (first.device == device and first.dtype == dtype)
        # the caller's model is left where and as it was (a notebook keeps using it); a copy moves instead
        module = (model if in_place else copy.deepcopy(model).to(device=device, dtype=dtype)).eval()
    return _Runner(module, device, dtype, use_engine, transform.mean, transform.std)


# ---------------------------------------------------------------------------------------------- data


def list_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named in ``paths`` (any extension: a wrong one is reported when decoding) plus the image files under
    each directory, recursively, sorted. A missing path or no image at all raises ``FileNotFoundError``."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(
                    f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); point at a folder of images."
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist.")
    if not files:
        raise FileNotFoundError("no images given.")
    return files


class _ImageFiles(torch.utils.data.Dataset):
    """``samples[i] = (path, target)`` decoded by Pillow, resized and cropped: (uint8 HWC | None, target, i, error)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Any) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int, str | None]:
        from PIL import Image, UnidentifiedImageError

        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                pixels = self.transform.resize_crop(image.convert("RGB"))
        # what Pillow raises for a truncated, corrupt, unknown or oversized file (some plugins raise SyntaxError or
        # EOFError while loading)
        except (
            OSError,
            UnidentifiedImageError,
            ValueError,
            SyntaxError,
            EOFError,
            Image.DecompressionBombError,
        ) as exc:
            return None, target, index, f"{type(exc).__name__}: {exc}"
        return pixels, target, index, None


def _collate(items: list[tuple[torch.Tensor | None, int, int, str | None]]) -> dict[str, Any]:
    good = [item for item in items if item[0] is not None]
    return {
        "pixels": torch.stack([item[0] for item in good]) if good else None,
        "targets": torch.tensor([item[1] for item in good], dtype=torch.long),
        "indices": torch.tensor([item[2] for item in good], dtype=torch.long),
        "failed": [(item[2], item[3]) for item in items if item[0] is None],
    }


def _loader(dataset: torch.utils.data.Dataset, workers: int | None, pin: bool, **kwargs: Any):
    if workers is None:  # the cores this process may use (a container's cpuset), not the host's
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(8, cores)
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=pin,
        collate_fn=_collate,
        persistent_workers=False,
        **kwargs,
    )


def _report_failures(batch: dict[str, Any], dataset: _ImageFiles, strict: bool, failures: dict[str, str]) -> None:
    for index, message in batch["failed"]:
        path = str(dataset.samples[index][0])
        if strict:
            raise ImageError(f"cannot read {path} as an image ({message}); fix or remove it, or run without --strict.")
        logger.warning("skipped %s: not a readable image (%s)", path, message)
        failures[path] = message


def _progress(total: int, enabled: bool, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", desc=what, dynamic_ncols=True)


def _eval_transform(model: nn.Module) -> Any:
    from vitfast.transforms import _torchvision, for_model

    _torchvision()  # a missing torchvision is reported here, with how to install it, not inside a worker
    return for_model(model)


# ---------------------------------------------------------------------------------------------- predict


def predict(
    model: nn.Module | str,
    images: Iterable[str | os.PathLike],
    *,
    topk: int = 5,
    batch_size: int = 32,
    workers: int | None = 0,
    device: torch.device | str | None = None,
    engine: str = "auto",
    dtype: torch.dtype | None = None,
    strict: bool = False,
) -> list[dict[str, Any]]:
    """Top-k classes of each image file (directories are searched recursively).

    Returns one record per file, in order: ``{"file", "topk": [{"index", "prob", "label", "name"}, ...]}`` (softmax
    probabilities; ``label`` / ``name`` are None when the head's classes are unknown, see :func:`class_names`), or
    ``{"file", "error"}`` for a file that could not be decoded (``strict=True`` raises :class:`ImageError` instead).
    """
    _single_process("predict")
    model = _as_model(model)
    _require_head(model, "predict classes")
    transform = _eval_transform(model)
    files = list_images(images)
    batch_size = min(batch_size, len(files))  # a few images: the engine captures no larger batch than it needs
    dataset = _ImageFiles([(path, -1) for path in files], transform)
    run = _runner(model, transform, device, engine, dtype, batch_size)
    labels, descriptions = class_names(model)
    k = min(topk, model.num_classes)
    records: dict[int, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for batch in _loader(dataset, workers, run.device.type == "cuda", batch_size=batch_size):
        _report_failures(batch, dataset, strict, failures)
        for index, message in batch["failed"]:
            records[index] = {"file": str(files[index]), "error": message}
        if batch["pixels"] is None:
            continue
        probs, classes = run(batch["pixels"]).softmax(-1).topk(k, dim=-1)
        for index, row_probs, row_classes in zip(
            batch["indices"].tolist(), probs.tolist(), classes.tolist(), strict=True
        ):
            records[index] = {
                "file": str(files[index]),
                "topk": [
                    {
                        "index": c,
                        "prob": p,
                        "label": labels[c] if labels else None,
                        "name": descriptions[c] if descriptions else None,
                    }
                    for p, c in zip(row_probs, row_classes, strict=True)
                ],
            }
    return [records[i] for i in range(len(files))]


# ---------------------------------------------------------------------------------------------- validate


def _read_labels_file(root: Path, labels_file: Path, names: list[str] | None) -> list[tuple[Path, int]]:
    """``FILE LABEL`` per line (whitespace or comma separated): a path relative to ``root``, a class index or name."""
    index = {name: i for i, name in enumerate(names or [])}
    samples = []
    for number, line in enumerate(labels_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise ValueError(f"{labels_file}:{number}: expected 'FILE LABEL', got {line!r}.")
        name, label = parts
        if label.lstrip("-").isdigit():
            target = int(label)
        elif label in index:
            target = index[label]
        else:
            raise ValueError(
                f"{labels_file}:{number}: label {label!r} is neither a class index nor one of the model's label names."
            )
        samples.append((root / name, target))
    if not samples:
        raise ValueError(f"{labels_file} lists no images.")
    return samples


def _folder_targets(classes: list[str], model: nn.Module) -> list[int]:
    """Model class index of each ImageFolder class: by label name when the head's names are known, else by order."""
    names, _ = class_names(model)
    if names:
        position = {name: i for i, name in enumerate(names)}
        known = [c for c in classes if c in position]
        if len(known) == len(classes):
            return [position[c] for c in classes]
        if known:
            unknown = [c for c in classes if c not in position]
            raise ValueError(
                f"{len(unknown)} class folder(s) are not among the model's label names: {', '.join(unknown[:10])}"
                f"{' ...' if len(unknown) > 10 else ''}. Rename them (e.g. to ImageNet synsets such as {names[0]})."
            )
    if len(classes) == model.num_classes:
        return list(range(len(classes)))  # ImageFolder's sorted folder order is the head's order
    raise ValueError(
        f"the folder has {len(classes)} classes ({', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''}) but the "
        f"model's head has {model.num_classes}, and the folder names are not the head's label names. Use a model "
        "fine-tuned on these classes, or name the folders by the model's labels."
    )


def _samples(root: Path, labels_file: Path | None, model: nn.Module) -> list[tuple[Path, int]]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory.")
    if labels_file is not None:
        samples = _read_labels_file(root, labels_file, class_names(model)[0])
        outside = [(path, target) for path, target in samples if not 0 <= target < model.num_classes]
        if outside:
            path, target = outside[0]
            raise ValueError(
                f"{labels_file}: {len(outside)} label(s) outside the head's classes 0..{model.num_classes - 1}, "
                f"e.g. {target} for {path.name}; the labels must index this model's classifier."
            )
        return samples
    from torchvision.datasets import ImageFolder

    try:
        # paths and classes only; decoding is ours, so an unreadable file is reported instead of killing a worker
        folder = ImageFolder(str(root), loader=str)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{root} is not an ImageFolder with images: expected one sub-folder of images per class (class/xxx.jpg), "
            f"or pass a labels file for a flat folder ({exc})."
        ) from exc
    targets = _folder_targets(folder.classes, model)
    return [(Path(path), targets[target]) for path, target in folder.samples]


def _distributed(device: torch.device | str | None) -> tuple[int, int, bool, torch.device | str | None]:
    """(rank, world size, whether this call initialized the process group, device) from torchrun's environment.

    Each process takes the GPU of its local rank unless a device is given; NCCL for GPUs, gloo for the CPU.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False, device
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        on_gpu = device is not None and torch.device(device).type == "cuda"
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), created, device


def _single_process(job: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            f"{job} runs in one process (every process would write the same output); run it without torchrun. "
            "`vitfast validate` is the command that shards across processes."
        )


def validate(
    model: nn.Module | str,
    root: str | os.PathLike,
    *,
    labels_file: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: torch.device | str | None = None,
    engine: str = "auto",
    dtype: torch.dtype | None = None,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) of ``model`` on a labelled folder, and images/s.

    ``root`` is a torchvision ``ImageFolder`` (one sub-folder per class; folders named by the head's label names,
    e.g. ImageNet synsets, are mapped by name, others in sorted order) or, with ``labels_file``, any folder plus
    ``FILE LABEL`` lines. Returns ``{"top1", "top5", "images", "skipped", "seconds", "images_per_s",
    "data_wait_s", "setup_s", "processes", "device", "dtype", "engine", "failures"}``. ``seconds`` runs from the
    first batch requested to the last result; ``data_wait_s`` is the part of it spent waiting for the DataLoader (the
    slowest process's); ``setup_s`` (not in ``seconds``) moves the model and, with the engine, captures its graph.
    Under ``torchrun`` every process returns the same, reduced result.
    """
    import torch.distributed as dist

    model = _as_model(model)
    _require_head(model, "be validated")
    rank, world, created, device = _distributed(device)
    try:
        transform = _eval_transform(model)
        dataset = _ImageFiles(_samples(Path(root), Path(labels_file) if labels_file else None, model), transform)
        setup = time.perf_counter()
        run = _runner(model, transform, device, engine, dtype, batch_size)
        setup = time.perf_counter() - setup
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False) if world > 1 else None
        loader = _loader(dataset, workers, run.device.type == "cuda", batch_size=batch_size, sampler=sampler)

        # per file: 1 = evaluated, top-1 hit, top-5 hit, unreadable. DistributedSampler pads the shards with repeated
        # files; a MAX reduction over these flags counts each file once however the files were spread
        flags = torch.zeros(4, len(dataset), dtype=torch.int32)
        failures: dict[str, str] = {}
        bar = _progress(len(sampler) if sampler else len(dataset), progress and rank == 0, "validate")
        k = min(5, model.num_classes)
        wait = 0.0
        start = time.perf_counter()
        ready = start
        for batch in loader:
            wait += time.perf_counter() - ready
            _report_failures(batch, dataset, strict, failures)
            for index, _ in batch["failed"]:
                flags[3, index] = 1
            if batch["pixels"] is not None:
                top = run(batch["pixels"]).topk(k, dim=-1).indices.cpu()
                hits = top == batch["targets"][:, None]
                flags[0, batch["indices"]] = 1
                flags[1, batch["indices"]] = hits[:, 0].int()
                flags[2, batch["indices"]] = hits.any(dim=1).int()
            bar.update(len(batch["indices"]) + len(batch["failed"]))
            ready = time.perf_counter()
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        timing = torch.tensor([time.perf_counter() - start, wait], dtype=torch.float64)
        bar.close()
        if world > 1:
            # NCCL reduces GPU tensors only; gloo takes these where they are
            reduce_on = run.device if dist.get_backend() == "nccl" else torch.device("cpu")
            flags, timing = flags.to(reduce_on), timing.to(reduce_on)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            dist.all_reduce(timing, op=dist.ReduceOp.MAX)
            flags, timing = flags.cpu(), timing.cpu()
            gathered: list[dict[str, str]] = [{} for _ in range(world)]
            dist.all_gather_object(gathered, failures)
            failures = {path: message for part in gathered for path, message in part.items()}
    finally:
        if created:
            dist.destroy_process_group()

    evaluated = int(flags[0].sum())
    if evaluated == 0:
        raise ValueError(f"no image in {root} could be read ({len(failures)} unreadable); nothing was evaluated.")
    seconds, data_wait = timing.tolist()
    return {
        "top1": 100.0 * int(flags[1].sum()) / evaluated,
        "top5": 100.0 * int(flags[2].sum()) / evaluated,
        "images": evaluated,
        "skipped": int(flags[3].sum()),
        "seconds": seconds,
        "images_per_s": evaluated / seconds,
        "data_wait_s": data_wait,
        "setup_s": setup,
        "processes": world,
        "device": str(run.device),
        "dtype": str(run.dtype).removeprefix("torch."),
        "engine": run.engine,
        "failures": dict(sorted(failures.items())),
    }


# ---------------------------------------------------------------------------------------------- embed


def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_output(out: Path, features: torch.Tensor, files: list[str], manifest: dict[str, Any]) -> None:
    # written under a temporary name and renamed: an interrupted write never leaves a truncated output behind
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {key: json.dumps(manifest[key]) for key in ("architecture", "weights_sha256", "normalize", "dtype")}
        metadata["files"] = json.dumps(files)
        save_file({"features": features.contiguous()}, str(tmp), metadata=metadata)
    else:
        with open(tmp, "wb") as handle:
            np.save(handle, features.numpy())
        out.with_name(out.stem + ".files.txt").write_text("".join(f"{name}\n" for name in files))
    os.replace(tmp, out)


def embed(
    model: nn.Module | str,
    images: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    normalize: bool = False,
    batch_size: int = 64,
    workers: int | None = None,
    device: torch.device | str | None = None,
    engine: str = "auto",
    dtype: torch.dtype | None = None,
    strict: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pooled pre-logits features of every image file into ``out`` (``.safetensors`` or ``.npy``), resumable.

    ``.safetensors``: a ``features`` tensor ``[N, D]`` (fp32) with the file names (JSON) in its metadata. ``.npy``:
    the array, and the file names one per line in ``OUT_STEM.files.txt`` beside it. Row i belongs to file i;
    unreadable files are left out (and listed in the returned ``failures``). ``normalize`` L2-normalizes each row.

    Each batch is written to ``OUT.partial/`` as it completes; a run that stops (Ctrl-C, a crash, a lost machine)
    keeps those batches, and the same command continues from the first missing one. The final file is written
    once, at the end, and the partial folder removed.
    """
    _single_process("embed")
    out = Path(out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out must end in .safetensors or .npy, got {out.name}.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out, or pass --overwrite to replace it.")
    model = load_model(model) if isinstance(model, str) else copy.deepcopy(model)  # its head is replaced below
    transform = _eval_transform(model)
    files = list_images(images)
    names = [str(path) for path in files]
    run_device, run_dtype, use_engine = _placement(device, engine, dtype)
    # everything the rows depend on: a resumed run must not mix features of other weights, dtypes or files
    manifest = {
        "architecture": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
        "weights_sha256": _weights_digest(model),
        "normalize": normalize,
        "dtype": str(run_dtype),
        "engine": use_engine,
        "batch_size": batch_size,
        "files": names,
    }
    partial = _partial_dir(out)
    partial.mkdir(parents=True, exist_ok=True)
    manifest_file = partial / "manifest.json"
    if manifest_file.is_file():
        if json.loads(manifest_file.read_text()) != manifest:
            raise ValueError(
                f"{partial} holds an unfinished run with other files, weights or options; finish it with the same "
                "command, or delete that folder to start over."
            )
        logger.info("resuming the embedding run in %s", partial)
    else:
        manifest_file.write_text(json.dumps(manifest))

    # one chunk file per batch of files: chunk c holds files [c * batch_size, (c + 1) * batch_size)
    chunks = [list(range(s, min(s + batch_size, len(files)))) for s in range(0, len(files), batch_size)]
    done = {int(p.stem.split("_")[1]) for p in partial.glob("chunk_*.safetensors")}
    pending = [c for c in range(len(chunks)) if c not in done]
    model.reset_classifier(0)  # the forward returns pooled, normalized pre-logits features
    dataset = _ImageFiles([(path, -1) for path in files], transform)
    run = _runner(model, transform, run_device, engine, run_dtype, batch_size)
    loader = _loader(dataset, workers, run.device.type == "cuda", batch_sampler=[chunks[c] for c in pending])
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    failures: dict[str, str] = {}
    bar = _progress(sum(len(chunks[c]) for c in pending), progress, "embed")
    for chunk, batch in zip(pending, loader, strict=True):
        _report_failures(batch, dataset, strict, failures)
        if batch["pixels"] is not None:
            features = run(batch["pixels"]).cpu()
            if normalize:
                features = torch.nn.functional.normalize(features, dim=-1)
        else:
            features = torch.zeros(0, model.num_features)
        target = partial / f"chunk_{chunk:06d}.safetensors"
        tmp = target.with_suffix(".tmp")
        failed = {str(index): message for index, message in batch["failed"]}
        save_file(
            {"features": features.contiguous(), "indices": batch["indices"]},
            str(tmp),
            metadata={"failed": json.dumps(failed)},
        )
        os.replace(tmp, target)
        bar.update(len(chunks[chunk]))
    bar.close()

    parts, kept, failures = [], [], {}
    for chunk in range(len(chunks)):
        path = partial / f"chunk_{chunk:06d}.safetensors"
        with safe_open(str(path), "pt") as handle:
            failures.update({names[int(i)]: m for i, m in json.loads(handle.metadata()["failed"]).items()})
        tensors = load_file(str(path))
        parts.append(tensors["features"])
        kept += tensors["indices"].tolist()
    features = torch.cat(parts)
    if not kept:
        raise ValueError(f"none of the {len(files)} files could be read; nothing to write ({partial} is kept).")
    _write_output(out, features, [names[i] for i in kept], manifest)
    shutil.rmtree(partial)
    return {"out": str(out), "images": len(kept), "dim": features.shape[1], "failures": failures}
