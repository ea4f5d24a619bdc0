"""vitfast.layers.recompute: the recomputing GEMM and residual norm give the plain composition's gradients."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_scaled
from vitfast import ops
from vitfast.layers.recompute import (
    ResidualNorm,
    normalization_of,
    normalized_linear,
    recomputed_linear,
    tag_normalization,
)

recompute = importlib.import_module("vitfast.layers.recompute")


def _leaves(*shapes, dtype=torch.float64):
    return [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in shapes]


def _grads(out: torch.Tensor, inputs, cotangent) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, cotangent))


def test_recomputed_linear_with_a_layer_norm_and_a_built_weight_matches_the_plain_composition() -> None:
    x, norm_weight, norm_bias, weight_a, weight_b, bias = _leaves((2, 7, 12), 12, 12, (5, 12), (4, 12), 9)

    def norm(x, w, b):
        return ops.layer_norm(x, w, b, 1e-6)

    def stacked(weight_a, weight_b, bias):
        return torch.cat((weight_a, weight_b)), bias

    inputs = (x, norm_weight, norm_bias, weight_a, weight_b, bias)
    cotangent = torch.randn(2, 7, 9, dtype=torch.float64)
    expected = F.linear(norm(x, norm_weight, norm_bias), *stacked(weight_a, weight_b, bias))
    out = recomputed_linear(norm, (x, norm_weight, norm_bias), stacked, (weight_a, weight_b, bias))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for grad, reference in zip(_grads(out, inputs, cotangent), _grads(expected, inputs, cotangent), strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)
    # it saves the prologue's inputs and the parameters, not the normalized tensor nor the stacked weight
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        recomputed_linear(norm, (x, norm_weight, norm_bias), stacked, (weight_a, weight_b, bias))
    assert {t.untyped_storage().data_ptr() for t in saved} == {t.untyped_storage().data_ptr() for t in inputs}


def test_frozen_parameters_get_no_gradient_and_cost_no_weight_gradient() -> None:
    x = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(4, 8)  # frozen
    out = recomputed_linear(torch.nn.GELU(), (x,), None, (weight, None))
    (grad,) = torch.autograd.grad(out, x, torch.ones(3, 4))
    (expected,) = torch.autograd.grad(F.linear(F.gelu(x), weight), x, torch.ones(3, 4))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_under_autocast_the_gemm_and_its_gradients_take_autocast_dtype() -> None:
    x, weight, bias = _leaves((6, 16), (8, 16), 8, dtype=torch.float32)
    cotangent = torch.randn(6, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(F.gelu(x), weight, bias)
        out = recomputed_linear(F.gelu, (x,), None, (weight, bias))
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grads = _grads(out, (x, weight, bias), cotangent)
    for grad, reference in zip(grads, _grads(expected, (x, weight, bias), cotangent), strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference, rtol=0, atol=0)


def test_a_tag_goes_stale_when_its_tensor_or_inputs_change_in_place() -> None:
    x, weight, bias = _leaves((4, 8), 8, 8)
    normed = tag_normalization(
        ops.layer_norm(x, weight, bias, 1e-6), lambda *a: ops.layer_norm(*a, 1e-6), (x, weight, bias)
    )
    assert normalization_of(normed) is not None
    assert normalization_of(normed.clone()) is None  # a new tensor carries no recipe
    with torch.no_grad():
        normed.mul_(2)
    assert normalization_of(normed) is None
    # the stale tensor is then used as it is: its gradient reaches x through the LayerNorm's own node
    linear_weight = torch.randn(3, 8, dtype=torch.float64)
    out = normalized_linear(normed, None, (linear_weight, None))
    (grad,) = torch.autograd.grad(out, x, torch.ones(4, 3, dtype=torch.float64))
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(out, F.linear(normed, linear_weight))


def test_a_tag_does_not_keep_its_inputs_alive() -> None:
    """Features a caller keeps (a tagged LayerNorm output) do not hold the LayerNorm's input once it is gone."""
    x = torch.randn(4, 8)
    normed = tag_normalization(
        ops.layer_norm(x, None, None, 1e-6), lambda *a: ops.layer_norm(*a, 1e-6), (x, None, None)
    )
    assert normalization_of(normed).inputs[0] is x
    del x
    assert normalization_of(normed) is None


