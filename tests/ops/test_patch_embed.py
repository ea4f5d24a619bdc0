"""The fused patch-embedding kernels (``patch_embed_tokens``) against the plain-PyTorch model path.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py), which is slow: sizes stay small
(64x48 images at patch 16 = a 4x3 grid, 56x42 at patch 14, D = 96) but every tail is masked (K = 768 / 588 is not a
multiple of the K tile, D = 96 and B * N are not multiples of theirs).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import vitfast.backend
from tests.helpers import assert_kernel_close
from vitfast import ops
from vitfast.ops import _triton

# vitfast.ops re-exports the function patch_embed under the module's own name
pytest.importorskip("triton")
pe = importlib.import_module("vitfast.ops.patch_embed")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SHAPES = {16: (64, 48), 14: (56, 42)}
EMBED_DIM = 96
NAMES = ("x", "weight", "bias", "pos_embed", "cls_token")

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs the compiled kernels)")


def make_inputs(
    patch: int = 16,
    batch: int = 2,
    pos: str | None = "with_cls",
    cls: bool = True,
    bias: bool = True,
    uint8: bool = False,
    embed_dim: int = EMBED_DIM,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
) -> dict[str, torch.Tensor | None]:
    """Fresh random fp64 inputs (uint8 image when asked); ``pos``: "with_cls" (N + 1 positions), "patches" (N), None."""
    height, width = size or SHAPES[patch]
    num_patches = (height // patch) * (width // patch)
    if uint8:
        x = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, device=device)
    else:
        x = torch.randn(batch, 3, height, width, dtype=torch.float64, device=device)
    pos_len = {"with_cls": num_patches + 1, "patches": num_patches, None: 0}[pos]
    return {
        "x": x,
        "weight": 0.05 * torch.randn(embed_dim, 3, patch, patch, dtype=torch.float64, device=device),
        "bias": torch.randn(embed_dim, dtype=torch.float64, device=device) if bias else None,
        "pos_embed": torch.randn(1, pos_len, embed_dim, dtype=torch.float64, device=device) if pos else None,
        "cls_token": torch.randn(1, 1, embed_dim, dtype=torch.float64, device=device) if cls else None,
    }


def leaves(inputs: dict, dtype: torch.dtype, x_grad: bool = True) -> dict:
    """Copies in ``dtype`` (a uint8 image stays uint8) that require grad."""
    out = {}
    for name, tensor in inputs.items():
        if tensor is None or tensor.dtype == torch.uint8:
            out[name] = tensor
        else:
            out[name] = tensor.detach().to(dtype).requires_grad_(name != "x" or x_grad)
    return out


def run(fn, inputs: dict, grad_out: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Output and the gradients of every input that requires grad, for ``grad_out`` (fresh random when None)."""
    out = fn(*(inputs[name] for name in NAMES), **kwargs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    with_grad = {name: t for name, t in inputs.items() if t is not None and t.requires_grad}
    grads = torch.autograd.grad(out, list(with_grad.values()), grad_out.to(out.dtype))
    return out.detach(), dict(zip(with_grad, grads, strict=True)), grad_out


def check_against_reference(inputs: dict, dtype: torch.dtype, x_grad: bool = True, **kwargs) -> torch.Tensor:
    """Kernel output and gradients within STYLE rule 5 of the fp64 reference (bound: same-dtype PyTorch's error)."""
    out, grads, grad_out = run(pe._patch_embed_tokens_triton, leaves(inputs, dtype, x_grad), **kwargs)
    expected, expected_grads, _ = run(
        pe.patch_embed_tokens_ref, leaves(inputs, torch.float64, x_grad), grad_out, **kwargs
    )
    baseline, baseline_grads, _ = run(pe.patch_embed_tokens_ref, leaves(inputs, dtype, x_grad), grad_out, **kwargs)
    assert out.dtype == dtype
    assert_kernel_close(out, expected, baseline, what="tokens")
    assert set(grads) == set(expected_grads) and grads, f"gradients for {sorted(grads)}"
    for name, grad in grads.items():
        assert grad.dtype == dtype
        assert_kernel_close(grad, expected_grads[name], baseline_grads[name], what=f"d_{name}")
    return out


@pytest.mark.parametrize("patch", [16, 14])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tokens_and_all_gradients_match_reference(patch, dtype) -> None:
    check_against_reference(make_inputs(patch), dtype)


def test_tiles_follow_the_sm_count(monkeypatch) -> None:
    """Off a GPU the tiles are chosen as for an H100's 132 SMs: these tiny inputs take 64 x 64 tiles (every other
    test here runs them); with one SM the 128 x 128 tiles of large batches give every SM a program, and the forward,
    image-gradient and weight-gradient kernels still match the reference at them, uint8 normalization included."""
    cpu = torch.device("cpu")
    assert pe._tile(24, EMBED_DIM, 1, cpu) == (64, 4)
    assert pe._tile(196 * 64, 768, 1, cpu) == (128, 8)  # ViT-B/16 batch 64: 588 forward tiles
    assert pe._tile(768, 768, 8, cpu) == (128, 8)  # its weight gradient: 36 tiles x 8 row splits
    assert pe._tile(768, 768, 2, cpu) == (64, 4)  # batch 8: 36 x 2
    monkeypatch.setattr(_triton, "NOMINAL_SMS", 1)
    assert pe._tile(24, EMBED_DIM, 1, cpu) == (128, 8)
    check_against_reference(make_inputs(16), torch.bfloat16)
    check_against_reference(make_inputs(14, uint8=True), torch.float32, x_grad=False, mean=MEAN, std=STD)


@pytest.mark.parametrize(
    ("pos", "cls", "bias"),
    [("patches", True, True), ("patches", False, True), (None, True, False), (None, False, False)],
    ids=["pos_without_cls_position", "no_cls", "no_pos_no_bias", "bare_projection"],
)
def test_optional_parts(pos, cls, bias) -> None:
    out = check_against_reference(make_inputs(16, pos=pos, cls=cls, bias=bias), torch.float32)
    assert out.shape == (2, 12 + int(cls), EMBED_DIM)


@pytest.mark.parametrize(("patch", "dtype"), [(14, torch.float32), (16, torch.bfloat16)])
def test_uint8_image_matches_reference_on_the_normalized_image(patch, dtype) -> None:
    inputs = make_inputs(patch, uint8=True)
    out, grads, grad_out = run(pe._patch_embed_tokens_triton, leaves(inputs, dtype), mean=MEAN, std=STD)
    assert out.dtype == dtype and set(grads) == {"weight", "bias", "pos_embed", "cls_token"}
    # the reference sees the image normalized in fp64 beforehand, as a float input
    mean = torch.tensor(MEAN, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).reshape(1, 3, 1, 1)
    normalized = {**inputs, "x": (inputs["x"].double() / 255 - mean) / std}
    expected, expected_grads, _ = run(pe.patch_embed_tokens_ref, leaves(normalized, torch.float64, False), grad_out)
    baseline, baseline_grads, _ = run(pe.patch_embed_tokens_ref, leaves(inputs, dtype), grad_out, mean=MEAN, std=STD)
    assert_kernel_close(out, expected, baseline, what="tokens")
    for name, grad in grads.items():
        assert_kernel_close(grad, expected_grads[name], baseline_grads[name], what=f"d_{name}")


def test_float_image_with_mean_std_and_channels_last() -> None:
    """Normalization on load for a float image: the image gradient carries the 1 / std factor; any strides work."""
    inputs = make_inputs(16)
    inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    check_against_reference(inputs, torch.float32, mean=torch.tensor(MEAN), std=STD)


def test_rectangular_patch_and_other_channel_count() -> None:
    """Nothing assumes 3 channels or square patches: one channel, 8x4 patches (K = 32, a single K tile)."""
    inputs = make_inputs(16)
    inputs["x"] = torch.randn(3, 1, 24, 20, dtype=torch.float64)
    inputs["weight"] = 0.2 * torch.randn(EMBED_DIM, 1, 8, 4, dtype=torch.float64)
    inputs["pos_embed"] = torch.randn(1, 3 * 5 + 1, EMBED_DIM, dtype=torch.float64)
    out = check_against_reference(inputs, torch.float32, mean=(0.5,), std=(0.25,))
    assert out.shape == (3, 16, EMBED_DIM)


def test_weight_gradient_split_over_rows_and_strided_grad(monkeypatch) -> None:
    """Several row splits of the d_weight reduction (the GPU case) and a non-contiguous incoming gradient."""
    monkeypatch.setattr(pe, "_DW_MIN_ROWS_PER_SPLIT", 32)
    inputs = make_inputs(16, batch=6)  # 72 patch rows: splits of 32, 32 and 8 rows
    tokens = 13
    grad_out = torch.randn(EMBED_DIM, tokens, 6, dtype=torch.float64).permute(2, 1, 0)
    args = [inputs["x"].float(), inputs["weight"].float(), None, None, 1, True, True]
    d_x, d_weight = torch.ops.vitfast.patch_embed_bwd(grad_out.float(), *args)
    expected = pe._patch_embed_bwd_reference(grad_out, inputs["x"], inputs["weight"], None, None, 1, True, True)
    baseline = pe._patch_embed_bwd_reference(grad_out.float(), *args)
    for name, actual, exp, base in zip(("x", "weight"), (d_x, d_weight), expected, baseline, strict=True):
        assert_kernel_close(actual, exp, base, what=f"d_{name}")


@pytest.mark.parametrize(("dtype", "sms"), [(torch.bfloat16, 132), (torch.float16, 1)])
def test_weight_gradient_split_reduced_by_the_last_program_of_each_tile(monkeypatch, dtype, sms) -> None:
    """Split rows on a grid of d_weight tiles (D = 160, K = 192: 3 x 3 tiles of 64, or with one nominal SM 2 x 2 of
    128): each tile's last program sums the partials in split order and rounds once, so the result matches the
    reference and is the same bits on every call."""
    monkeypatch.setattr(pe, "_DW_MIN_ROWS_PER_SPLIT", 32)
    monkeypatch.setattr(_triton, "NOMINAL_SMS", sms)
    inputs = make_inputs(8, batch=5, embed_dim=160, size=(24, 40), pos=None)  # 75 patch rows: 32, 32, 11
    grad_out = torch.randn(5, 16, 160, dtype=torch.float64)
    args = [inputs["x"].to(dtype), inputs["weight"].to(dtype), None, None, 1, False, True]
    first = torch.ops.vitfast.patch_embed_bwd(grad_out.to(dtype), *args)[1]
    again = torch.ops.vitfast.patch_embed_bwd(grad_out.to(dtype), *args)[1]
    expected = pe._patch_embed_bwd_reference(grad_out, inputs["x"], inputs["weight"], None, None, 1, False, True)[1]
    baseline = pe._patch_embed_bwd_reference(grad_out.to(dtype), *args)[1]
    assert first.dtype == dtype and first.shape == inputs["weight"].shape
    assert_kernel_close(first, expected, baseline, what="d_weight")
    assert torch.equal(first, again)


def test_public_function_dispatches_to_the_kernel(monkeypatch) -> None:
    inputs = leaves(make_inputs(16), torch.float32)
    args = [inputs[name] for name in NAMES]
    launched = []
    monkeypatch.setattr(pe, "launch", lambda kernel, *a, **k: launched.append(kernel))
    with vitfast.backend.use_backend("reference"):
        ops.patch_embed_tokens(*args)
    assert launched == []
    with vitfast.backend.use_backend("triton"):
        ops.patch_embed_tokens(*args)
    assert launched == [pe._patch_embed_fwd_kernel]


def test_fallbacks_run_the_reference(monkeypatch) -> None:
    inputs = make_inputs(16)

    def no_launch(*args, **kwargs):
        raise AssertionError("the kernel must not run for this case")

    monkeypatch.setattr(pe, "launch", no_launch)
    # fp64: outside the kernel's dtypes, the reference result exactly
    out, grads, grad_out = run(pe._patch_embed_tokens_triton, leaves(inputs, torch.float64))
    expected, expected_grads, _ = run(pe.patch_embed_tokens_ref, leaves(inputs, torch.float64), grad_out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for name in NAMES:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=0)
    # trainable mean/std: the kernel treats them as constants, the reference differentiates them
    mean = torch.tensor(MEAN, requires_grad=True)
    out = pe._patch_embed_tokens_triton(*leaves(inputs, torch.float32).values(), mean=mean, std=STD)
    (d_mean,) = torch.autograd.grad(out.sum(), mean)
    assert torch.isfinite(d_mean).all() and d_mean.abs().sum() > 0


def test_ops_without_a_kernel_device_run_their_reference(monkeypatch) -> None:
    """Where no kernel can run (a CPU without the interpreter), torch.ops.vitfast.* compute the same in PyTorch."""
    monkeypatch.setattr(pe, "kernel_can_run", lambda *tensors: False)
    monkeypatch.setattr(pe, "launch", lambda *a, **k: pytest.fail("no kernel may run here"))
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    inputs = make_inputs(14, pos="patches")

    def fused_op(*args):
        return torch.ops.vitfast.patch_embed_fwd(*args, mean, std)

    out, grads, grad_out = run(fused_op, leaves(inputs, torch.float32))
    expected, expected_grads, _ = run(
        pe.patch_embed_tokens_ref, leaves(inputs, torch.float64), grad_out, mean=MEAN, std=STD
    )
    baseline, baseline_grads, _ = run(
        pe.patch_embed_tokens_ref, leaves(inputs, torch.float32), grad_out, mean=MEAN, std=STD
    )
    assert_kernel_close(out, expected, baseline, what="tokens")
    for name in NAMES:
        assert_kernel_close(grads[name], expected_grads[name], baseline_grads[name], what=f"d_{name}")


def _opcheck_samples(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[tuple]:
    """Every optional argument absent (float image), then every one present (uint8 image, mean/std)."""
    bare = leaves(make_inputs(14, pos=None, cls=False, bias=False, device=device), dtype)
    uint8 = leaves(make_inputs(16, pos="patches", uint8=True, device=device), dtype)
    stats = (torch.tensor(MEAN, device=device), torch.tensor(STD, device=device))
    return [(*(bare[name] for name in NAMES), None, None), (*(uint8[name] for name in NAMES), *stats)]


def test_opcheck() -> None:
    # AOT-dispatch checks would compile the op, which cannot trace interpreted kernels (vitfast/ops/_triton.py)
    for args in _opcheck_samples():
        torch.library.opcheck(
            torch.ops.vitfast.patch_embed_fwd,
            args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {**a, "x": a["x"][:, :2]}, ValueError, "expected 3 input channels, got 2"),
        (lambda a: {**a, "x": a["x"][:, :, :60]}, ValueError, "60x48 is not a positive multiple of the patch size"),
        (lambda a: {**a, "x": a["x"][0]}, ValueError, r"expected an image batch \[B, C, H, W\]"),
        (lambda a: {**a, "x": a["x"].half()}, TypeError, "dtype mismatch: image torch.float16"),
        (lambda a: {**a, "x": a["x"].int()}, TypeError, "floating-point or uint8 image"),
        (lambda a: {**a, "x": a["x"].to(torch.uint8)}, ValueError, "a uint8 image needs mean and std"),
        (lambda a: {**a, "bias": a["bias"].double()}, TypeError, "dtype mismatch: bias is torch.float64"),
        (lambda a: {**a, "bias": a["bias"][:5]}, ValueError, r"bias must have shape \[96\]"),
        (lambda a: {**a, "cls_token": a["cls_token"][0]}, ValueError, r"cls_token must have shape \[1, 1, 96\]"),
        (lambda a: {**a, "pos_embed": a["pos_embed"][:, :11]}, ValueError, "11 positions.*expected 12 or 13"),
        (lambda a: {**a, "cls_token": None}, ValueError, "13 positions.*expected 12 "),
        (lambda a: {**a, "pos_embed": a["pos_embed"][0]}, ValueError, r"pos_embed must have shape \[1, L, 96\]"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_inputs_raise_clear_errors(change, error, match, impl) -> None:
    inputs = change({name: t.float() for name, t in make_inputs(16).items()})
    fn = pe.patch_embed_tokens_ref if impl == "reference" else pe._patch_embed_tokens_triton
    with pytest.raises(error, match=match):
        fn(*(inputs[name] for name in NAMES))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_mean_std_raise_clear_errors(impl) -> None:
    inputs = [t.float() for t in make_inputs(16).values()]
    fn = pe.patch_embed_tokens_ref if impl == "reference" else pe._patch_embed_tokens_triton
    with pytest.raises(ValueError, match="mean and std go together"):
        fn(*inputs, mean=MEAN)
    with pytest.raises(ValueError, match=r"std must have one value per channel \(3\), got 2"):
        fn(*inputs, mean=MEAN, std=(0.5, 0.5))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(("patch", "size"), [(16, 224), (14, 448)])
def test_gpu_vit_sizes_bf16(patch, size) -> None:
    inputs = make_inputs(patch, batch=4, embed_dim=1024, size=(size, size), device="cuda")
    check_against_reference(inputs, torch.bfloat16)
    uint8 = make_inputs(patch, batch=4, embed_dim=1024, size=(size, size), device="cuda", uint8=True)
    check_against_reference(uint8, torch.bfloat16, mean=MEAN, std=STD)


@pytest.mark.gpu
@requires_gpu
def test_gpu_fp32_is_not_tf32() -> None:
    check_against_reference(make_inputs(16, batch=4, embed_dim=768, size=(224, 224), device="cuda"), torch.float32)


@pytest.mark.gpu
@requires_gpu
def test_gpu_full_opcheck() -> None:
    for args in _opcheck_samples("cuda", torch.bfloat16):
        torch.library.opcheck(torch.ops.vitfast.patch_embed_fwd, args)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("uint8", [False, True])
def test_gpu_torch_compile_fullgraph(uint8) -> None:
    inputs = leaves(
        make_inputs(16, batch=4, embed_dim=768, size=(224, 224), device="cuda", uint8=uint8), torch.bfloat16
    )
    stats = {"mean": MEAN, "std": STD} if uint8 else {}

    def embed(*args):
        return ops.patch_embed_tokens(*args, **stats)

    with vitfast.backend.use_backend("triton"):
        eager, eager_grads, grad_out = run(embed, inputs)
        compiled, compiled_grads, _ = run(torch.compile(embed, fullgraph=True), inputs, grad_out)
    # same kernels, but inductor may reorder the small torch reductions around them: bf16 tolerances, not bitwise
    torch.testing.assert_close(compiled, eager)
    assert set(compiled_grads) == set(eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=f"d_{name}")
