"""The benchmark runner: table formatting, JSON rows, the agreement check, and small real runs on the CPU."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from vitfast import bench, ops
from vitfast.bench import PROVIDERS, BenchConfig, Measurement, check_agreement, format_tables
from vitfast.cli import main

TINY = {"depth": 1, "img_size": 64}


def _row(provider: str, batch_size: int, median: float | None, agrees: bool | None = True, **kw) -> Measurement:
    kw = {"p25_ms": median, "p75_ms": median, **kw}
    return Measurement(
        "vit_base_patch16_224",
        provider,
        batch_size,
        "bf16",
        "infer",
        [224, 224],
        median_ms=median,
        agrees=agrees,
        max_error=0.0 if agrees else 0.5,
        img_per_s=batch_size / median * 1e3 if median else None,
        tflops=1.0,
        **kw,
    )


def test_table_has_the_seed_shape_and_speedups_against_the_best_agreeing_peer() -> None:
    results = [
        _row("timm-eager", 1, 5.0),
        _row("timm-eager", 8, 6.0),
        _row("timm-graphs", 1, 1.0),
        _row("timm-graphs", 8, 2.0),
        _row("timm-compile", 1, 0.5, agrees=False),
        _row("timm-compile", 8, 0.5, agrees=False),  # fast and wrong
        _row("vitfast", 1, 0.5),
        _row("vitfast", 8, 4.0),
        Measurement("vit_base_patch16_224", "liger", 1, "bf16", "infer", [224, 224], skipped="liger_kernel missing"),
    ]
    table = format_tables(results, {"device_name": "GPU", "torch": "2.x", "git_commit": "abc"})
    lines = table.splitlines()
    assert lines[0].startswith("Device: GPU | torch 2.x")
    header = lines[2]
    assert (
        header
        == "| model | size | dtype | provider | bs=1 (ms) | bs=8 (ms) | speed-up vs best peer | img/s @8 | TF/s @8 |"
    )
    vitfast_row = next(line for line in lines if "| vitfast |" in line and "224x224" in line)
    assert "| 0.50 | 4.00 | 2.00x / 0.50x |" in vitfast_row  # vs timm-graphs (1.0, 2.0); the wrong 0.5 is ignored
    compile_row = next(line for line in lines if "| timm-compile |" in line and "224x224" in line)
    assert "0.50 (wrong)" in compile_row
    assert "| liger | n/a | n/a | - |" in next(line for line in lines if "| liger |" in line and "224x224" in line)
    assert any("| NO |" in line for line in lines) and any("liger_kernel missing" in line for line in lines)


def test_agreement_check_flags_wrong_nonfinite_and_misshaped_outputs() -> None:
    reference = torch.randn(4, 10)
    outputs = {
        "timm-eager": reference,
        "close": reference + 1e-3 * reference.abs().max(),
        "wrong": reference + 0.2 * reference.abs().max(),
        "nan": torch.full_like(reference, float("nan")),
        "shape": reference[:2],
    }
    result = check_agreement(outputs, "timm-eager", tolerance=1e-2)
    assert result["timm-eager"] == (0.0, True)
    assert result["close"][1] and result["close"][0] == pytest.approx(1e-3, rel=1e-3)
    assert not result["wrong"][1] and not result["nan"][1] and not result["shape"][1]


def test_run_on_cpu_appends_json_rows(tmp_path) -> None:
    config = BenchConfig(models=["vit_small_patch16_224"], batch_sizes=[1, 2], reps=2, warmup=0, overrides=TINY)
    env = bench.environment()
    path = tmp_path / "rows.jsonl"
    results = bench.run(config, on_result=lambda row: bench.append_json(path, row, env))
    assert [(r.provider, r.batch_size) for r in results] == [
        ("timm-eager", 1),
        ("vitfast-reference", 1),
        ("timm-eager", 2),
        ("vitfast-reference", 2),
    ]
    assert all(r.agrees and r.max_error == 0.0 and r.median_ms > 0 and r.reps == 2 for r in results)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 4
    for key in (
        "device_name",
        "torch",
        "timm",
        "triton",
        "date",
        "git_commit",
        "median_ms",
        "p25_ms",
        "p75_ms",
        "first_call_s",
        "img_per_s",
        "tflops",
        "max_error",
        "agrees",
        "batch_size",
        "provider",
        "dtype",
    ):
        assert key in rows[0], key
    assert rows[0]["dtype"] == "fp32" and rows[0]["img_size"] == [64, 64]


def test_defaults_and_validation_on_cpu() -> None:
    config = BenchConfig().resolved()
    if not torch.cuda.is_available():
        assert config.device == "cpu" and config.dtype == "fp32"
        assert config.providers == ["timm-eager", "vitfast-reference"]
    assert config.models == ["vit_base_patch16_224"] and config.batch_sizes == [1, 4, 8]
    with pytest.raises(ValueError, match="unknown provider"):
        BenchConfig(providers=["tensorrt"]).resolved()
    with pytest.raises(ValueError, match="unknown dtype"):
        BenchConfig(dtype="int8").resolved()


def test_providers_that_cannot_run_are_reported_not_dropped() -> None:
    config = BenchConfig(
        models=["mocov3_vit_small"],
        batch_sizes=[1],
        reps=1,
        warmup=0,
        device="cpu",
        providers=["timm-eager", "timm-graphs", "vitfast"],
        overrides=TINY,
    )
    results = {r.provider: r for r in bench.run(config)}
    assert results["timm-eager"].skipped == "no timm counterpart"
    assert results["timm-graphs"].skipped == "needs a CUDA GPU"
    assert results["vitfast"].median_ms > 0 and results["vitfast"].agrees


def test_train_mode_times_an_optimizer_step() -> None:
    config = BenchConfig(
        models=["eva02_tiny_patch14_224"],
        batch_sizes=[2],
        reps=1,
        warmup=0,
        train=True,
        overrides={"depth": 1, "img_size": 56, "num_classes": 10},
    )
    results = bench.run(config)
    assert {r.mode for r in results} == {"train"}
    assert all(r.agrees for r in results), "the first step's loss must agree across providers"


def test_patched_timm_providers_train_and_infer_on_a_copy() -> None:
    """``timm-patched``: the user's timm model with vitfast.patch(), same first loss / output as timm; patched on a
    copy (patch works in place), so that the timm providers keep running timm's own layers."""
    overrides = {"depth": 1, "img_size": 56, "num_classes": 10}
    for train in (True, False):
        config = BenchConfig(
            models=["eva02_tiny_patch14_224"],
            batch_sizes=[2],
            reps=1,
            warmup=0,
            train=train,
            providers=["timm-patched", "timm-eager"],
            overrides=overrides,
        )
        results = bench.run(config)
        assert sorted(r.provider for r in results) == ["timm-eager", "timm-patched"]
        assert all(r.agrees and r.median_ms for r in results), [(r.provider, r.agrees, r.error) for r in results]
    _, reference = bench.build_models("eva02_tiny_patch14_224", "cpu", **overrides)
    patched = bench.prepare(PROVIDERS["timm-patched"], None, reference, torch.float32, train=False)
    assert patched is not reference and hasattr(patched, "vitfast_patch_summary")
    assert not hasattr(reference, "vitfast_patch_summary")


