"""vitfast.optimize(): the fused inference forward, padding, size dispatch, output ownership and input errors.

On the CPU the engine runs its whole path minus the graph capture; the GPU tests at the end capture real graphs.
"""

from __future__ import annotations

import copy
import importlib
import logging
import warnings

import pytest
import torch

import vitfast
from tests.helpers import assert_close_scaled, assert_kernel_close, randomize_
from vitfast._measure import scaled_error
from vitfast.backend import get_backend, override_impl, use_backend
from vitfast.engine import (
    CANDIDATES,
    COMPILED_CANDIDATE,
    COMPILED_KERNELS_CANDIDATE,
    EPILOGUE_CANDIDATE,
    PDL_CANDIDATE,
    PRUNE_MARGIN,
    TUNING_CANDIDATES,
    InferenceEngine,
    gelu_epilogue_linear,
)

FAMILIES = [
    "vit_small_patch16_224",  # fused qkv + bias, GELU, final norm
    "vit_base_patch16_clip_quickgelu_224",  # pre-norm, QuickGELU
    "beitv2_base_patch16_224",  # q/v bias, relative position bias, layer scale, avg pool + fc_norm
    "eva02_base_patch14_448",  # split q/k/v, RoPE, SwiGLU with sub-LN (both concatenated by the engine)
    "eva02_tiny_patch14_224",  # packed SwiGLU, q/v bias, RoPE
    "eva02_large_patch14_448",  # SwiGLU hidden 2730: padded to 2736 by the engine
]


def _model(name: str, **overrides) -> torch.nn.Module:
    overrides = {"depth": 2, "num_classes": 7, **overrides}
    return randomize_(vitfast.create_model(name, **overrides)).eval()


def _small_model(**overrides) -> torch.nn.Module:
    return _model("vit_small_patch16_224", img_size=64, **overrides)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n.startswith("eva02_") and n.endswith("448") else n for n in FAMILIES],
)
def test_fused_forward_matches_model_fp32(name: str) -> None:
    model = _model(name, img_size=112 if "448" not in name else 224)
    engine = vitfast.optimize(model, batch_sizes=(2,), dtype=torch.float32, device="cpu")
    assert engine.fused is not None
    image = torch.randn(2, 3, *model.config.img_size)
    with torch.no_grad():
        assert_close_scaled(engine(image), model(image), tol=1e-5, what=f"{name} logits")
        assert_close_scaled(engine.forward_features(image), model.forward_features(image), tol=1e-5, what=name)


@pytest.mark.parametrize(
    "name", ["beitv2_base_patch16_224", pytest.param("eva02_base_patch14_448", marks=pytest.mark.slow)]
)
def test_bf16_engine_within_rule_5(name: str) -> None:
    """The fused residuals round once where the model rounds twice: the bf16 error must stay within rule 5."""
    model = _model(name, img_size=112)
    image = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(image.double())
        baseline = copy.deepcopy(model).bfloat16()(image.bfloat16())
    out = vitfast.optimize(model, batch_sizes=(2,), dtype=torch.bfloat16, device="cpu")(image)
    assert out.dtype == torch.bfloat16
    assert_kernel_close(out, exact, baseline, floor=1e-3, what=name)


def test_relative_position_bias_is_gathered_once_at_build() -> None:
    """BEiT's bias is constant in inference: the engine gathers it once into the dense, 16-byte-row layout the kernels
    stream and every call passes it (no per-call gather of the table); the logits match the model's."""
    model = _model("beitv2_base_patch16_224", img_size=64, depth=1)
    engine = vitfast.optimize(model, batch_sizes=(1,), dtype=torch.float32, device="cpu")
    block, attn = engine.fused.blocks[0], engine.model.blocks[0].attn
    tokens = attn.relative_position_index.shape[0]
    assert block.rel_pos_bias.shape == (attn.num_heads, tokens, tokens) and block.rel_pos_bias.stride(1) % 4 == 0
    expected = vitfast.ops.gather_rel_pos_bias(attn.relative_position_bias_table, attn.relative_position_index)
    assert torch.equal(block.rel_pos_bias, expected)
    calls = []
    original = vitfast.ops.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    image = torch.randn(1, 3, 64, 64)
    with pytest.MonkeyPatch.context() as patcher, torch.no_grad():
        patcher.setattr(vitfast.ops, "attention", spy)
        logits = engine(image)
    assert calls and all(call["bias"] is block.rel_pos_bias and "rel_pos_bias_table" not in call for call in calls)
    with torch.no_grad():
        assert_close_scaled(logits, model(image), tol=1e-5, what="beit logits")


