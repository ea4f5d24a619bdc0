"""``"auto"`` in training: the measured table picks an implementation per op, width and device; else PyTorch."""

from __future__ import annotations

import torch

from vitfast import backend

GPU = torch.device("cuda", 0)  # never touched: the device name is looked up through backend._device_name


def _impls(op: str) -> dict:
    return backend.implementations(op)


def _cell(**changes) -> backend.TrainingCell:
    fields = dict(
        op="layer_norm",
        backend="triton",
        min_width=512,
        max_width=1024,
        device="Stand-in GPU",
        measured="2026-12-01",
        source="benchmarks/results/stand-in.md",
    )
    return backend.TrainingCell(**{**fields, **changes})


def _dispatch(width: int | None, device: torch.device = GPU):
    with backend.use_backend("auto"):
        return backend.dispatch("layer_norm", device, width)


def test_shipped_table_keeps_pytorch_in_training() -> None:
    """No GPU has measured a cell of the current kernels: training runs the reference everywhere."""
    assert backend.TRAINING_TABLE == ()
    reference = _impls("layer_norm")["reference"]
    assert _dispatch(768) is reference
    assert _dispatch(None) is reference


def test_a_measured_cell_applies_to_its_op_width_and_device_only(monkeypatch) -> None:
    triton_impl = object()
    monkeypatch.setitem(backend._impls["layer_norm"], "triton", triton_impl)
    monkeypatch.setattr(backend, "_device_name", lambda index: "Stand-in GPU")
    monkeypatch.setattr(backend, "TRAINING_TABLE", (_cell(), _cell(op="layer_norm_residual", backend="cuda")))
    reference = _impls("layer_norm")["reference"]
    assert _dispatch(768) is triton_impl
    assert _dispatch(512) is triton_impl and _dispatch(1024) is triton_impl
    assert _dispatch(1280) is reference  # outside the measured range
    assert _dispatch(None) is reference  # op called without its width
    assert _dispatch(768, torch.device("cpu")) is reference
    monkeypatch.setattr(backend, "_device_name", lambda index: "Another GPU")
    assert _dispatch(768) is reference  # measured on another device


def test_inference_keeps_its_own_choice(monkeypatch) -> None:
    """Outside grad mode the table is not read: ``"auto"`` picks the compiled extension on CUDA where present."""
    cuda_impl = object()
    monkeypatch.setitem(backend._impls["layer_norm"], "cuda", cuda_impl)
    with torch.no_grad():
        assert _dispatch(768) is cuda_impl
    assert _dispatch(768) is _impls("layer_norm")["reference"]
