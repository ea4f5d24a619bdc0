"""Fused LayerNorm (plain and with the pre-norm residual add): the Triton kernels against an fp64 reference.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py). Errors are bounded as in STYLE rule 5:
at most twice the error of PyTorch in the same dtype (``F.layer_norm`` / eager ``x + gamma * branch``, run through
autograd for the gradients) plus the dtype's epsilon. On the CPU, ``F.layer_norm`` in fp16/bf16 keeps its statistics
in fp32 and rounds once, like the kernels, so the baseline is an honest same-dtype result.

The interpreter rounds fp32 -> bf16 by truncation (Triton 3.8's ``_convert_float``), a GPU rounds to nearest even: in
bf16 the kernel's error here is up to one bf16 ulp instead of half of one, still inside the bound thanks to its floor.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import vitfast.ops._triton as triton_glue
from tests.helpers import assert_kernel_close
from vitfast import ops

# the module, not the function of the same name that vitfast.ops exports
ln = importlib.import_module("vitfast.ops.layer_norm")

pytest.importorskip("triton")

EPS = 1e-6
ROWS = (3, 197)  # 591 rows: odd, not a multiple of any row block
CUDA = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled kernels, torch.compile, full shapes)")
CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def _leaves(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {name: None if t is None else t.detach().clone().requires_grad_() for name, t in tensors.items()}


def _grads(outputs, leaves: dict, grad_outputs) -> dict[str, torch.Tensor]:
    """Gradients of every present leaf for the given output gradients (None: that output is not used)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if g is not None]
    wanted = {name: t for name, t in leaves.items() if t is not None}
    # a parameter off the used outputs' path (weight when only residual_out is used) gets zeros, and so must the kernel
    grads = torch.autograd.grad(
        [o for o, _ in pairs], list(wanted.values()), [g for _, g in pairs], allow_unused=True, materialize_grads=True
    )
    return dict(zip(wanted, grads, strict=True))


def _params(cols: int, dtype: torch.dtype, weight=True, bias=True, gamma=False) -> dict[str, torch.Tensor | None]:
    return {
        "gamma": (0.5 + 0.1 * torch.randn(cols)).to(dtype) if gamma else None,
        "weight": (1.0 + 0.1 * torch.randn(cols)).to(dtype) if weight else None,
        "bias": (0.1 * torch.randn(cols)).to(dtype) if bias else None,
    }


def _double(tensors: dict) -> dict:
    return {name: None if t is None else t.double() for name, t in tensors.items()}


def _check_plain(x, weight, bias, kernel_fn, what: str) -> None:
    """``kernel_fn(x, weight, bias, eps)``: output and gradients against fp64, bounded by F.layer_norm in x's dtype."""
    d_out = torch.randn(x.shape).to(x.dtype)
    inputs = {"x": x, "weight": weight, "bias": bias}
    results = {}
    for name, fn, dtype in (
        ("kernel", kernel_fn, None),
        ("torch", ln.layer_norm_ref, None),
        ("fp64", ln.layer_norm_ref, torch.float64),
    ):
        leaves = _leaves(_double(inputs) if dtype else inputs)
        out = fn(leaves["x"], leaves["weight"], leaves["bias"], EPS)
        results[name] = {"out": out, **_grads([out], leaves, [d_out.to(out.dtype)])}
    assert results["kernel"]["out"].dtype == x.dtype
    for key in results["fp64"]:
        assert results["kernel"][key].dtype == results["torch"][key].dtype, key
        assert_kernel_close(results["kernel"][key], results["fp64"][key], results["torch"][key], what=f"{what} {key}")


def _eager_residual(x, branch, gamma, weight, bias, eps):
    """What a same-dtype PyTorch model does: ``x + gamma * branch`` in eager ops, then F.layer_norm."""
    residual = x + (branch if gamma is None else gamma * branch)
    return F.layer_norm(residual, (x.shape[-1],), weight, bias, eps), residual


