"""What an autograd node costs the host, per call: torch's C++ ``Function<T>::apply`` (the native eager path's node
until 2026-12-02) and the native path's own ``torch::autograd::Node`` (``csrc/eager.cpp`` NativeNode, in its
``swiglu`` rows) against aten's generated node, no GPU needed.

    python -m benchmarks.autograd_node_cost          # table (builds a two-line extension first, ~1 min)

Rows, in one run with their repeats interleaved (:func:`benchmarks.host_overhead.time_interleaved`:
thread CPU time, median of 9 repeats of 1000 calls, min-max):

- a toy extension's call that only allocates its output (``at::empty_like``: the bare call);
- the same through ``Function<T>::apply``: without inputs that want a gradient, with them, then also saving two
  tensors for backward, then also writing two ``saved_data`` entries (what the native path's node did through it);
- aten's ``F.silu`` on the same tensors without and with a gradient (its node is generated C++);
- vitfast's native ``swiglu`` forward (the stand-in sm_90 driver of :mod:`benchmarks.host_overhead`) without and
  with a gradient, when the probe's toolchain is here.

The differences between the rows with and without a gradient are the node's cost.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
struct Toy : public torch::autograd::Function<Toy> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, int64_t mode) {
    at::Tensor out = at::empty_like(inputs[0]);
    if (mode >= 1) ctx->save_for_backward({inputs[0], inputs[1]});
    if (mode >= 2) {
      ctx->set_materialize_grads(false);
      ctx->saved_data["plan"] = at::IValue(int64_t{1});
      ctx->saved_data["device"] = inputs[0].device();
    }
    return {out};
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0], grads[0], at::Tensor()}; }
};
at::Tensor call(at::Tensor a, at::Tensor b, int64_t mode) {
  if (mode < 0) return at::empty_like(a);
  std::vector<at::Tensor> inputs{a, b};
  return Toy::apply(at::TensorList(inputs), mode)[0];
}
"""


def main() -> int:
    from torch.utils.cpp_extension import load_inline

    toy = load_inline("vitfast_toy_node", cpp_sources=_SOURCE, functions=["call"], extra_cflags=["-O3", "-g0"])
    torch.set_num_threads(1)
    a, b = torch.randn(4, 128, requires_grad=True), torch.randn(4, 128, requires_grad=True)
    ad, bd = a.detach(), b.detach()
    fns: dict[str, Callable[[], object]] = {
        "toy: empty_like only": lambda: toy.call(ad, bd, -1),
        "toy: apply, no gradient": lambda: toy.call(ad, bd, 0),
        "toy: apply, gradient": lambda: toy.call(a, b, 0),
        "toy: apply, gradient, 2 saved": lambda: toy.call(a, b, 1),
        "toy: apply, gradient, 2 saved, saved_data": lambda: toy.call(a, b, 2),
        "aten F.silu, no gradient": lambda: torch.nn.functional.silu(ad),
        "aten F.silu, gradient": lambda: torch.nn.functional.silu(a),
    }
    from benchmarks import host_overhead

    problem = host_overhead.unavailable()
    with host_overhead.stand_in_gpu() if problem is None else contextlib.nullcontext():
        if problem is None:
            swiglu = importlib.import_module("vitfast.ops.swiglu")
            gate, up = (host_overhead._cpu(4, 128, grad=True) for _ in range(2))
            native, gate_d, up_d = swiglu._swiglu_fwd_op.native, gate.detach(), up.detach()
            fns["vitfast native swiglu, no gradient"] = lambda: native(gate_d, up_d)
            fns["vitfast native swiglu, gradient"] = lambda: native(gate, up)
        timings = host_overhead.time_interleaved(fns, calls=1000, repeats=9)
    if problem is not None:
        print(f"(vitfast's native rows left out: {problem})", file=sys.stderr)
    for name, t in timings.items():
        print(f"{t['median']:7.2f} us ({t['min']:.2f}-{t['max']:.2f})  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
