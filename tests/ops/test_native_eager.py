"""The native eager path (csrc/eager.cpp): the LayerNorm forward's host work in C++, against the Python path.

Under Triton's interpreter (these tests) the native path's "launcher" is a closure over ``kernel[grid]``, so the
C++ argument lists, outputs and autograd node run for real and their results are compared bit for bit with the
Python eager path's. What it replays on a GPU is the launch cache's compiled launcher (tests/ops/test_launch_cache.py).
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from vitfast import _ext
from vitfast.ops import _triton

ln = importlib.import_module("vitfast.ops.layer_norm")

pytestmark = pytest.mark.skipif(
    ln._layer_norm_fwd_op.native is None, reason="no native eager path (the compiled extension is not loaded)"
)


@pytest.fixture
def native():
    """The extension's native LayerNorm entry point; its setup restored (and its cache emptied) afterwards."""
    yield _ext.module
    ln.register_ext()


def _setup(module, *, state=None, fill=None, backward=None) -> None:
    fill = fill or functools.partial(_triton.native_fill, ln._layer_norm_fwd_op)
    module.layer_norm_fwd_native_setup(
        state or ln._native_state, fill, backward or ln._layer_norm_grads, True, ln.MAX_WIDTH
    )


def _counting_fill(calls: list, op=None, **options):
    """A fill (``native_fill`` of ``op``, LayerNorm's by default) that records each call in ``calls``."""

    def fill(*args):
        calls.append(args)
        return _triton.native_fill(op or ln._layer_norm_fwd_op, *args, **options)

    return fill


VARIANTS = ("plain", "no parameters", "residual", "residual + gamma")


def _inputs(variant: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    cols = shape[-1]

    def leaf(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(dtype).requires_grad_()

    x = leaf(*shape)
    branch = leaf(*shape) if variant.startswith("residual") else None
    gamma = leaf(cols) if variant == "residual + gamma" else None
    weight, bias = (None, None) if variant == "no parameters" else (leaf(cols), leaf(cols))
    return x, branch, gamma, weight, bias


def _run(inputs, eps: float = 1e-5):
    """The op's outputs and the gradients of every input, through whichever path the op takes."""
    outputs = ln._layer_norm_fwd_op(*inputs, eps)
    out, residual_out = outputs[0], outputs[1]
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    loss = (out.float() * weights).sum()
    if residual_out.numel():
        loss = loss + (residual_out.float() * weights.flip(0)).sum()
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outputs], list(grads)


def _assert_same(a, b) -> None:
    for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(3, 5, 48), (1, 33), (7, 130)])
def test_native_matches_the_python_path_bit_for_bit(monkeypatch, native, variant, shape, dtype) -> None:
    """Outputs (out, residual_out, mean, rstd) and every gradient: the first call (the Python launcher fills the
    cache) and the second (the C++ replay) equal the Python path exactly, at odd widths and row counts too."""
    fills: list = []
    _setup(native, fill=_counting_fill(fills))
    inputs = _inputs(variant, shape, dtype)
    with monkeypatch.context() as m:
        m.setattr(ln._layer_norm_fwd_op, "native", None)
        expected = _run(inputs)
    before = native.native_launches()["layer_norm"]
    first = _run(inputs)
    assert len(fills) == 1 and native.native_launches()["layer_norm"] == before + 1
    replayed = _run(inputs)
    assert len(fills) == 1, "the second call went through the Python launcher instead of the cached launch"
    _assert_same(first, expected)
    _assert_same(replayed, expected)


def test_native_node_saves_what_the_python_node_saves(monkeypatch) -> None:
    """The same tensors saved for backward (through saved_tensors_hooks, so recomputation and offloading see them)."""

    def saved(native_path: bool) -> list[tuple]:
        seen: list[tuple] = []

        def pack(t: torch.Tensor):
            seen.append((tuple(t.shape), t.dtype))
            return t

        inputs = _inputs("residual + gamma", (4, 24), torch.bfloat16)
        with monkeypatch.context() as m:
            if not native_path:
                m.setattr(ln._layer_norm_fwd_op, "native", None)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = ln._layer_norm_fwd_op(*inputs, 1e-6)[0]
        out.float().sum().backward()
        return seen

    assert saved(True) == saved(False)


