"""SwiGLU (split and packed) and SwiGLU + sub-LayerNorm: the Triton kernels against an fp64 reference.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py). Errors are bounded as in STYLE rule 5:
at most twice the error of PyTorch in the same dtype (``F.silu(gate) * up``, then ``F.layer_norm`` for the fused op,
run through autograd for the gradients) plus the dtype's epsilon.

The interpreter converts fp32 -> bf16 by truncation (Triton 3.8's ``_convert_float``) where a GPU rounds to nearest
even: in bf16 the kernels' error here is up to one bf16 ulp instead of half of one, inside the bound's floor.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import vitfast.backend
import vitfast.ops._triton as triton_glue
from tests.helpers import assert_kernel_close
from vitfast import ops
from vitfast.backend import use_backend
from vitfast.layers import SwiGLU

# the module, not the function of the same name that vitfast.ops exports
sw = importlib.import_module("vitfast.ops.swiglu")

pytest.importorskip("triton")

EPS = 1e-6
ROWS = (3, 197)  # 591 rows: odd, not a multiple of any row block
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled kernels, torch.compile, full shapes)")
CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.fixture(autouse=True)
def _default_device():
    """On a GPU machine the same tests run the compiled kernels on CUDA tensors instead of the interpreter."""
    with torch.device(DEVICE):
        yield


def _compare(kernel_fn, reference_fn, inputs: dict[str, torch.Tensor], what: str) -> None:
    """Output and every input gradient of ``kernel_fn`` against ``reference_fn`` in fp64, bounded by PyTorch's own
    error in the inputs' dtype (``reference_fn`` on the same inputs)."""
    results = {}
    d_out = None
    for name, fn, dtype in (("kernel", kernel_fn, None), ("torch", reference_fn, None), ("fp64", reference_fn, "64")):
        leaves = {k: (t.double() if dtype else t).detach().clone().requires_grad_() for k, t in inputs.items()}
        out = fn(*leaves.values())
        if d_out is None:
            d_out = torch.randn(out.shape, device=out.device)
        grads = torch.autograd.grad(out, list(leaves.values()), d_out.to(out.dtype))
        results[name] = {"out": out, **{f"d_{k}": g for k, g in zip(leaves, grads, strict=True)}}
    for key in results["fp64"]:
        kernel, torch_result = results["kernel"][key], results["torch"][key]
        assert kernel.dtype == torch_result.dtype and kernel.shape == torch_result.shape, key
        assert_kernel_close(kernel, results["fp64"][key], torch_result, what=f"{what} {key}")


