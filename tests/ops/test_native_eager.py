"""The native eager path (csrc/eager.cpp): one C++ mechanism that replays what an op's Python path did for a key.

Under Triton's interpreter (these tests) a plan's "launcher" is a closure over ``kernel[grid]``, so the C++ key,
allocations, argument slots and autograd node run for real, and their results are compared bit for bit with the
Python eager path's. What it replays on a GPU is the launch cache's compiled launcher (tests/ops/test_launch_cache.py,
and the probe test at the end, off the interpreter).
"""

from __future__ import annotations

import contextlib
import importlib
import struct
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

import vitfast
from vitfast import ops
from vitfast.ops import _triton

ln = importlib.import_module("vitfast.ops.layer_norm")
attn = importlib.import_module("vitfast.ops.attention")
sw = importlib.import_module("vitfast.ops.swiglu")
rope = importlib.import_module("vitfast.ops.rope")
lin = importlib.import_module("vitfast.ops.linear")
pe = importlib.import_module("vitfast.ops.patch_embed")

pytestmark = pytest.mark.skipif(
    ln._layer_norm_fwd_op.native is None, reason="no native eager path (the compiled extension is not loaded)"
)

OPS = _triton.EAGER_OPS


@contextlib.contextmanager
def python_path():
    """Every op's native entry point off: the Python eager path runs."""
    saved = {name: op.native for name, op in OPS.items()}
    for op in OPS.values():
        op.native = None
    try:
        yield
    finally:
        for name, native in saved.items():
            OPS[name].native = native


