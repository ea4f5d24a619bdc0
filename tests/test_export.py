"""Export to ONNX (checked with onnxruntime on the CPU) and torch.export for every family, against eager."""

from __future__ import annotations

import pytest
import torch

import vitfast
from tests.helpers import randomize_
from vitfast.cli import main
from vitfast.export import export_model, verify_export

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# one model per family and layout (EVA-02 Ti: packed SwiGLU + fused qkv; EVA-02 B: split q/k/v, sub-LN SwiGLU)
FAMILIES = [
    "vit_small_patch16_224",
    "vit_base_patch16_clip_quickgelu_224",
    "mae_vit_base_patch16",
    "mocov3_vit_small",
    "beitv2_base_patch16_224",
    "cae_base_patch16_224",
    "eva_giant_patch14_224",
    "eva02_tiny_patch14_224",
    "eva02_base_patch14_224",
]
TOL = 1e-5  # fp32: the export runs the same math, up to reordered reductions


def _tiny(name: str) -> torch.nn.Module:
    patch = vitfast.create_model(name, depth=0).config.patch_size
    model = vitfast.create_model(name, depth=1, embed_dim=64, num_heads=2, img_size=(3 * patch, 4 * patch))
    return randomize_(model).eval()


@pytest.mark.slow  # ~4 s each: the ONNX exporter's own passes
@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_export_with_a_dynamic_batch_matches_eager(name: str, tmp_path) -> None:
    model = _tiny(name)
    path = export_model(model, tmp_path / "model.onnx", format="onnx", batch="dynamic")
    for batch_size in (1, 3):  # traced with 2: other batch sizes run too
        check = verify_export(model, path, format="onnx", batch_size=batch_size)
        assert check["scaled_error"] <= TOL, check
        assert check["shape"][0] == batch_size


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_export_matches_eager(name: str, tmp_path) -> None:
    model = _tiny(name)
    path = export_model(model, tmp_path / "model.pt2", format="torch-export", batch_size=2)
    assert verify_export(model, path, format="torch-export", batch_size=2)["scaled_error"] <= TOL


def test_export_traces_the_reference_path_under_a_kernel_backend(tmp_path) -> None:
    model = _tiny("beitv2_base_patch16_224")
    with vitfast.use_backend("triton"):
        path = export_model(model, tmp_path / "model.pt2", format="torch-export", batch_size=2)
    program = torch.export.load(path)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "vitfast" in t], targets
    assert verify_export(model, path, format="torch-export")["scaled_error"] <= TOL


def test_export_rejects_bad_arguments(tmp_path) -> None:
    model = _tiny("vit_small_patch16_224")
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(model, tmp_path / "m.tflite", format="tflite")
    with pytest.raises(ValueError, match="batch must be"):
        export_model(model, tmp_path / "m.onnx", batch="ragged")


@pytest.mark.slow
def test_export_command(tmp_path, capsys) -> None:
    out = tmp_path / "vit.pt2"
    assert main(["export", "vit_small_patch16_224", str(out), "--format", "torch-export", "--img-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and "checked against the eager model" in printed
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["export", "vit_small_patch16_224", str(out), "--format", "keras"])