def _params(width: int, dtype: torch.dtype, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    weight = (1.0 + 0.1 * torch.randn(width, device=device)).to(dtype)
    return weight, (0.1 * torch.randn(width, device=device)).to(dtype)


def _layer_norm_kernel(gate, up, weight, bias):
    return sw._swiglu_layer_norm_triton(gate, up, weight, bias, EPS)


def _layer_norm_reference(gate, up, weight, bias):
    return sw.swiglu_layer_norm_ref(gate, up, weight, bias, EPS)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# bf16 at width 2730 runs in the packed test: the same kernel, and the interpreter's bf16 is slow
@pytest.mark.parametrize(
    "dtype, width", [(torch.float32, 2730), (torch.float16, 2730), *((dtype, 75) for dtype in DTYPES)]
)
def test_swiglu_split(dtype, width) -> None:
    gate, up = torch.randn(*ROWS, width).to(dtype), torch.randn(*ROWS, width).to(dtype)
    _compare(sw._swiglu_triton, sw.swiglu_ref, {"gate": gate, "up": up}, f"split {dtype} h={width}")


@pytest.mark.parametrize(
    "dtype, width", [(torch.float32, 2730), (torch.bfloat16, 2730), (torch.float16, 75), (torch.bfloat16, 75)]
)
def test_swiglu_packed(dtype, width) -> None:
    x = torch.randn(*ROWS, 2 * width).to(dtype)
    _compare(sw._swiglu_packed_triton, sw.swiglu_packed_ref, {"x": x}, f"packed {dtype} h={width}")


@pytest.mark.parametrize("width", [pytest.param(2730, marks=pytest.mark.slow), 75])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_layer_norm(dtype, width) -> None:
    gate, up = torch.randn(*ROWS, width).to(dtype), torch.randn(*ROWS, width).to(dtype)
    weight, bias = _params(width, dtype)
    inputs = {"gate": gate, "up": up, "weight": weight, "bias": bias}
    _compare(_layer_norm_kernel, _layer_norm_reference, inputs, f"fused LN {dtype} h={width}")


@pytest.mark.parametrize("dtype, padded_params", [(torch.float32, False), (torch.bfloat16, True)])
def test_swiglu_layer_norm_padded(dtype, padded_params) -> None:
    """EVA-02-L's MLP zero-padded to 2736: gate and up are views of the padded fc1 output, the norm is over the 2730
    true columns (parameters of 2730, or zero-padded to 2736 as the engine passes them), the output and every
    gradient are exactly zero in the padding, whatever the padding of the inputs holds."""
    width, padded = 2730, 2736
    hidden = torch.randn(*ROWS, 2 * padded).to(dtype)  # random padding: the kernel must ignore it, not rely on zeros
    gate, up = hidden[..., :padded], hidden[..., padded:]
    weight, bias = _params(width, dtype)
    if padded_params:  # padded to the rows' width; the padding holds values the op must ignore, not zeros
        noise = torch.randn(2, padded - width).to(dtype)
        weight, bias = torch.cat([weight, noise[0]]), torch.cat([bias, noise[1]])

    def kernel(gate, up, weight, bias):
        return sw._swiglu_layer_norm_triton(gate, up, weight, bias, EPS, width)

    def reference(gate, up, weight, bias):
        return sw.swiglu_layer_norm_ref(gate, up, weight, bias, EPS, width)

    inputs = {"gate": gate, "up": up, "weight": weight, "bias": bias}
    _compare(kernel, reference, inputs, f"padded fused LN {dtype}")
    leaves = [t.detach().requires_grad_() for t in (gate, up, weight, bias)]
    with use_backend("triton"):  # the public op, as the engine calls it
        out = ops.swiglu_layer_norm(*leaves, EPS, width=width)
    assert out.shape == gate.shape and not out[..., width:].any()
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert all(not grad[..., width:].any() for grad in grads)


def test_swiglu_layer_norm_fp32_parameters_with_fp16_activations() -> None:
    """Parameters may keep another dtype than the activations (fp32 master weights): grads come back in theirs."""
    gate, up = torch.randn(5, 41, 300).half(), torch.randn(5, 41, 300).half()
    weight, bias = _params(300, torch.float32)
    weight = weight.requires_grad_()
    bias = bias.requires_grad_()
    out = _layer_norm_kernel(gate, up, weight, bias)
    assert out.dtype == torch.float16
    out.backward(torch.randn_like(out))
    assert weight.grad.dtype == bias.grad.dtype == torch.float32
    inputs = {"gate": gate, "up": up, "weight": weight.detach().half(), "bias": bias.detach().half()}
    _compare(_layer_norm_kernel, _layer_norm_reference, inputs, "fp16 activations")


def test_strided_inputs_are_read_in_place_or_copied() -> None:
    """Row-strided views (the halves of one buffer, a column slice) are read in place; a transposed one is copied."""
    fused = torch.randn(37, 2 * 75)
    gate, up = fused.chunk(2, dim=-1)  # row stride 150
    _compare(sw._swiglu_triton, sw.swiglu_ref, {"gate": gate, "up": up}, "split halves of one buffer")
    transposed = torch.randn(75, 37).t()  # unit row stride, column stride 37
    _compare(sw._swiglu_triton, sw.swiglu_ref, {"gate": transposed, "up": up}, "split transposed gate")
    wide = torch.randn(2, 19, 200)
    _compare(sw._swiglu_packed_triton, sw.swiglu_packed_ref, {"x": wide[..., 20:170]}, "packed column slice")
    weight, bias = _params(75, torch.float32)
    inputs = {"gate": gate, "up": transposed, "weight": weight, "bias": bias}
    _compare(_layer_norm_kernel, _layer_norm_reference, inputs, "fused LN strided")


def test_leading_dims_and_empty_rows() -> None:
    gate, up = torch.randn(2, 3, 5, 33), torch.randn(2, 3, 5, 33)
    weight, bias = _params(33, torch.float32)
    _compare(_layer_norm_kernel, _layer_norm_reference, {"gate": gate, "up": up, "weight": weight, "bias": bias}, "4d")
    empty = torch.randn(0, 7, 64, requires_grad=True)
    weight = weight.new_ones(64).requires_grad_()
    out = _layer_norm_kernel(empty, empty, weight, torch.zeros(64))
    assert out.shape == (0, 7, 64)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(64)) and empty.grad.shape == empty.shape
    assert sw._swiglu_triton(empty, empty).shape == (0, 7, 64)
    assert sw._swiglu_packed_triton(empty).shape == (0, 7, 32)