@pytest.mark.parametrize("with_gamma", [False, True])
@pytest.mark.parametrize("consumer", ["recomputing", "plain"])
def test_residual_norm_gives_the_fused_op_gradients(with_gamma, consumer) -> None:
    """The normalized output read by a recomputing GEMM (the residual's gradient alone comes back to ResidualNorm) or
    by a plain one (ResidualNorm recomputes the fused op and differentiates it)."""
    x, branch, gamma, norm_weight, norm_bias, weight = _leaves((2, 5, 16), (2, 5, 16), 16, 16, 16, (6, 16))
    gamma = gamma if with_gamma else None
    inputs = [t for t in (x, branch, gamma, norm_weight, norm_bias, weight) if t is not None]
    d_out, d_residual = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)

    def loss(normed, residual, out):
        return (out * d_out).sum() + (residual * d_residual).sum()

    normed, residual = ops.layer_norm_residual(x, branch, gamma, norm_weight, norm_bias, 1e-6)
    expected = torch.autograd.grad(loss(normed, residual, F.linear(normed, weight)), inputs)

    normed, residual = ResidualNorm.apply(1e-6, x, branch, gamma, norm_weight, norm_bias)
    if consumer == "recomputing":

        def recipe(*args):
            return ops.layer_norm_residual(*args, 1e-6)[0]

        tag_normalization(normed, recipe, (x, branch, gamma, norm_weight, norm_bias))
        out = normalized_linear(normed, None, (weight, None))
    else:
        out = F.linear(normed, weight)
    for grad, reference in zip(torch.autograd.grad(loss(normed, residual, out), inputs), expected, strict=True):
        assert_close_scaled(grad, reference, tol=1e-12, what=f"{consumer} grad")


def test_the_forward_runs_its_steps_in_grad_mode_as_the_recomputation_does(monkeypatch) -> None:
    """``"auto"`` picks implementations by grad mode: the steps run inside the Functions' forwards (where autograd
    turns grad mode off) see it on, as in backward, so both run the same implementation."""
    grad_modes = []

    def gelu(h):
        grad_modes.append(torch.is_grad_enabled())
        return F.gelu(h)

    x, weight = _leaves((3, 8), (4, 8))
    out = recomputed_linear(gelu, (x,), None, (weight, None))
    out.sum().backward()
    assert grad_modes == [True, True]

    fused = ops.layer_norm_residual
    monkeypatch.setattr(
        ops, "layer_norm_residual", lambda *args: grad_modes.append(torch.is_grad_enabled()) or fused(*args)
    )
    x, branch = _leaves((3, 8), (3, 8))
    normed, residual = ResidualNorm.apply(1e-6, x, branch, None, None, None)
    assert grad_modes[2:] == [True] and normed.grad_fn is not None


def test_autocast_contexts_only_where_the_state_differs() -> None:
    """``_autocast_as`` gives the wanted autocast state, entering a context only where it is not the current one."""
    bf16 = torch.bfloat16
    assert isinstance(recompute._autocast_as("cpu", False), contextlib.nullcontext)
    with recompute._autocast_as("cpu", True, bf16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == bf16
        assert isinstance(recompute._autocast_as("cpu", True, bf16), contextlib.nullcontext)
        with recompute._autocast_as("cpu", False):
            assert not torch.is_autocast_enabled("cpu")
        with recompute._autocast_as("cpu", True, torch.float16):
            assert torch.get_autocast_dtype("cpu") == torch.float16
        assert torch.get_autocast_dtype("cpu") == bf16
    assert not torch.is_autocast_enabled("cpu")


def test_gradients_by_the_engine_equal_autograd_grad() -> None:
    """The recompute's pass over its recomputed step (the engine called directly) gives torch.autograd.grad's
    gradients, None for an input the outputs do not reach."""
    x, weight, unused = _leaves((3, 4), (5, 4), 4)
    outputs = [F.gelu(F.linear(x, weight)), x.sum(0)]
    grads = [torch.randn_like(o) for o in outputs]
    expected = torch.autograd.grad(outputs, (x, weight, unused), grads, retain_graph=True, allow_unused=True)
    got = recompute._gradients(outputs, (x, weight, unused), grads)
    assert got[2] is None and expected[2] is None
    for a, b in zip(got[:2], expected[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
