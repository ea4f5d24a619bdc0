"""vitfast::preprocess (compiled extension) against preprocess_ref: bit-exact in every dtype and output layout.

The C++ CPU twin runs here; the CUDA kernel runs in the ``gpu`` tests (full batch shapes, unaligned inputs, every
vector width). fp32 must be bit-identical (same IEEE operations in the same order); bf16 / fp16 are that fp32 value
rounded once, so they must be bit-identical too.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.test_ext import extension_or_skip
from vitfast import _ext, ops
from vitfast.backend import use_backend

preprocess_module = importlib.import_module("vitfast.ops.preprocess")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the CUDA kernel)")
CPU_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.fixture(scope="module", autouse=True)
def extension():
    return extension_or_skip()


def _images(batch: int, height: int, width: int, device: str = "cpu") -> torch.Tensor:
    images = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8)
    every_byte = torch.arange(256, dtype=torch.uint8).repeat_interleave(3)  # each value in each channel
    count = min(images.numel(), every_byte.numel())
    images.view(-1)[:count] = every_byte[:count]
    return images.to(device)


def _op(images, stats, patch, dtype):
    return torch.ops.vitfast.preprocess(images, list(stats[0]), list(stats[1]), patch, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "shape, patch",
    [((2, 32, 48), 16), ((1, 28, 42), 14), ((3, 17, 23), 0), ((2, 224, 224), 0), ((1, 64, 64), 32), ((2, 5, 5), 5)],
)
@pytest.mark.parametrize("stats", [IMAGENET, CLIP, INCEPTION], ids=["imagenet", "clip", "inception"])
def test_cpu_twin_is_bit_exact(shape, patch, dtype, stats) -> None:
    images = _images(*shape)
    got = _op(images, stats, patch, dtype)
    expected = ops.preprocess_ref(images, *stats, patch, dtype)
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    assert torch.equal(ops.preprocess(images, *stats, patch_size=patch, dtype=dtype), expected)


def test_reference_formula_is_the_division_not_a_reciprocal() -> None:
    """The contract: (x / 255 - mean) / std in fp32; x * (1 / 255) differs for half of the byte values."""
    values = torch.arange(256, dtype=torch.uint8).repeat(3).view(1, 16, 16, 3)
    mean, std = IMAGENET
    got = _op(values, IMAGENET, 0, torch.float32)
    by_division = (values.permute(0, 3, 1, 2).float() / 255.0 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(
        std
    ).view(3, 1, 1)
    by_reciprocal = (
        values.permute(0, 3, 1, 2).float() * (1 / 255.0) - torch.tensor(mean).view(3, 1, 1)
    ) / torch.tensor(std).view(3, 1, 1)
    assert torch.equal(got, by_division)
    assert not torch.equal(got, by_reciprocal)


def test_patch_rows_layout() -> None:
    """Row n is patch (n // grid_w, n % grid_w) flattened (channel, ky, kx): the image's patch, and conv-ready."""
    images = _images(2, 28, 42)
    p = 14
    rows = ops.preprocess(images, *CLIP, patch_size=p)
    image = ops.preprocess(images, *CLIP)
    for b, n in ((0, 0), (1, 4), (0, 5)):
        gy, gx = divmod(n, 42 // p)
        assert torch.equal(rows[b, n], image[b, :, gy * p : (gy + 1) * p, gx * p : (gx + 1) * p].flatten())
    weight, bias = torch.randn(24, 3, p, p), torch.randn(24)
    conv = F.conv2d(image, weight, bias, stride=p).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ops.patch_rows_to_tokens(rows, weight, bias), conv, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit a projection weight"):
        ops.patch_rows_to_tokens(rows, torch.randn(24, 3, 16, 16), None)


def test_strided_inputs() -> None:
    """A crop view (rows and columns strided) and a channels-last view of a CHW tensor: copied, same values."""
    base = _images(2, 40, 50)
    crop = base[:, 3:35, 5:37]
    chw = _images(2, 32, 32).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    for images in (crop, chw):
        for patch in (0, 16):
            assert torch.equal(
                _op(images, IMAGENET, patch, torch.bfloat16),
                ops.preprocess_ref(images, *IMAGENET, patch, torch.bfloat16),
            )


def test_model_takes_the_output() -> None:
    import vitfast

    model = vitfast.create_model("vit_small_patch16_224", depth=1, num_classes=4, img_size=48).eval()
    images = _images(2, 48, 48)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    x = ops.preprocess(images, mean, std)
    normalized = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    assert torch.equal(x, normalized)  # what a model fed by PyTorch ops sees, bit for bit
    with torch.no_grad():
        assert model(x).shape == (2, 4)
        tokens = ops.patch_rows_to_tokens(
            ops.preprocess(images, mean, std, patch_size=16), model.patch_embed.proj.weight, model.patch_embed.proj.bias
        )
        conv = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, conv, rtol=1e-5, atol=1e-5)


def test_fallbacks_give_the_same_values(monkeypatch) -> None:
    calls = []
    reference = preprocess_module.preprocess_ref
    monkeypatch.setattr(preprocess_module, "preprocess_ref", lambda *a: calls.append(1) or reference(*a))
    images = _images(2, 32, 32)
    with_ext = ops.preprocess(images, *IMAGENET, patch_size=16, dtype=torch.float16)
    assert not calls
    with use_backend("reference"):
        assert torch.equal(ops.preprocess(images, *IMAGENET, patch_size=16, dtype=torch.float16), with_ext)
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    assert torch.equal(ops.preprocess(images, *IMAGENET, patch_size=16, dtype=torch.float16), with_ext)
    assert len(calls) == 2


def test_tensor_stats_and_single_precision_rounding() -> None:
    images = _images(1, 16, 16)
    mean = torch.tensor(CLIP[0], dtype=torch.float32)
    std = torch.tensor(CLIP[1], dtype=torch.float64)
    assert torch.equal(ops.preprocess(images, mean, std), ops.preprocess_ref(images, *CLIP))


def test_errors() -> None:
    images = _images(2, 32, 48)
    with pytest.raises(TypeError, match=r"expected uint8 images \[B, H, W, 3\].*got torch.float32"):
        ops.preprocess(images.float(), *IMAGENET)
    with pytest.raises(ValueError, match=r"channels first: pass images.permute\(0, 2, 3, 1\)"):
        ops.preprocess(images.permute(0, 3, 1, 2), *IMAGENET)
    with pytest.raises(ValueError, match=r"one image \[H, W, 3\]: pass images\[None\]"):
        ops.preprocess(images[0], *IMAGENET)
    with pytest.raises(ValueError, match="32x48 is not a multiple of the patch size 14"):
        ops.preprocess(images, *IMAGENET, patch_size=14)
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        ops.preprocess(images, *IMAGENET, dtype=torch.float64)
    with pytest.raises(ValueError, match="mean needs one value per channel"):
        ops.preprocess(images, (0.5, 0.5), IMAGENET[1])
    with pytest.raises(ValueError, match="patch_size must be an int >= 0"):
        ops.preprocess(images, *IMAGENET, patch_size=-1)
    # the op itself (C++ checks, raised as Python ValueError / TypeError)
    with pytest.raises(TypeError, match="expected uint8 images"):
        _op(images.float(), IMAGENET, 0, torch.float32)
    with pytest.raises(ValueError, match="channels-last images"):
        _op(images.permute(0, 3, 1, 2), IMAGENET, 0, torch.float32)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        _op(images, IMAGENET, 14, torch.float32)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        _op(images, IMAGENET, 0, torch.int32)
    with pytest.raises(ValueError, match="mean and std need 3 values each"):
        torch.ops.vitfast.preprocess(images, [0.5], [0.5, 0.5, 0.5], 0, torch.float32)


def test_empty_batch() -> None:
    images = torch.empty(0, 32, 32, 3, dtype=torch.uint8)
    assert _op(images, IMAGENET, 16, torch.float32).shape == (0, 4, 768)


def test_opcheck_and_compile_cpu() -> None:
    images = _images(2, 32, 48)
    for patch, dtype in ((0, torch.float32), (16, torch.bfloat16)):
        torch.library.opcheck(
            torch.ops.vitfast.preprocess,
            (images, list(IMAGENET[0]), list(IMAGENET[1]), patch, dtype),
            test_utils=CPU_OPCHECK,
        )

    def run(images):
        return ops.preprocess(images, *CLIP, patch_size=16, dtype=torch.bfloat16) * 2

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in ((2, 32, 48), (1, 64, 16)):
        images = _images(*shape)
        assert torch.equal(compiled(images), run(images))


# ---- CUDA kernel --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("size, patches", [(224, (0, 16, 14)), (448, (0, 14, 16))])
def test_cuda_kernel_full_batches(size, patches) -> None:
    if not _ext.HAS_EXT_CUDA:
        pytest.fail("the extension was loaded without its CUDA kernels on a GPU machine")
    images = _images(8, size, size, "cuda")
    for stats in (IMAGENET, CLIP):
        for patch in patches:
            for dtype in DTYPES:
                expected = ops.preprocess_ref(images, *stats, patch, dtype)
                assert torch.equal(_op(images, stats, patch, dtype), expected), (patch, dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(
    "shape, patch",
    [
        ((3, 17, 23), 0),  # no vector stores, byte loads
        ((2, 30, 70), 0),  # rows not a multiple of 16 bytes
        ((2, 48, 2400), 0),  # rows wider than a tile: row segments
        ((1, 32, 96), 32),
        ((2, 28, 70), 14),  # 5 patches a row: a tile of 8 covers it
        ((1, 224, 224), 112),  # a patch bigger than a tile: the element kernel
        ((2, 6, 9), 3),
    ],
)
def test_cuda_kernel_odd_shapes(shape, patch) -> None:
    images = _images(*shape, "cuda")
    for dtype in DTYPES:
        assert torch.equal(_op(images, IMAGENET, patch, dtype), ops.preprocess_ref(images, *IMAGENET, patch, dtype))


@pytest.mark.gpu
@requires_gpu
def test_cuda_kernel_unaligned_input_and_output() -> None:
    storage = torch.randint(0, 256, (8 * 64 * 64 * 3 + 1,), dtype=torch.uint8, device="cuda")
    images = storage[1:].view(8, 64, 64, 3)  # data pointer off 16-byte alignment: byte loads
    for patch in (0, 16):
        assert torch.equal(
            _op(images, CLIP, patch, torch.bfloat16), ops.preprocess_ref(images, *CLIP, patch, torch.bfloat16)
        )


@pytest.mark.gpu
@requires_gpu
def test_opcheck_and_compile_gpu() -> None:
    images = _images(2, 64, 96, "cuda")
    for patch, dtype in ((0, torch.float32), (16, torch.bfloat16)):
        torch.library.opcheck(
            torch.ops.vitfast.preprocess, (images, list(IMAGENET[0]), list(IMAGENET[1]), patch, dtype)
        )

    def run(images):
        return ops.preprocess(images, *CLIP, patch_size=16, dtype=torch.bfloat16) * 2

    compiled = torch.compile(run, fullgraph=True)
    assert torch.equal(compiled(images), run(images))
