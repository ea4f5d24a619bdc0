"""The lean eager launch path of ``vitfast.ops._triton``: launch plans memoized on the direct path, rows without a
reshape, allocations with int sizes, the launch cache's inline key.

A memo whose key misses something its plan depends on would launch a kernel with another problem's grid or block
sizes, a silent wrong answer. So every launcher is run on the direct path over calls that change one property at a
time (dtype, shape, strides, flags, eps, the settings tests patch) with the memo kept, and again with it emptied
before each call: the launches (kernel, grid, every scalar argument, every constexpr, every tensor's dtype and
layout) must be the same. The launches are recorded, not run (nothing is computed), so the tests take ~1 s.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitfast.ops import _triton

pytest.importorskip("triton")

ln = importlib.import_module("vitfast.ops.layer_norm")
sw = importlib.import_module("vitfast.ops.swiglu")
rope = importlib.import_module("vitfast.ops.rope")
attn = importlib.import_module("vitfast.ops.attention")
lin = importlib.import_module("vitfast.ops.linear")

MEMOS = [
    ln._fwd_plan,
    ln._bwd_plan,
    sw._elementwise_plan,
    sw._layer_norm_fwd_plan,
    sw._layer_norm_bwd_plan,
    rope._rope_plan,
    attn._fwd_plan,
    attn._bwd_plan,
    lin._launch_plan,
]


@contextlib.contextmanager
def _direct_path():
    """Inside an :class:`EagerOp`'s direct call, as its body runs there."""
    _triton._direct.depth += 1
    try:
        yield
    finally:
        _triton._direct.depth -= 1


def _describe(value):
    if isinstance(value, torch.Tensor):
        return "tensor", value.dtype, tuple(value.shape), value.stride(), value.is_contiguous()
    return value


class _Recorder:
    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def __call__(self, kernel, grid, *args, **kwargs) -> None:
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        self.launches.append((name, grid, tuple(map(_describe, args)), tuple(sorted(kwargs.items()))))