def test_native_declines_what_it_does_not_take(native) -> None:
    """NotImplemented (the Python path then runs, and raises its own errors) for anything outside its contract."""
    x, w = torch.randn(4, 16), torch.randn(16)
    eps = 1e-6
    declined = {
        "non-contiguous x": (x.t().contiguous().t(), None, None, None, None, eps),
        "broadcast branch": (x, torch.randn(16).expand(4, 16), None, None, None, eps),
        "gamma without a branch": (x, None, w, None, None, eps),
        "weight of another width": (x, None, None, torch.randn(8), None, eps),
        "strided weight": (x, None, None, torch.randn(32)[::2], None, eps),
        "float64 x": (x.double(), None, None, None, None, eps),
        "int eps": (x, None, None, None, None, 0),
        "no rows": (torch.randn(0, 16), None, None, None, None, eps),
        "a tensor subclass": (x.as_subclass(_Sub), None, None, None, None, eps),
        "a meta tensor": (torch.empty(4, 16, device="meta"), None, None, None, None, eps),
        "wider than the kernels": (torch.randn(1, ln.MAX_WIDTH + 1), None, None, None, None, eps),
        "wrong arity": (x, None, None, None, None),
    }
    for what, args in declined.items():
        assert native.layer_norm_fwd_native(*args) is NotImplemented, what
    # and the public path still says what was wrong
    with pytest.raises(ValueError, match="weight must have shape"):
        ln._layer_norm_fwd_op(x, None, None, torch.randn(8), None, eps)


class _Sub(torch.Tensor):
    pass


def test_native_does_not_replay_a_launch_whose_arguments_differ(native) -> None:
    """A fill whose recorded launch did not use the arguments the C++ side would pass is not cached."""

    def fill(*args):
        outputs, launch = _triton.native_fill(ln._layer_norm_fwd_op, *args)
        recorded = list(launch[5])
        recorded[0] = recorded[0].clone()  # another tensor in x's slot
        return outputs, (*launch[:5], tuple(recorded))

    _setup(native, fill=fill)
    inputs = _inputs("plain", (3, 16), torch.float32)
    out = ln._layer_norm_fwd_op(*inputs, 1e-6)[0]
    assert native.native_launches()["layer_norm"] == 0
    torch.testing.assert_close(out, ln.layer_norm_ref(inputs[0], inputs[3], inputs[4], 1e-6), rtol=1e-5, atol=1e-5)


def test_native_leaves_the_call_to_python_when_no_replay_may_run(native, monkeypatch) -> None:
    """The state callback says no (a launch hook is set, say): NotImplemented, and the Python path runs."""
    _setup(native, state=lambda: None)
    x = torch.randn(3, 16)
    assert native.layer_norm_fwd_native(x, None, None, None, None, 1e-6) is NotImplemented
    calls = []
    monkeypatch.setattr(ln._layer_norm_fwd_op, "fn", lambda *a: calls.append(a) or ln._layer_norm_fwd_reference(*a))
    ln._layer_norm_fwd_op(x, None, None, None, None, 1e-6)
    assert len(calls) == 1