def test_gpu_tile_heights_through_the_interpreter(monkeypatch) -> None:
    """The GPU tiles (4 rows x 1024 columns elementwise, 2 rows x 2048 for the fused LN at width 1100, a few rows per
    backward program) run the same kernels correctly, masked row and column tails included."""
    monkeypatch.setattr(sw, "INTERPRETER", False)
    assert sw._elementwise_blocks(1100) == (4, 1024) and sw._rows_per_tile(2048) == 2 and sw._rows_per_tile(4096) == 1
    gate, up = torch.randn(11, 1100), torch.randn(11, 1100)
    _compare(sw._swiglu_triton, sw.swiglu_ref, {"gate": gate, "up": up}, "GPU tiles split")
    _compare(sw._swiglu_packed_triton, sw.swiglu_packed_ref, {"x": torch.randn(11, 2200)}, "GPU tiles packed")
    weight, bias = _params(1100, torch.float32)
    inputs = {"gate": gate, "up": up, "weight": weight, "bias": bias}
    _compare(_layer_norm_kernel, _layer_norm_reference, inputs, "GPU tiles fused LN")


def test_fused_layer_norm_normalizes_the_product_rounded_to_the_input_dtype() -> None:
    """Like the unfused fp16 path, the fused kernel normalizes ``silu(gate) * up`` rounded to fp16.

    Gates within a few fp16 ulps of silu's minimum give products that differ in fp32 (by ~1e-6) but round to one fp16
    value. With a tiny eps, normalizing the fp32 products would amplify their differences to O(1); normalizing the
    rounded ones gives exactly zero, so the output is exactly the bias.
    """
    silu_argmin = -1.2785
    gate = (silu_argmin + torch.arange(-8, 8) * 2.0**-10).half().reshape(1, 16)  # 16 values: exact fp32 mean
    up = torch.ones(1, 16).half()
    product_fp32 = F.silu(gate.float()) * up.float()
    assert product_fp32.unique().numel() > 1 and product_fp32.half().unique().numel() == 1
    weight, bias = _params(16, torch.float16, device="cpu")
    eps = 1e-12
    assert not torch.equal(F.layer_norm(product_fp32, (16,), weight.float(), bias.float(), eps).half(), bias[None])
    out = sw._swiglu_layer_norm_triton(gate.to(DEVICE), up.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), eps)
    assert torch.equal(out.cpu(), bias[None])


def test_opcheck_cpu() -> None:
    gate, up = torch.randn(2, 13, 37), torch.randn(2, 13, 37)
    weight, bias = _params(37, torch.float32)
    leaves = [t.requires_grad_() for t in (gate, up, weight, bias)]
    x = torch.randn(2, 13, 74, requires_grad=True)
    d_out = torch.randn(2, 13, 37)
    torch.library.opcheck(torch.ops.vitfast.swiglu_fwd, (gate, up), test_utils=CPU_OPCHECK)
    torch.library.opcheck(torch.ops.vitfast.swiglu_bwd, (d_out, gate.detach(), up.detach()), test_utils=CPU_OPCHECK)
    torch.library.opcheck(torch.ops.vitfast.swiglu_packed_fwd, (x,), test_utils=CPU_OPCHECK)
    torch.library.opcheck(torch.ops.vitfast.swiglu_packed_bwd, (d_out, x.detach()), test_utils=CPU_OPCHECK)
    torch.library.opcheck(torch.ops.vitfast.swiglu_layer_norm_fwd, (*leaves, EPS, 37), test_utils=CPU_OPCHECK)
    _out, mean, rstd = torch.ops.vitfast.swiglu_layer_norm_fwd(*(t.detach() for t in leaves), EPS, 37)
    torch.library.opcheck(
        torch.ops.vitfast.swiglu_layer_norm_bwd,
        (d_out, gate.detach(), up.detach(), weight.detach(), mean, rstd, 37),
        test_utils=CPU_OPCHECK,
    )
    # the padded form: the norm over the first 33 of 37 columns, parameters zero-padded to 37
    torch.library.opcheck(torch.ops.vitfast.swiglu_layer_norm_fwd, (*leaves, EPS, 33), test_utils=CPU_OPCHECK)