def _calls() -> list:
    """Launcher calls, each changing one property the plans may depend on."""

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype)

    def ln_fwd(x, branch=None, gamma=None, weight=None, bias=None, eps=1e-6):
        return lambda: ln.layer_norm_fwd(x, branch, gamma, weight, bias, eps)

    def ln_bwd(x, weight=None, bias=None):
        stats = x.shape[:-1]
        return lambda: ln.layer_norm_bwd(
            torch.randn_like(x), None, x, None, None, weight, bias, torch.zeros(stats), torch.ones(stats)
        )

    def q(batch=2, heads=2, tokens=17, dim=32, dtype=torch.float32):
        return t(batch, heads, tokens, dim, dtype=dtype)

    def attention_fwd(qkv, **bias):
        return lambda: attn.attention_fwd(*qkv, 0.125, **bias)

    def attention_bwd(qkv):
        out = torch.randn_like(qkv[0])
        lse = torch.zeros(qkv[0].shape[:-1])
        return lambda: attn.attention_bwd(torch.randn_like(out), *qkv, out, lse, 0.125)

    cos, sin = rope.rope_2d_table((4, 4), 32)
    wide = t(6, 40)
    return [
        ln_fwd(t(5, 33)),
        ln_fwd(t(5, 33, dtype=torch.bfloat16)),  # dtype
        ln_fwd(t(9, 33)),  # rows
        ln_fwd(t(5, 64)),  # width
        ln_fwd(t(2, 5, 33)),  # rank
        ln_fwd(wide[:, :33]),  # strided rows (a view)
        ln_fwd(t(33, 5).t()),  # no unit column stride (copied)
        ln_fwd(t(5, 33), weight=t(33), bias=t(33)),  # flags
        ln_fwd(t(5, 33), branch=t(5, 33), gamma=t(33)),
        ln_fwd(t(5, 33), eps=1e-5),  # eps
        ln_bwd(t(5, 33)),
        ln_bwd(t(5, 33), weight=t(33), bias=t(33)),
        ln_bwd(t(40, 33), weight=t(33)),
        lambda: sw.swiglu_fwd(t(3, 40), t(3, 40)),
        lambda: sw.swiglu_fwd(t(3, 40, dtype=torch.float16), t(3, 40, dtype=torch.float16)),
        lambda: sw.swiglu_fwd(t(3, 1100), t(3, 1100)),
        lambda: sw.swiglu_fwd(wide[:, :20], wide[:, 20:]),
        lambda: sw.swiglu_bwd(t(3, 40), t(3, 40), t(3, 40)),
        lambda: sw.swiglu_packed_fwd(t(3, 80)),
        lambda: sw.swiglu_packed_bwd(t(3, 40), t(3, 80)),
        lambda: sw.swiglu_layer_norm_fwd(t(3, 40), t(3, 40), t(40), t(40), 1e-6),
        lambda: sw.swiglu_layer_norm_fwd(t(70, 40), t(70, 40), t(40), t(40), 1e-6),
        lambda: sw.swiglu_layer_norm_bwd(t(3, 40), t(3, 40), t(3, 40), t(40), torch.zeros(3), torch.ones(3)),
        lambda: sw.swiglu_layer_norm_bwd(t(70, 40), t(70, 40), t(70, 40), t(40), torch.zeros(70), torch.ones(70)),
        lambda: rope.rope_2d_qk_fwd(q(), q(), cos, sin, 1),
        lambda: rope.rope_2d_qk_fwd(q(dtype=torch.bfloat16), q(dtype=torch.bfloat16), cos, sin, 1),
        lambda: rope.rope_2d_qk_fwd(q(), q(), cos, sin, 1, inverse=True),
        lambda: rope.rope_2d_qk_fwd(q(heads=3), q(heads=3), cos, sin, 1),
        lambda: rope.rope_2d_qk_fwd(q(batch=3), q(batch=3), cos, sin, 1),
        # head strides of 3 * 32: no multiple of 8 bf16 elements... of 16 bytes for fp32 either way; a packed qkv
        lambda: rope.rope_2d_qk_fwd(*t(2, 17, 2, 3, 32).permute(3, 0, 2, 1, 4)[:2], cos, sin, 1),
        lambda: rope.rope_2d_qk_fwd(*t(2, 17, 2, 3, 34).permute(3, 0, 2, 1, 4)[:2, ..., :32], cos, sin, 1),
        attention_fwd((q(), q(), q())),
        attention_fwd((q(dtype=torch.float16), q(dtype=torch.float16), q(dtype=torch.float16))),
        attention_fwd((q(tokens=300), q(tokens=300), q(tokens=300))),
        attention_fwd((q(dim=64), q(dim=64), q(dim=64))),
        attention_fwd(tuple(t(2, 17, 3, 2, 36).permute(2, 0, 3, 1, 4)[..., :32])),  # head stride not 16-byte aligned
        attention_fwd((q(), q(), q()), bias=t(2, 17, 17)),
        attention_bwd((q(), q(), q())),
        attention_bwd((q(dtype=torch.bfloat16), q(dtype=torch.bfloat16), q(dtype=torch.bfloat16))),
        attention_bwd(tuple(t(2, 17, 3, 2, 36).permute(2, 0, 3, 1, 4)[..., :32])),
        lambda: lin.linear_fwd(t(5, 32), t(48, 32), t(48), None),
        lambda: lin.linear_fwd(t(5, 32), t(48, 32), None, "gelu"),
        lambda: lin.linear_fwd(t(700, 32), t(48, 32), None, "gelu"),  # the large-M tiles
        lambda: lin.linear_fwd(t(5, 32, dtype=torch.float16), t(48, 32, dtype=torch.float16), None, "quick_gelu"),
        lambda: lin.linear_fwd(t(2, 3, 32), t(48, 32), None, None),
    ]


def _record(monkeypatch, calls, clear_each: bool, clear_first: bool = True) -> list:
    recorder = _Recorder()
    for module in (ln, sw, rope, attn, lin):
        monkeypatch.setattr(module, "launch", recorder)
    for memo in MEMOS if clear_first else ():
        memo.cache_clear()
    with _direct_path():
        for call in calls:
            if clear_each:
                for memo in MEMOS:
                    memo.cache_clear()
            call()
    return recorder.launches


def test_memoized_plans_launch_what_fresh_plans_launch(monkeypatch) -> None:
    """Every launcher, on the direct path, makes the same launches with its memos kept (each call after the first
    of its kind served from them) as with the memos emptied before each call."""
    calls = _calls()
    fresh = _record(monkeypatch, calls, clear_each=True)
    memoized = _record(monkeypatch, calls * 2, clear_each=False)  # the second round all from the memos
    assert len(fresh) >= len(calls)
    assert memoized == fresh * 2
    assert all(memo.memo for memo in MEMOS), "a plan was never memoized: the test covers less than it says"


