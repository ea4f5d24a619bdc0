"""LayerNorm of the compiled extension (vitfast::layer_norm_ext_fwd): C++ CPU twin here, CUDA kernel on a GPU; its
gradients are the Triton backward's (vitfast::layer_norm_bwd, through the interpreter here) on its statistics.

Outputs and every gradient against fp64, with STYLE rule 5's bound (at most twice the error of PyTorch in the same
dtype, plus the dtype's epsilon): F.layer_norm for the plain op; eager ``x + gamma * branch`` then F.layer_norm for the
residual variant. Plus the op contract (optional inputs, statistics, errors), opcheck, and the per-shape dispatch
between the CUDA C++ and Triton kernels.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_kernel_close
from tests.test_ext import extension_or_skip
from vitfast import backend

ln = importlib.import_module("vitfast.ops.layer_norm")
ext = importlib.import_module("vitfast.ops.layer_norm_ext")

EPS = 1e-6
CUDA = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CUDA kernels)")
CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.fixture(scope="module", autouse=True)
def extension():
    return extension_or_skip()


def _params(cols: int, dtype: torch.dtype, weight=True, bias=True, gamma=False, device="cpu") -> dict:
    return {
        "gamma": (0.5 + 0.1 * torch.randn(cols)).to(device, dtype) if gamma else None,
        "weight": (1.0 + 0.1 * torch.randn(cols)).to(device, dtype) if weight else None,
        "bias": (0.1 * torch.randn(cols)).to(device, dtype) if bias else None,
    }


def _leaves(tensors: dict, dtype: torch.dtype | None = None) -> dict:
    return {
        name: None if t is None else (t.to(dtype) if dtype else t).detach().clone().requires_grad_()
        for name, t in tensors.items()
    }


def _results(fn, leaves: dict, grad_outputs: list) -> dict:
    outputs = fn(*leaves.values(), EPS)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, grad_outputs, strict=True) if g is not None]
    wanted = {name: t for name, t in leaves.items() if t is not None}
    grads = torch.autograd.grad(
        [o for o, _ in pairs], list(wanted.values()), [g for _, g in pairs], allow_unused=True, materialize_grads=True
    )
    return {**{f"out{i}": o for i, o in enumerate(outputs)}, **dict(zip(wanted, grads, strict=True))}


def _eager_residual(x, branch, gamma, weight, bias, eps):
    residual = x + (branch if gamma is None else gamma * branch)
    return F.layer_norm(residual, (x.shape[-1],), weight, bias, eps), residual


def _check(kernel_fn, torch_fn, fp64_fn, inputs: dict, grad_outputs: list, what: str) -> None:
    kernel = _results(kernel_fn, _leaves(inputs), grad_outputs)
    baseline = _results(torch_fn, _leaves(inputs), grad_outputs)
    expected = _results(fp64_fn, _leaves(inputs, torch.float64), grad_outputs)
    for key, value in expected.items():
        assert kernel[key].dtype == baseline[key].dtype, f"{what} {key}: dtype {kernel[key].dtype}"
        assert_kernel_close(kernel[key], value, baseline[key], what=f"{what} {key}")


def _torch_plain(x, weight, bias, eps):
    """F.layer_norm in x's dtype; with fp32 parameters and half x (which F.layer_norm refuses on CUDA), in fp32
    rounded once to x's dtype, as autocast would run it."""
    if all(p is None or p.dtype == x.dtype for p in (weight, bias)):
        return ln.layer_norm_ref(x, weight, bias, eps)
    return ln.layer_norm_ref(x.float(), weight, bias, eps).to(x.dtype)


def check_plain(x, params, fn=ext.layer_norm_ext, what="") -> None:
    inputs = {"x": x, "weight": params["weight"], "bias": params["bias"]}
    _check(fn, _torch_plain, ln.layer_norm_ref, inputs, [torch.randn(x.shape, device=x.device)], what)


def check_residual(x, branch, params, fn=ext.layer_norm_residual_ext, what="", use=(True, True)) -> None:
    inputs = {"x": x, "branch": branch, **params}
    grads = [torch.randn(x.shape, device=x.device) if used else None for used in use]
    _check(fn, _eager_residual, ln.layer_norm_residual_ref, inputs, grads, what)