def test_ops_run_the_pytorch_twins_where_kernels_cannot(monkeypatch) -> None:
    """Off the interpreter, CPU tensors take the PyTorch bodies of the ops: same results, layouts and dtypes as the
    kernels (run here through the interpreter, or on the GPU)."""
    gate, up = torch.randn(3, 29, 130, device="cpu"), torch.randn(3, 29, 130, device="cpu")
    weight, bias = _params(130, torch.float32, device="cpu")
    d_out = torch.randn_like(gate)

    def run(device):
        gate_, up_, weight_, bias_, d_out_ = (t.to(device) for t in (gate, up, weight, bias, d_out))
        x = torch.cat([gate_, up_], dim=-1)
        vitfast_ops = torch.ops.vitfast
        out, mean, rstd = vitfast_ops.swiglu_layer_norm_fwd(gate_, up_, weight_, bias_, EPS, 130)
        return (
            vitfast_ops.swiglu_fwd(gate_, up_),
            *vitfast_ops.swiglu_bwd(d_out_, gate_, up_),
            vitfast_ops.swiglu_packed_fwd(x),
            vitfast_ops.swiglu_packed_bwd(d_out_, x),
            out,
            mean,
            rstd,
            *vitfast_ops.swiglu_layer_norm_bwd(d_out_, gate_, up_, weight_, mean, rstd, 130),
        )

    kernel = run(DEVICE)
    monkeypatch.setattr(triton_glue, "INTERPRETER", False)
    assert not triton_glue.kernel_can_run(gate)
    twin = run("cpu")
    for index, (got, want) in enumerate(zip(twin, kernel, strict=True)):
        assert got.shape == want.shape and got.dtype == want.dtype, index
        torch.testing.assert_close(got, want.cpu(), rtol=1e-5, atol=1e-5, msg=f"output {index}")