@pytest.mark.parametrize("setting", ["layer_norm tile", "layer_norm sm count", "swiglu interpreter", "fwd small n"])
def test_memo_keys_follow_the_settings_tests_patch(monkeypatch, setting: str) -> None:
    """A setting a plan reads (and a test may set) is in the memo's key: changing it after a memoized call changes
    the launch as it would without the memo."""
    calls = {
        "layer_norm tile": lambda: ln.layer_norm_fwd(torch.randn(300, 512), None, None, None, None, 1e-6),
        "layer_norm sm count": lambda: ln.layer_norm_fwd(torch.randn(300, 512), None, None, None, None, 1e-6),
        "swiglu interpreter": lambda: sw.swiglu_fwd(torch.randn(30, 1100), torch.randn(30, 1100)),
        "fwd small n": lambda: attn.attention_fwd(*(torch.randn(1, 2, 200, 32, dtype=torch.bfloat16),) * 3, 0.1),
    }
    change = {
        "layer_norm tile": lambda: monkeypatch.setattr(ln, "_TILE", 4096),
        "layer_norm sm count": lambda: monkeypatch.setattr(ln, "_sm_count", lambda device: 2),
        "swiglu interpreter": lambda: monkeypatch.setattr(sw, "INTERPRETER", False),
        "fwd small n": lambda: monkeypatch.setattr(attn, "FWD_SMALL_N", 128),
    }
    call = calls[setting]
    if setting == "fwd small n":  # the GPU tiles (the interpreter's do not read FWD_SMALL_N)
        monkeypatch.setattr(attn, "INTERPRETER", False)
    before = _record(monkeypatch, [call, call], clear_each=False)  # the second launch from the memo
    change[setting]()
    memoized = _record(monkeypatch, [call, call], clear_each=False, clear_first=False)  # the first setting's entry kept
    fresh = _record(monkeypatch, [call], clear_each=True)
    assert before[0] == before[1] and before[0] != fresh[0], "the setting changes nothing: the test proves nothing"
    assert memoized == fresh * 2


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_memo_is_read_on_the_direct_path_only(monkeypatch) -> None:
    """A poisoned memo entry is what the direct path launches (so the memo is read there), and neither the
    launcher called on its own nor the registered op (under a dispatch mode, as under tracing) ever reads it."""
    x = torch.randn(7, 48)
    recorder = _Recorder()
    monkeypatch.setattr(ln, "launch", recorder)
    ln._fwd_plan.cache_clear()
    with _direct_path():
        ln.layer_norm_fwd(x, None, None, None, None, 1e-6)
    (key,) = ln._fwd_plan.memo
    true_grid = recorder.launches[0][1]
    ln._fwd_plan.memo[key] = (999, 1, 64, 1)
    recorder.launches.clear()
    ln._layer_norm_fwd_op(x, None, None, None, None, 1e-6)  # untraced: the direct path
    ln.layer_norm_fwd(x, None, None, None, None, 1e-6)  # the launcher on its own
    with _PassThrough():
        ln._layer_norm_fwd_op(x, None, None, None, None, 1e-6)  # the registered op
    ln._fwd_plan.cache_clear()
    assert [launch[1] for launch in recorder.launches] == [(999,), true_grid, true_grid]


def test_memo_is_bounded() -> None:
    calls = []

    @_triton.eager_memo
    def plan(n: int) -> int:
        calls.append(n)
        return n + 1

    with _direct_path():
        results = [plan(n) for n in range(_triton._MEMO_SIZE + 10)] + [plan(0), plan(_triton._MEMO_SIZE + 9)]
    assert results[-2:] == [1, _triton._MEMO_SIZE + 10]
    assert len(plan.memo) <= _triton._MEMO_SIZE
    assert calls.count(0) == 2 and calls.count(_triton._MEMO_SIZE + 9) == 1  # cleared once it was full, then hits
    assert [plan(5), plan(5)] == [6, 6] and calls.count(5) == 3  # off the direct path: computed every time


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 6),
        lambda: torch.randn(2, 3, 6),
        lambda: torch.randn(6, 4).t(),  # column stride 4: copied
        lambda: torch.randn(4, 9)[:, :6],  # strided rows: a view
        lambda: torch.randn(0, 6),
        lambda: torch.randn(1, 6).expand(3, 6),  # row stride 0, unit column stride: a view (rows alias)
    ],
    ids=["contiguous", "3-d", "transposed", "strided-rows", "empty", "broadcast"],
)
def test_rows_2d_addresses_the_same_elements_on_and_off_the_direct_path(make) -> None:
    t = make()
    off = _triton.rows_2d(t, 6)
    with _direct_path():
        on = _triton.rows_2d(t, 6)
    assert off[0].dim() == 2 and off[0].shape == (off[1], 6) and off[2] == off[0].stride(0)
    assert (on[1], on[2]) == (off[1], off[2])
    for rows, n_rows, row_stride in (on, off):  # element (r, c) lies at data_ptr + r * row_stride + c
        flat = torch.as_strided(rows, (n_rows, 6), (row_stride, 1))
        torch.testing.assert_close(flat, t.reshape(-1, 6), rtol=0, atol=0)
    if t.is_contiguous():
        assert on[0] is t  # no reshape on the direct path