def test_unaligned_swiglu_width_is_padded_with_zeros() -> None:
    """EVA-02-L's hidden width 2730 runs as 2736 (GEMM rows 16-byte aligned in bf16); the padding is zeros, so the
    logits match the model (test_fused_forward_matches_model_fp32) and the padded hidden columns stay zero."""
    model = _model("eva02_large_patch14_448", img_size=56, depth=1)
    engine = vitfast.optimize(model, batch_sizes=(1,), dtype=torch.float32, device="cpu")
    block = engine.fused.blocks[0]
    assert (block.width, block.padded_width) == (2730, 2736)
    assert block.fc1_weight.shape == (2 * 2736, 1024) and block.fc2_weight.shape == (1024, 2736)
    hidden = {}
    original = vitfast.ops.linear

    def spy(x, weight, bias=None, *args):
        if weight is block.fc2_weight:
            hidden["fc2_input"] = x
        return original(x, weight, bias, *args)

    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(vitfast.ops, "linear", spy)
        engine(torch.randn(1, 3, 56, 56))
    assert hidden["fc2_input"].shape[-1] == 2736 and not hidden["fc2_input"][..., 2730:].any()


def test_unfused_engine_runs_the_model_forward() -> None:
    model = _small_model()
    engine = vitfast.optimize(model, batch_sizes=(2,), dtype=torch.float32, device="cpu", fuse=False)
    assert engine.fused is None
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(engine(image), model(image), rtol=0, atol=0)


