"""The timm-style model API, input validation, gradient checkpointing and the call-time backend switch."""

from __future__ import annotations

import logging

import pytest
import torch

import vitfast
import vitfast.backend as backend
from tests.helpers import assert_close_scaled, randomize_


@pytest.fixture(scope="module")
def eva02():
    return randomize_(vitfast.create_model("eva02_tiny_patch14_224", depth=2, num_classes=5)).eval()


def test_forward_head_and_reset_classifier(eva02) -> None:
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = eva02.forward_features(image)
        assert tokens.shape == (2, 1 + 256, 192)
        assert eva02.forward_head(tokens, pre_logits=True).shape == (2, 192)
        assert eva02.forward_head(tokens).shape == (2, 5)
    model = vitfast.create_model("vit_small_patch16_224", depth=1)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 384)
    model.reset_classifier(3, global_pool="avg")
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3) and model.pretrained_cfg["num_classes"] == 3
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


@pytest.mark.parametrize(
    ("shape", "dtype", "error", "message"),
    [
        ((1, 3, 256, 256), torch.float32, ValueError, "does not match the model's 224x224.*dynamic_img_size=True"),
        ((1, 1, 224, 224), torch.float32, ValueError, "expected 3 input channels, got 1"),
        ((1, 3, 225, 224), torch.float32, ValueError, "not divisible by the patch size"),
        ((3, 224, 224), torch.float32, ValueError, r"expected an image batch \[B, C, H, W\]"),
        ((1, 3, 224, 224), torch.int32, TypeError, "floating-point image.*uint8.*mean/std"),
    ],
)
def test_bad_inputs_raise_clear_errors(shape, dtype, error, message) -> None:
    model = vitfast.create_model("vit_small_patch16_224", depth=1)
    with pytest.raises(error, match=message):
        model(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_uint8_images_are_normalized_with_the_pretrained_mean_and_std(backend) -> None:
    pytest.importorskip("triton")
    model = vitfast.create_model("eva02_tiny_patch14_224", depth=1, img_size=56, num_classes=4, mask_token=True).eval()
    assert model.pretrained_cfg["mean"] != (0.5, 0.5, 0.5)  # CLIP statistics: a per-channel normalization
    image = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    mean, std = (
        torch.tensor(model.pretrained_cfg[k], dtype=torch.float64).reshape(1, 3, 1, 1) for k in ("mean", "std")
    )
    normalized = ((image.double() / 255 - mean) / std).float()
    mask = torch.rand(2, 16) < 0.5
    with torch.no_grad(), vitfast.use_backend(backend):
        assert_close_scaled(model(image), model(normalized), tol=1e-5, what="uint8 logits")
        assert_close_scaled(
            model.forward_features(image, mask=mask), model.forward_features(normalized, mask=mask), tol=1e-5
        )


def test_dynamic_img_size_accepts_other_sizes() -> None:
    model = vitfast.create_model("beitv2_base_patch16_224", depth=1, dynamic_img_size=True)
    assert model(torch.randn(1, 3, 160, 288)).shape == (1, 1000)
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 100, 160))


def test_blocks_called_directly_need_the_grid_for_other_sizes(eva02) -> None:
    tokens = torch.randn(1, 1 + 256, 192)
    assert eva02.blocks[0](tokens).shape == tokens.shape  # the default grid's RoPE table is built on demand
    with pytest.raises(ValueError, match="do not match a 16x16 patch grid"):
        eva02.blocks[0](torch.randn(1, 1 + 100, 192))
    assert eva02.blocks[0](torch.randn(1, 1 + 100, 192), grid=(10, 10)).shape == (1, 101, 192)


def _grads(model, image):
    model.zero_grad()
    model(image).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_the_same_gradients_and_recomputes() -> None:
    model = randomize_(vitfast.create_model("eva02_tiny_patch14_224", depth=2, num_classes=5))
    image = torch.randn(2, 3, 224, 224)
    reference = _grads(model, image)
    calls = []
    hook = model.blocks[0].attn.register_forward_hook(lambda *args: calls.append(1))
    model.set_grad_checkpointing(True)
    checkpointed = _grads(model, image)
    hook.remove()
    assert len(calls) == 2, "a checkpointed block runs its forward again in backward"
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        assert_close_scaled(checkpointed[name], reference[name], what=name)
    # also when the blocks are driven directly
    tokens = torch.randn(2, 257, 192, requires_grad=True)
    out = tokens
    for block in model.blocks:
        out = block(out)
    out.sum().backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all()