def test_peer_providers_route_ops_to_the_peer_library(monkeypatch) -> None:
    """Liger's functions stand in as fakes here (it needs a GPU); the check is that vitfast's ops reach them."""
    called = []

    class FakeLayerNorm:
        @staticmethod
        def apply(x, weight, bias, eps):
            called.append("layer_norm")
            return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    class FakeSiLUMul:
        @staticmethod
        def apply(gate, up):
            called.append("swiglu")
            return F.silu(gate) * up

    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", types.ModuleType("liger_kernel.ops"))
    monkeypatch.setitem(
        sys.modules, "liger_kernel.ops.layer_norm", types.SimpleNamespace(LigerLayerNormFunction=FakeLayerNorm)
    )
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.swiglu", types.SimpleNamespace(LigerSiLUMulFunction=FakeSiLUMul))
    x = torch.randn(3, 8)
    with bench.provider_context(PROVIDERS["liger"]):
        torch.testing.assert_close(
            ops.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-6), F.layer_norm(x, (8,), eps=1e-6)
        )
        torch.testing.assert_close(ops.swiglu_packed(x), F.silu(x[:, :4]) * x[:, 4:])
        normed, residual = ops.layer_norm_residual(x, x, None, None, None, 1e-6)
        torch.testing.assert_close(residual, 2 * x)
        torch.testing.assert_close(normed, F.layer_norm(2 * x, (8,), eps=1e-6))
        ops.swiglu_layer_norm(x, x, torch.ones(8), torch.zeros(8), 1e-6)
    expected = ["layer_norm", "swiglu", "layer_norm", "swiglu", "layer_norm"]
    assert called == expected
    ops.layer_norm(x, None, None)
    assert called == expected, "the override ends with the block"