def test_native_keys_launches_by_the_plan_settings(native, monkeypatch) -> None:
    """A module setting the launch plan reads (_TILE) is part of the key: changed, the launch is planned anew."""
    _setup(native)
    inputs = _inputs("plain", (64, 32), torch.float32)
    _run(inputs)
    count = native.native_launches()["layer_norm"]
    monkeypatch.setattr(ln, "_TILE", ln._TILE // 4)
    with monkeypatch.context() as m:
        m.setattr(ln._layer_norm_fwd_op, "native", None)
        expected = _run(inputs)
    _assert_same(_run(inputs), expected)
    assert native.native_launches()["layer_norm"] == count + 1


def test_native_backward_errors_reach_the_caller(native) -> None:
    def backward(*args):
        raise ValueError("the backward failed here")

    _setup(native, backward=backward)
    x = torch.randn(3, 16, requires_grad=True)
    out = ln._layer_norm_fwd_op(x, None, None, None, None, 1e-6)[0]
    with pytest.raises(ValueError, match="the backward failed here"):
        out.sum().backward()


def test_native_saved_inputs_are_version_checked() -> None:
    """x modified in place after the forward: backward refuses, as for any autograd node."""
    x = torch.randn(3, 16)
    leaf = torch.randn(16, requires_grad=True)
    out = ln._layer_norm_fwd_op(x, None, None, leaf, None, 1e-6)[0]
    assert out.grad_fn.name().endswith("LayerNormFunction>")
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_native_path_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv(_triton.NATIVE_ENV, "0")
    assert _triton.native_function("layer_norm_fwd_native") is None
    monkeypatch.delenv(_triton.NATIVE_ENV)
    assert _triton.native_function("layer_norm_fwd_native") is not None


# ------------------------------------------------------------------------------------------------------ attention

attn = importlib.import_module("vitfast.ops.attention")


@pytest.fixture
def attention_native():
    if attn._attention_fwd_op.native is None:
        pytest.skip("no native attention path")
    yield _ext.module
    attn.register_ext()


def _attention_leaves(layout: str, dtype: torch.dtype, shape=(2, 2, 19, 32)):
    generator = torch.Generator().manual_seed(1)
    batch, heads, tokens, head_dim = shape
    if layout == "contiguous":
        return [torch.randn(*shape, generator=generator).to(dtype).requires_grad_() for _ in range(3)]
    # timm's fused qkv projection: q, k, v are strided views of one [B, N, 3, H, D] tensor
    return [torch.randn(batch, tokens, 3, heads, head_dim, generator=generator).to(dtype).requires_grad_()]


def _attention_run(leaves, scale=None):
    q, k, v = leaves if len(leaves) == 3 else leaves[0].permute(2, 0, 3, 1, 4).unbind(0)
    out = attn._attention_triton(q, k, v, scale)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out.float() * weights).sum(), leaves)
    return [out.detach()], list(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "fused qkv view"])
def test_native_attention_matches_the_python_path_bit_for_bit(monkeypatch, attention_native, layout, dtype) -> None:
    """Output and dq / dk / dv, first call (fill) and second (replay), against the Python path; strided q, k, v
    (timm's fused projection) are read in place on both."""
    fills: list = []

    fill = _counting_fill(fills, attn._attention_fwd_op)

    attention_native.attention_fwd_native_setup(
        attn._native_state, fill, attn._attention_grads, True, tuple(attn.KERNEL_HEAD_DIMS), attn.math.log2(attn.math.e)
    )
    leaves = _attention_leaves(layout, dtype)
    with monkeypatch.context() as m:
        m.setattr(attn._attention_fwd_op, "native", None)
        expected = _attention_run(leaves)
    first = _attention_run(leaves)
    replayed = _attention_run(leaves)
    assert len(fills) == 1 and attention_native.native_launches()["attention"] == 1
    _assert_same(first, expected)
    _assert_same(replayed, expected)
    # another scale is another specialization (its scale * log2(e) is an argument the replay passes as recorded)
    _assert_same(_attention_run(leaves, 0.5), _run_python_attention(monkeypatch, leaves, 0.5))
    assert len(fills) == 2


def _run_python_attention(monkeypatch, leaves, scale):
    with monkeypatch.context() as m:
        m.setattr(attn._attention_fwd_op, "native", None)
        return _attention_run(leaves, scale)


def test_native_attention_declines_what_it_does_not_take(attention_native) -> None:
    q = torch.randn(1, 2, 5, 32)
    table, index = torch.randn(9, 2), torch.zeros(5, 5, dtype=torch.long)
    declined = {
        "a relative position bias": (q, q, q, 0.1, table, index, None),
        "a dense bias": (q, q, q, 0.1, None, None, torch.randn(2, 5, 5)),
        "a head dim the kernels lack": (torch.randn(1, 2, 5, 24),) * 3 + (0.1, None, None, None),
        "k of another shape": (q, torch.randn(1, 2, 6, 32), q, 0.1, None, None, None),
        "v of another dtype": (q, q, q.half(), 0.1, None, None, None),
        "3-d q": (q[0], q[0], q[0], 0.1, None, None, None),
        "an int scale": (q, q, q, 1, None, None, None),
        "no tokens": (torch.randn(1, 2, 0, 32),) * 3 + (0.1, None, None, None),
    }
    for what, args in declined.items():
        assert attention_native.attention_fwd_native(*args) is NotImplemented, what