@contextlib.contextmanager
def python_runs():
    """Counts, per op, the runs of its Python body (a fill or the Python path; a replay runs none)."""
    counts: dict[str, int] = {}
    saved = {name: op.fn for name, op in OPS.items()}

    def counting(name: str, fn: Callable) -> Callable:
        def run(*args):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args)

        return run

    for name, op in OPS.items():
        op.fn = counting(name, op.fn)
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            OPS[name].fn = fn


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaf(generator, dtype, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()


# Each case: (make(dtype) -> leaves, call(*leaves) -> outputs, the ops its second call replays). A replayed op's
# Python body never runs on the second call; the others' backward (or forward) computes more than its launches (a
# torch reduction, index_add_), which the native path leaves to Python.
def _ln_case(variant: str):
    def make(dtype):
        g = _generator()
        x = _leaf(g, dtype, 3, 5, 48)
        branch = _leaf(g, dtype, 3, 5, 48) if variant != "plain" else None
        gamma = _leaf(g, dtype, 48) if variant == "residual + gamma" else None
        return [x, branch, gamma, _leaf(g, dtype, 48), _leaf(g, dtype, 48)]

    def call(x, branch, gamma, weight, bias):
        if branch is None:
            return [ops.layer_norm(x, weight, bias, 1e-5)]
        out, residual = ops.layer_norm_residual(x, branch, gamma, weight, bias, 1e-5)
        return [out] if variant == "residual_out unused" else [out, residual]

    return make, call, {"vitfast::layer_norm_fwd", "vitfast::layer_norm_bwd"}


def _attention_case(layout: str):
    def make(dtype):
        g = _generator(1)
        if layout == "fused qkv view":  # timm's fused projection: strided views of one [B, N, 3, H, D] tensor
            return [_leaf(g, dtype, 2, 19, 3, 2, 32)]
        leaves = [_leaf(g, dtype, 2, 2, 19, 32) for _ in range(3)]
        if layout == "rel-pos table":
            leaves += [_leaf(g, torch.float32, 40, 2), torch.randint(0, 40, (19, 19), generator=g)]
        return leaves

    def call(*leaves):
        if layout == "fused qkv view":
            q, k, v = leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
            return [ops.attention(q, k, v)]
        if layout == "rel-pos table":
            return [ops.attention(*leaves[:3], rel_pos_bias_table=leaves[3], rel_pos_index=leaves[4])]
        return [ops.attention(*leaves, scale=0.3)]

    return make, call, {"vitfast::attention_fwd", "vitfast::attention_bwd"}


def _rope_case():
    def make(dtype):
        g = _generator(2)
        return [_leaf(g, dtype, 2, 3, 17, 32), _leaf(g, dtype, 2, 3, 17, 32)]

    def call(q, k):
        cos, sin = rope.rope_2d_table((4, 4), 32)
        return list(ops.rope_2d_qk(q, k, cos, sin, 1))

    return make, call, {"vitfast::rope_2d_qk"}


def _swiglu_case(form: str):
    def make(dtype):
        g = _generator(3)
        if form == "packed":
            return [_leaf(g, dtype, 5, 3, 80)]
        leaves = [_leaf(g, dtype, 5, 3, 40), _leaf(g, dtype, 5, 3, 40)]
        return leaves + ([_leaf(g, dtype, 36), _leaf(g, dtype, 36)] if form == "sub-LN, padded rows" else [])

    def call(*leaves):
        if form == "packed":
            return [ops.swiglu_packed(leaves[0])]
        if form == "split":
            return [ops.swiglu(*leaves)]
        return [ops.swiglu_layer_norm(*leaves, 1e-6, width=36)]

    name = {"packed": "swiglu_packed", "split": "swiglu", "sub-LN, padded rows": "swiglu_layer_norm"}[form]
    return make, call, {f"vitfast::{name}_fwd", f"vitfast::{name}_bwd"}


def _linear_case(activation):
    def make(dtype):
        g = _generator(4)
        return [_leaf(g, dtype, 3, 7, 32), _leaf(g, dtype, 24, 32), _leaf(g, dtype, 24) if activation else None]

    def call(x, weight, bias):
        return [ops.linear(x, weight, bias, activation)]

    return make, call, {"vitfast::linear_fwd"}


def _patch_embed_case():
    def make(dtype):
        g = _generator(5)
        return [_leaf(g, dtype, 2, 3, 32, 32), _leaf(g, dtype, 24, 3, 16, 16), _leaf(g, dtype, 24),
                _leaf(g, dtype, 1, 5, 24), _leaf(g, dtype, 1, 1, 24)]  # fmt: skip

    def call(*leaves):
        return [ops.patch_embed_tokens(*leaves)]

    return make, call, {"vitfast::patch_embed_fwd", "vitfast::patch_embed_bwd"}


CASES = {
    "layer_norm": _ln_case("plain"),
    "layer_norm_residual": _ln_case("residual"),
    "layer_norm_residual + gamma": _ln_case("residual + gamma"),
    "layer_norm_residual, residual_out unused": _ln_case("residual_out unused"),
    "attention": _attention_case("contiguous"),
    "attention, fused qkv view": _attention_case("fused qkv view"),
    "attention, rel-pos table": _attention_case("rel-pos table"),
    "rope_2d_qk": _rope_case(),
    "swiglu": _swiglu_case("split"),
    "swiglu_packed": _swiglu_case("packed"),
    "swiglu_layer_norm, padded rows": _swiglu_case("sub-LN, padded rows"),
    "linear + gelu": _linear_case("gelu"),
    "linear, no bias": _linear_case(None),
    "patch_embed_tokens": _patch_embed_case(),
}


def _run(call: Callable, leaves: list) -> list[torch.Tensor]:
    """The outputs and the gradient of every floating-point leaf, for a weighted sum of the outputs."""
    with vitfast.use_backend("triton"):
        outs = call(*leaves)
    loss = sum((o.float() * torch.linspace(-1.0, 1.0, o.numel()).reshape(o.shape)).sum() for o in outs)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, wanted))


def _assert_same(got: list, expected: list, what: str) -> None:
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), what
        assert torch.equal(a, b), what