@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), torch.Size([2, 3, 4])])
def test_empty_is_torch_empty(shape) -> None:
    got = _triton.empty(shape, torch.bfloat16, torch.device("cpu"))
    want = torch.empty(shape, dtype=torch.bfloat16)
    assert (got.shape, got.stride(), got.dtype, got.device) == (want.shape, want.stride(), want.dtype, want.device)


def test_launch_cache_args_key_tells_apart_what_the_per_argument_key_does() -> None:
    """Two arguments have one inline key exactly when they have one :func:`_arg_key` (which
    tests/ops/test_launch_cache.py checks against Triton's own specializer), whatever kinds of value meet at one
    position."""
    base = torch.empty(16, dtype=torch.float32)
    values = [
        base,
        base[1:],
        base[4:],
        torch.empty(8, dtype=torch.float16)[4:],
        torch.nn.Parameter(torch.empty(4)),
        *(0, 1, 2, 15, 16, 17, 33, -16, -1, 2**31 - 1, 2**31, 2**32 + 1, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63),
        0.5,
        1.0,
        True,
        False,
        None,
    ]
    keys = _triton._args_key(tuple(values))
    for a, key_a in zip(values, keys, strict=True):
        for b, key_b in zip(values, keys, strict=True):
            # and no finer where it need not be (ints Triton does not tell apart would each cost a slow launch)
            assert (key_a == key_b) == (_triton._arg_key(a) == _triton._arg_key(b)), (a, b)
    with pytest.raises(_triton._Uncacheable):
        _triton._args_key((base, "a string"))


@pytest.mark.parametrize("path", ["python", "native"])
@pytest.mark.parametrize(
    "case", ["grad wanted", "no_grad", "inference_mode", "no input wants a gradient", "only a parameter wants one"]
)
def test_grad_mode_and_requires_grad_pick_the_autograd_node(monkeypatch, case: str, path: str) -> None:
    """The direct path (Python, or its C++ twin) builds the autograd node exactly when a gradient is wanted, and
    never goes through the registered op (which would raise here)."""
    if path == "native" and ln._layer_norm_fwd_op.native is None:
        pytest.skip("no native eager path here (the compiled extension is not loaded)")
    if path == "python":
        monkeypatch.setattr(ln._layer_norm_fwd_op, "native", None)
    monkeypatch.setattr(ln._layer_norm_fwd_op, "op", lambda *a: pytest.fail("went through the registered op"))
    x, weight = torch.randn(3, 16), torch.randn(16)
    if case in ("grad wanted", "no_grad", "inference_mode"):
        x.requires_grad_()
    if case == "only a parameter wants one":
        weight.requires_grad_()
    mode = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(case, contextlib.nullcontext())
    with mode:
        for _ in range(2):  # the native path's second call replays what its first (a fill: the Python path) did
            out = ln._layer_norm_fwd_op(x, None, None, weight, None, 1e-6)[0]
    wants_node = case in ("grad wanted", "only a parameter wants one")
    assert (out.grad_fn is not None) == wants_node
    if wants_node:
        if path == "python":
            assert type(out.grad_fn).__name__ == "_EagerAutogradBackward"
        else:
            assert out.grad_fn.name() == "vitfast::eager::NativeNode"
        (grad,) = torch.autograd.grad(out.square().sum(), x if x.requires_grad else weight)
        reference = ln.layer_norm_ref(x.detach(), weight.detach(), None, 1e-6)
        assert grad.shape == (x if x.requires_grad else weight).shape
        torch.testing.assert_close(out.detach(), reference, rtol=1e-5, atol=1e-5)
