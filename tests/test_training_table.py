"""benchmarks/training_table.py: cells only where a GPU run measured the kernels faster at forward + backward."""

from __future__ import annotations

import json

import torch

from benchmarks import training_table
from vitfast import backend


def _bench(op: str, shape: tuple, provider: str, passes: str, median_s: float) -> dict:
    return {
        "name": f"test_gpu_op[{op}-{shape}-{provider}-{passes}]",
        "group": f"{op} {shape} bfloat16 {passes}",
        "stats": {"median": median_s},
    }


def _report() -> dict:
    rows = [
        # LayerNorm 1024: a clear win at forward + backward (a forward-only loss must not matter)
        ("layer_norm", (8200, 1024), "vitfast", "fwd+bwd", 0.80e-4),
        ("layer_norm", (8200, 1024), "torch", "fwd+bwd", 1.00e-4),
        ("layer_norm", (8200, 1024), "vitfast", "fwd", 9.00e-4),
        ("layer_norm", (8200, 1024), "torch", "fwd", 1.00e-4),
        # 768: one shape wins, the other is within the margin: no cell for the width
        ("layer_norm", (12608, 768), "vitfast", "fwd+bwd", 0.90e-4),
        ("layer_norm", (12608, 768), "torch", "fwd+bwd", 1.00e-4),
        ("layer_norm", (1576, 768), "vitfast", "fwd+bwd", 0.98e-4),
        ("layer_norm", (1576, 768), "torch", "fwd+bwd", 1.00e-4),
        # attention's width is the head dim; torch-compile is not the eager peer
        ("attention", (8, 16, 1025, 64, "rope"), "vitfast", "fwd+bwd", 2.0e-3),
        ("attention", (8, 16, 1025, 64, "rope"), "torch", "fwd+bwd", 1.0e-3),
        ("attention", (8, 16, 1025, 64, "rope"), "torch-compile", "fwd+bwd", 5.0e-3),
        # an op without a width at dispatch is never a cell
        ("patch_embed", (8, 448, 14, 1024), "vitfast", "fwd+bwd", 1.0e-4),
        ("patch_embed", (8, 448, 14, 1024), "torch", "fwd+bwd", 9.0e-4),
    ]
    return {
        "machine_info": {"cuda_device": "NVIDIA H200"},
        "datetime": "2026-12-02T10:00:00",
        "benchmarks": [_bench(*row) for row in rows],
    }


def test_cells_only_for_widths_won_at_every_shape() -> None:
    rows = training_table.rows_from(_report())
    assert {(row.op, row.width) for row in rows} == {("layer_norm", 1024), ("layer_norm", 768), ("attention", 64)}
    attention = next(row for row in rows if row.op == "attention")
    assert attention.torch_ms == 1.0 and attention.ratio == 2.0  # the eager peer, not torch-compile
    found = training_table.cells(rows, "NVIDIA H200", "2026-12-02", "benchmarks/results/x.md", 0.05)
    assert len(found) == 1
    cell = eval(found[0].rstrip(","), {"TrainingCell": backend.TrainingCell})
    assert cell == backend.TrainingCell(
        "layer_norm", "triton", 1024, 1024, "NVIDIA H200", "2026-12-02", "benchmarks/results/x.md"
    )


def test_command_writes_the_results_file(tmp_path, capsys) -> None:
    report = tmp_path / "ops.json"
    report.write_text(json.dumps(_report()))
    results = tmp_path / "table.md"
    assert training_table.main([str(report), "--results", str(results)]) == 0
    text = results.read_text()
    assert (
        "NVIDIA H200" in text
        and "| layer_norm | (8200, 1024) | bfloat16 | 1024 | 0.080 | 0.100 | 0.80x | yes |" in text
    )
    assert "TrainingCell('layer_norm', 'triton', 1024, 1024, 'NVIDIA H200', '2026-12-02'" in capsys.readouterr().out


def test_cells_do_not_apply_under_torch_compile(monkeypatch) -> None:
    """A cell measured eager against eager PyTorch; under torch.compile the reference (which inductor fuses) runs."""
    triton_impl = object()
    monkeypatch.setitem(backend._impls["layer_norm"], "triton", triton_impl)
    monkeypatch.setattr(backend, "_device_name", lambda index: "NVIDIA H200")
    cell = backend.TrainingCell("layer_norm", "triton", 1024, 1024, "NVIDIA H200", "2026-12-02", "x")
    monkeypatch.setattr(backend, "TRAINING_TABLE", (cell,))
    gpu = torch.device("cuda", 0)
    with backend.use_backend("auto"):
        assert backend.dispatch("layer_norm", gpu, 1024) is triton_impl
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert backend.dispatch("layer_norm", gpu, 1024) is backend.implementations("layer_norm")["reference"]


def test_ops_pass_the_width_the_table_is_keyed_by(monkeypatch) -> None:
    """training_table.WIDTH_OF must name the width each op hands to dispatch, or a cell would never apply."""
    import importlib

    from vitfast import ops

    seen = []

    def spy(op, device, width=None):
        seen.append((op, width))
        return backend.implementations(op)["reference"]

    for name in ("rope", "swiglu", "layer_norm", "attention"):
        monkeypatch.setattr(importlib.import_module(f"vitfast.ops.{name}"), "dispatch", spy)
    q = torch.randn(1, 2, 5, 8)
    cos, sin = ops.rope_2d_table((2, 2), 8)
    ops.rope_2d_qk(q, q, cos, sin, 1)
    gate = torch.randn(3, 12)
    ops.swiglu(gate, gate)
    ops.swiglu_packed(torch.randn(3, 24))
    ops.swiglu_layer_norm(gate, gate, torch.ones(10), torch.zeros(10), 1e-6, width=10)
    ops.layer_norm(gate, torch.ones(12), torch.zeros(12), 1e-6)
    ops.attention(q, q, q)
    assert seen == [
        ("rope_2d_qk", 8),
        ("swiglu", 12),
        ("swiglu_packed", 12),
        ("swiglu_layer_norm", 10),
        ("layer_norm", 12),
        ("attention", 8),
    ]
    assert training_table.WIDTH_OF["rope_2d_qk"]((8, 16, 1025, 64)) == 64