# every case in fp32; the 16-bit dtypes (another key, the same mechanism) on a case per op family
HALF_CASES = (
    "layer_norm_residual + gamma",
    "attention, rel-pos table",
    "swiglu_layer_norm, padded rows",
    "linear + gelu",
)
PARITY = [(case, torch.float32) for case in CASES] + [
    (case, dtype) for case in HALF_CASES for dtype in (torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize(("case", "dtype"), PARITY, ids=[f"{case}-{str(dtype)[6:]}" for case, dtype in PARITY])
def test_native_matches_the_python_path_bit_for_bit(case: str, dtype: torch.dtype) -> None:
    """Outputs (values, strides) and every gradient: the first call (the Python path fills the plans) and the second
    (the C++ replay of the forward and of the backward ops that have a plan) equal the Python path exactly; on the
    second call, the replayed ops' Python bodies never run."""
    make, call, replayed = CASES[case]
    leaves = make(dtype)
    with python_path():
        expected = _run(call, leaves)
    _assert_same(_run(call, leaves), expected, "the first call (fill)")
    with python_runs() as runs:
        second = _run(call, leaves)
    _assert_same(second, expected, "the second call (replay)")
    assert not replayed & set(runs), f"Python bodies ran on the replay: {runs}"
    for name in replayed:
        assert _triton.native_plans(OPS[name])[0] >= 1, name


def test_native_node_saves_what_the_python_node_saves() -> None:
    """The same tensors saved for backward (through saved_tensors_hooks, so recomputation and offloading see them),
    and no more: LayerNorm keeps x, not its output (the activation-memory contract)."""

    def saved(native: bool) -> list[tuple]:
        seen: list[tuple] = []

        def pack(t: torch.Tensor):
            seen.append((tuple(t.shape), t.dtype))
            return t

        make, call, _ = CASES["layer_norm_residual + gamma"]
        leaves = make(torch.bfloat16)
        with contextlib.ExitStack() as stack:
            if not native:
                stack.enter_context(python_path())
            _run(call, leaves)  # fill
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), vitfast.use_backend("triton"):
                out = call(*leaves)[0]
        out.float().sum().backward()
        return seen

    assert saved(True) == saved(False)


def test_native_node_is_the_cpp_node_and_version_checks_its_saved_inputs() -> None:
    """A replay's node is the C++ one, and x modified in place after the forward makes backward refuse, as for any
    autograd node."""
    x = torch.randn(3, 16)
    leaf = torch.randn(16, requires_grad=True)
    for _ in range(2):
        out = ln._layer_norm_fwd_op(x, None, None, leaf, None, 1e-6)[0]
    assert out.grad_fn.name() == "vitfast::eager::NativeNode"
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_native_node_frees_its_saved_tensors_after_backward_unless_retained() -> None:
    """The node's graph as any node's: its outputs are its inputs in order, its next functions its inputs' (None for
    one that wants no gradient), a second backward through a freed graph raises, and with retain_graph the same
    gradients come twice."""
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(16)
    for _ in range(2):
        out, *_, mean, rstd = ln._layer_norm_fwd_op(x, None, None, w, None, 1e-6)
    assert out.grad_fn.name() == "vitfast::eager::NativeNode"
    assert mean.grad_fn.name() == rstd.grad_fn.name() == "vitfast::eager::NativeNode"  # one node, four outputs
    assert (out.output_nr, mean.output_nr, rstd.output_nr) == (0, 2, 3)
    assert [f is None for f, _ in out.grad_fn.next_functions] == [False, True]  # x's accumulator; w wants none
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    out.sum().backward()
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()


def test_native_backward_errors_reach_the_caller(monkeypatch) -> None:
    x = torch.randn(3, 16, requires_grad=True)
    for _ in range(2):
        out = ln._layer_norm_fwd_op(x, None, None, None, None, 1e-6)[0]

    def backward(*args):
        raise ValueError("the backward failed here")

    monkeypatch.setattr(ln._layer_norm_fwd_op, "backward", backward)
    with pytest.raises(ValueError, match="the backward failed here"):
        out.sum().backward()


class _Sub(torch.Tensor):
    pass


def test_native_declines_what_it_does_not_take() -> None:
    """NotImplemented (the Python path then runs, and raises its own errors) for calls outside the mechanism, or
    outside an op's coverage (then the key is declined at once, without running the Python path)."""
    native = ln._layer_norm_fwd_op.native
    x = torch.randn(4, 16)
    outside = {
        "a tensor subclass": (x.as_subclass(_Sub), None, None, None, None, 1e-6),
        "a meta tensor": (torch.empty(4, 16, device="meta"), None, None, None, None, 1e-6),
        "a sparse tensor": (x.to_sparse(), None, None, None, None, 1e-6),
        "an argument of another type": (x, None, None, None, None, "1e-6"),
        "no tensor": (None, None, None, None, None, 1e-6),
    }
    for what, args in outside.items():
        assert native(*args) is NotImplemented, what
    assert _triton.native_plans(ln._layer_norm_fwd_op) == (0, 0)
    with python_runs() as runs:
        assert native(x.double(), None, None, None, None, 1e-6) is NotImplemented  # fp64: not the kernels'
        assert native(x.double(), None, None, None, None, 1e-6) is NotImplemented
    assert runs == {} and _triton.native_plans(ln._layer_norm_fwd_op) == (0, 1)
    # and the public path still says what was wrong, or falls back
    with vitfast.use_backend("triton"):
        want = ln.layer_norm_ref(x.double(), None, None, 1e-6)
        torch.testing.assert_close(ops.layer_norm(x.double(), None, None), want)
        with pytest.raises(ValueError, match="weight must have shape"):
            ops.layer_norm(x, torch.randn(8), None)


@_triton.triton_op("vitfast_test::layer_norm_plus_one")
def _layer_norm_plus_one(x: torch.Tensor) -> torch.Tensor:
    """An op whose Python path computes more than its launches: a LayerNorm kernel, then an aten add."""
    return ln.layer_norm_fwd(x, None, None, None, None, 1e-6)[0] + 1


def test_a_path_that_computes_more_than_its_launches_is_left_to_python() -> None:
    """An op whose body runs an aten op besides its launches and allocations (an add): no plan, the key is declined
    after the first fill, and later calls run the Python path, with the same results."""
    _triton.register_native(_layer_norm_plus_one, ln._native_state, True)
    x = torch.randn(3, 16)
    expected = ln.layer_norm_ref(x, None, None, 1e-6) + 1
    with python_runs() as runs:
        results = [_layer_norm_plus_one(x) for _ in range(3)]
    for result in results:
        torch.testing.assert_close(result, expected)
    assert runs["vitfast_test::layer_norm_plus_one"] == 3
    assert _triton.native_plans(_layer_norm_plus_one) == (0, 1)


def test_native_replays_zero_filled_allocations(monkeypatch) -> None:
    """The patch embedding's weight gradient split over row ranges counts each tile's arrivals in a torch.zeros
    buffer: the plan allocates that buffer zero-filled (a replay that did not would read the last call's counts),
    and every replay matches the Python path bit for bit."""
    monkeypatch.setattr(pe, "_DW_MIN_ROWS_PER_SPLIT", 32)  # 48 patch rows: two splits (a key of its own)
    plans = []
    planned = _triton._plan
    monkeypatch.setattr(_triton, "_plan", lambda *a: plans.append(planned(*a)) or plans[-1])
    g = _generator(6)
    leaves = [_leaf(g, torch.float32, *shape) for shape in ((3, 3, 32, 32), (24, 3, 8, 8), (24,))] + [None, None]

    def call(*leaves):
        return [ops.patch_embed_tokens(*leaves)]

    with python_path():
        expected = _run(call, leaves)
    for what in ("the first call (fill)", "a replay", "another replay"):
        with python_runs() as runs:
            _assert_same(_run(call, leaves), expected, what)
    assert "vitfast::patch_embed_bwd" not in runs
    zeroed = [buffer for plan in plans if plan for buffer in plan[1] if buffer[6]]
    assert [(dtype, shape) for dtype, shape, *_ in zeroed] == [(torch.int32, (3,))]  # a counter per 64 x 64 tile


def test_native_leaves_the_call_to_python_when_no_replay_may_run(monkeypatch) -> None:
    """The state callback says no (a launch hook is set, say): NotImplemented, and the Python path runs."""
    monkeypatch.setattr(ln, "native_state", lambda *settings: None)  # what ln._native_state asks
    x = torch.randn(3, 16)
    with python_runs() as runs:
        assert ln._layer_norm_fwd_op.native(x, None, None, None, None, 1e-6) is NotImplemented
        ln._layer_norm_fwd_op(x, None, None, None, None, 1e-6)
    assert runs == {"vitfast::layer_norm_fwd": 1}


def test_native_keys_plans_by_the_op_settings(monkeypatch) -> None:
    """A module setting a launch plan reads (_TILE) is in the key: changed, the call is planned anew."""
    make, call, _ = CASES["layer_norm"]
    leaves = make(torch.float32)
    _run(call, leaves)
    plans = _triton.native_plans(ln._layer_norm_fwd_op)[0]
    monkeypatch.setattr(ln, "_TILE", ln._TILE // 4)
    with python_path():
        expected = _run(call, leaves)
    _assert_same(_run(call, leaves), expected, "a changed setting")
    assert _triton.native_plans(ln._layer_norm_fwd_op)[0] == plans + 1


def test_native_keys_aliased_arguments_apart() -> None:
    """One tensor passed as x and as the branch is another key than two tensors: each replays its own plan."""
    x, other = torch.randn(4, 32), torch.randn(4, 32)
    with python_path():
        expected = [ln._layer_norm_fwd_op(x, b, None, None, None, 1e-6)[:2] for b in (x, other)]
    for _ in range(2):
        for b, want in zip((x, other), expected, strict=True):
            got = ln._layer_norm_fwd_op(x, b, None, None, None, 1e-6)[:2]
            _assert_same(list(got), list(want), "aliased or not")
    assert _triton.native_plans(ln._layer_norm_fwd_op)[0] == 2


def test_plan_models_only_fresh_allocations_and_arguments() -> None:
    """``_plan`` answers None for what a replay could not reproduce: an output on an argument's storage, two outputs
    on one storage, a launch argument inside an argument's storage at another address, a saved tensor that is
    neither an argument nor an output; a view of a fresh allocation is a slot of its own."""
    x, out = torch.randn(8), torch.empty(8)

    def plan(result, launch_args, saved=None):
        context = None
        if saved is not None:
            context = _triton._RecordedContext(type("Ctx", (), {"save_for_backward": lambda self, *t: None})())
            context.save_for_backward(*saved)
        return _triton._plan((x,), result, [((1, 1, 1), None, None, None, (), launch_args, None)], context)

    assert plan(out, (x, out)) is not None
    assert plan(x.view(2, 4), (x,)) is None  # an output on the argument's storage
    pair = torch.empty(2, 8)
    assert plan((pair[0], pair[1]), (x, pair[0])) is None
    assert plan(out, (x[2:], out)) is None
    assert plan(out, (x, out), saved=(x, out)) is not None
    assert plan(out, (x, out), saved=(x * 2,)) is None
    # a launch argument inside an output's (or a temporary's) storage at another offset: a view slot
    temporary = torch.empty(2, 8)
    steps = plan(out, (x, out[4:], temporary, temporary[1]))[3]
    assert steps[0][5] == ((0, 0), (3, 0, (4,), (1,), 4), (1, 1), (3, 1, (8,), (1,), 8))


def test_native_call_is_refused_inside_a_fill() -> None:
    """Within a fill (its launches are being recorded) no op replays natively: the fill would miss that launch."""
    x = torch.randn(3, 16)
    ln._layer_norm_fwd_op(x, None, None, None, None, 1e-6)  # a plan for x's key
    outer, _triton._direct.recorded = _triton._direct.recorded, []
    try:
        assert ln._layer_norm_fwd_op.native_call(x, None, None, None, None, 1e-6) is NotImplemented
    finally:
        _triton._direct.recorded = outer


def test_native_path_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv(_triton.NATIVE_ENV, "0")
    assert _triton.native_api() is None
    monkeypatch.delenv(_triton.NATIVE_ENV)
    assert _triton.native_api() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the native path's real launches need a GPU")
def test_gpu_native_paths_match_the_python_paths_and_capture() -> None:
    """On a GPU (the replay calls Triton's compiled launcher there): every case at ViT-B/16 bs 8-like shapes in bf16
    bitwise equal to the Python path, fill and replay; and a replay inside a CUDA graph capture (on the capturing
    stream)."""
    from vitfast import _ext

    _ext.register_ops()
    device = torch.device("cuda")
    for case, (make, call, replayed) in CASES.items():
        leaves = [t.detach().to(device).requires_grad_(t.requires_grad) for t in make(torch.bfloat16)]
        with python_path():
            expected = _run(call, leaves)
        for _ in range(2):  # fill, then replay
            _assert_same(_run(call, leaves), expected, case)
        for name in replayed:
            assert _triton.native_plans(OPS[name])[0] >= 1, (case, name)
    x = torch.randn(8, 197, 768, device=device, dtype=torch.bfloat16)
    w, b = torch.randn(768, device=device, dtype=torch.bfloat16), torch.randn(768, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            ln._layer_norm_fwd_op(x, None, None, w, b, 1e-6)  # fill, then a replay outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ln._layer_norm_fwd_op(x, None, None, w, b, 1e-6)[0]
        x.copy_(x.flip(0))
        graph.replay()
        torch.cuda.synchronize()
        reference = ln.layer_norm_ref(x, w, b, 1e-6)
        torch.testing.assert_close(static_out.float(), reference.float(), rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def probe_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The host-overhead probe's JSON (two calls a repeat: its checks, not its timings), from a subprocess off the
    interpreter: the stand-in sm_90 driver, Triton compiles, its launch cache fills, the launch is a no-op."""
    from tests.helpers import offline_report

    path = tmp_path_factory.mktemp("probe") / "probe.json"
    return offline_report("benchmarks.host_overhead", path, 600, "--calls", "2", "--repeats", "1")


@pytest.mark.slow
def test_native_paths_cache_their_launches_on_the_compiled_launch_path(probe_result: dict) -> None:
    """Off the interpreter each op the probe calls gets a plan and replays it: an op that never got one would run
    the Python path and the fill's watch on every call."""
    plans = probe_result["native_launches"]
    assert plans is not None, "the probe's process did not load the compiled extension"
    for name in ("layer_norm_fwd", "layer_norm_bwd", "attention_fwd", "attention_bwd", "swiglu_fwd", "swiglu_bwd",
                 "swiglu_packed_fwd", "swiglu_packed_bwd", "swiglu_layer_norm_fwd", "swiglu_layer_norm_bwd",
                 "rope_2d_qk", "linear_fwd", "patch_embed_fwd", "patch_embed_bwd"):  # fmt: skip
        assert plans[f"vitfast::{name}"][0] >= 1, name
    assert plans["vitfast::layer_norm_fwd"][0] >= 2  # plain and residual
    assert plans["vitfast::rope_2d_qk"][0] >= 2  # the rotation and its inverse (the backward)


@pytest.mark.slow
def test_native_replays_launch_directly_with_what_tritons_launcher_passes(probe_result: dict) -> None:
    """A replay launches with cuLaunchKernelEx itself (the stand-in's recording launch, built against NVIDIA's cuda.h):
    every launch of every probe's forward, and of its fwd+bwd where the backward replays; the grid, block, shared
    memory, stream, function, attributes and each parameter cell as Triton's launcher packs them for the fill's
    launch (benchmarks.host_overhead.direct_launch_check); no Python launch in the replay; PDL's attribute for a
    kernel compiled for it; a launch the driver refuses raises."""
    check = probe_result["direct_launch"]
    assert "unavailable" not in check, check
    for row in check["rows"]:
        assert row["launches"] >= 1 and row["direct"] == row["launches"], row
        assert row["problems"] == [], row
        if "fwd_bwd" in row:
            fwd_bwd = row["fwd_bwd"]
            assert fwd_bwd["direct"] == fwd_bwd["launches"] >= 1 and fwd_bwd["python"] == 0, row
            assert fwd_bwd["problems"] == [], row
    labels = {row["label"] for row in check["rows"]}
    assert labels >= {"layer_norm", "attention + RoPE", "swiglu_packed", "linear + GELU"}
    assert sum(row["launches"] for row in check["rows"]) >= 13
    # the stand-in's thread had no context: the first direct launch made its device's primary one current, once
    assert check["context"] == {"sets": 1, "device": 100, "context": 0xC0}
    # 6: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert check["pdl"] == {"launches": 1, "attrs": [[[6, 1]]]}
    assert "cuLaunchKernelEx failed with CUresult 1" in check["failure"]


def test_jit_trace_records_the_registered_op_not_a_direct_launch() -> None:
    """Under torch.jit.trace neither eager path runs (a launch made outside the dispatcher would be missing from the
    trace, whose replay would return the outputs' uninitialized memory): the trace holds vitfast::layer_norm_fwd and
    computes LayerNorm of new inputs."""
    import warnings

    x, w, b = torch.randn(4, 32), torch.randn(32), torch.randn(32)

    def f(x, w, b):
        return ln.layer_norm(x, w, b) * 2

    with vitfast.use_backend("triton"), torch.no_grad():
        for _ in range(2):  # a plan for the key exists before the trace
            f(x, w, b)
    with vitfast.use_backend("triton"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace's deprecation and tracer warnings
        traced = torch.jit.trace(f, (x, w, b))
    assert "vitfast::layer_norm_fwd" in str(traced.graph)
    x2 = torch.randn(4, 32)
    with vitfast.use_backend("triton"), torch.no_grad():
        torch.testing.assert_close(traced(x2, w, b), 2 * ln.layer_norm_ref(x2, w, b, 1e-6), rtol=1e-5, atol=1e-5)


def _compiled(signature: dict, ptx_params: list[str], **metadata) -> SimpleNamespace:
    fields = {"num_warps": 4, "num_ctas": 1, "shared": 1024, "launch_pdl": False, "launch_cooperative_grid": False,
              "global_scratch_size": 0, "profile_scratch_size": 0, "tensordesc_meta": [], **metadata}  # fmt: skip
    ptx = ".visible .entry k(\n" + ",\n".join(f"\t.param {p} k_param_{i}" for i, p in enumerate(ptx_params)) + "\n)"
    return SimpleNamespace(metadata=SimpleNamespace(**fields), function=7, src=SimpleNamespace(signature=signature),
                           asm={"ptx": ptx})  # fmt: skip


POINTER = ".u64 .ptr .global .align 1"


def test_direct_launch_templates_only_what_the_ptx_declares() -> None:
    """A compiled kernel launches directly only when its PTX entry declares exactly the parameters Triton's packing
    rules give its signature (the positional non-constexprs, then two scratch pointers), and Triton launches it
    with nothing but those and PDL; anything else keeps Triton's launcher."""
    signature = {"x": "*bf16", "n": "i32", "stride": "constexpr", "eps": "fp32", "big": "i64", "BLOCK": "constexpr"}
    ptx = [POINTER, ".u32", ".f32", ".u64", POINTER, POINTER]

    def template(compiled: SimpleNamespace, constexprs: tuple = (64,)):
        return _triton._direct_template(SimpleNamespace(compiled=compiled, constexprs=constexprs))

    assert template(_compiled(signature, ptx)) == (7, 128, 1024, False, ((0, "*"), (1, "i32"), (3, "fp32"),
                                                                          (4, "i64")))  # fmt: skip
    assert template(_compiled(signature, ptx, launch_pdl=True))[3] is True
    assert template(_compiled(signature, ptx[:-1])) is None  # one scratch pointer: another Triton
    assert template(_compiled(signature, [POINTER, ".f32", ".u32", *ptx[3:]])) is None  # types out of order
    assert template(_compiled(signature, [".u64", *ptx[1:]])) is None  # a pointer PTX does not declare as one
    assert template(_compiled(signature, ptx), constexprs=(1, 64)) is None  # a keyword argument the kernel takes
    assert template(_compiled(signature, ptx), constexprs=()) is not None  # a positional constexpr: dropped
    for change in ({"global_scratch_size": 16}, {"profile_scratch_size": 8}, {"num_ctas": 2},
                   {"launch_cooperative_grid": True}, {"tensordesc_meta": [{}]}):  # fmt: skip
        assert template(_compiled(signature, ptx, **change)) is None, change
    assert template(_compiled({**signature, "n": "i1"}, ptx)) is None  # a type whose packing is not modelled
    assert template(SimpleNamespace(**{**vars(_compiled(signature, ptx)), "function": None})) is None


def test_direct_launch_packs_scalars_as_tritons_launcher() -> None:
    """A step's parameters: a tensor argument by position, scalars as Triton's extractors pack them (an int in its
    width, two's complement; an fp32 as a C float); None for a value the parameter's type does not take; None
    without a cuLaunchKernelEx for the active driver (any driver but Triton's CUDA one, here)."""
    template = (7, 128, 1024, False, ((0, "*"), (1, "i32"), (3, "fp32"), (4, "i64")))
    args = (torch.empty(4), -2, 1, 1e-6, 2**40)
    assert _triton._direct_launch(template, args) is None  # this machine's driver: no direct launch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_triton, "direct_launch_driver", lambda active: (1, 2, 3, 4, 5))
        eps = int.from_bytes(struct.pack("<f", 1e-6), "little")
        params = ((1, 0), (0, 0xFFFF_FFFE), (0, eps), (0, 2**40), (0, 0), (0, 0))
        assert _triton._direct_launch(template, args) == ((1, 2, 3, 4, 5), 7, 128, 1024, False, params)
        assert _triton._direct_launch(template, (4, -2, 1, 1e-6, 2**40)) is None  # an int where a tensor goes
        assert _triton._direct_launch(template, (torch.empty(4), 2.5, 1, 1e-6, 2**40)) is None  # a float for an i32
        assert _triton._direct_launch(template, (torch.empty(4), -2, 1, 1e39, 2**40)) is None  # past float32
        assert _triton._direct_launch(None, args) is None


def test_direct_launch_driver_is_only_for_tritons_cuda_driver(monkeypatch) -> None:
    assert _triton.direct_launch_driver(object()) is None
    cuda_driver = type("CudaDriver", (), {"__module__": "triton.backends.nvidia.driver"})()
    monkeypatch.setenv(_triton.DIRECT_ENV, "0")
    assert _triton.direct_launch_driver(cuda_driver) is None  # the off switch
