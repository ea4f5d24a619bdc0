"""Export a vitfast model to ONNX or a ``torch.export`` program, checked against the eager model.

Export always traces the plain-PyTorch reference path (:func:`vitfast.use_backend` ``"reference"``), whatever backend
the model runs on: a model on the Triton or CUDA backend exports as its reference, which gives the same outputs.
ONNX goes through ``torch.onnx.export(..., dynamo=True)`` (the ``onnx`` and ``onnxscript`` packages); the check runs
the exported file with ``onnxruntime`` on the CPU when it is installed.

    >>> model = vitfast.create_model("eva02_base_patch14_224").eval()
    >>> export_model(model, "eva02_base.onnx", format="onnx", batch="dynamic")
    >>> verify_export(model, "eva02_base.onnx", format="onnx")  # max |export - eager| / max |eager|
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitfast.backend import use_backend

__all__ = ["DTYPES", "FORMATS", "export_model", "verify_export"]

FORMATS = ("onnx", "torch-export")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _example_input(model: nn.Module, batch_size: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, config.in_chans, *config.img_size, generator=generator)
    return image.to(device=next(model.parameters()).device, dtype=dtype)


def _check_format(format: str, batch: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    if batch not in ("static", "dynamic"):
        raise ValueError(f"batch must be 'static' or 'dynamic', got {batch!r}.")


def export_model(
    model: nn.Module,
    path: str | Path,
    format: str = "onnx",
    batch: str = "static",
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    opset_version: int | None = None,
) -> Path:
    """Export ``model`` (eval mode, at its ``config.img_size``) to ``path``; returns the path.

    Args:
        model: a vitfast :class:`~vitfast.VisionTransformer`.
        path: output file (``.onnx``; ``.pt2`` for ``torch-export``, loaded back with ``torch.export.load``).
        format: ``"onnx"`` or ``"torch-export"``.
        batch: ``"static"`` (the traced ``batch_size`` only) or ``"dynamic"`` (any batch size).
        batch_size: batch of the example input; a dynamic batch traces with at least 2 (a batch of 1 would be
            specialized by ``torch.export``).
        dtype: parameter and input dtype of the exported graph.
        opset_version: ONNX opset (default: the exporter's).

    The input is named ``image`` (``[B, C, H, W]``, float, normalized as in ``model.pretrained_cfg``); the output
    ``output`` is what ``model(image)`` returns (logits, or pooled features for a headless model).
    """
    _check_format(format, batch)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if batch == "dynamic":
        batch_size = max(batch_size, 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().to(dtype)
    image = _example_input(model, batch_size, dtype)
    dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1)}} if batch == "dynamic" else None
    with use_backend("reference"), torch.no_grad():
        if format == "torch-export":
            program = torch.export.export(model, (image,), dynamic_shapes=dynamic_shapes)
            torch.export.save(program, path)
        else:
            torch.onnx.export(
                model,
                (image,),
                path,
                dynamo=True,
                input_names=["image"],
                output_names=["output"],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset_version,
            )
    return path


def _run_export(path: Path, format: str, image: torch.Tensor) -> torch.Tensor:
    if format == "torch-export":
        return torch.export.load(path).module()(image)
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError("checking an ONNX export needs onnxruntime: pip install onnxruntime") from exc
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: image.cpu().numpy()})
    return torch.from_numpy(output)


def verify_export(
    model: nn.Module, path: str | Path, format: str = "onnx", batch_size: int = 2, seed: int = 1
) -> dict[str, Any]:
    """Run the exported file and the eager model on one random batch; returns the comparison.

    ``{"max_abs_error", "scaled_error" (max |export - eager| / max |eager|), "shape"}``. ONNX files run with
    onnxruntime on the CPU; ``torch-export`` programs on the model's device.
    """
    _check_format(format, "static")
    from vitfast.bench import scaled_error

    model = model.eval()
    dtype = next(model.parameters()).dtype
    image = _example_input(model, batch_size, dtype, seed=seed)
    with torch.no_grad():
        expected = model(image).float().cpu()
        actual = _run_export(Path(path), format, image).float().cpu()
    if actual.shape != expected.shape:
        raise RuntimeError(f"the export returned shape {tuple(actual.shape)}, the model {tuple(expected.shape)}.")
    return {
        "max_abs_error": (actual - expected).abs().max().item(),
        "scaled_error": scaled_error(actual, expected),
        "shape": tuple(expected.shape),
    }