def test_native_attention_node() -> None:
    if attn._attention_fwd_op.native is None:
        pytest.skip("no native attention path")
    q = torch.randn(1, 2, 5, 32, requires_grad=True)
    out = attn._attention_fwd_op(q, q.detach(), q.detach(), 0.125, None, None, None)[0]
    assert out.grad_fn.name().endswith("vitfast::eager::AttentionFunction>")
    assert out.stride() == (5 * 2 * 32, 32, 2 * 32, 1)  # [B, H, N, D] view of a contiguous [B, N, H, D]


# ------------------------------------------------------------------------------------------- SwiGLU + sub-LN

sw = importlib.import_module("vitfast.ops.swiglu")

SUB_LN_CASES = {
    "plain": ((3, 5, 48), None, "input"),
    "fp32 parameters": ((4, 24), None, torch.float32),
    "true width in padded rows, [width] parameters": ((7, 40), 36, "input"),
    "true width in padded rows, padded parameters": ((2, 40), 36, "padded"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(SUB_LN_CASES))
def test_native_swiglu_layer_norm_matches_the_python_path_bit_for_bit(monkeypatch, case, dtype) -> None:
    """EVA-02's sub-LN: output and the four gradients, fill and replay, against the Python path, also for the
    zero-padded row layout (norm over the true width) with [width] or padded parameters."""
    if sw._swiglu_layer_norm_fwd_op.native is None:
        pytest.skip("no native SwiGLU + sub-LN path")
    fills: list = []

    fill = _counting_fill(fills, sw._swiglu_layer_norm_fwd_op)

    _ext.module.swiglu_layer_norm_fwd_native_setup(
        _triton.native_state, fill, sw._swiglu_layer_norm_grads, True, sw.MAX_LAYER_NORM_WIDTH
    )
    try:
        shape, width, params = SUB_LN_CASES[case]
        generator = torch.Generator().manual_seed(2)

        def leaf(*size, dt=dtype):
            return torch.randn(*size, generator=generator).to(dt).requires_grad_()

        gate, up = leaf(*shape), leaf(*shape)
        param_width = shape[-1] if width is None or params == "padded" else width
        weight = leaf(param_width, dt=params if isinstance(params, torch.dtype) else dtype)
        bias = leaf(param_width)

        def run():
            out = sw._swiglu_layer_norm_triton(gate, up, weight, bias, 1e-6, width)
            weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
            return [out.detach()], list(torch.autograd.grad((out.float() * weights).sum(), [gate, up, weight, bias]))

        with monkeypatch.context() as m:
            m.setattr(sw._swiglu_layer_norm_fwd_op, "native", None)
            expected = run()
        first, replayed = run(), run()
        assert len(fills) == 1 and _ext.module.native_launches()["swiglu_layer_norm"] == 1
        _assert_same(first, expected)
        _assert_same(replayed, expected)
        assert (
            sw._swiglu_layer_norm_fwd_op(gate, up, weight, bias, 1e-6, width or shape[-1])[0]
            .grad_fn.name()
            .endswith("vitfast::eager::SwigluLayerNormFunction>")
        )
    finally:
        sw.register_ext()


def test_native_swiglu_layer_norm_declines_what_it_does_not_take() -> None:
    if sw._swiglu_layer_norm_fwd_op.native is None:
        pytest.skip("no native SwiGLU + sub-LN path")
    g, w = torch.randn(4, 16), torch.randn(16)
    native = _ext.module.swiglu_layer_norm_fwd_native
    declined = {
        "strided gate": (torch.randn(4, 32)[:, :16], g, w, w, 1e-6, 16),
        "up of another shape": (g, torch.randn(4, 8), w, w, 1e-6, 16),
        "no weight": (g, g, None, w, 1e-6, 16),
        "weight of another width": (g, g, torch.randn(12), w, 1e-6, 16),
        "weight and bias of different lengths": (g, g, torch.randn(12), w, 1e-6, 12),
        "width past the rows": (g, g, w, w, 1e-6, 17),
        "width 0": (g, g, w, w, 1e-6, 0),
        "float64": (g.double(), g.double(), w, w, 1e-6, 16),
        "int eps": (g, g, w, w, 0, 16),
        "no rows": (torch.randn(0, 16), torch.randn(0, 16), w, w, 1e-6, 16),
    }
    for what, args in declined.items():
        assert native(*args) is NotImplemented, what


# ------------------------------------------------------------------------------------------------------ 2D RoPE

rope = importlib.import_module("vitfast.ops.rope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "fused qkv view", "one angle per pair"])
def test_native_rope_matches_the_python_path_bit_for_bit(monkeypatch, layout, dtype) -> None:
    """q_out, k_out and dq, dk (the backward is the inverse rotation, itself a native call): fill, then replay."""
    if rope._rope_2d_qk_op.native is None:
        pytest.skip("no native RoPE path")
    fills: list = []

    fill = _counting_fill(fills, rope._rope_2d_qk_op)

    _ext.module.rope_2d_qk_native_setup(rope._native_state, fill, rope._rope_2d_qk_grads, True)
    try:
        batch, heads, side, head_dim = 2, 3, 3, 32
        tokens = side * side + 1
        cos, sin = rope.rope_2d_table((side, side), head_dim)
        if layout == "one angle per pair":
            cos, sin = cos[:, ::2].contiguous(), sin[:, ::2].contiguous()
        generator = torch.Generator().manual_seed(3)
        if layout == "fused qkv view":
            leaves = [torch.randn(batch, tokens, 3, heads, head_dim, generator=generator).to(dtype).requires_grad_()]
        else:
            shape = (batch, heads, tokens, head_dim)
            leaves = [torch.randn(*shape, generator=generator).to(dtype).requires_grad_() for _ in range(2)]

        def run():
            q, k = leaves if len(leaves) == 2 else leaves[0].permute(2, 0, 3, 1, 4).unbind(0)[:2]
            q_out, k_out = rope._rope_2d_qk_triton(q, k, cos, sin, 1)
            weights = torch.linspace(-1.0, 1.0, q_out.numel()).reshape(q_out.shape)
            loss = (q_out.float() * weights).sum() + (k_out.float() * weights.flip(0)).sum()
            return [q_out.detach(), k_out.detach()], list(torch.autograd.grad(loss, leaves))

        with monkeypatch.context() as m:
            m.setattr(rope._rope_2d_qk_op, "native", None)
            expected = run()
        first = run()
        launches = _ext.module.native_launches()["rope_2d_qk"]
        assert len(fills) == launches == 2  # the rotation and the backward's inverse rotation
        replayed = run()
        assert len(fills) == 2
        _assert_same(first, expected)
        _assert_same(replayed, expected)
    finally:
        rope.register_ext()


def test_native_rope_declines_what_it_does_not_take() -> None:
    if rope._rope_2d_qk_op.native is None:
        pytest.skip("no native RoPE path")
    q = torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(4, 8), torch.randn(4, 8)
    native = _ext.module.rope_2d_qk_native
    declined = {
        "3-d q": (q[0], q[0], cos, sin, 1, False),
        "a strided head dim": (q.transpose(2, 3).contiguous().transpose(2, 3), q, cos, sin, 1, False),
        "k of another shape": (q, torch.randn(1, 2, 6, 8), cos, sin, 1, False),
        "a table of the wrong length": (q, q, torch.randn(5, 8), torch.randn(5, 8), 1, False),
        "tables of different strides": (q, q, cos, torch.randn(8, 4).t(), 1, False),
        "prefix past the tokens": (q, q, cos, sin, 6, False),
        "an int for inverse": (q, q, cos, sin, 1, 0),
        "float64": (q.double(), q.double(), cos, sin, 1, False),
    }
    for what, args in declined.items():
        assert native(*args) is NotImplemented, what


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the native path's real launches need a GPU")
def test_gpu_native_paths_match_the_python_paths_and_capture(monkeypatch) -> None:
    """On a GPU (the replay calls Triton's compiled launcher there): ViT-B/16 bs 8 shapes in bf16, LayerNorm,
    residual LayerNorm, attention, EVA-02-B's sub-LN and 2D RoPE bitwise equal to the Python path, forward and
    backward; and
    inside a CUDA graph capture (the replay launches on the capturing stream)."""
    device = torch.device("cuda")
    ln.register_ext()
    attn.register_ext()
    sw.register_ext()
    rope.register_ext()
    x, branch = (torch.randn(8, 197, 768, device=device, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    w, b = (torch.randn(768, device=device, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    qkv = torch.randn(8, 197, 3, 12, 64, device=device, dtype=torch.bfloat16).requires_grad_()
    # EVA-02-B's sub-LN: hidden 2048
    gate, up = (torch.randn(8, 197, 2048, device=device, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    sub_w, sub_b = (torch.randn(2048, device=device, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    cos, sin = rope.rope_2d_table((14, 14), 64, device=device)

    def calls():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        outs = [
            ln._layer_norm_fwd_op(x, None, None, w, b, 1e-6)[0],
            *ln._layer_norm_fwd_op(x, branch, None, w, b, 1e-6)[:2],
        ]
        outs.append(attn._attention_triton(q, k, v))
        outs.append(sw._swiglu_layer_norm_triton(gate, up, sub_w, sub_b, 1e-6))
        outs.extend(rope._rope_2d_qk_triton(q, k, cos, sin, 1))
        leaves = [x, branch, w, b, qkv, gate, up, sub_w, sub_b]
        grads = torch.autograd.grad([o.float().square().sum() for o in outs], leaves)
        return [o.detach() for o in outs] + list(grads)

    with monkeypatch.context() as m:
        m.setattr(ln._layer_norm_fwd_op, "native", None)
        m.setattr(attn._attention_fwd_op, "native", None)
        m.setattr(sw._swiglu_layer_norm_fwd_op, "native", None)
        m.setattr(rope._rope_2d_qk_op, "native", None)
        expected = calls()
    native_ops = (ln._layer_norm_fwd_op, attn._attention_fwd_op, sw._swiglu_layer_norm_fwd_op, rope._rope_2d_qk_op)
    if any(op.native is None for op in native_ops):
        pytest.skip("no native eager path (the compiled extension is not loaded for this torch)")
    for _ in range(2):  # fill, then replay
        got = calls()
        assert all(torch.equal(a, e) for a, e in zip(got, expected, strict=True))
    assert _ext.module.native_launches()["layer_norm"] >= 2 and _ext.module.native_launches()["attention"] >= 1
    with torch.no_grad():
        static_x = x.detach().clone()
        ln._layer_norm_fwd_op(static_x, None, None, w.detach(), b.detach(), 1e-6)  # warm (filled above)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ln._layer_norm_fwd_op(static_x, None, None, w.detach(), b.detach(), 1e-6)[0]
        static_x.copy_(x.detach().flip(0))
        graph.replay()
        torch.cuda.synchronize()
        reference = ln.layer_norm_ref(static_x, w.detach(), b.detach(), 1e-6)
        torch.testing.assert_close(static_out.float(), reference.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_native_paths_cache_their_launches_on_the_compiled_launch_path(tmp_path) -> None:
    """Off the interpreter (the host-overhead probe's stand-in sm_90 driver: Triton compiles, its launch cache fills,
    the launch is a no-op), each native path caches the launch cache's entry and replays it: a path that never
    cached would run the Python launcher, and more, on every call."""
    from tests.helpers import offline_report

    result = offline_report("benchmarks.host_overhead", tmp_path / "probe.json", 600, "--calls", "2", "--repeats", "1")
    assert result["native_launches"] is not None, "the probe's process did not load the compiled extension"
    assert result["native_launches"]["layer_norm"] >= 2  # plain and residual
    assert result["native_launches"]["attention"] >= 1
    assert result["native_launches"]["swiglu_layer_norm"] >= 1
    assert result["native_launches"]["rope_2d_qk"] >= 2  # the rotation and its inverse (the backward)


def test_jit_trace_records_the_registered_op_not_a_direct_launch() -> None:
    """Under torch.jit.trace neither eager path runs (a launch made outside the dispatcher would be missing from the
    trace, whose replay would return the outputs' uninitialized memory): the trace holds vitfast::layer_norm_fwd and
    computes LayerNorm of new inputs."""
    import warnings

    import vitfast

    x, w, b = torch.randn(4, 32), torch.randn(32), torch.randn(32)

    def f(x, w, b):
        return ln.layer_norm(x, w, b) * 2

    with vitfast.use_backend("triton"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace's deprecation and tracer warnings
        traced = torch.jit.trace(f, (x, w, b))
    assert "vitfast::layer_norm_fwd" in str(traced.graph)
    x2 = torch.randn(4, 32)
    with vitfast.use_backend("triton"), torch.no_grad():
        torch.testing.assert_close(traced(x2, w, b), 2 * ln.layer_norm_ref(x2, w, b, 1e-6), rtol=1e-5, atol=1e-5)