def test_pytorch_twins_match_autograd_in_fp64() -> None:
    """The PyTorch bodies of the backward ops are the exact gradients of the references."""
    gate, up, d_out = (torch.randn(9, 21, 50, dtype=torch.float64) for _ in range(3))
    weight, bias = (t.double() for t in _params(50, torch.float32, device="cpu"))
    leaves = [t.clone().requires_grad_() for t in (gate, up, weight, bias)]
    expected = torch.autograd.grad(sw.swiglu_layer_norm_ref(*leaves, EPS), leaves, d_out)
    out, mean, rstd = sw._swiglu_layer_norm_fwd_reference(gate, up, weight, bias, EPS, 50)
    torch.testing.assert_close(out, sw.swiglu_layer_norm_ref(gate, up, weight, bias, EPS), rtol=0, atol=0)
    d_gate, d_up, d_params = sw._swiglu_layer_norm_bwd_reference(d_out, gate, up, weight, mean, rstd, 50)
    for index, (g, e) in enumerate(zip((d_gate, d_up, *d_params), expected, strict=True)):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6, msg=f"gradient {index}")  # fp32 statistics
    expected = torch.autograd.grad(sw.swiglu_ref(*leaves[:2]), leaves[:2], d_out)
    for g, e in zip(sw._swiglu_bwd_reference(d_out, gate, up), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_fallbacks_run_the_reference(monkeypatch) -> None:
    reasons = []
    monkeypatch.setattr(sw, "log_fallback", lambda op, reason: reasons.append((op, reason)))
    gate64, up64 = torch.randn(7, 33, dtype=torch.float64), torch.randn(7, 33, dtype=torch.float64)
    w64, b64 = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    assert torch.equal(sw._swiglu_triton(gate64, up64), sw.swiglu_ref(gate64, up64))
    x64 = torch.randn(7, 34, dtype=torch.float64)
    assert torch.equal(sw._swiglu_packed_triton(x64), sw.swiglu_packed_ref(x64))
    assert torch.equal(
        sw._swiglu_layer_norm_triton(gate64, up64, w64, b64, EPS), sw.swiglu_layer_norm_ref(gate64, up64, w64, b64, EPS)
    )
    wide_gate, wide_up = torch.randn(3, sw.MAX_LAYER_NORM_WIDTH + 2), torch.randn(3, sw.MAX_LAYER_NORM_WIDTH + 2)
    wide_w, wide_b = _params(sw.MAX_LAYER_NORM_WIDTH + 2, torch.float32, device="cpu")
    assert torch.equal(
        sw._swiglu_layer_norm_triton(wide_gate, wide_up, wide_w, wide_b, EPS),
        sw.swiglu_layer_norm_ref(wide_gate, wide_up, wide_w, wide_b, EPS),
    )
    gate, row = torch.randn(4, 48), torch.randn(48)
    assert torch.equal(sw._swiglu_triton(gate, row), sw.swiglu_ref(gate, row))
    assert torch.equal(
        sw._swiglu_layer_norm_triton(gate, gate, None, None, EPS), sw.swiglu_layer_norm_ref(gate, gate, None, None, EPS)
    )
    assert [op for op, _ in reasons] == [
        "swiglu",
        "swiglu_packed",
        "swiglu_layer_norm",
        "swiglu_layer_norm",
        "swiglu",
        "swiglu_layer_norm",
    ]
    assert "float64" in reasons[0][1] and "float64" in reasons[2][1]
    assert "width over 8192" in reasons[3][1] and "broadcast" in reasons[4][1] and "without weight" in reasons[5][1]


def test_bad_input_messages() -> None:
    vitfast_ops = torch.ops.vitfast
    gate, up = torch.randn(4, 16), torch.randn(4, 16)
    weight, bias = torch.randn(16), torch.randn(16)
    with pytest.raises(ValueError, match=r"gate and up must have the same shape, got \(4, 16\) and \(4, 15\)"):
        vitfast_ops.swiglu_fwd(gate, up[:, :15])
    with pytest.raises(ValueError, match="gate and up must have the same dtype"):
        vitfast_ops.swiglu_fwd(gate, up.half())
    with pytest.raises(ValueError, match="gate must be float16, bfloat16 or float32 .* got torch.float64"):
        vitfast_ops.swiglu_fwd(gate.double(), up.double())
    with pytest.raises(ValueError, match="non-empty last dimension"):
        vitfast_ops.swiglu_fwd(torch.randn(4, 0), torch.randn(4, 0))
    with pytest.raises(ValueError, match=r"grad must have the shape of gate \(4, 16\), got \(4, 8\)"):
        vitfast_ops.swiglu_bwd(torch.randn(4, 8), gate, up)
    with pytest.raises(ValueError, match=r"even, non-zero last dimension, got shape \(4, 15\)"):
        vitfast_ops.swiglu_packed_fwd(torch.randn(4, 15))
    with pytest.raises(ValueError, match=r"grad must have shape \(4, 8\) for x \(4, 16\), got \(4, 16\)"):
        vitfast_ops.swiglu_packed_bwd(gate, gate)
    with pytest.raises(ValueError, match="packed SwiGLU needs an even last dimension, got 15"):
        ops.swiglu_packed(torch.randn(4, 15))
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\), got \(15,\)"):
        vitfast_ops.swiglu_layer_norm_fwd(gate, up, weight[:15], bias, EPS, 16)
    with pytest.raises(ValueError, match=r"bias must have shape \(15,\) or \(16,\), got \(14,\)"):
        vitfast_ops.swiglu_layer_norm_fwd(gate, up, weight[:15], bias[:14], EPS, 15)
    with pytest.raises(ValueError, match=r"width must be in \[1, 16\]"):
        vitfast_ops.swiglu_layer_norm_fwd(gate, up, weight, bias, EPS, 17)
    # the public op: a narrower weight is an error unless the caller says the rows are padded
    with pytest.raises(ValueError, match=r"weight and bias must be \[16\].*pass width="):
        ops.swiglu_layer_norm(gate, up, weight[:15], bias[:15])
    with pytest.raises(ValueError, match=r"width must be an int in \[1, 8\]"):
        ops.swiglu_layer_norm(gate[:, :8], up[:, :8], weight, bias, width=16)
    with pytest.raises(ValueError, match=r"needs weight and bias of one shape, \(12,\) or \(16,\)"):
        ops.swiglu_layer_norm(gate, up, weight[:13], bias[:13], width=12)
    with pytest.raises(ValueError, match="bias must be float16, bfloat16 or float32 .* got torch.float64"):
        vitfast_ops.swiglu_layer_norm_fwd(gate, up, weight, bias.double(), EPS, 16)
    with pytest.raises(ValueError, match="takes widths up to 8192, got 8193"):
        vitfast_ops.swiglu_layer_norm_fwd(torch.randn(1, 8193), torch.randn(1, 8193), weight, bias, EPS, 16)
    _out, mean, rstd = vitfast_ops.swiglu_layer_norm_fwd(gate, up, weight, bias, EPS, 16)
    with pytest.raises(ValueError, match=r"mean and rstd must have shape \(4,\), got \(3,\) and \(4,\)"):
        vitfast_ops.swiglu_layer_norm_bwd(gate, gate, up, weight, mean[:3], rstd, 16)
    with pytest.raises(ValueError, match="mean and rstd must be float32, got torch.float32 and torch.float16"):
        vitfast_ops.swiglu_layer_norm_bwd(gate, gate, up, weight, mean, rstd.half(), 16)