def _check_residual(x, branch, params, kernel_fn, what: str, use_normed=True, use_residual=True) -> None:
    """``kernel_fn`` = layer_norm_residual: both outputs and the gradients of every input, for the used outputs."""
    d_normed = torch.randn(x.shape).to(x.dtype) if use_normed else None
    d_residual = torch.randn(x.shape).to(x.dtype) if use_residual else None
    inputs = {"x": x, "branch": branch, **params}
    results = {}
    for name, fn, dtype in (
        ("kernel", kernel_fn, None),
        ("torch", _eager_residual, None),
        ("fp64", ln.layer_norm_residual_ref, torch.float64),
    ):
        leaves = _leaves(_double(inputs) if dtype else inputs)
        normed, residual = fn(*leaves.values(), EPS)
        grad_outputs = [None if g is None else g.to(normed.dtype) for g in (d_normed, d_residual)]
        results[name] = {"normed": normed, "residual": residual, **_grads([normed, residual], leaves, grad_outputs)}
    assert results["kernel"]["normed"].dtype == results["kernel"]["residual"].dtype == x.dtype
    assert all(results["kernel"][name].dtype == t.dtype for name, t in inputs.items() if t is not None)
    for key in results["fp64"]:
        assert_kernel_close(results["kernel"][key], results["fp64"][key], results["torch"][key], what=f"{what} {key}")


def _cases(*groups: tuple[torch.dtype, tuple[int, ...]]) -> list:
    return [pytest.param(dtype, cols, id=f"{str(dtype)[6:]}-{cols}") for dtype, widths in groups for cols in widths]


@pytest.mark.parametrize(
    "dtype, cols",
    _cases(
        (torch.float32, (50, 384, 768, 1024, 1408, 2730)),
        (torch.float16, (50, 384, 768, 2730)),
        (torch.bfloat16, (384, 1280, 1408)),
    ),
)
def test_layer_norm_kernel(dtype, cols) -> None:
    x = torch.randn(*ROWS, cols).to(dtype)
    params = _params(cols, dtype)
    _check_plain(x, params["weight"], params["bias"], ln._layer_norm_triton, f"{dtype} C={cols}")


@pytest.mark.parametrize(
    "dtype, cols",
    _cases((torch.float32, (50, 768, 2730)), (torch.float16, (768,)), (torch.bfloat16, (1024,))),
)
def test_layer_norm_residual_kernel(dtype, cols) -> None:
    x, branch = torch.randn(*ROWS, cols).to(dtype), torch.randn(*ROWS, cols).to(dtype)
    params = _params(cols, dtype, gamma=True)
    _check_residual(x, branch, params, ln._layer_norm_residual_triton, f"{dtype} C={cols}")


@pytest.mark.parametrize("dtype, cols", _cases((torch.float16, (1001,)), (torch.bfloat16, (768,))))
def test_layer_norm_residual_without_layer_scale(dtype, cols) -> None:
    """``x + branch`` (ViT, EVA-02): branch's gradient is dx itself, no copy; an odd width, batch 1's 197 rows."""
    x, branch = torch.randn(197, cols).to(dtype), torch.randn(197, cols).to(dtype)
    _check_residual(x, branch, _params(cols, dtype), ln._layer_norm_residual_triton, f"{dtype} C={cols} no gamma")


@pytest.mark.parametrize("gamma", [True, False])
@pytest.mark.parametrize("weight, bias", [(True, True), (True, False), (False, True), (False, False)])
def test_layer_norm_residual_optional_parameters(gamma, weight, bias) -> None:
    x, branch = torch.randn(37, 300), torch.randn(37, 300)
    params = _params(300, torch.float32, weight=weight, bias=bias, gamma=gamma)
    _check_residual(x, branch, params, ln._layer_norm_residual_triton, f"gamma={gamma} w={weight} b={bias}")
    if not gamma:
        _check_plain(x, params["weight"], params["bias"], ln._layer_norm_triton, f"plain w={weight} b={bias}")