def test_frozen_sincos_position_embedding_gets_no_gradient() -> None:
    model = vitfast.create_model("mocov3_vit_small", depth=1, num_classes=3)
    model(torch.randn(1, 3, 224, 224)).sum().backward()
    assert model.pos_embed.grad is None and model.cls_token.grad is not None
    assert model.no_weight_decay() == {"cls_token", "pos_embed"}
    beit = vitfast.create_model("beitv2_base_patch16_224", depth=2)
    assert beit.no_weight_decay() == {
        "cls_token",
        "blocks.0.attn.relative_position_bias_table",
        "blocks.1.attn.relative_position_bias_table",
    }


def test_bfloat16_forward_runs_close_to_float32(eva02) -> None:
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        reference = eva02(image)
        low = vitfast.create_model("eva02_tiny_patch14_224", depth=2, num_classes=5)
        low.load_state_dict(eva02.state_dict())
        out = low.to(torch.bfloat16).eval()(image.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out.float(), reference, tol=5e-2, what="bf16 vs fp32")


def test_backend_is_looked_up_at_call_time(monkeypatch, eva02) -> None:
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = eva02(image)
    calls = []

    def spy(op):
        def run(*args):
            calls.append(op)
            return backend._impls[op]["reference"](*args)

        return run

    monkeypatch.setattr(backend, "_check_available", lambda name: None)  # pretend a GPU backend can run here
    for op in backend._impls:
        monkeypatch.setitem(backend._impls[op], "triton", spy(op))
    with torch.no_grad():
        backend.set_backend("triton")
        out = eva02(image)
        # norm1 and the fused residual + norm2 per block, then the final fc_norm
        norms = [op for op in calls if op.startswith("layer_norm")]
        assert norms == ["layer_norm", "layer_norm_residual"] * 2 + ["layer_norm"]
        assert "attention" in calls and "patch_embed_tokens" in calls
        num_calls = len(calls)
        backend.set_backend("reference")
        eva02(image)
    assert len(calls) == num_calls, "switching back takes effect without rebuilding the model"
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_missing_implementation_falls_back_to_reference_with_one_debug_log(monkeypatch, caplog) -> None:
    monkeypatch.setattr(backend, "_check_available", lambda name: None)
    monkeypatch.setattr(backend, "_logged_fallbacks", set())
    backend.set_backend("cuda")
    with caplog.at_level(logging.DEBUG, logger="vitfast"):
        first = backend.dispatch("swiglu", torch.device("cpu"))
        backend.dispatch("swiglu", torch.device("cpu"))
    assert first is backend._impls["swiglu"]["reference"]
    assert sum("no 'cuda' implementation" in r.message for r in caplog.records) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without a GPU")
def test_gpu_backends_without_a_gpu_raise_errors_that_say_why(monkeypatch) -> None:
    from vitfast.ops import _triton

    monkeypatch.setattr(_triton, "INTERPRETER", False)  # the test suite runs under Triton's interpreter
    with pytest.raises(RuntimeError, match="needs a CUDA GPU|needs the triton package"):
        vitfast.set_backend("triton")
    with pytest.raises(RuntimeError, match="compiled extension"):
        vitfast.set_backend("cuda")
    with pytest.raises(ValueError, match="Unknown vitfast backend 'fast'"):
        vitfast.set_backend("fast")
    assert vitfast.get_backend() == "auto"
    monkeypatch.setattr(_triton, "INTERPRETER", True)
    vitfast.set_backend("triton")  # the interpreter runs the kernels on CPU tensors
    assert vitfast.get_backend() == "triton"


def test_backend_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv("VITFAST_BACKEND", "reference")
    assert vitfast.get_backend() == "reference"
    backend._current = None
    monkeypatch.setenv("VITFAST_BACKEND", "turbo")
    with pytest.raises(ValueError, match=r"\$VITFAST_BACKEND"):
        vitfast.get_backend()
    backend._current = None
    monkeypatch.delenv("VITFAST_BACKEND")
    with vitfast.use_backend("reference"):
        assert vitfast.get_backend() == "reference"
    assert vitfast.get_backend() == "auto"