def test_public_functions_and_the_reference_backend() -> None:
    gate, up = torch.randn(2, 9, 40, dtype=torch.float64), torch.randn(2, 9, 40, dtype=torch.float64)
    weight, bias = (t.double() for t in _params(40, torch.float32, device="cpu"))
    with vitfast.backend.use_backend("reference"):
        out = ops.swiglu_layer_norm(gate, up, weight, bias, EPS)
        assert torch.equal(out, F.layer_norm(F.silu(gate) * up, (40,), weight, bias, EPS))
        assert torch.equal(ops.swiglu(gate, up), F.silu(gate) * up)
        assert torch.equal(ops.swiglu_packed(torch.cat([gate, up], -1)), F.silu(gate) * up)
    assert ops.swiglu_layer_norm_ref is sw.swiglu_layer_norm_ref


def _swiglu_layer(sub_norm: bool, drop: float) -> SwiGLU:
    layer = SwiGLU(24, 43, sub_norm=sub_norm, drop=drop)
    norm_weight = getattr(layer.norm, "weight", None)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(0.2 * torch.randn_like(param) + (1.0 if param is norm_weight else 0.0))
    return layer


@pytest.mark.parametrize(
    "sub_norm, drop, training, fused",
    [(True, 0.0, True, True), (True, 0.1, False, True), (True, 0.1, True, False), (False, 0.0, False, False)],
)
def test_swiglu_layer_fuses_the_sub_norm_unless_dropout_sits_between(sub_norm, drop, training, fused) -> None:
    layer = _swiglu_layer(sub_norm, drop).train(training)
    calls = []

    def spy(name):
        reference = vitfast.backend._impls[name]["reference"]
        return lambda *args: calls.append(name) or reference(*args)

    x = torch.randn(2, 7, 24)
    with (
        vitfast.backend.override_impl("swiglu", spy("swiglu")),
        vitfast.backend.override_impl("swiglu_layer_norm", spy("swiglu_layer_norm")),
    ):
        torch.manual_seed(1)
        out = layer(x)
    assert calls == (["swiglu_layer_norm"] if fused else ["swiglu"])
    torch.manual_seed(1)  # the same dropout masks, drawn in the same order
    hidden = layer.drop(F.silu(layer.fc1_g(x)) * layer.fc1_x(x))
    if sub_norm:
        hidden = F.layer_norm(hidden, (43,), layer.norm.weight, layer.norm.bias, layer.norm.eps)
    assert torch.equal(out, layer.drop(layer.fc2(hidden)))  # the reference path is today's maths, bit for bit


