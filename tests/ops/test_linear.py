"""The fused projection (GEMM + bias + activation) against fp64, through the Triton interpreter on the CPU."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import assert_kernel_close
from vitfast import ops
from vitfast.backend import use_backend

pytest.importorskip("triton")
linear_module = importlib.import_module("vitfast.ops.linear")  # the module, not the function ops.linear
requires_kernels = pytest.mark.skipif(
    not linear_module.HAS_TRITON or not (torch.cuda.is_available() or linear_module.INTERPRETER),
    reason="needs Triton on a GPU or under TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, n, dtype, bias=True, grad=False):
    x = torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(grad)
    weight = (torch.randn(n, shape[-1], device=DEVICE) / shape[-1] ** 0.5).to(dtype).requires_grad_(grad)
    b = torch.randn(n, device=DEVICE).to(dtype).requires_grad_(grad) if bias else None
    return x, weight, b


@requires_kernels
@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "n"), [((2, 25, 200), 130), ((197, 96), 160)])
def test_kernel_matches_fp64(shape, n, dtype, activation) -> None:
    x, weight, bias = _inputs(shape, n, dtype)
    exact = ops.linear_ref(x.double(), weight.double(), bias.double(), activation)
    baseline = ops.linear_ref(x, weight, bias, activation)
    with use_backend("triton"):
        out = ops.linear(x, weight, bias, activation)
    assert out.dtype == dtype and out.shape == (*shape[:-1], n)
    assert_kernel_close(out, exact, baseline, what=f"linear {activation} {dtype}")


@requires_kernels
def test_no_bias_and_strided_rows() -> None:
    x, weight, _ = _inputs((40, 3 * 64), 48, torch.float32, bias=False)
    view = x[:, 64:128]  # rows with a stride of 192: read in place
    exact = ops.linear_ref(view.double(), weight[:, :64].double().contiguous())
    with use_backend("triton"):
        out = ops.linear(view, weight[:, :64].contiguous())
    assert_kernel_close(out, exact, ops.linear_ref(view, weight[:, :64]), what="strided rows")


@requires_kernels
def test_gradients_through_the_kernel() -> None:
    x, weight, bias = _inputs((3, 17, 40), 24, torch.float32, grad=True)
    grad_out = torch.randn(3, 17, 24, device=DEVICE)
    with use_backend("triton"):
        grads = torch.autograd.grad(ops.linear(x, weight, bias, "gelu"), (x, weight, bias), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = torch.autograd.grad(ops.linear_ref(*leaves, "gelu"), leaves, grad_out.double())
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@requires_kernels
@pytest.mark.parametrize("activation", [None, "gelu", "quick_gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_of_each_activation(dtype, activation) -> None:
    """The backward's written-out activation derivatives (no autograd pass) against fp64 autograd through the
    reference, within rule 5 of the same-dtype reference's own gradients; with and without a bias."""
    for bias in (True, False):
        x, weight, b = _inputs((2, 9, 40), 24, dtype, grad=True, bias=bias)
        grad_out = torch.randn(2, 9, 24, device=DEVICE).to(dtype)
        wanted = [t for t in (x, weight, b) if t is not None]
        with use_backend("triton"):
            grads = torch.autograd.grad(ops.linear(x, weight, b, activation), wanted, grad_out)
        leaves = [t.detach().double().requires_grad_() for t in wanted]
        exact = torch.autograd.grad(ops.linear_ref(*leaves[:2], leaves[2] if bias else None, activation), leaves,
                                    grad_out.double())  # fmt: skip
        baseline = torch.autograd.grad(ops.linear_ref(x, weight, b, activation), wanted, grad_out)
        for name, got, want, base in zip(("x", "weight", "bias"), grads, exact, baseline, strict=False):
            assert got.dtype == dtype
            assert_kernel_close(got, want, base, what=f"d_{name} {activation} {dtype} bias={bias}")


@requires_kernels
def test_backward_computes_only_the_gradients_wanted() -> None:
    """A frozen weight and bias (a linear probe's backbone, say): only the input's gradient, equal to the one computed
    with all three."""
    x, weight, bias = _inputs((3, 40), 24, torch.float32, grad=True)
    grad_out = torch.randn(3, 24, device=DEVICE)
    with use_backend("triton"):
        (all_x, *_rest) = torch.autograd.grad(ops.linear(x, weight, bias, "gelu"), (x, weight, bias), grad_out)
        weight.requires_grad_(False)
        bias.requires_grad_(False)
        out = ops.linear(x, weight, bias, "gelu")
        (only_x,) = torch.autograd.grad(out, (x,), grad_out)
    assert out.grad_fn is not None and weight.grad is None and bias.grad is None
    torch.testing.assert_close(only_x, all_x, rtol=0, atol=0)


@requires_kernels
def test_opcheck() -> None:
    x, weight, bias = _inputs((9, 32), 16, torch.float32, grad=True)
    torch.library.opcheck(
        torch.ops.vitfast.linear_fwd,
        (x, weight, bias, 1),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_errors_and_fallback() -> None:
    x, weight, bias = _inputs((4, 8), 6, torch.float32)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.linear(x, weight, bias, "relu")
    with pytest.raises(ValueError, match="weight must be"):
        linear_module.linear_fwd(x, weight.T, bias, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_module.linear_fwd(x, weight, bias[:3], None)
    # fp64 is outside the kernels: the reference runs, same result
    x64, w64, b64 = (t.double() for t in (x, weight, bias))
    if linear_module.HAS_TRITON:
        torch.testing.assert_close(
            linear_module._linear_triton(x64, w64, b64, "gelu"), ops.linear_ref(x64, w64, b64, "gelu")
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of Triton ops runs on a GPU only")
def test_torch_compile_fullgraph_on_gpu() -> None:
    x, weight, bias = _inputs((8 * 197, 768), 3072, torch.bfloat16)

    def fn(x, weight, bias):
        with use_backend("triton"):
            return linear_module._linear_triton(x, weight, bias, "gelu")

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, weight, bias), fn(x, weight, bias), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="full shapes on a GPU")
@pytest.mark.parametrize(("m", "k", "n"), [(197, 768, 2304), (1576, 768, 3072), (257, 1024, 4096), (8200, 1024, 1024)])
def test_gpu_full_shapes_bf16(m, k, n) -> None:
    x, weight, bias = _inputs((m, k), n, torch.bfloat16)
    exact = ops.linear_ref(x.double(), weight.double(), bias.double(), "gelu")
    with use_backend("triton"):
        out = ops.linear(x, weight, bias, "gelu")
    assert_kernel_close(out, exact, ops.linear_ref(x, weight, bias, "gelu"), what=f"{m}x{k}x{n}")