CASES = [(torch.float32, cols) for cols in (50, 384, 769, 1408, 2730)] + [
    (torch.bfloat16, 384),
    (torch.bfloat16, 1408),
    (torch.float16, 769),
    (torch.float16, 2730),
]


@pytest.mark.parametrize("rows", [1, 197])
@pytest.mark.parametrize("dtype, cols", CASES, ids=[f"{str(d)[6:]}-{c}" for d, c in CASES])
def test_cpu_twin(rows, dtype, cols) -> None:
    x, branch = torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype)
    check_plain(x, _params(cols, dtype), what=f"plain {dtype} {rows}x{cols}")
    check_residual(x, branch, _params(cols, dtype, gamma=True), what=f"residual {dtype} {rows}x{cols}")


@pytest.mark.parametrize("gamma", [True, False])
@pytest.mark.parametrize("weight, bias", [(True, True), (True, False), (False, True), (False, False)])
def test_optional_parameters(gamma, weight, bias) -> None:
    x, branch = torch.randn(3, 37, 300), torch.randn(3, 37, 300)
    params = _params(300, torch.float32, weight=weight, bias=bias, gamma=gamma)
    check_residual(x, branch, params, what=f"gamma={gamma} w={weight} b={bias}")
    if not gamma:
        check_plain(x, params, what=f"plain w={weight} b={bias}")


@pytest.mark.parametrize("use", [(True, False), (False, True)])
def test_one_output_used(use) -> None:
    x, branch = torch.randn(2, 45, 200).half(), torch.randn(2, 45, 200).half()
    check_residual(x, branch, _params(200, torch.float16, gamma=True), what=f"outputs used {use}", use=use)


def test_fp32_parameters_and_strided_activations() -> None:
    """Autocast-style bf16 activations with fp32 parameters; a transposed x (copied) and a row-strided x (read in
    place)."""
    x = torch.randn(5, 300, 7).bfloat16().transpose(1, 2)
    check_plain(x, _params(300, torch.float32), what="transposed bf16 x, fp32 params")
    sliced = torch.randn(3, 11, 640)[..., 100:400]
    check_residual(sliced, torch.randn(3, 11, 300), _params(300, torch.float32, gamma=True), what="row-strided x")


def test_statistics_and_matching_the_triton_op() -> None:
    """The fp32 mean / rstd the forward returns, and the same outputs (to rounding) as the Triton op's PyTorch body,
    whose backward takes the same saved tensors."""
    x, branch = torch.randn(3, 101, 1408) + 3.0, torch.randn(3, 101, 1408)
    gamma, weight, bias = _params(1408, torch.float32, gamma=True).values()
    out, residual, mean, rstd = torch.ops.vitfast.layer_norm_ext_fwd(x, branch, gamma, weight, bias, EPS)
    var64, mean64 = torch.var_mean(residual.double(), dim=-1, correction=0)
    var32, mean32 = torch.var_mean(residual, dim=-1, correction=0)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (3, 101)
    assert_kernel_close(mean, mean64, mean32, what="mean")
    assert_kernel_close(rstd, torch.rsqrt(var64 + EPS), torch.rsqrt(var32 + EPS), what="rstd")
    triton_body = ln._layer_norm_fwd_reference(x, branch, gamma, weight, bias, EPS)
    for got, want in zip((out, residual, mean, rstd), triton_body, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_empty_rows_and_outputs_of_absent_inputs() -> None:
    x = torch.randn(0, 7, 32)
    weight = torch.randn(32, requires_grad=True)
    out, residual, mean, rstd = torch.ops.vitfast.layer_norm_ext_fwd(x, None, None, weight, None, EPS)
    assert out.shape == x.shape and residual.shape == (0,) and mean.shape == rstd.shape == (0, 7)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(32))