@pytest.mark.parametrize("use_normed, use_residual", [(True, False), (False, True)])
def test_layer_norm_residual_one_output_used(use_normed, use_residual) -> None:
    x, branch = torch.randn(2, 45, 200).half(), torch.randn(2, 45, 200).half()
    params = _params(200, torch.float16, gamma=True)
    _check_residual(x, branch, params, ln._layer_norm_residual_triton, "one output", use_normed, use_residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_statistics(dtype) -> None:
    """The fp32 mean and rstd the forward returns, of x (plain) and of the rounded residual_out (residual variant)."""
    x, branch = torch.randn(3, 101, 1408).to(dtype) + 3.0, torch.randn(3, 101, 1408).to(dtype)
    for fwd_branch in (None, branch):
        _out, residual, mean, rstd = torch.ops.vitfast.layer_norm_fwd(x, fwd_branch, None, None, None, EPS)
        normalized = x if fwd_branch is None else residual
        var64, mean64 = torch.var_mean(normalized.double(), dim=-1, correction=0)
        var32, mean32 = torch.var_mean(normalized.float(), dim=-1, correction=0)
        assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (3, 101)
        assert_kernel_close(mean, mean64, mean32, what="mean")
        assert_kernel_close(rstd, torch.rsqrt(var64 + EPS), torch.rsqrt(var32 + EPS), what="rstd")


def test_layer_norm_bwd_op_without_output_gradients() -> None:
    """Autograd hands the backward zeros for unused outputs; called directly, the op takes None for either."""
    x, branch = torch.randn(41, 96), torch.randn(41, 96)
    gamma, weight, bias = _params(96, torch.float32, gamma=True).values()
    _out, residual, mean, rstd = torch.ops.vitfast.layer_norm_fwd(x, branch, gamma, weight, bias, EPS)
    d_out, d_residual = torch.randn(41, 96), torch.randn(41, 96)
    for given_d_out, given_d_residual in ((None, d_residual), (d_out, None), (None, None)):
        grads = torch.ops.vitfast.layer_norm_bwd(
            given_d_out, given_d_residual, residual, branch, gamma, weight, bias, mean, rstd
        )
        expected = torch.ops.vitfast.layer_norm_bwd(
            torch.zeros_like(d_out) if given_d_out is None else d_out,
            torch.zeros_like(d_residual) if given_d_residual is None else d_residual,
            residual,
            branch,
            gamma,
            weight,
            bias,
            mean,
            rstd,
        )
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    dx, dbranch, dgamma, dweight, dbias = grads
    assert dx.abs().max() == 0 and dweight.abs().max() == 0 and dgamma.abs().max() == 0


def test_layer_norm_strided_and_mixed_dtype_inputs() -> None:
    """Non-contiguous activations (a transposed view, a column slice) and mixed dtypes."""
    base = torch.randn(5, 300, 7).half()
    x = base.transpose(1, 2)  # [5, 7, 300], last dim strided: copied to unit stride
    weight, bias = (1 + 0.1 * torch.randn(300)), 0.1 * torch.randn(300)
    _check_plain(x, weight, bias, ln._layer_norm_triton, "transposed x, fp32 params")
    wide = torch.randn(3, 11, 640)
    sliced = wide[..., 100:400]  # unit column stride, row stride 640: read in place
    branch = torch.randn(3, 11, 300)
    params = _params(300, torch.float32, gamma=True)
    _check_residual(sliced, branch, params, ln._layer_norm_residual_triton, "row-strided x")
    # an fp32 residual stream with a bf16 branch (autocast): residual_out and normed in fp32, dbranch in bf16
    _check_residual(sliced, branch.bfloat16(), params, ln._layer_norm_residual_triton, "fp32 x, bf16 branch")


# (rows, cols): BLOCK_ROWS, then the backward's (programs, rows per program), on a 2-SM device (8 programs wanted)
_GPU_CONFIGS = {(37, 768): (4, (5, 8)), (7, 768): (1, (7, 1))}


@pytest.mark.parametrize("rows, cols", list(_GPU_CONFIGS))
def test_gpu_block_sizes_and_grid_through_the_interpreter(monkeypatch, rows, cols) -> None:
    """The GPU launch configuration run through the interpreter, here for a 2-SM device: the GPU tile (4 rows of 768
    per program, fewer when that leaves an SM under 4 programs: 7 rows, one each), the GPU backward grid (37 rows: 5
    programs looping over two row blocks each) and the reduction's 32-column programs run the same kernels
    correctly."""
    monkeypatch.setattr(ln, "_TILE", 4096)
    monkeypatch.setattr(ln, "_sm_count", lambda device: 2)
    block_rows = ln._block_sizes(cols, rows, 2)[0]
    assert (block_rows, ln._bwd_grid(rows, block_rows, 2)[:2]) == _GPU_CONFIGS[rows, cols]
    x, branch = torch.randn(rows, cols), torch.randn(rows, cols)
    _check_residual(x, branch, _params(cols, torch.float32, gamma=True), ln._layer_norm_residual_triton, "tile")
    params = _params(cols, torch.float32)
    _check_plain(x, params["weight"], params["bias"], ln._layer_norm_triton, "tile")


def test_batch_1_fills_the_gpu(monkeypatch) -> None:
    """ViT-B/16 at batch 1 (197 rows of 768) on 132 SMs: a row per program, forward and backward."""
    monkeypatch.setattr(ln, "_TILE", 4096)  # the GPU's
    block_rows = ln._block_sizes(768, 197, 132)[0]
    assert block_rows == 1 and ln._bwd_grid(197, block_rows, 132)[0] == 197
    # at batch 64 the backward's programs still fill every SM several times over
    assert ln._bwd_grid(64 * 197, ln._block_sizes(768, 64 * 197, 132)[0], 132)[0] >= 3 * 132


@pytest.mark.parametrize("rows", [1, 3, 591, 8 * 1025, 256 * 1025])
@pytest.mark.parametrize("block_rows", [1, 4, 64])
@pytest.mark.parametrize("sm_count", [None, 132])
def test_bwd_grid_covers_every_row_once(rows, block_rows, sm_count) -> None:
    programs, rows_per_program, tile_rows = ln._bwd_grid(rows, block_rows, sm_count)
    assert rows_per_program % tile_rows == 0 and tile_rows <= block_rows
    assert (programs - 1) * rows_per_program < rows <= programs * rows_per_program, "no empty program, no row left"
    sequential = rows_per_program // tile_rows if sm_count else rows_per_program  # the interpreter: every row
    assert sequential <= ln._MAX_CHAIN
    if sm_count:  # the machine is kept busy: rounding rows_per_program up loses at most half the wanted programs
        assert 2 * programs >= min(ln._PROGRAMS_PER_SM * sm_count, -(-rows // block_rows))


@settings(max_examples=6, deadline=None)
@given(
    rows=st.integers(1, 300),
    cols=st.integers(8, 3000),  # narrower: test_layer_norm_tiny_widths
    residual=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layer_norm_random_shapes(rows, cols, residual, affine, seed) -> None:
    torch.manual_seed(seed)
    x = torch.randn(rows, cols)
    params = _params(cols, torch.float32, weight=affine, bias=affine, gamma=residual)
    if residual:
        _check_residual(x, torch.randn(rows, cols), params, ln._layer_norm_residual_triton, f"{rows}x{cols}")
    else:
        _check_plain(x, params["weight"], params["bias"], ln._layer_norm_triton, f"{rows}x{cols}")


@pytest.mark.parametrize("cols", [1, 2, 3, 5, 7])
def test_layer_norm_tiny_widths(cols) -> None:
    """Outputs only. The gradients of a row of a few values are mostly cancellation (at width 2 the exact dx is
    ~eps / spread**2 times the input gradient), so fp32 implementations differ there by their rounding noise alone,
    and the rule-5 bound would compare two noises; the hypothesis test covers gradients from width 8 up."""
    x, branch = torch.randn(300, cols), torch.randn(300, cols)
    gamma, weight, bias = _params(cols, torch.float32, gamma=True).values()
    kernel = ln._layer_norm_triton(x, weight, bias, EPS)
    expected = ln.layer_norm_ref(x.double(), weight.double(), bias.double(), EPS)
    assert_kernel_close(kernel, expected, ln.layer_norm_ref(x, weight, bias, EPS), what=f"out C={cols}")
    kernel = ln._layer_norm_residual_triton(x, branch, gamma, weight, bias, EPS)
    expected = ln.layer_norm_residual_ref(*(t.double() for t in (x, branch, gamma, weight, bias)), EPS)
    baseline = _eager_residual(x, branch, gamma, weight, bias, EPS)
    for got, want, base, what in zip(kernel, expected, baseline, ("normed", "residual"), strict=True):
        assert_kernel_close(got, want, base, what=f"{what} C={cols}")


def test_opcheck_cpu() -> None:
    x, branch = torch.randn(2, 13, 70), torch.randn(2, 13, 70)
    gamma, weight, bias = _params(70, torch.float32, gamma=True).values()
    leaves = [t.requires_grad_() for t in (x, branch, gamma, weight, bias)]
    torch.library.opcheck(torch.ops.vitfast.layer_norm_fwd, (*leaves, EPS), test_utils=CPU_OPCHECK)
    torch.library.opcheck(torch.ops.vitfast.layer_norm_fwd, (x, None, None, None, bias, EPS), test_utils=CPU_OPCHECK)
    _out, residual, mean, rstd = torch.ops.vitfast.layer_norm_fwd(*(t.detach() for t in leaves), EPS)
    d_out, d_residual = torch.randn_like(x), torch.randn_like(x)
    detached = [t.detach() for t in (branch, gamma, weight, bias)]
    torch.library.opcheck(
        torch.ops.vitfast.layer_norm_bwd, (d_out, d_residual, residual, *detached, mean, rstd), test_utils=CPU_OPCHECK
    )
    _out, _residual, mean, rstd = torch.ops.vitfast.layer_norm_fwd(x.detach(), None, None, None, None, EPS)
    torch.library.opcheck(
        torch.ops.vitfast.layer_norm_bwd,
        (d_out, None, x.detach(), None, None, None, None, mean, rstd),
        test_utils=CPU_OPCHECK,
    )


def test_ops_run_the_pytorch_twins_where_kernels_cannot(monkeypatch) -> None:
    """Off the interpreter, CPU tensors take the PyTorch bodies of the ops: same outputs, same layout as the kernels."""
    x, branch = torch.randn(3, 29, 130), torch.randn(3, 29, 130)
    gamma, weight, bias = _params(130, torch.float32, gamma=True).values()
    d_out, d_residual = torch.randn_like(x), torch.randn_like(x)

    def run(*fwd_args):
        out, residual, mean, rstd = torch.ops.vitfast.layer_norm_fwd(*fwd_args, EPS)
        normalized = fwd_args[0] if fwd_args[1] is None else residual
        grads = torch.ops.vitfast.layer_norm_bwd(
            d_out, d_residual if fwd_args[1] is not None else None, normalized, *fwd_args[1:], mean, rstd
        )
        return (out, residual, mean, rstd, *grads)

    for fwd_args in ((x, branch, gamma, weight, bias), (x, None, None, weight, None), (x, branch, None, None, bias)):
        kernel = run(*fwd_args)
        monkeypatch.setattr(triton_glue, "INTERPRETER", False)
        twin = run(*fwd_args)
        monkeypatch.undo()
        for got, want in zip(twin, kernel, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fallbacks_run_the_reference(monkeypatch) -> None:
    reasons = []
    monkeypatch.setattr(ln, "log_fallback", lambda op, reason: reasons.append((op, reason)))
    x64 = torch.randn(7, 33, dtype=torch.float64)
    w64, b64 = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    assert torch.equal(ln._layer_norm_triton(x64, w64, b64, EPS), ln.layer_norm_ref(x64, w64, b64, EPS))
    wide = torch.randn(2, ln.MAX_WIDTH + 1)
    assert torch.equal(ln._layer_norm_triton(wide, None, None, EPS), ln.layer_norm_ref(wide, None, None, EPS))
    x, row = torch.randn(4, 5, 48), torch.randn(1, 5, 48)  # a branch broadcast over the batch
    for got, want in zip(
        ln._layer_norm_residual_triton(x, row, None, None, None, EPS),
        ln.layer_norm_residual_ref(x, row, None, None, None, EPS),
        strict=True,
    ):
        assert torch.equal(got, want)
    assert [op for op, _ in reasons] == ["layer_norm", "layer_norm", "layer_norm_residual"]
    assert "float64" in reasons[0][1] and f"> {ln.MAX_WIDTH}" in reasons[1][1] and "broadcast" in reasons[2][1]


def test_public_functions_and_the_reference_backend() -> None:
    x, branch = torch.randn(2, 9, 40, dtype=torch.float64), torch.randn(2, 9, 40, dtype=torch.float64)
    gamma, weight, bias = _params(40, torch.float64, gamma=True).values()
    normed, residual = ops.layer_norm_residual(x, branch, gamma, weight, bias)
    torch.testing.assert_close(residual, x + gamma * branch, rtol=0, atol=0)
    torch.testing.assert_close(normed, F.layer_norm(residual, (40,), weight, bias, 1e-6), rtol=0, atol=0)
    assert ops.layer_norm_residual_ref is ln.layer_norm_residual_ref
    half = torch.randn(3, 64).bfloat16()
    half_branch = torch.randn(3, 64).bfloat16()
    half_gamma = torch.randn(64).bfloat16()
    rounded_once = (half.float() + half_gamma.float() * half_branch.float()).bfloat16()
    assert torch.equal(ln.layer_norm_residual_ref(half, half_branch, half_gamma, None, None)[1], rounded_once)


def test_bad_input_messages() -> None:
    fwd, bwd = torch.ops.vitfast.layer_norm_fwd, torch.ops.vitfast.layer_norm_bwd
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\), got \(15,\)"):
        fwd(x, None, None, torch.randn(15), None, EPS)
    with pytest.raises(ValueError, match="gamma .* needs a branch"):
        fwd(x, None, torch.randn(16), None, None, EPS)
    with pytest.raises(ValueError, match=r"branch must have x's shape \(4, 16\), got \(4, 15\)"):
        fwd(x, torch.randn(4, 15), None, None, None, EPS)
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32, got torch.float64"):
        fwd(x.double(), None, None, None, None, EPS)
    with pytest.raises(ValueError, match=f"widths 1..{ln.MAX_WIDTH}, got {ln.MAX_WIDTH + 1}"):
        fwd(torch.randn(2, ln.MAX_WIDTH + 1), None, None, None, None, EPS)
    with pytest.raises(ValueError, match="bias must be float16, bfloat16 or float32"):
        fwd(x, None, None, None, torch.randn(16, dtype=torch.float64), EPS)
    mean, rstd = torch.randn(4), torch.rand(4)
    with pytest.raises(ValueError, match=r"rstd must be float32 of shape \(4,\)"):
        bwd(x, None, x, None, None, None, None, mean, rstd.half())
    with pytest.raises(ValueError, match=r"mean must be float32 of shape \(4,\) on cpu, got torch.float32 \(3,\)"):
        bwd(x, None, x, None, None, None, None, mean[:3], rstd)
    with pytest.raises(ValueError, match=r"d_out must have x's shape"):
        bwd(x[:3], None, x, None, None, None, None, mean, rstd)


def test_empty_rows() -> None:
    x = torch.randn(0, 7, 32)
    weight = torch.randn(32, requires_grad=True)
    out, _residual, mean, rstd = torch.ops.vitfast.layer_norm_fwd(x, None, None, weight, None, EPS)
    assert out.shape == x.shape and mean.shape == rstd.shape == (0, 7)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(32))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("rows, cols", [(8 * 1025, 1024), (8 * 257, 2730), (8 * 197, 6144)])
def test_bf16_full_shapes_on_gpu(rows, cols) -> None:
    with torch.device("cuda"):
        x, branch = torch.randn(rows, cols).bfloat16(), torch.randn(rows, cols).bfloat16()
        params = _params(cols, torch.bfloat16, gamma=True)
        _check_plain(x, params["weight"], params["bias"], ln._layer_norm_triton, f"bf16 {rows}x{cols}")
        _check_residual(x, branch, params, ln._layer_norm_residual_triton, f"bf16 {rows}x{cols}")


@pytest.mark.gpu
@requires_gpu
def test_opcheck_full_on_gpu() -> None:
    with torch.device("cuda"):
        x, branch = torch.randn(2, 197, 768).bfloat16(), torch.randn(2, 197, 768).bfloat16()
        gamma, weight, bias = _params(768, torch.float32, gamma=True).values()
        leaves = [t.requires_grad_() for t in (x, branch, gamma, weight, bias)]
        torch.library.opcheck(torch.ops.vitfast.layer_norm_fwd, (*leaves, EPS))
        torch.library.opcheck(torch.ops.vitfast.layer_norm_fwd, (x, None, None, weight, None, EPS))
        _out, residual, mean, rstd = torch.ops.vitfast.layer_norm_fwd(*(t.detach() for t in leaves), EPS)
        d_out, d_residual = torch.randn_like(x), torch.randn_like(x)
        detached = [t.detach() for t in (branch, gamma, weight, bias)]
        torch.library.opcheck(torch.ops.vitfast.layer_norm_bwd, (d_out, d_residual, residual, *detached, mean, rstd))
        _out, _residual, mean, rstd = torch.ops.vitfast.layer_norm_fwd(x.detach(), None, None, weight, None, EPS)
        torch.library.opcheck(
            torch.ops.vitfast.layer_norm_bwd,
            (d_out, None, x.detach(), None, None, weight.detach(), None, mean, rstd),
        )


@pytest.mark.gpu
@requires_gpu
def test_torch_compile_fullgraph_on_gpu() -> None:
    def block(x, branch, gamma, weight, bias):
        normed, residual = ln._layer_norm_residual_triton(x, branch, gamma, weight, bias, EPS)
        return ln._layer_norm_triton(normed, weight, bias, EPS) + residual

    with torch.device("cuda"):
        inputs = [torch.randn(4, 257, 2730).bfloat16(), torch.randn(4, 257, 2730).bfloat16()]
        inputs += list(_params(2730, torch.float32, gamma=True).values())
        d_out = torch.randn(4, 257, 2730).bfloat16()
        results = []
        for fn in (block, torch.compile(block, fullgraph=True)):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = fn(*leaves)
            results.append([out, *torch.autograd.grad(out, leaves, d_out)])
        for compiled, eager in zip(results[1], results[0], strict=True):
            # the same kernels run; only the fp32 sums of the parameter-gradient partials may be reordered
            tolerance = {"rtol": 1e-5, "atol": 1e-5} if eager.dtype == torch.float32 else {"rtol": 0, "atol": 0}
            torch.testing.assert_close(compiled, eager, **tolerance)


def test_fallback_logs_at_debug(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="vitfast")
    triton_glue._logged.discard(("layer_norm", "dtype torch.float64 (kernels: float16, bfloat16, float32)"))
    ln._layer_norm_triton(torch.randn(2, 8, dtype=torch.float64), None, None, EPS)
    assert "dtype torch.float64" in caplog.text and "running the reference" in caplog.text