def test_padding_leaves_real_rows_unchanged() -> None:
    model = _small_model()
    engine = vitfast.optimize(model, batch_sizes=(1, 4), dtype=torch.float32, device="cpu")
    images = torch.randn(3, 3, 64, 64)
    out = engine(images)
    assert out.shape == (3, 7)
    assert engine.captured_sizes() == [("forward", 4)]
    for i in range(3):
        alone = engine(images[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    assert engine.captured_sizes() == [("forward", 1), ("forward", 4)]


def test_batch_above_largest_size_runs_eager_or_captures() -> None:
    model = _small_model()
    image = torch.randn(5, 3, 64, 64)
    eager = vitfast.optimize(model, batch_sizes=(1, 4), dtype=torch.float32, device="cpu")
    expected = eager(image)
    assert eager.captured_sizes() == [] and eager.stats["eager_calls"] == 1
    capturing = vitfast.optimize(model, batch_sizes=(1, 4), dtype=torch.float32, device="cpu", on_new_size="capture")
    torch.testing.assert_close(capturing(image), expected)
    assert capturing.captured_sizes() == [("forward", 5)] and capturing.batch_sizes == [1, 4, 5]


def test_forward_and_features_are_separate_entries() -> None:
    model = _small_model()
    engine = vitfast.optimize(model, batch_sizes=(2,), dtype=torch.float32, device="cpu")
    image = torch.randn(2, 3, 64, 64)
    logits, tokens = engine(image), engine.forward_features(image)
    assert logits.shape == (2, 7) and tokens.shape == (2, 17, 384)
    assert engine.captured_sizes() == [("features", 2), ("forward", 2)]


def test_outputs_are_owned_by_the_caller_by_default() -> None:
    engine = vitfast.optimize(_small_model(), batch_sizes=(2,), dtype=torch.float32, device="cpu")
    first_input, second_input = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    first = engine(first_input)
    kept = first.clone()
    second = engine(second_input)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)  # not overwritten by the second call
    assert first.data_ptr() != second.data_ptr()
    assert not torch.equal(first, second)


def test_copy_outputs_false_returns_the_static_buffer() -> None:
    engine = vitfast.optimize(_small_model(), batch_sizes=(2,), dtype=torch.float32, device="cpu", copy_outputs=False)
    first = engine(torch.randn(2, 3, 64, 64))
    second = engine(torch.randn(2, 3, 64, 64))
    assert first.data_ptr() == second.data_ptr()  # documented: the next call overwrites the view
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_input_is_not_modified_and_model_is_copied() -> None:
    model = _small_model()
    weight = model.head.weight
    image = torch.randn(3, 3, 64, 64)
    saved = image.clone()
    with pytest.warns(UserWarning, match="slower there than float32"):
        engine = vitfast.optimize(model, batch_sizes=(4,), dtype=torch.bfloat16, device="cpu")
    engine(image)
    torch.testing.assert_close(image, saved, rtol=0, atol=0)
    assert model.head.weight is weight and weight.dtype == torch.float32
    assert engine.model.head.weight.dtype == torch.bfloat16 and not engine.model.head.weight.requires_grad


def test_uint8_images_match_the_model() -> None:
    model = _small_model()
    engine = vitfast.optimize(model, batch_sizes=(2,), dtype=torch.float32, device="cpu")
    image = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(image)
    torch.testing.assert_close(engine(image), expected, rtol=1e-5, atol=1e-5)
    engine(image.float())  # a float batch of the same size is another entry, not the uint8 one
    assert len(engine._captured) == 2


def test_a_timm_model_is_graphed_without_fusion() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_small_patch16_224", img_size=64, depth=2, num_classes=5).eval()
    engine = vitfast.optimize(model, batch_sizes=(2,), dtype=torch.float32, device="cpu")
    assert engine.fused is None
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(engine(image), model(image))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_sizes": ()}, ValueError, "batch_sizes must be positive"),
        ({"batch_sizes": (0, 2)}, ValueError, "batch_sizes must be positive"),
        ({"dtype": torch.float64}, ValueError, "dtype must be"),
        ({"on_new_size": "pad"}, ValueError, "on_new_size must be one of"),
        ({"backend": "tensorrt"}, ValueError, "unknown vitfast backend"),
        ({"use_graphs": True}, ValueError, "CUDA graphs need a CUDA device"),
    ],
)
def test_bad_arguments(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        vitfast.optimize(_small_model(), **{"device": "cpu", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="device='cpu'"):
        vitfast.optimize(_small_model(), device="cuda")


def test_defaults_follow_the_model() -> None:
    """A CPU model gets a CPU engine in float32 (bf16 matmuls are several times slower on the CPU), with no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = vitfast.optimize(_small_model(), batch_sizes=(1,))
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32 and not engine.use_graphs


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (torch.randn(3, 64, 64), ValueError, r"\[B, C, H, W\]"),
        (torch.randn(0, 3, 64, 64), ValueError, "non-empty"),
        (torch.randint(0, 9, (2, 3, 64, 64), dtype=torch.int32), TypeError, "floating-point or uint8"),
        (torch.randn(2, 3, 96, 96), ValueError, "does not match the model's 64x64"),
        (torch.randn(2, 1, 64, 64), ValueError, "expected 3 input channels"),
        ([1, 2], TypeError, "expected an image batch tensor"),
    ],
)
def test_bad_inputs(image, error, message) -> None:
    engine = vitfast.optimize(_small_model(), batch_sizes=(2,), dtype=torch.float32, device="cpu")
    with pytest.raises(error, match=message):
        engine(image)
    assert engine.captured_sizes() == []  # a rejected input leaves no entry behind


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.slow), "kernels-sdpa"])
def test_engine_on_the_triton_kernels_matches_the_reference(backend: str) -> None:
    """The fused sequence on the kernels (interpreter on the CPU): the same ops the GPU engine captures. EVA-02 has
    RoPE: fused into the attention kernel ("triton"), or by the rope_2d_qk kernel before SDPA ("kernels-sdpa")."""
    pytest.importorskip("triton")
    model = _model("eva02_tiny_patch14_224", img_size=56, depth=1)
    image = torch.randn(1, 3, 56, 56)
    expected = vitfast.optimize(model, batch_sizes=(1,), dtype=torch.float32, device="cpu", backend="reference")
    kernels = vitfast.optimize(model, batch_sizes=(1,), dtype=torch.float32, device="cpu", backend=backend)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(image.double())
    assert_kernel_close(kernels(image), exact, expected(image), what=f"engine on {backend}")


class _FakeGraph:
    """Stands in for a CUDA graph on the CPU: a replay reruns the candidate's forward into the static output."""

    def __init__(self, engine, kind, static_input, candidate, static_output, corrupt):
        self.args = (engine, kind, static_input, candidate)
        self.static_output, self.corrupt = static_output, corrupt

    def replay(self) -> None:
        engine, kind, static_input, candidate = self.args
        out = engine._call(kind, static_input, candidate)
        self.static_output.copy_(out * 3 if self.corrupt else out)


def _tuning_engine(
    monkeypatch,
    times: dict[str, float],
    corrupt: set[str] = frozenset(),
    failing=frozenset(),
    model: torch.nn.Module | None = None,
    batch_sizes=(2,),
    compile: bool = False,
    captures: list | None = None,
):
    """An engine that runs its tuning loop on the CPU with fake graphs and preset replay times (``captures`` lists
    the (batch size, candidate) of every capture attempted)."""
    pytest.importorskip("triton")  # the candidates run the kernels (through the interpreter here)
    engine_module = importlib.import_module("vitfast.engine")
    model = _small_model() if model is None else model
    engine = vitfast.optimize(model, batch_sizes=batch_sizes, dtype=torch.float32, device="cpu", compile=compile)
    engine.use_graphs = True

    def capture_graph(kind, static_input, candidate):
        if captures is not None:
            captures.append((static_input.shape[0], candidate))
        if candidate in failing:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = engine._call(kind, static_input, candidate).clone()
        graph = _FakeGraph(engine, kind, static_input, candidate, out, candidate in corrupt)
        return engine_module._Captured(static_input, out, graph)

    monkeypatch.setattr(engine, "_capture_graph", capture_graph)
    monkeypatch.setattr(engine_module, "_median_replay_ms", lambda graph: times[graph.args[3]])
    return engine


@pytest.mark.slow
def test_tuning_keeps_the_fastest_candidate_that_agrees(monkeypatch, caplog) -> None:
    times = {"kernels": 1.0, "kernels-sdpa": 2.0, "reference": 3.0}
    engine = _tuning_engine(monkeypatch, times, corrupt={"kernels"}, failing={"kernels-sdpa"})
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = engine.model(image)
    out = engine(image)
    ((key, choice),) = engine.choices.items()
    assert choice == "reference" and engine.tuning[key] == {"reference": 3.0}  # the faster two were rejected
    assert "differs from the reference" in caplog.text and "capture failed" in caplog.text
    torch.testing.assert_close(out, expected)


@pytest.mark.slow
def test_tuning_picks_the_fastest(monkeypatch) -> None:
    engine = _tuning_engine(monkeypatch, {"kernels": 2.0, "kernels-sdpa": 1.5, "reference": 3.0})
    engine(torch.randn(1, 3, 64, 64))
    assert list(engine.choices.values()) == ["kernels-sdpa"]


def test_tuning_with_no_usable_candidate_says_why(monkeypatch) -> None:
    engine = _tuning_engine(monkeypatch, {}, failing=set(TUNING_CANDIDATES))
    with pytest.raises(RuntimeError, match="no candidate could be captured.*capture failed"):
        engine(torch.randn(2, 3, 64, 64))


def test_candidates_follow_compile() -> None:
    """The compiled candidates are offered with compile=True (the default where graphs are tuned), never without;
    without graphs, compile=True runs the one over the reference ops."""
    pytest.importorskip("triton")
    engine = vitfast.optimize(_small_model(), batch_sizes=(1,), dtype=torch.float32, device="cpu")
    assert not engine.compile and engine._candidates() == ["current"]
    engine.use_graphs = True
    assert engine._candidates() == list(TUNING_CANDIDATES)
    engine.compile = True
    assert engine._candidates() == [*TUNING_CANDIDATES, COMPILED_CANDIDATE, COMPILED_KERNELS_CANDIDATE]
    on_cpu = vitfast.optimize(_small_model(), batch_sizes=(1,), dtype=torch.float32, device="cpu", compile=True)
    assert on_cpu._candidates() == [COMPILED_CANDIDATE]
    fixed = vitfast.optimize(_small_model(), batch_sizes=(1,), device="cpu", backend=COMPILED_CANDIDATE)
    assert fixed._candidates() == [COMPILED_CANDIDATE]


@pytest.mark.parametrize(
    ("name", "dtype", "offered"),
    [
        ("vit_small_patch16_224", torch.bfloat16, True),
        ("vit_small_patch16_224", torch.float32, False),  # the tanh GELU fails rule 5 in fp32
        ("vit_base_patch16_clip_quickgelu_224", torch.bfloat16, False),  # QuickGELU is another function
        ("eva02_tiny_patch14_224", torch.bfloat16, False),  # SwiGLU: no GELU to fuse
    ],
)
def test_gelu_epilogue_is_offered_where_it_passes_rule_5(name, dtype, offered) -> None:
    pytest.importorskip("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-bit on the CPU
        model = _model(name, img_size=28 if "patch14" in name else 32, depth=1)
        engine = vitfast.optimize(model, batch_sizes=(1,), dtype=dtype, device="cpu")
    engine.use_graphs = True
    assert (EPILOGUE_CANDIDATE in engine._candidates()) is offered


def test_gelu_epilogue_error_against_exact_gelu() -> None:
    """fc1 at ViT-B widths (197 tokens, 768 -> 3072): the epilogue's tanh GELU (its numerics as emulated on the CPU)
    against the exact GELU in fp64 passes rule 5 in bf16, and fails it in fp32 (why the candidate is bf16 only)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(197, 768, dtype=torch.float64, generator=generator)
    weight = torch.randn(3072, 768, dtype=torch.float64, generator=generator) * 0.05
    bias = torch.randn(3072, dtype=torch.float64, generator=generator) * 0.02
    exact = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))
    for dtype, passes in ((torch.bfloat16, True), (torch.float32, False)):
        args = (x.to(dtype), weight.to(dtype), bias.to(dtype))
        fused = gelu_epilogue_linear(*args, "gelu")
        assert fused.dtype == dtype
        baseline = vitfast.ops.linear_ref(*args, "gelu")
        if passes:
            assert_kernel_close(fused, exact, baseline, what="bias + tanh GELU epilogue, bf16")
        else:
            with pytest.raises(AssertionError, match="exceeds 2 x PyTorch"):
                assert_kernel_close(fused, exact, baseline, what="bias + tanh GELU epilogue, fp32")
    torch.testing.assert_close(  # no activation: the plain projection
        gelu_epilogue_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias), rtol=0, atol=0
    )


@pytest.mark.slow  # the Triton kernels through the interpreter
def test_epilogue_candidate_routes_fc1_through_the_epilogue() -> None:
    """The kernels-epilogue candidate as captured (Triton kernels through the interpreter, fc1 on the epilogue): the
    tanh GELU shows as a small difference from the exact model, and only in the GELU projections."""
    pytest.importorskip("triton")
    model = _model("vit_small_patch16_224", img_size=32, depth=1)
    engine = vitfast.optimize(model, batch_sizes=(1,), dtype=torch.float32, device="cpu", backend=EPILOGUE_CANDIDATE)
    seen = []

    def spy(x, weight, bias=None, activation=None):
        seen.append(activation)
        return gelu_epilogue_linear(x, weight, bias, activation)

    image = torch.randn(1, 3, 32, 32)
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(importlib.import_module("vitfast.engine"), "gelu_epilogue_linear", spy)
        out = engine(image)
    assert seen == [None, None, "gelu", None] * 2  # qkv, proj, fc1, fc2; at capture, then at the call
    with torch.no_grad():
        error = scaled_error(out, model(image))
    assert 1e-6 < error < 1e-3, error  # tanh GELU's approximation, nothing larger


def test_gelu_epilogue_engine_within_rule_5() -> None:
    """The whole fused forward with every fc1 on the epilogue, ViT-B widths, bf16, against the model in fp64."""
    model = _model("vit_base_patch16_224", img_size=64)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(image.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-bit on the CPU
        engine = vitfast.optimize(model, batch_sizes=(2,), dtype=torch.bfloat16, device="cpu", backend="reference")
    baseline = engine(image)
    with override_impl("linear", gelu_epilogue_linear):
        fused = engine._call("forward", image.bfloat16(), "reference")
    assert not torch.equal(fused, baseline)  # the epilogue ran
    assert_kernel_close(fused, exact, baseline, floor=1e-3, what="engine with the GELU epilogue, bf16")


@pytest.mark.slow  # 28 forwards through the fake tuning loop
def test_pruning_by_the_nearest_smaller_batch_size(monkeypatch, caplog) -> None:
    """A candidate rejected at the nearest smaller size, or more than PRUNE_MARGIN times slower than its winner there,
    is not captured again; one within the margin is; a size more than PRUNE_MAX_BATCH_RATIO times larger than every
    smaller captured size is tuned in full."""
    times = {"kernels": 1.0, "kernels-sdpa": 0.9 * PRUNE_MARGIN, "reference": 1.1 * PRUNE_MARGIN}
    captures = []
    model = _model("vit_small_patch16_224", img_size=32, depth=1, embed_dim=64, num_heads=2)
    engine = _tuning_engine(
        monkeypatch,
        times,
        failing={COMPILED_CANDIDATE},
        model=model,
        batch_sizes=(1, 2, 4, 20),
        compile=True,
        captures=captures,
    )
    # every candidate runs the reference ops here: the test is about which ones are captured, not about the kernels
    monkeypatch.setattr(engine, "_candidate", lambda name: use_backend("reference"))
    sizes = (1, 2, 4, 20)  # 2 and 4 within PRUNE_MAX_BATCH_RATIO of the size before; 20 is not
    for batch in sizes:
        engine(torch.randn(batch, 3, 32, 32))
    attempted = {batch: [name for b, name in captures if b == batch] for batch in sizes}
    compiled = [COMPILED_CANDIDATE, COMPILED_KERNELS_CANDIDATE]  # both fail: one by name, one (interpreter) itself
    everyone = [*TUNING_CANDIDATES, *compiled]
    assert attempted == {1: everyone, 2: ["kernels", "kernels-sdpa"], 4: ["kernels", "kernels-sdpa"], 20: everyone}
    skipped = {key[1]: value for key, value in engine.skipped.items()}
    assert all("capture failed" in skipped[1][name] for name in compiled)
    assert set(skipped[2]) == set(skipped[4]) == {"reference", *compiled}
    assert "more than 1.5x the fastest" in skipped[2]["reference"] and "left out at batch 1" in skipped[2]["inductor"]
    assert "left out at batch 1" in skipped[2][COMPILED_KERNELS_CANDIDATE]
    assert "left out at batch 2" in skipped[4]["reference"]  # pruned once, pruned up the chain
    assert set(skipped[20]) == set(compiled)
    assert set(engine.choices.values()) == {"kernels"} and len(engine.choices) == 4
    assert caplog.text.count("capture failed") == 4  # a pruned candidate is logged at info level, not warned about


def test_batch_64_and_above(monkeypatch) -> None:
    """Batch 64 is captured like any size; a size never named runs at the next larger captured one (padded); above the
    largest, eagerly (or captured exactly with on_new_size='capture')."""
    model = _model("vit_small_patch16_224", img_size=32, depth=1)
    engine = vitfast.optimize(model, batch_sizes=(8, 64), dtype=torch.float32, device="cpu")
    images = torch.randn(128, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    for batch in (64, 20, 128):
        assert_close_scaled(engine(images[:batch]), expected[:batch], tol=1e-5, what=f"batch {batch}")
    assert engine.captured_sizes() == [("forward", 64)] and engine.stats["eager_calls"] == 2 + 1  # 64, 20: padded
    capturing = vitfast.optimize(model, batch_sizes=(64,), dtype=torch.float32, device="cpu", on_new_size="capture")
    assert_close_scaled(capturing(images), expected, tol=1e-5, what="batch 128 captured")
    assert capturing.captured_sizes() == [("forward", 128)]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("vit_small_patch16_224", marks=pytest.mark.slow),  # three traces
        "beitv2_base_patch16_224",
        "eva02_base_patch14_448",
        "eva02_large_patch14_448",
    ],
)
def test_fused_forward_traces_as_one_graph(name: str) -> None:
    """What the compiled candidate compiles: dynamo traces the fused forward on the reference ops with fullgraph=True
    (a graph break raises), here without inductor (backend="eager"): fused qkv / GELU, rel-pos bias + layer scale,
    split qkv + RoPE + SwiGLU with sub-LN, the padded 2730-wide SwiGLU; uint8 images and the features call once."""
    img_size = 28 if "patch14" in name else 32
    engine = vitfast.optimize(_model(name, img_size=img_size, depth=1), batch_sizes=(2,), device="cpu")
    cases = [(torch.randn(2, 3, img_size, img_size), False)]
    if name == "vit_small_patch16_224":
        cases += [(torch.randint(0, 256, (2, 3, img_size, img_size), dtype=torch.uint8), False), (cases[0][0], True)]
    for image, features_only in cases:
        _assert_traced_forward_matches(engine, COMPILED_CANDIDATE, image, features_only)


def _assert_traced_forward_matches(engine, candidate: str, image: torch.Tensor, features_only: bool) -> None:
    """The engine's fused forward under ``candidate``, traced by dynamo with fullgraph=True (backend="eager": no
    inductor), gives exactly what it gives untraced."""
    engine_module = importlib.import_module("vitfast.engine")
    engine.fused.prepare(image)
    traced = torch.compile(
        engine_module._own_code(engine_module._forward), backend="eager", fullgraph=True, dynamic=False
    )
    with torch.inference_mode(), engine._candidate(candidate):
        out = traced(engine.fused, features_only, image)
        expected = engine_module._forward(engine.fused, features_only, image)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.slow  # ~10 s each: dynamo, then the interpreted kernels
@pytest.mark.parametrize("name", ["beitv2_base_patch16_224", "eva02_base_patch14_448"])
def test_kernels_forward_traces_as_one_graph(name: str) -> None:
    """What "compiled-kernels" compiles on a GPU: dynamo traces the kernels-sdpa forward with fullgraph=True, our
    Triton ops opaque in the graph (here backend="eager": inductor cannot lower interpreted kernels). BEiT: the
    attention kernel with the relative position bias, layer-scale residual LayerNorms; EVA-02: rope_2d_qk before
    SDPA, SwiGLU + sub-LN."""
    pytest.importorskip("triton")
    img_size = 28 if "patch14" in name else 32
    engine = vitfast.optimize(_model(name, img_size=img_size, depth=1), batch_sizes=(1,), device="cpu")
    _assert_traced_forward_matches(engine, COMPILED_KERNELS_CANDIDATE, torch.randn(1, 3, img_size, img_size), False)


@pytest.fixture(scope="module")
def one_compile_thread():
    """Inductor's CPU backend compiles C++; a pool of workers costs more than it saves on a two-core machine."""
    inductor_config = importlib.import_module("torch._inductor.config")
    with inductor_config.patch(compile_threads=1):
        yield


@pytest.mark.slow
def test_compiled_candidate_agrees_is_kept_when_fastest_and_skipped_when_wrong(
    monkeypatch, caplog, one_compile_thread
) -> None:
    """The fused forward compiled by torch.compile (inductor's CPU backend, fullgraph) as a candidate of the tuning
    loop: it matches the model, wins when fastest, owns nothing the caller holds, and is skipped when it disagrees."""
    model = _model("vit_small_patch16_224", img_size=32, depth=1, embed_dim=64, num_heads=2)
    images = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = [model(image) for image in images]
    times = {"kernels": 3.0, "kernels-sdpa": 3.0, "reference": 2.0, COMPILED_CANDIDATE: 1.0}
    engine = _tuning_engine(monkeypatch, times, failing={"kernels", "kernels-sdpa"}, model=model, compile=True)
    first = engine(images[0])
    ((key, choice),) = engine.choices.items()
    assert choice == COMPILED_CANDIDATE and engine.tuning[key] == {"reference": 2.0, COMPILED_CANDIDATE: 1.0}
    assert list(engine.compile_seconds[key]) == [COMPILED_CANDIDATE] and engine.compile_seconds[key][choice] > 0
    second = engine(images[1])
    assert_close_scaled(first, expected[0], tol=1e-5, what="compiled candidate")
    assert_close_scaled(second, expected[1], tol=1e-5, what="compiled candidate, second call")
    assert first.data_ptr() != second.data_ptr() and list(engine.compile_seconds) == [key]  # no recompile

    wrong = _tuning_engine(
        monkeypatch,
        times,
        corrupt={COMPILED_CANDIDATE},
        failing={"kernels", "kernels-sdpa"},
        model=model,
        compile=True,
    )
    with caplog.at_level(logging.WARNING, logger="vitfast"):
        out = wrong(images[0])
    assert list(wrong.choices.values()) == ["reference"] and "'inductor' skipped" in caplog.text
    assert not wrong._compiled  # the loser's compiled forward is let go
    assert_close_scaled(out, expected[0], tol=1e-5, what="fallback to the reference")


def test_compiled_kernels_candidate_fails_cleanly_under_the_interpreter(monkeypatch, caplog) -> None:
    """inductor cannot compile interpreted Triton kernels: the "compiled-kernels" capture fails at once with an error
    that says so (nothing is compiled), it is skipped with a warning, and a working candidate is kept; outputs are
    the caller's as always. Fixed as the backend, its first call raises the same error."""
    model = _model("vit_small_patch16_224", img_size=32, depth=1, embed_dim=64, num_heads=2)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(image)
    times = {"reference": 2.0}
    failing = {"kernels", "kernels-sdpa", COMPILED_CANDIDATE}  # left out by name, to keep the test cheap
    engine = _tuning_engine(monkeypatch, times, failing=failing, model=model, compile=True)
    with caplog.at_level(logging.WARNING, logger="vitfast"):
        first, second = engine(image), engine(image)
    ((key, choice),) = engine.choices.items()
    assert choice == "reference" and set(engine.skipped[key]) == {*failing, COMPILED_KERNELS_CANDIDATE}
    problem = engine.skipped[key][COMPILED_KERNELS_CANDIDATE]
    assert "capture failed (RuntimeError" in problem and "interpreter" in problem
    assert f"{COMPILED_KERNELS_CANDIDATE!r} skipped" in caplog.text
    assert not engine._compiled and not engine.compile_seconds
    assert_close_scaled(first, expected, tol=1e-5, what="fallback to the reference")
    assert first.data_ptr() != second.data_ptr()  # each call a fresh tensor
    fixed = vitfast.optimize(
        model, batch_sizes=(2,), dtype=torch.float32, device="cpu", backend=COMPILED_KERNELS_CANDIDATE
    )
    with pytest.raises(RuntimeError, match="needs a CUDA GPU and Triton without its interpreter"):
        fixed(image)


def test_pdl_candidate_only_where_supported(monkeypatch) -> None:
    """ "kernels-pdl" is offered only where PDL can run (sm_90+, not the interpreter: never here), and is
    "kernels-sdpa" with PDL on inside its block; under the interpreter the kernels never get PDL, so its forward
    is bitwise kernels-sdpa's."""
    pytest.importorskip("triton")
    engine_module = importlib.import_module("vitfast.engine")
    triton_glue = importlib.import_module("vitfast.ops._triton")
    model = _model("vit_small_patch16_224", img_size=32, depth=1, embed_dim=64, num_heads=2)
    engine = vitfast.optimize(model, batch_sizes=(1,), dtype=torch.float32, device="cpu")
    engine.use_graphs = True
    assert PDL_CANDIDATE not in engine._candidates()
    with engine._candidate(PDL_CANDIDATE):
        assert not triton_glue._pdl.on  # asked for, but not supported here
    for module in (engine_module, triton_glue):  # as on an sm_90 GPU
        monkeypatch.setattr(module, "pdl_supported", lambda device: True)
    assert engine._candidates() == [*TUNING_CANDIDATES, PDL_CANDIDATE]
    with engine._candidate(PDL_CANDIDATE):
        assert triton_glue._pdl.on and get_backend() == "triton"
    with engine._candidate("kernels-sdpa"):
        assert not triton_glue._pdl.on
    assert not triton_glue._pdl.on
    image = torch.randn(1, 3, 32, 32)
    pdl, sdpa = engine._call("forward", image, PDL_CANDIDATE), engine._call("forward", image, "kernels-sdpa")
    torch.testing.assert_close(pdl, sdpa, rtol=0, atol=0)


def test_repr_and_is_exported() -> None:
    engine = vitfast.optimize(_small_model(), batch_sizes=(4, 1), dtype=torch.float32, device="cpu")
    assert isinstance(engine, InferenceEngine) and vitfast.InferenceEngine is InferenceEngine
    assert "batch_sizes=[1, 4]" in repr(engine) and "graphs=False" in repr(engine)


# ---------------------------------------------------------------------------------------------- GPU: real graphs

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("name", ["vit_base_patch16_224", "beitv2_base_patch16_224", "eva02_base_patch14_448"])
def test_gpu_graphs_match_timm_within_rule_5(name: str) -> None:
    timm = pytest.importorskip("timm")
    from vitfast.models import get_entry

    entry = get_entry(name)
    with torch.device("cuda"):
        reference = randomize_(timm.create_model(entry.timm_name, **{**entry.timm_kwargs, "num_classes": 7})).eval()
        ours = vitfast.create_model(name, num_classes=7)
    ours.load_state_dict(reference.state_dict(), strict=False)
    engine = vitfast.optimize(ours, batch_sizes=(1, 4))
    image = torch.randn(3, 3, *ours.config.img_size, device="cuda")
    with torch.no_grad():
        exact = reference(image)
        baseline = copy.deepcopy(reference).bfloat16()(image.bfloat16())
    out = engine(image)
    assert engine.captured_sizes() == [("forward", 4)] and engine.stats["replays"] == 1
    (choice,) = engine.choices.values()
    (times,) = engine.tuning.values()
    (skipped,) = engine.skipped.values()
    assert engine.compile and COMPILED_CANDIDATE in engine._candidates()  # compiled by default with graphs
    assert choice in CANDIDATES and set(times) | set(skipped) == set(engine._candidates())
    assert times[choice] == min(times.values())
    assert_kernel_close(out, exact, baseline, floor=1e-3, what=f"{name} engine bf16")
    again = engine(image)
    torch.testing.assert_close(again, out, rtol=0, atol=0)  # a replay is deterministic
    uint8 = torch.randint(0, 256, (1, 3, *ours.config.img_size), dtype=torch.uint8, device="cuda")
    graphed = vitfast.optimize(ours, batch_sizes=(1,), backend=choice)
    eager = vitfast.optimize(ours, batch_sizes=(1,), backend=choice, use_graphs=False)
    torch.testing.assert_close(graphed(uint8), eager(uint8), rtol=0, atol=0)  # the same kernels, replayed


@pytest.mark.gpu
@requires_gpu
def test_gpu_pdl_and_compiled_kernels_candidates_capture_and_agree(monkeypatch) -> None:
    """On a GPU the new candidates are captured, agree with the plain forward and are timed, not skipped; kernels-pdl
    (where PDL can run) gives bitwise kernels-sdpa's output."""
    from vitfast.ops._triton import pdl_supported

    model = _model("eva02_base_patch14_448", img_size=112).cuda()  # split qkv, RoPE, SwiGLU + sub-LN
    names = ["kernels-sdpa", COMPILED_KERNELS_CANDIDATE, *([PDL_CANDIDATE] if pdl_supported("cuda") else [])]
    engine = vitfast.optimize(model, batch_sizes=(1,))
    monkeypatch.setattr(engine, "_candidates", lambda: names)
    image = torch.randn(1, 3, 112, 112, device="cuda")
    engine(image)
    (key,) = engine.choices
    assert set(engine.tuning[key]) == set(names), engine.skipped[key]
    assert COMPILED_KERNELS_CANDIDATE in engine.compile_seconds[key]
    if PDL_CANDIDATE in names:
        pdl = vitfast.optimize(model, batch_sizes=(1,), backend=PDL_CANDIDATE)
        sdpa = vitfast.optimize(model, batch_sizes=(1,), backend="kernels-sdpa")
        torch.testing.assert_close(pdl(image), sdpa(image), rtol=0, atol=0)


def test_engine_does_not_import_the_benchmarks() -> None:
    """The engine measures with vitfast._measure, beneath both it and vitfast.bench (which imports the registry)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(importlib.import_module("vitfast.engine")))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert "vitfast._measure" in imported and "vitfast.bench" not in imported and "bench" not in names
