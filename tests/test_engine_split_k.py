"""The engine's "kernels-splitk" candidate: proj and fc2 as split-K GEMMs reduced inside the next residual LayerNorm.

On the CPU the candidate runs its kernels through Triton's interpreter (tiny models); the split counts are the ones
an H100's 132 SMs give (``split_k_splits`` off a GPU), so batch 1 of these models splits.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import vitfast
from tests.helpers import assert_kernel_close, randomize_
from vitfast.engine import SPLIT_K_CANDIDATE, TUNING_CANDIDATES
from vitfast.ops import _triton

pytest.importorskip("triton")
linear_module = importlib.import_module("vitfast.ops.linear")
engine_module = importlib.import_module("vitfast.engine")
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or linear_module.INTERPRETER), reason="needs Triton on a GPU or the interpreter"
)

MODELS = {
    # proj and fc2 K 512 (2 slices each); final norm, no layer scale
    "vit": ("vit_small_patch16_224", {"embed_dim": 512, "num_heads": 8, "mlp_ratio": 1.0, "img_size": 64, "depth": 2}),
    # layer scale on both branches; avg pool + fc_norm: no final norm, the last fc2's partials are added up alone
    "vit-layer-scale": (
        "vit_small_patch16_224",
        {
            "embed_dim": 512,
            "num_heads": 8,
            "mlp_ratio": 1.0,
            "img_size": 64,
            "depth": 1,
            "layer_scale_init": 0.1,
            "global_pool": "avg",
        },
    ),
    # EVA-02-B: SwiGLU with sub-LN (hidden 2048), RoPE, split q/k/v, layer scale off, avg pool (no final norm)
    "eva02": ("eva02_base_patch14_224", {"img_size": 56, "depth": 1}),
}


def _model(key: str) -> torch.nn.Module:
    name, overrides = MODELS[key]
    return randomize_(vitfast.create_model(name, num_classes=7, **overrides)).eval()


def _counting(monkeypatch) -> dict[str, int]:
    """Count the split-K GEMMs and the reductions the engine runs (the ops it calls through ``vitfast.ops``)."""
    calls = {"linear_split_k": 0, "layer_norm_residual_partials": 0}
    for name in calls:
        original = getattr(vitfast.ops, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(vitfast.ops, name, spy)
    return calls


# over ~5 s each on two shared cores (the interpreter runs every kernel of the forward); the layer-scale one is not
@pytest.mark.parametrize(
    "key",
    [pytest.param("vit", marks=pytest.mark.slow), "vit-layer-scale", pytest.param("eva02", marks=pytest.mark.slow)],
)
def test_split_k_candidate_matches_the_plain_forward(key, monkeypatch) -> None:
    model = _model(key)
    size = model.config.img_size
    image = torch.randn(1, 3, *size)
    plain = vitfast.optimize(model, batch_sizes=(1,), dtype=torch.float32, device="cpu", backend="reference")
    split = vitfast.optimize(model, batch_sizes=(1,), dtype=torch.float32, device="cpu", backend=SPLIT_K_CANDIDATE)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(image.double())
        expected = plain(image)
        calls = _counting(monkeypatch)
        # one forward as the capture runs it (the first engine call would run it twice: validation, then the copy)
        got = split._call("forward", image, SPLIT_K_CANDIDATE)
    blocks = len(split.fused.blocks)
    final_norm = split.fused.final_norm is not None
    # every proj and fc2 split (batch 1 leaves an H100's SMs idle at these widths), each reduced by the next residual
    # LayerNorm: norm2 after proj, the next norm1 or the final norm after fc2 (none after the last without one)
    assert calls["linear_split_k"] == 2 * blocks
    assert calls["layer_norm_residual_partials"] == 2 * blocks - (0 if final_norm else 1)
    assert final_norm == (key == "vit")
    assert_kernel_close(got, exact, expected, what=f"{key} logits on {SPLIT_K_CANDIDATE}")


def test_projection_splits_only_where_the_tiles_leave_sms_idle(monkeypatch) -> None:
    """``_project`` with split-K on: partial sums at 17 rows x 512 on 132 SMs; on a GPU of 8 SMs the 8 tiles fill
    it, and the projection is the plain ``ops.linear`` (cuBLAS in the candidate), its output as without split-K."""
    h, weight, bias = torch.randn(1, 17, 512), torch.randn(512, 512) / 512**0.5, torch.randn(512)
    with torch.no_grad():
        partials = engine_module._project(h, weight, bias, split_k=True)
        assert isinstance(partials, engine_module._Partials) and partials.sums.shape == (2, 17, 512)
        torch.testing.assert_close(
            partials.total(h.dtype), torch.nn.functional.linear(h, weight, bias), rtol=1e-5, atol=1e-5
        )
        monkeypatch.setattr(_triton, "NOMINAL_SMS", 8)
        plain = engine_module._project(h, weight, bias, split_k=True)
        assert torch.equal(plain, vitfast.ops.linear(h, weight, bias))


def test_candidate_is_offered_for_fused_models_on_a_gpu_only() -> None:
    fused = vitfast.optimize(_model("vit"), batch_sizes=(1,), device="cpu", compile=False)
    fused.use_graphs = True  # the candidate list of a graphed engine, without capturing
    assert fused._candidates() == list(TUNING_CANDIDATES)  # on the CPU there are no SMs to fill
    fused.device = torch.device("cuda")  # read by the list only: nothing runs
    assert fused._candidates() == [*TUNING_CANDIDATES, SPLIT_K_CANDIDATE]
    unfused = vitfast.optimize(_model("vit"), batch_sizes=(1,), device="cpu", compile=False, fuse=False)
    unfused.use_graphs, unfused.device = True, torch.device("cuda")
    assert SPLIT_K_CANDIDATE not in unfused._candidates()
    # the flag is set only inside the candidate's context
    with fused._candidate(SPLIT_K_CANDIDATE):
        assert fused.fused.split_k
    assert not fused.fused.split_k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture, compiled kernels)")
@pytest.mark.parametrize("name", ["vit_base_patch16_224", "beitv2_base_patch16_224"])
def test_gpu_split_k_graph_within_rule_5(name: str) -> None:
    """Full-width models at batch 1, bf16, captured in a CUDA graph on the candidate: every proj and fc2 splits on an
    H100 / H200, and the logits stay within rule 5 of the same model in bf16 PyTorch."""
    with torch.device("cuda"):
        model = randomize_(vitfast.create_model(name, num_classes=7, depth=2)).eval()
    image = torch.randn(1, 3, *model.config.img_size, device="cuda")
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(image.double())
        baseline = copy.deepcopy(model).bfloat16()(image.bfloat16())
    engine = vitfast.optimize(model, batch_sizes=(1,), backend=SPLIT_K_CANDIDATE)
    out = engine(image)
    assert engine.stats["replays"] == 1
    assert_kernel_close(out, exact, baseline, floor=1e-3, what=f"{name} on {SPLIT_K_CANDIDATE}")


def test_split_k_left_out_where_nothing_splits() -> None:
    """The split count the capture's batch size gives decides: ViT with K = 512 splits at batch 1 (17 rows, one
    output tile), and at 256 images (4352 rows, 544 tiles on 132 SMs) nothing does, so the candidate, whose graph
    would then be kernels-sdpa's, is not captured there."""
    model = _model("vit-layer-scale")
    fused = engine_module._FusedViT(model)
    size = model.config.img_size
    assert fused.splits_k_at(torch.empty(1, 3, *size))
    assert not fused.splits_k_at(torch.empty(256, 3, *size))