def test_cli_bench(capsys, tmp_path) -> None:
    assert (
        main(
            [
                "bench",
                "vit_small_patch16_224",
                "--batch-sizes",
                "1",
                "--reps",
                "1",
                "--img-size",
                "64",
                "--json",
                str(tmp_path / "rows.jsonl"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| vit_small_patch16_224 | 64x64 | fp32 | vitfast-reference |" in out
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2
    assert main(["bench", "--providers", "tensorrt"]) == 2
    assert "unknown provider" in capsys.readouterr().err


def test_plot(tmp_path, monkeypatch) -> None:
    results = [_row("timm-eager", 1, 5.0), _row("timm-eager", 8, 6.0), _row("vitfast", 1, 4.0), _row("vitfast", 8, 5.0)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs matplotlib"):
            bench.plot(results, tmp_path / "latency.png")
        return
    bench.plot(results, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_tables_from_saved_json_rows(capsys, tmp_path) -> None:
    env = {"device_name": "NVIDIA H100", "torch": "2.11", "git_commit": "abc", "date": "2026-11-22"}
    for row in (_row("timm-eager", 1, 5.0), _row("vitfast", 1, 4.0)):
        bench.append_json(tmp_path / "rows.jsonl", row, env)
    results, read_env = bench.read_json(tmp_path / "rows.jsonl")
    assert [r.provider for r in results] == ["timm-eager", "vitfast"] and read_env["device_name"] == "NVIDIA H100"
    assert main(["bench", "--from-json", str(tmp_path / "rows.jsonl")]) == 0
    assert "| vit_base_patch16_224 | 224x224 | bf16 | vitfast | 4.00 | 1.25x |" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_suite_runs_its_cpu_cases() -> None:
    """`pytest benchmarks/` must keep working: run its CPU cases once each (timing disabled)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "-q",
            "-k",
            "cpu",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "16 passed" in result.stdout


def test_rows_reach_the_callback_as_each_provider_finishes() -> None:
    """A run cut short (e.g. by a time limit) keeps every row measured so far; the reference is measured first."""
    seen = []

    def on_result(row):
        seen.append(row.provider)
        if row.provider == "vitfast":
            raise KeyboardInterrupt

    config = BenchConfig(
        models=["vit_small_patch16_224"],
        batch_sizes=[1],
        reps=1,
        warmup=0,
        overrides=TINY,
        providers=["vitfast", "vitfast-reference", "timm-eager"],
    )
    with pytest.raises(KeyboardInterrupt):
        bench.run(config, on_result=on_result)
    assert seen == ["timm-eager", "vitfast"]


def test_a_speedup_within_the_noise_is_marked() -> None:
    """On the CPU timm eager and the vitfast reference run the same math: overlapping spreads must not read as a win."""
    close = [
        _row("timm-eager", 1, 5.0, p25_ms=4.6, p75_ms=5.4),
        _row("vitfast", 1, 4.9, p25_ms=4.5, p75_ms=5.3),
    ]
    table = format_tables(close)
    assert "| ~1.02x |" in next(line for line in table.splitlines() if "| vitfast |" in line)
    assert "~: within the noise" in table
    apart = [_row("timm-eager", 1, 5.0, p25_ms=4.9, p75_ms=5.1), _row("vitfast", 1, 2.5, p25_ms=2.4, p75_ms=2.6)]
    table = format_tables(apart)
    assert "| 2.00x |" in table and "~" not in table


def test_engine_rows_record_the_choice_and_throughput(monkeypatch) -> None:
    """The engine provider (made runnable on the CPU here, where the engine runs without graphs) keeps one engine per
    model across the batch sizes, and each row says what the engine captured, with img/s and TF/s from the FLOPs."""
    import dataclasses

    import vitfast

    monkeypatch.setitem(PROVIDERS, "vitfast-graphs", dataclasses.replace(PROVIDERS["vitfast-graphs"], cuda_only=False))
    made = []
    original = vitfast.optimize

    def counting_optimize(*args, **kwargs):
        made.append(kwargs.get("batch_sizes"))
        return original(*args, **kwargs)

    monkeypatch.setattr(vitfast, "optimize", counting_optimize)
    config = BenchConfig(
        models=["vit_small_patch16_224"],
        batch_sizes=[1, 3],
        providers=["vitfast-reference", "vitfast-graphs"],
        reps=2,
        warmup=0,
        overrides=TINY,
    )
    results = bench.run(config)
    engine_rows = [r for r in results if r.provider == "vitfast-graphs"]
    assert made == [[1, 3]] and [r.engine_choice for r in engine_rows] == ["current", "current"]
    flops = bench.forward_flops("vit_small_patch16_224", tuple(sorted(TINY.items())))
    assert flops == bench.model_info("vit_small_patch16_224", flops=True, **TINY).gflops * 1e9
    for row in results:
        assert row.agrees and row.img_per_s == pytest.approx(row.batch_size / row.median_ms * 1e3)
        assert row.tflops == pytest.approx(flops * row.img_per_s / 1e12)
    details = format_tables(results).splitlines()
    header = next(line for line in details if line.startswith("| model | bs |"))
    assert "| median ms | p25-p75 ms | img/s | TF/s |" in header
    assert sum("engine: current" in line for line in details) == 2