def test_swiglu_layer_with_the_kernels() -> None:
    layer = _swiglu_layer(True, 0.0).eval()
    reference = _swiglu_layer(True, 0.0).double().eval()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 11, 24)
    with vitfast.backend.override_impl("swiglu_layer_norm", sw._swiglu_layer_norm_triton):
        out = layer(x)
    with vitfast.backend.use_backend("reference"):
        torch_out = layer(x)
    expected = reference(x.double())
    assert_kernel_close(out, expected, torch_out, what="SwiGLU layer output")
    d_out = torch.randn_like(out)
    kernel_grads = torch.autograd.grad(out, list(layer.parameters()), d_out)
    torch_grads = torch.autograd.grad(torch_out, list(layer.parameters()), d_out)
    expected_grads = torch.autograd.grad(expected, list(reference.parameters()), d_out.double())
    names = [name for name, _ in layer.named_parameters()]
    for name, got, want, baseline in zip(names, kernel_grads, expected_grads, torch_grads, strict=True):
        assert_kernel_close(got, want, baseline, what=f"SwiGLU layer d_{name}")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("width", [2730, 2048, 1024])
def test_bf16_full_shapes_on_gpu(width) -> None:
    rows = 8 * 1025
    with torch.device("cuda"):
        gate, up = torch.randn(rows, width).bfloat16(), torch.randn(rows, width).bfloat16()
        _compare(sw._swiglu_triton, sw.swiglu_ref, {"gate": gate, "up": up}, f"bf16 split {rows}x{width}")
        x = torch.randn(rows, 2 * width).bfloat16()
        _compare(sw._swiglu_packed_triton, sw.swiglu_packed_ref, {"x": x}, f"bf16 packed {rows}x{width}")
        weight, bias = _params(width, torch.bfloat16, device="cuda")
        inputs = {"gate": gate, "up": up, "weight": weight, "bias": bias}
        _compare(_layer_norm_kernel, _layer_norm_reference, inputs, f"bf16 fused LN {rows}x{width}")


@pytest.mark.gpu
@requires_gpu
def test_opcheck_full_on_gpu() -> None:
    with torch.device("cuda"):
        gate, up = torch.randn(2, 197, 2730).bfloat16(), torch.randn(2, 197, 2730).bfloat16()
        weight, bias = _params(2730, torch.float32, device="cuda")
        leaves = [t.requires_grad_() for t in (gate, up, weight, bias)]
        x = torch.randn(2, 197, 1024).bfloat16().requires_grad_()
        d_out = torch.randn(2, 197, 2730).bfloat16()
        torch.library.opcheck(torch.ops.vitfast.swiglu_fwd, (gate, up))
        torch.library.opcheck(torch.ops.vitfast.swiglu_bwd, (d_out, gate.detach(), up.detach()))
        torch.library.opcheck(torch.ops.vitfast.swiglu_packed_fwd, (x,))
        torch.library.opcheck(torch.ops.vitfast.swiglu_packed_bwd, (d_out[..., :512], x.detach()))
        torch.library.opcheck(torch.ops.vitfast.swiglu_layer_norm_fwd, (*leaves, EPS, 2730))
        _out, mean, rstd = torch.ops.vitfast.swiglu_layer_norm_fwd(*(t.detach() for t in leaves), EPS, 2730)
        torch.library.opcheck(
            torch.ops.vitfast.swiglu_layer_norm_bwd,
            (d_out, gate.detach(), up.detach(), weight.detach(), mean, rstd, 2730),
        )


@pytest.mark.gpu
@requires_gpu
def test_torch_compile_fullgraph_on_gpu() -> None:
    def mlp_hidden(gate, up, x, weight, bias):
        split = ops.swiglu(gate, up)
        packed = ops.swiglu_packed(x)
        return ops.swiglu_layer_norm(split, packed, weight, bias, EPS)

    with torch.device("cuda"), vitfast.backend.use_backend("triton"):
        gate, up = torch.randn(4, 257, 2730).bfloat16(), torch.randn(4, 257, 2730).bfloat16()
        x = torch.randn(4, 257, 2 * 2730).bfloat16()
        weight, bias = _params(2730, torch.bfloat16, device="cuda")
        inputs = {"gate": gate, "up": up, "x": x, "weight": weight, "bias": bias}
        compiled = torch.compile(mlp_hidden, fullgraph=True)

        def reference(gate, up, x, weight, bias):
            hidden = sw.swiglu_ref(gate, up)
            return sw.swiglu_layer_norm_ref(hidden, sw.swiglu_packed_ref(x), weight, bias, EPS)

        _compare(compiled, reference, inputs, "torch.compile")