def test_bad_input_messages() -> None:
    fwd = torch.ops.vitfast.layer_norm_ext_fwd
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\), got \[15\]"):
        fwd(x, None, None, torch.randn(15), None, EPS)
    with pytest.raises(ValueError, match="gamma .* needs a branch"):
        fwd(x, None, torch.randn(16), None, None, EPS)
    with pytest.raises(ValueError, match=r"branch must have x's shape \[4, 16\], got \[4, 15\]"):
        fwd(x, torch.randn(4, 15), None, None, None, EPS)
    with pytest.raises(ValueError, match="branch must have x's dtype Float, got BFloat16"):
        fwd(x, torch.randn(4, 16).bfloat16(), None, None, None, EPS)
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32, got Double"):
        fwd(x.double(), None, None, None, None, EPS)
    with pytest.raises(ValueError, match=f"widths 1..{ext.MAX_WIDTH}, got {ext.MAX_WIDTH + 1}"):
        fwd(torch.randn(2, ext.MAX_WIDTH + 1), None, None, None, None, EPS)
    with pytest.raises(ValueError, match="bias must be float32 or x's dtype Half, got BFloat16"):
        fwd(x.half(), None, None, None, torch.randn(16).bfloat16(), EPS)


def test_opcheck_and_compile_cpu() -> None:
    """The forward op's schema, fake and autograd registration; compiled, the same outputs. The AOT checks of the
    backward cannot run here: under the interpreter, tracing cannot capture a Triton kernel (the Triton op's own
    tests skip them too); test_cuda_opcheck_compile_and_dispatch runs them on a GPU."""
    x, branch = torch.randn(2, 13, 70), torch.randn(2, 13, 70)
    gamma, weight, bias = _params(70, torch.float32, gamma=True).values()
    fwd = torch.ops.vitfast.layer_norm_ext_fwd
    leaves = [t.clone().requires_grad_() for t in (x, branch, gamma, weight, bias)]
    with_grad = tuple(name for name in CPU_OPCHECK if name != "test_aot_dispatch_dynamic")
    torch.library.opcheck(fwd, (*leaves, EPS), test_utils=with_grad)
    torch.library.opcheck(fwd, (x, branch, gamma, weight, bias, EPS), test_utils=CPU_OPCHECK)
    torch.library.opcheck(fwd, (x, None, None, None, bias, EPS), test_utils=CPU_OPCHECK)

    def block(x, branch, gamma, weight, bias):
        normed, residual = ext.layer_norm_residual_ext(x, branch, gamma, weight, bias, EPS)
        return (normed * residual).sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, branch, gamma, weight, bias), block(x, branch, gamma, weight, bias))


# ---- dispatch ---------------------------------------------------------------------------------------------------


def test_prefer_rule() -> None:
    x, weight = torch.randn(2, 64), torch.randn(64)
    assert ext.prefer_cuda_kernel(x, weight, None)
    assert not ext.prefer_cuda_kernel(x, weight.requires_grad_(), None)
    with torch.no_grad():
        assert ext.prefer_cuda_kernel(x, weight, None)


def test_uncovered_calls_hand_over(monkeypatch) -> None:
    reasons = []
    monkeypatch.setattr(ext, "log_fallback", lambda op, reason: reasons.append((op, reason)))
    monkeypatch.setattr(backend, "_current", "auto")
    x, branch = torch.randn(3, 40).double(), torch.randn(3, 40).double()
    assert torch.equal(ext._layer_norm_cuda(x, None, None, EPS), ln.layer_norm_ref(x, None, None, EPS))
    assert reasons == [("layer_norm", "CUDA C++ kernel: tensors not all on a CUDA GPU")]
    out, residual = ext._layer_norm_residual_cuda(x, branch, None, None, None, EPS)
    assert torch.equal(residual, x + branch) and torch.equal(out, ln.layer_norm_ref(x + branch, None, None, EPS))
    assert [op for op, _ in reasons] == ["layer_norm", "layer_norm_residual"]


def test_auto_hands_calls_needing_gradients_to_pytorch(monkeypatch) -> None:
    """Under "auto" the C++ kernel takes inference calls and PyTorch the ones that need a backward (measured faster);
    under an explicit "cuda" the C++ kernel takes every covered call, and uncovered ones go to Triton when present."""
    impls = backend.implementations("layer_norm")
    x, weight = torch.empty(4, 768, dtype=torch.bfloat16), torch.ones(768, requires_grad=True)
    monkeypatch.setattr(backend, "_current", "auto")
    assert ext._hand_over("layer_norm", None, x, None, None) is None
    assert ext._hand_over("layer_norm", None, x, weight, None) is impls["reference"]
    assert ext._hand_over("layer_norm", "a reason", x, None, None) is impls["reference"]
    monkeypatch.setattr(backend, "_current", "cuda")
    assert ext._hand_over("layer_norm", None, x, weight, None) is None
    assert ext._hand_over("layer_norm", "a reason", x, None, None) is impls.get("triton", impls["reference"])


