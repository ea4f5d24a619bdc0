"""Programmatic dependent launch (PDL): which kernels take it, when ``launch()`` turns it on, and what it compiles to.

On this machine PDL is never on (no GPU, and the kernels run through Triton's interpreter, which cannot run the
``griddepcontrol`` PTX): the CPU tests check that, the plumbing of ``launch()``, and that the kernels' outputs are
unchanged. The compiled side runs offline for sm_90 in a subprocess without ``TRITON_INTERPRET``
(``python -m benchmarks.pdl_check``, ~40 s): the PDL variant of every forward kernel waits before its first global
access in PTX and SASS, the plain variant is the kernel as it was, and the launch cache keeps the two apart.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import offline_report
from vitfast.ops import _triton

pytest.importorskip("triton")

OP_MODULES = ("layer_norm", "attention", "rope", "swiglu", "patch_embed", "linear")
# what the engine's fused forward (and the unfused layers' forward) launches today; none of the backward kernels. The
# rule the tests hold: every kernel whose name has no "_bwd" takes PDL (a new forward kernel must too).
FORWARD_KERNELS = {
    "_layer_norm_fwd_kernel",
    "_attention_fwd_kernel",
    "_rel_pos_bias_gather_kernel",
    "_rope_qk_kernel",
    "_swiglu_fwd_kernel",
    "_swiglu_layer_norm_fwd_kernel",
    "_patch_embed_fwd_kernel",
    "_linear_fwd_kernel",
}


def _kernels() -> dict[str, object]:
    modules = [importlib.import_module(f"vitfast.ops.{name}") for name in OP_MODULES]
    return {
        name: value
        for module in modules
        for name, value in vars(module).items()
        if name.endswith("_kernel") and hasattr(value, "arg_names")
    }


def _forward_kernels() -> set[str]:
    return {name for name in _kernels() if "_bwd" not in name}


def test_every_forward_kernel_takes_pdl_and_no_backward_one() -> None:
    kernels = _kernels()
    assert _forward_kernels() >= FORWARD_KERNELS
    assert {name for name, kernel in kernels.items() if _triton._takes_pdl(kernel)} == _forward_kernels()
    # last, with a default: the launchers (and the kernel report's recorded launches) need not pass it
    assert all(kernels[name].arg_names[-1] == "PDL" for name in _forward_kernels())


def test_pdl_is_never_on_under_the_interpreter_or_on_the_cpu() -> None:
    assert not _triton.pdl_supported("cpu")
    with _triton.use_pdl("cpu") as on:
        assert not on and not _triton._pdl.on
    if _triton.INTERPRETER:  # tests/conftest.py, without a GPU
        assert not _triton.pdl_supported("cuda")
        with _triton.use_pdl("cuda") as on:
            assert not on and not _triton._pdl.on


def test_use_pdl_sets_what_launch_adds_and_restores_it(monkeypatch) -> None:
    monkeypatch.setattr(_triton, "pdl_supported", lambda device: True)
    kernels = _kernels()
    forward, backward = kernels["_layer_norm_fwd_kernel"], kernels["_layer_norm_bwd_kernel"]
    outside, untouched = {}, {}
    _triton._add_pdl(forward, outside)
    assert outside == {"PDL": False}  # always passed: the launch cache keys on every constexpr
    with _triton.use_pdl("cuda") as on:
        inside = {"BLOCK": 4}
        _triton._add_pdl(forward, inside)
        _triton._add_pdl(backward, untouched)  # a kernel without the parameter never gets PDL
        with _triton.use_pdl("cuda", enabled=False) as nested:
            assert not nested and not _triton._pdl.on
        assert on and _triton._pdl.on
    assert inside == {"BLOCK": 4, "PDL": True, "launch_pdl": True} and untouched == {}
    assert not _triton._pdl.on


@pytest.mark.skipif(not _triton.INTERPRETER, reason="the kernels run on CPU tensors only through the interpreter")
def test_interpreted_kernels_never_get_pdl(monkeypatch) -> None:
    """With the flag forced on, interpreted launches still get no PDL (the interpreter cannot run griddepcontrol,
    so this would raise) and compute what they compute without it."""
    from vitfast import ops
    from vitfast.backend import use_backend

    x, branch = torch.randn(3, 7, 48), torch.randn(3, 7, 48)
    weight, bias = torch.randn(48), torch.randn(48)
    with use_backend("triton"):
        expected = ops.layer_norm_residual(x, branch, None, weight, bias, 1e-6)
        monkeypatch.setattr(_triton._pdl, "on", True)
        got = ops.layer_norm_residual(x, branch, None, weight, bias, 1e-6)
    for out, want in zip(got, expected, strict=True):
        torch.testing.assert_close(out, want, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- offline sm_90


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return offline_report("benchmarks.pdl_check", tmp_path_factory.mktemp("pdl") / "pdl.json", timeout=600)


@pytest.mark.slow
def test_pdl_variants_wait_before_any_global_access(report: dict) -> None:
    assert {row["kernel"] for row in report["rows"]} == _forward_kernels()
    for row in report["rows"]:
        pdl, where = row["pdl"], f"{row['kernel']} ({row['case']})"
        ptx, sass = pdl["grid_dependency"], pdl["sass_grid_dependency"]
        assert pdl["launch_pdl"], where  # the compiled kernel's launcher sets the launch attribute
        assert (ptx["waits"], ptx["triggers"]) == (1, 1), where
        assert ptx["globals_before_wait"] == 0 and ptx["first_wait"] < ptx["first_trigger"] < ptx["first_global"], where
        assert sass["globals_before_wait"] == 0 and sass["first_wait"] < sass["first_global"], where


@pytest.mark.slow
def test_plain_variants_have_no_grid_dependency_and_the_same_resources(report: dict) -> None:
    for row in report["rows"]:
        plain, pdl, where = row["plain"], row["pdl"], f"{row['kernel']} ({row['case']})"
        assert not plain["launch_pdl"] and plain["grid_dependency"]["waits"] == 0, where
        assert plain["grid_dependency"]["triggers"] == 0 and plain["sass_grid_dependency"]["first_wait"] is None, where
        # the SASS check sees the accesses it counts (with no wait, every one comes before it)
        assert plain["sass_grid_dependency"]["globals_before_wait"] > 0, where
        for key in ("regs", "local_bytes", "shared", "num_warps", "global_ops"):
            assert plain[key] == pdl[key], f"{where}: {key} {plain[key]} vs {pdl[key]} with PDL"


@pytest.mark.slow
def test_launch_keys_the_cache_on_pdl(report: dict) -> None:
    """Through vitfast's launch() and launch cache (stand-in sm_90): the launcher passes nothing, launch() adds PDL;
    each state compiles once and is then served from the cache, under its own key; each compiled kernel launches with
    PDL exactly when its PTX waits."""
    path = report["launch_path"]
    assert path["outside"] == {"from_launcher": [], "compiles": 1, "cache_keys_with_pdl": [False]}
    assert path["inside"] == {"from_launcher": [], "compiles": 1, "cache_keys_with_pdl": [False, True]}
    assert path["compiled"] == [[False, False], [True, True]]


# ------------------------------------------------------------------------------------------------ on a GPU

requires_pdl = pytest.mark.skipif(
    not (torch.cuda.is_available() and _triton.pdl_supported("cuda")),
    reason="PDL needs a CUDA GPU of compute capability 9.0+ and Triton without its interpreter",
)


@pytest.mark.gpu
@requires_pdl
def test_gpu_pdl_chain_in_a_graph_is_bitwise_the_plain_one() -> None:
    """Thirty dependent residual LayerNorms captured in one CUDA graph, launched with and without PDL: each reads what
    the one before wrote, so a kernel touching memory before its wait would show up as a difference (or as one
    between replays); the PDL specialization was compiled with launch_pdl."""
    from vitfast import ops
    from vitfast.backend import use_backend
    from vitfast.ops.layer_norm import _layer_norm_fwd_kernel

    with torch.device("cuda"):
        x, branch = torch.randn(8, 197, 768, dtype=torch.bfloat16), torch.randn(8, 197, 768, dtype=torch.bfloat16)
        weight, bias = torch.randn(768), torch.randn(768)

    def chain() -> torch.Tensor:
        normed, residual = branch, x
        for _ in range(30):
            normed, residual = ops.layer_norm_residual(residual, normed, None, weight, bias, 1e-6)
        return normed

    results = []
    for pdl in (False, True):
        with use_backend("triton"), _triton.use_pdl("cuda", enabled=pdl) as on:
            assert on == pdl
            chain()  # compiles and warms up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
        replays = []
        for _ in range(3):
            graph.replay()
            replays.append(out.clone())
        for replay in replays[1:]:
            torch.testing.assert_close(replay, replays[0], rtol=0, atol=0)
        results.append(replays[0])
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    compiled = [k for cache in _layer_norm_fwd_kernel.device_caches.values() for k in cache[0].values()]
    assert any(k.metadata.launch_pdl and "griddepcontrol.wait" in k.asm["ptx"] for k in compiled)
