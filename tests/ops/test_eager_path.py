"""The eager launch path of ``vitfast.ops._triton.EagerOp``: the dispatcher is skipped only when nothing traces.

An untraced call runs the op's body directly (inside one autograd node when a gradient is wanted); under a dispatch
mode (what fake tensors, make_fx and opcheck use) or a functorch transform the registered ``torch.library`` op runs,
so those tools see ``vitfast::*`` as before. Both ways give the same outputs and gradients.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitfast.ops._triton as triton_glue
from vitfast import ops
from vitfast.backend import use_backend

pytest.importorskip("triton")

ln = importlib.import_module("vitfast.ops.layer_norm")


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _inputs() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    x = torch.randn(5, 33).requires_grad_()
    branch = torch.randn(5, 33).requires_grad_()
    weight = (1 + 0.1 * torch.randn(33)).requires_grad_()
    bias = (0.1 * torch.randn(33)).requires_grad_()
    return x, branch, weight, bias


def test_untraced_call_skips_the_dispatcher(monkeypatch) -> None:
    """The op's body runs directly: the registered op is never called (it would raise here)."""

    def registered_op(*args):
        raise AssertionError("the eager path went through the torch.library op")

    monkeypatch.setattr(ln._layer_norm_fwd_op, "op", registered_op)
    monkeypatch.setattr(ln._layer_norm_bwd_op, "op", registered_op)
    x, branch, weight, bias = _inputs()
    out, residual = ln._layer_norm_fwd_op(x, branch, None, weight, bias, 1e-6)[:2]
    (out.sum() + residual.square().sum()).backward()
    assert x.grad is not None and branch.grad is not None and weight.grad is not None and bias.grad is not None


def test_dispatch_mode_sees_the_registered_ops() -> None:
    x, branch, weight, bias = _inputs()
    with use_backend("triton"), _RecordOps() as mode:
        out, residual = ops.layer_norm_residual(x, branch, None, weight, bias)
        (out.sum() + residual.square().sum()).backward()
    assert "vitfast.layer_norm_fwd.default" in mode.ops
    assert "vitfast.layer_norm_bwd.default" in mode.ops


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_functorch_transform_takes_the_registered_op(monkeypatch) -> None:
    """Under vmap the call must not take the direct path (a BatchedTensor is not a tensor the launcher can read)."""
    calls = []
    registered = ln._layer_norm_fwd_op.op
    monkeypatch.setattr(ln._layer_norm_fwd_op, "op", lambda *args: calls.append(1) or registered(*args))
    x = torch.randn(3, 4, 16)
    expected = torch.stack([ln._layer_norm_fwd_op(row, None, None, None, None, 1e-6)[0] for row in x])
    out = torch.vmap(lambda row: ln._layer_norm_fwd_op(row, None, None, None, None, 1e-6)[0])(x)
    assert calls, "vmap's call went around the registered op"
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("wants_grad", ["all", "x only"])
def test_eager_and_registered_paths_agree(wants_grad: str) -> None:
    """Same outputs and gradients with and without the dispatcher, also when only some inputs want a gradient."""
    results = []
    for path in ("eager", "registered"):
        x, branch, weight, bias = _inputs()
        if wants_grad == "x only":
            branch, weight, bias = branch.detach(), weight.detach(), bias.detach()
        fwd = ln._layer_norm_fwd_op if path == "eager" else ln._layer_norm_fwd_op.op
        out, residual = fwd(x, branch, None, weight, bias, 1e-6)[:2]
        leaves = [t for t in (x, branch, weight, bias) if t.requires_grad]
        grads = torch.autograd.grad(out.square().sum() + residual.sum(), leaves)
        results.append((out.detach(), residual.detach(), grads))
    (out_e, res_e, grads_e), (out_r, res_r, grads_r) = results
    torch.testing.assert_close(out_e, out_r, rtol=0, atol=0)
    torch.testing.assert_close(res_e, res_r, rtol=0, atol=0)
    for grad_e, grad_r in zip(grads_e, grads_r, strict=True):
        torch.testing.assert_close(grad_e, grad_r, rtol=0, atol=0)


def test_mutating_ops_are_refused() -> None:
    with pytest.raises(ValueError, match="mutate nothing"):
        triton_glue.triton_op("vitfast::_never_registered", mutates_args=("x",))


def test_residual_without_layer_scale_hands_dx_to_branch() -> None:
    """``x + branch`` has one gradient for both: the backward returns dx itself, no second copy written."""
    x, branch, weight, bias = _inputs()
    with use_backend("triton"):
        out, residual = ops.layer_norm_residual(x, branch, None, weight, bias)
    grad_x, grad_branch = torch.autograd.grad(out.square().sum() + residual.sum(), (x, branch))
    assert grad_x.data_ptr() == grad_branch.data_ptr()
    expected_out, expected_residual = ln.layer_norm_residual_ref(x, branch, None, weight, bias)
    expected = torch.autograd.grad(expected_out.square().sum() + expected_residual.sum(), x)[0]
    torch.testing.assert_close(grad_x, expected)