# ---- CUDA kernels -------------------------------------------------------------------------------------------------

FULL_SHAPES = [(8200, 1024), (12608, 768), (1576, 384), (2056, 1408), (8200, 2730)]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("rows, cols", FULL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
def test_cuda_full_shapes(rows, cols, dtype) -> None:
    with torch.device("cuda"):
        x, branch = torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype)
        check_plain(x, _params(cols, dtype, device="cuda"), what=f"plain {dtype} {rows}x{cols}")
        check_residual(x, branch, _params(cols, dtype, gamma=True, device="cuda"), what=f"residual {rows}x{cols}")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("cols", [1, 7, 50, 256, 769, 1536, 1537, 4096, 4100, 8192])
def test_cuda_widths_and_paths(cols) -> None:
    """Every register bucket, warp and block paths, vector and scalar loads (odd widths, an unaligned x)."""
    with torch.device("cuda"):
        x, branch = torch.randn(3, 67, cols).bfloat16(), torch.randn(3, 67, cols).bfloat16()
        check_residual(x, branch, _params(cols, torch.bfloat16, gamma=True, device="cuda"), what=f"C={cols}")
        unaligned = torch.randn(3 * 67 * cols + 1).bfloat16()[1:].view(3, 67, cols)
        check_plain(unaligned, _params(cols, torch.float32, device="cuda"), what=f"unaligned C={cols}")


@pytest.mark.gpu
@requires_gpu
def test_cuda_deterministic_and_matches_twin() -> None:
    with torch.device("cuda"):
        x, branch = torch.randn(8 * 197, 768).bfloat16(), torch.randn(8 * 197, 768).bfloat16()
        gamma, weight, bias = _params(768, torch.bfloat16, gamma=True, device="cuda").values()
        fwd = torch.ops.vitfast.layer_norm_ext_fwd(x, branch, gamma, weight, bias, EPS)
        d_out, d_residual = torch.randn_like(x), torch.randn_like(x)
        leaves = [t.clone().requires_grad_() for t in (x, branch, gamma, weight, bias)]
        grads = [
            torch.autograd.grad(ext.layer_norm_residual_ext(*leaves, EPS), leaves, (d_out, d_residual))
            for _ in range(2)
        ]
    for first, second in zip(*grads, strict=True):
        assert torch.equal(first, second)
    twin = torch.ops.vitfast.layer_norm_ext_fwd(*(t.cpu() for t in (x, branch, gamma, weight, bias)), EPS)
    assert torch.equal(fwd[1].cpu(), twin[1])  # the residual: x + gamma * branch rounded once, on both devices


@pytest.mark.gpu
@requires_gpu
def test_cuda_opcheck_compile_and_dispatch(monkeypatch) -> None:
    with torch.device("cuda"):
        x, branch = torch.randn(2, 197, 768).bfloat16(), torch.randn(2, 197, 768).bfloat16()
        gamma, weight, bias = _params(768, torch.float32, gamma=True, device="cuda").values()
    leaves = [t.requires_grad_() for t in (x, branch, gamma, weight, bias)]
    torch.library.opcheck(torch.ops.vitfast.layer_norm_ext_fwd, (*leaves, EPS))
    torch.library.opcheck(torch.ops.vitfast.layer_norm_ext_fwd, (x, None, None, weight, None, EPS))

    def block(x, branch, gamma, weight, bias):
        normed, residual = ext.layer_norm_residual_ext(x, branch, gamma, weight, bias, EPS)
        return normed.float().sum() + residual.float().square().sum()

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(*leaves), block(*leaves))

    from vitfast import ops

    ran = []
    monkeypatch.setattr(ext, "layer_norm_ext", lambda *a: ran.append(a[0].shape[-1]) or ln.layer_norm_ref(*a))
    backend.set_backend("auto")
    ops.layer_norm(x.detach(), None, None)
    ops.layer_norm(x, None, None)  # x requires grad: PyTorch's LayerNorm under "auto"
    assert ran == [768]
    backend.set_backend("cuda")
    ops.layer_norm(torch.randn(4, 2730, device="cuda", dtype=torch.bfloat16), None, None)
    assert ran == [768, 2730]
