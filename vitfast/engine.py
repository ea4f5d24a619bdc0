"""Small-batch inference: :func:`optimize` turns a model into an engine that replays one CUDA graph per batch size.

At batch 1-8 a ViT on a big GPU is bound by kernel launches, not by arithmetic: eager PyTorch spends most of a
forward issuing ~10 kernels per block from Python. The engine removes that in two ways:

- **CUDA graphs.** The first call at a batch size captures the whole forward into a graph reading a static input
  buffer and writing a static output buffer; every later call is one copy into the input buffer, one graph replay and
  (unless ``copy_outputs=False``) one copy out. A batch is padded to the next captured size (the padded rows are
  computed and dropped: no op in these models mixes samples, so they cannot change the real rows).
- **Fewer kernels per block** (``fuse=True``, vitfast :class:`~vitfast.models.VisionTransformer` models): weights are
  rearranged once so that EVA-02's split ``q/k/v`` and ``fc1_g/fc1_x`` projections each become one GEMM and the BEiT /
  EVA ``q_bias/v_bias`` concatenation is not rebuilt every call; RoPE tables are built once; and every residual add
  runs inside the LayerNorm that follows it (:func:`vitfast.ops.layer_norm_residual`), including the add that ends a
  block, fused into the next block's ``norm1`` (or the final norm). A SwiGLU hidden width that is not a multiple of
  8 (EVA-02-L: 2730) is zero-padded in the weights so that every GEMM row is 16-byte aligned.

On the CPU (or with ``use_graphs=False``) the engine takes the same path without capturing: static buffers, padding,
size dispatch and output ownership behave exactly as on the GPU, which is how they are tested without one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import numbers
import statistics
import time
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitfast import ops
from vitfast._measure import agreement, time_call, tolerance_for
from vitfast.backend import BACKENDS, implementations, override_impl, use_backend
from vitfast.layers.mlp import Mlp, SwiGLU, SwiGLUPacked
from vitfast.layers.pos_embed import resample_abs_pos_embed
from vitfast.models.vision_transformer import VisionTransformer
from vitfast.ops._triton import INTERPRETER, pdl_supported, plan_sms, use_pdl
from vitfast.ops.attention import attention_graph_policy
from vitfast.ops.linear import linear_ref, split_k_splits
from vitfast.ops.swiglu import aligned_width

__all__ = ["InferenceEngine", "optimize"]

logger = logging.getLogger("vitfast")

ON_NEW_SIZE = ("eager", "capture")
# What a batch size is captured with when no backend is given: the Triton kernels with cuBLAS GEMMs; the same with
# SDPA for attention unless a relative position bias is gathered (RoPE then rotates q and k in one kernel before
# SDPA); plain PyTorch. The fastest replay is kept.
TUNING_CANDIDATES = ("kernels", "kernels-sdpa", "reference")
# "kernels-sdpa" with fc1's bias + GELU in cuBLASLt's GEMM epilogue (torch._addmm_activation): one kernel instead of
# a GEMM and an activation pass. The epilogue computes the tanh approximation of GELU, so it is offered only where
# that passes STYLE rule 5 against the family's exact (erf) GELU: bf16 (ViT-B widths, CPU emulation of the
# epilogue's numerics, 2026-12-01: ViT-B 1.4e-2 vs bound 3.3e-2, BEiT v2-B 7.1e-3 vs 1.9e-2, CLIP-B (GELU) 1.3e-2 vs
# 2.4e-2, logits scaled max error against fp64). Not fp32 (3e-4 vs a bound of 2.5e-6), fp16 (not measured), nor
# QuickGELU (another function: 1.5e-2 against it in fp32).
EPILOGUE_CANDIDATE = "kernels-epilogue"
# The fused forward on the reference ops compiled by torch.compile (inductor: fused elementwise glue, padded GEMMs,
# its own attention lowering), then captured in the engine's graph like the others. Offered with compile=True.
COMPILED_CANDIDATE = "inductor"
# "kernels-sdpa" with proj and fc2 as split-K GEMMs where their output tiles leave SMs idle (batch 1 on an H100:
# ops.linear_split_k), their fp32 partial sums, bias, layer scale and residual added up inside the residual LayerNorm
# that follows (ops.layer_norm_residual_partials): no launch for the reduction. Fused vitfast models on a GPU only.
SPLIT_K_CANDIDATE = "kernels-splitk"
# "kernels-sdpa" with programmatic dependent launch between our Triton kernels (vitfast.ops._triton.use_pdl): inside
# the graph each kernel may start while the one before it finishes, and waits (griddepcontrol.wait) before its first
# global access. Offered where pdl_supported: sm_90+ and Triton with grid dependency control, never the interpreter.
PDL_CANDIDATE = "kernels-pdl"
# The "kernels-sdpa" forward compiled by torch.compile: inductor fuses the glue between our kernels, which it sees
# through torch.library.wrap_triton. Offered with compile=True; it cannot compile under Triton's interpreter (its
# capture fails there with an error saying so, and the candidate is skipped).
COMPILED_KERNELS_CANDIDATE = "compiled-kernels"
COMPILED_CANDIDATES = (COMPILED_CANDIDATE, COMPILED_KERNELS_CANDIDATE)
CANDIDATES = (*TUNING_CANDIDATES, EPILOGUE_CANDIDATE, SPLIT_K_CANDIDATE, PDL_CANDIDATE, *COMPILED_CANDIDATES)
# Pruning (capture time, above all the compiled candidate's compile): a candidate that was more than PRUNE_MARGIN
# times slower than the winner at the nearest smaller captured batch size of the same call, input shape and dtype,
# or was rejected there, is not captured again. Only when that size is at most PRUNE_MAX_BATCH_RATIO times smaller:
# the ranking at batch 1-8 (launch-bound) says little about batch 64 (GEMM-bound), which is tuned in full.
PRUNE_MARGIN = 1.5
PRUNE_MAX_BATCH_RATIO = 4
_KINDS = ("forward", "features")


def optimize(
    model: nn.Module,
    batch_sizes: Iterable[int] = (1, 4, 8),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    on_new_size: str = "eager",
    copy_outputs: bool = True,
    backend: str | None = None,
    fuse: bool = True,
    use_graphs: bool | None = None,
    compile: bool | None = None,
) -> InferenceEngine:
    """An inference engine for ``model``: same call signature (``engine(x)``, ``engine.forward_features(x)``).

    Args:
        model: a vitfast model (fused and graphed) or any module whose ``forward(x)`` takes an image batch (graphed
            only; a timm model patched with :func:`vitfast.patch` works). The model is copied (weights cast once to
            ``dtype`` on ``device``); the original is left as it was.
        batch_sizes: the sizes to capture, each on its first use. A batch of another size runs at the next larger
            captured size (padded) or, above the largest, as ``on_new_size`` says.
        dtype: weights and activations (``torch.bfloat16``, ``torch.float16`` or ``torch.float32``). Float inputs
            are cast to it on the copy into the static buffer; uint8 images stay uint8 (normalized by the model).
            Default: ``torch.bfloat16`` on a CUDA device, ``torch.float32`` elsewhere (CPU bf16 matmuls run several
            times slower than fp32 ones; asking for a 16-bit dtype on the CPU warns so).
        device: where the engine runs. Default: the device of the model's parameters. CUDA graphs need a CUDA
            device; on the CPU the engine runs eagerly.
        on_new_size: ``"eager"`` runs a batch larger than every captured size without a graph; ``"capture"`` captures
            a graph for that exact size (and keeps it).
        copy_outputs: ``True`` returns a fresh tensor per call. ``False`` returns a view of the engine's static output
            buffer, which the next call at that size overwrites: faster, for callers that consume the result at once.
        backend: the vitfast backend the forward is captured with. Default (``None``): with CUDA graphs, each batch
            size is captured once per candidate (``"kernels"``: the Triton kernels with cuBLAS GEMMs;
            ``"kernels-sdpa"``: the same, with SDPA for attention unless it has a relative position bias, and RoPE
            applied to q and k by one kernel before SDPA; ``"kernels-splitk"``: ``"kernels-sdpa"`` with proj and fc2
            split-K where their tiles leave SMs idle, reduced in the next LayerNorm (fused models on a GPU);
            ``"kernels-pdl"``: ``"kernels-sdpa"`` with programmatic dependent launch between the Triton kernels, on
            sm_90+ GPUs; ``"reference"``; ``"inductor"`` and ``"compiled-kernels"`` with ``compile``), each is
            checked against the plain forward, a few
            replays of each that agrees are timed, and the fastest graph is kept (``engine.choices`` says which won,
            ``engine.tuning`` the times, ``engine.skipped`` why others were left out: rejected, or pruned because
            they lost clearly at the nearest smaller batch size); without graphs, the current backend. A name from
            :data:`vitfast.backend.BACKENDS` or one of :data:`CANDIDATES` fixes it.
        fuse: run vitfast models through the fused block sequence (see the module docstring); ``False`` graphs the
            model's own ``forward``.
        use_graphs: capture CUDA graphs (default: on a CUDA device).
        compile: add the compiled candidates: the engine's forward compiled by ``torch.compile`` (fullgraph,
            static shapes) on the reference ops (``"inductor"``) and on the ``"kernels-sdpa"`` ops
            (``"compiled-kernels"``: inductor around our Triton kernels; GPU only), captured and timed beside the
            others; ``compile=False`` offers neither. Each compile is paid on the first call of each (call, batch
            size, input shape, dtype): on the CPU a ViT-B/16 took 83 s with an empty inductor cache and 6 s with a
            warm one; not yet measured on a GPU (``engine.compile_seconds[key][candidate]`` says how long each
            took). Default: on with CUDA graphs (where the engine tunes), off otherwise; ``compile=True`` without
            graphs runs the ``"inductor"`` forward.
    """
    return InferenceEngine(
        model,
        batch_sizes,
        dtype,
        device,
        on_new_size=on_new_size,
        copy_outputs=copy_outputs,
        backend=backend,
        fuse=fuse,
        use_graphs=use_graphs,
        compile=compile,
    )


def _default_device_and_dtype(
    model: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """``optimize``'s defaults: the model's own device, and bf16 on CUDA / fp32 elsewhere (the fast dtype there)."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}.")
    return device, dtype


@dataclass
class _Captured:
    """One graph: its static input and output, and the graph (None when running without graphs)."""

    static_input: torch.Tensor
    static_output: torch.Tensor
    graph: torch.cuda.CUDAGraph | None


class InferenceEngine(nn.Module):
    """What :func:`optimize` returns. Not thread-safe: one call at a time (graphs share static buffers)."""

    def __init__(
        self,
        model: nn.Module,
        batch_sizes: Iterable[int] = (1, 4, 8),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        on_new_size: str = "eager",
        copy_outputs: bool = True,
        backend: str | None = None,
        fuse: bool = True,
        use_graphs: bool | None = None,
        compile: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}.")
        batch_sizes = list(batch_sizes)
        if not batch_sizes or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}.")
        sizes = sorted({int(b) for b in batch_sizes})
        if sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}.")
        if on_new_size not in ON_NEW_SIZE:
            raise ValueError(f"on_new_size must be one of {ON_NEW_SIZE}, got {on_new_size!r}.")
        if backend is not None and backend not in (*BACKENDS, *CANDIDATES):
            choices = ", ".join(dict.fromkeys((*BACKENDS, *CANDIDATES)))
            raise ValueError(f"unknown vitfast backend {backend!r}; choose one of {choices}.")
        device, dtype = _default_device_and_dtype(model, device, dtype)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "optimize(device='cuda') needs a CUDA GPU, and torch.cuda.is_available() is False here; pass "
                "device='cpu' to run the engine without CUDA graphs."
            )
        if use_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the engine runs on {device}.")
        if device.type == "cpu" and dtype != torch.float32:
            warnings.warn(
                f"optimize(dtype={dtype}) on the CPU: 16-bit matmuls run several times slower there than float32 "
                "ones (the default on the CPU); pass dtype=torch.float32 unless you need the 16-bit numbers.",
                stacklevel=3,
            )
        self.batch_sizes = sizes
        self.dtype = dtype
        self.device = device
        self.on_new_size = on_new_size
        self.copy_outputs = copy_outputs
        self.backend = backend
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.compile = self.use_graphs if compile is None else bool(compile)
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.fused = _FusedViT(self.model) if fuse and isinstance(self.model, VisionTransformer) else None
        self._captured: dict[tuple, _Captured] = {}
        self.choices: dict[tuple, str] = {}  # (call, batch size, input shape, dtype) -> the candidate captured
        self.tuning: dict[tuple, dict[str, float]] = {}  # same keys -> median replay ms of every candidate
        self.skipped: dict[tuple, dict[str, str]] = {}  # same keys -> why a candidate was pruned or rejected
        self.compile_seconds: dict[tuple, dict[str, float]] = {}  # same keys -> each compiled candidate's first call
        self._compiled: dict[tuple, Callable] = {}  # (*key, candidate) -> its compiled forward
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.stats = {"replays": 0, "eager_calls": 0, "captures": 0}

    # ------------------------------------------------------------------ public calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or pooled features for a headless model), as ``model(x)``."""
        return self._run("forward", x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized tokens ``[B, 1 + N, C]``, as ``model.forward_features(x)``."""
        return self._run("features", x)

    def captured_sizes(self) -> list[tuple[str, int]]:
        """The (call, batch size) pairs captured so far."""
        return sorted((key[0], key[1]) for key in self._captured)

    def extra_repr(self) -> str:
        return (
            f"batch_sizes={self.batch_sizes}, dtype={self.dtype}, device={self.device}, graphs={self.use_graphs}, "
            f"fused={self.fused is not None}, compile={self.compile}, on_new_size={self.on_new_size!r}, "
            f"copy_outputs={self.copy_outputs}"
        )

    # ------------------------------------------------------------------ dispatch

    def _run(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected an image batch tensor [B, C, H, W], got {type(x).__name__}.")
        if x.ndim != 4 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty image batch [B, C, H, W], got a tensor of shape {tuple(x.shape)}.")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(f"expected a floating-point or uint8 image batch, got {x.dtype}.")
        batch = x.shape[0]
        size = next((s for s in self.batch_sizes if s >= batch), None)
        if size is None:
            if self.on_new_size == "eager":
                self.stats["eager_calls"] += 1
                return self._call(kind, x.to(self.device, self._input_dtype(x)))
            size = batch
            self.batch_sizes = sorted({*self.batch_sizes, batch})
        key = (kind, size, tuple(x.shape[1:]), self._input_dtype(x))
        captured = self._captured.get(key)
        if captured is None:
            captured = self._capture(kind, size, x)
            self._captured[key] = captured
        captured.static_input[:batch].copy_(x)
        if captured.graph is not None:
            captured.graph.replay()
            self.stats["replays"] += 1
        else:
            captured.static_output.copy_(self._call(kind, captured.static_input, self.choices[key]))
            self.stats["eager_calls"] += 1
        out = captured.static_output[:batch]
        return out.clone() if self.copy_outputs else out

    def _input_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.uint8 if x.dtype == torch.uint8 else self.dtype

    def _candidates(self) -> list[str]:
        if self.backend is not None:
            return [self.backend]
        compiled = [COMPILED_CANDIDATE] if self.compile else []
        if not self.use_graphs:
            return compiled or ["current"]
        if "triton" not in implementations("attention"):
            return ["current", *compiled]
        epilogue = [EPILOGUE_CANDIDATE] if self._gelu_epilogue_applies() else []
        split_k = [SPLIT_K_CANDIDATE] if self._split_k_applies() else []
        pdl = [PDL_CANDIDATE] if pdl_supported(self.device) else []
        compiled_kernels = [COMPILED_KERNELS_CANDIDATE] if self.compile else []
        return [*TUNING_CANDIDATES, *epilogue, *split_k, *pdl, *compiled, *compiled_kernels]

    def _gelu_epilogue_applies(self) -> bool:
        """Whether the tanh-GELU epilogue passes rule 5 here (see EPILOGUE_CANDIDATE) and has an fc1 to fuse into."""
        if self.dtype != torch.bfloat16 or self.fused is None:
            return False
        return any(block.mlp_kind == "mlp" and block.activation == "gelu" for block in self.fused.blocks)

    def _split_k_applies(self) -> bool:
        """Whether the split-K candidate has projections to split: a fused model on a GPU (it fills idle SMs)."""
        return self.fused is not None and self.device.type == "cuda"

    def _pruned(self, key: tuple, candidates: list[str]) -> tuple[list[str], dict[str, str]]:
        """``candidates`` less those the nearest smaller captured batch size says cannot win (see PRUNE_MARGIN)."""
        kind, size, shape, dtype = key
        smaller = [k[1] for k in self.tuning if (k[0], k[2], k[3]) == (kind, shape, dtype) and k[1] < size]
        if len(candidates) < 2 or not smaller or size > PRUNE_MAX_BATCH_RATIO * max(smaller):
            return candidates, {}
        previous = (kind, max(smaller), shape, dtype)
        times, rejected = self.tuning[previous], self.skipped.get(previous, {})
        best = min(times.values(), default=None)
        pruned = {}
        for name in candidates:
            if name in rejected:  # rejected there, or pruned there (and so further up the chain of sizes)
                pruned[name] = f"pruned: left out at batch {previous[1]} ({rejected[name]})"
            elif name in times and times[name] > PRUNE_MARGIN * best:
                pruned[name] = (
                    f"pruned: {times[name]:.3f} ms at batch {previous[1]}, more than {PRUNE_MARGIN}x the fastest "
                    f"({best:.3f} ms)"
                )
        return [name for name in candidates if name not in pruned], pruned

    @contextlib.contextmanager
    def _candidate(self, name: str):
        with contextlib.ExitStack() as stack:
            if name in (
                "kernels",
                "kernels-sdpa",
                EPILOGUE_CANDIDATE,
                SPLIT_K_CANDIDATE,
                PDL_CANDIDATE,
                COMPILED_KERNELS_CANDIDATE,
            ):
                stack.enter_context(use_backend("triton"))
                # cuBLAS beats ops.linear's Triton GEMM at every shape measured (H100, bf16, 2026-11-22: 9.1 vs
                # ~6.5 us per projection at 197 rows, 21 vs ~12 us at 1576 rows)
                linear = gelu_epilogue_linear if name == EPILOGUE_CANDIDATE else implementations("linear")["reference"]
                stack.enter_context(override_impl("linear", linear))
                if name != "kernels":
                    stack.enter_context(override_impl("attention", attention_graph_policy))
                if name == SPLIT_K_CANDIDATE and self.fused is not None:
                    stack.enter_context(self.fused.splitting_k())
                if name == PDL_CANDIDATE:
                    stack.enter_context(use_pdl(self.device))
            elif name == COMPILED_CANDIDATE:
                stack.enter_context(use_backend("reference"))
            elif name != "current":
                stack.enter_context(use_backend(name))
            yield

    def _call(self, kind: str, x: torch.Tensor, candidate: str | None = None) -> torch.Tensor:
        """One forward on the engine's model, outside any graph. Without a candidate (a batch above every captured
        size, run eagerly): the first one that needs no compile for this new size."""
        name = candidate or next((c for c in self._candidates() if c not in COMPILED_CANDIDATES), "current")
        with torch.inference_mode(), self._candidate(name):
            if name in COMPILED_CANDIDATES:
                return self._compiled_forward(kind, x, name)(self._target(), kind == "features", x)
            return _forward(self._target(), kind == "features", x)

    def _target(self) -> nn.Module | _FusedViT:
        return self.fused if self.fused is not None else self.model

    def _compiled_forward(self, kind: str, x: torch.Tensor, candidate: str) -> Callable:
        """The forward compiled for this exact input (static shapes) and candidate, compiling it on first use."""
        key = (kind, x.shape[0], tuple(x.shape[1:]), x.dtype)
        compiled = self._compiled.get((*key, candidate))
        if compiled is None:
            if candidate == COMPILED_KERNELS_CANDIDATE and (INTERPRETER or x.device.type != "cuda"):
                raise RuntimeError(
                    f"the {candidate!r} candidate compiles vitfast's Triton kernels into inductor's graph, which needs "
                    "a CUDA GPU and Triton without its interpreter (TRITON_INTERPRET=1 is "
                    f"{'set' if INTERPRETER else 'not set'}, the input is on {x.device}); use 'inductor' here."
                )
            if self.fused is not None:
                self.fused.prepare(x)  # its per-grid tables built eagerly, so that the graph has no side effects
            # Dynamo keeps compiled graphs (and its recompile limit) per code object: a copy of _forward's code per
            # entry keeps the entries of every engine and batch size apart, and none falls back to eager past the limit
            compiled = torch.compile(_own_code(_forward), fullgraph=True, dynamic=False)
            start = time.perf_counter()
            output = compiled(self._target(), kind == "features", x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            seconds = self.compile_seconds.setdefault(key, {})[candidate] = time.perf_counter() - start
            logger.info("vitfast engine: %s at batch %d compiled (%s) in %.1f s", kind, x.shape[0], candidate, seconds)
            del output
            self._compiled[(*key, candidate)] = compiled
        return compiled

    def _capture(self, kind: str, size: int, x: torch.Tensor) -> _Captured:
        static_input = torch.zeros((size, *x.shape[1:]), dtype=self._input_dtype(x), device=self.device)
        static_input[: x.shape[0]].copy_(x)
        key = (kind, size, tuple(x.shape[1:]), self._input_dtype(x))
        everyone = self._candidates()
        if self.backend is None and SPLIT_K_CANDIDATE in everyone and not self.fused.splits_k_at(static_input):
            # nothing splits at this batch size: the candidate's graph would be kernels-sdpa's, captured twice
            everyone.remove(SPLIT_K_CANDIDATE)
        candidates, problems = self._pruned(key, everyone) if self.use_graphs else (everyone, {})
        # tuning (also when pruning leaves one candidate: it is still checked against the reference at this size)
        several = self.use_graphs and len(everyone) > 1
        # The first run validates the input (shape, channels, image size) with the model's own error messages. With
        # several candidates it is the plain-PyTorch forward that each graph must agree with before its speed counts:
        # a kernel that misbehaves on some GPU (or a capture gone wrong) is never the one kept.
        first = self._call(kind, static_input, "reference" if several else candidates[0])
        self.stats["captures"] += 1
        if not self.use_graphs:
            self.choices[key] = candidates[0]
            return _Captured(static_input, first.clone(), None)
        expected = first if several else None
        tolerance = tolerance_for(self.dtype)
        best: tuple[float, str, _Captured] | None = None
        times: dict[str, float] = {}
        for name in candidates:
            try:
                captured = self._capture_graph(kind, static_input, name)
            except Exception as exc:  # a candidate that cannot be captured is skipped
                problems[name] = f"capture failed ({type(exc).__name__}: {exc})"
                continue
            if expected is not None:
                captured.graph.replay()
                error, agrees = agreement(captured.static_output, expected, tolerance)
                if not agrees:  # also a non-finite or misshaped output
                    problems[name] = f"output differs from the reference by {error:.2e} (> {tolerance:.0e})"
                    continue
                times[name] = _median_replay_ms(captured.graph)
                if best is not None and times[name] >= best[0]:
                    continue  # the loser's graph and buffers go back to the pool
            best = (times.get(name, 0.0), name, captured)
        for name, problem in problems.items():
            if problem.startswith("pruned"):
                logger.info("vitfast engine: candidate %r %s for %s at batch %d", name, problem, kind, size)
                continue
            logger.warning("vitfast engine: candidate %r skipped for %s at batch %d: %s", name, kind, size, problem)
        if best is None:
            raise RuntimeError(f"vitfast engine: no candidate could be captured for {kind} at batch {size}: {problems}")
        _, name, captured = best
        self.choices[key], self.tuning[key], self.skipped[key] = name, times, problems
        for loser in COMPILED_CANDIDATES:
            if loser != name:
                self._compiled.pop((*key, loser), None)  # a compiled forward that lost is never called again
        logger.debug("vitfast engine: %s at batch %d captured with %s (%s)", kind, size, name, times)
        return captured

    def _capture_graph(self, kind: str, static_input: torch.Tensor, candidate: str) -> _Captured:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream, as capture requires (cuBLAS workspaces, lazy inits)
                self._call(kind, static_input, candidate)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = self._call(kind, static_input, candidate)
        return _Captured(static_input, static_output, graph)


def _median_replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 15) -> float:
    """Median time of one replay, each from an idle GPU (as a caller sees it), timed as ``vitfast bench`` times."""
    _, times, _ = time_call(graph.replay, torch.device("cuda"), warmup=3, reps=reps)
    return statistics.median(times)


def gelu_epilogue_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``ops.linear`` of the ``"kernels-epilogue"`` candidate: cuBLAS, with a biased GEMM followed by the exact GELU
    replaced by cuBLASLt's bias + GELU epilogue, which computes the tanh approximation (one kernel; the fp32
    accumulator goes through bias and GELU and is rounded once). Every other projection as the reference."""
    if activation != "gelu" or bias is None:
        return linear_ref(x, weight, bias, activation)
    if x.device.type == "cuda":
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    # the CPU's _addmm_activation computes the exact GELU instead: the epilogue's numerics emulated, so that the
    # candidate is tested (and its rule-5 error measured) without a GPU
    return F.gelu(F.linear(x.float(), weight.float(), bias.float()), approximate="tanh").to(x.dtype)


def _forward(target: nn.Module | _FusedViT, features_only: bool, x: torch.Tensor) -> torch.Tensor:
    """One forward of the fused sequence or the model itself: what every candidate runs (and the compiled one
    compiles)."""
    if isinstance(target, _FusedViT):
        return target(x, features_only=features_only)
    return target.forward_features(x) if features_only else target(x)


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own (equal to, but not the same object as, ``fn.__code__``)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# ---------------------------------------------------------------------------------------------- fused ViT forward


@dataclass
class _Norm:
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, module: nn.Module) -> _Norm | None:
        if isinstance(module, nn.Identity):
            return None
        return cls(module.weight, module.bias, module.eps)


@dataclass
class _Partials:
    """A projection's output not yet added up: fp32 split-K sums ``[S, rows, N]`` and the bias, for the residual
    LayerNorm that follows (``ops.layer_norm_residual_partials``) to reduce."""

    sums: torch.Tensor
    bias: torch.Tensor | None
    shape: tuple[int, ...]

    def total(self, dtype: torch.dtype) -> torch.Tensor:
        """The projection's output ``shape`` in ``dtype`` (where no LayerNorm follows)."""
        total = self.sums.sum(0) if self.bias is None else self.sums.sum(0) + self.bias.float()
        return total.reshape(self.shape).to(dtype)


def _project(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, split_k: bool
) -> torch.Tensor | _Partials:
    """``h @ weight.T + bias``, or with ``split_k`` its split-K partial sums where the split applies (else cuBLAS)."""
    if split_k:
        rows, (n, k) = h.numel() // h.shape[-1], weight.shape
        splits = split_k_splits(rows, n, k, plan_sms(h.device))
        if splits > 1:
            return _Partials(ops.linear_split_k(h, weight, splits), bias, (*h.shape[:-1], n))
    return ops.linear(h, weight, bias)


class _FusedBlock:
    """One block's weights, rearranged once for inference (views of the engine's model parameters or new tensors)."""

    def __init__(self, block: nn.Module) -> None:
        attn = block.attn
        self.norm1, self.norm2 = _Norm.of(block.norm1), _Norm.of(block.norm2)
        self.gamma_1, self.gamma_2 = block.gamma_1, block.gamma_2
        self.num_heads, self.scale = attn.num_heads, attn.qk_scale
        self.num_prefix_tokens = attn.num_prefix_tokens
        if attn.qkv_layout == "split":  # three GEMMs -> one; the key has no bias
            self.qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            self.qkv_bias = torch.cat([attn.q_proj.bias, torch.zeros_like(attn.q_proj.bias), attn.v_proj.bias])
        elif attn.qkv_layout == "fused_qv_bias":
            self.qkv_weight = attn.qkv.weight
            self.qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        else:
            self.qkv_weight, self.qkv_bias = attn.qkv.weight, attn.qkv.bias
        # BEiT's relative position bias is a constant in inference: gathered once here into the dense [H, N, N] layout
        # the kernels stream (rows padded to 16 bytes), instead of once per call, and the same values a call gathers
        self.rel_pos_bias = None
        if attn.relative_position_bias_table is not None:
            table, index = attn.relative_position_bias_table, attn.relative_position_index
            self.rel_pos_bias = ops.gather_rel_pos_bias(table.detach(), index, aligned=True)
        self.uses_rope = attn.rope is not None
        self.inner_norm = _Norm.of(attn.norm)
        self.proj_weight, self.proj_bias = attn.proj.weight, attn.proj.bias
        mlp = block.mlp
        self.fc2_weight, self.fc2_bias = mlp.fc2.weight, mlp.fc2.bias
        if isinstance(mlp, Mlp):
            self.mlp_kind, self.activation = "mlp", mlp.act_name
            self.fc1_weight, self.fc1_bias = mlp.fc1.weight, mlp.fc1.bias
        elif isinstance(mlp, SwiGLU):  # fc1_g and fc1_x -> one GEMM producing [gate | up]
            self.mlp_kind = "swiglu"
            self.sub_norm = _Norm.of(mlp.norm)
            # Hidden widths that are not a multiple of 8 (EVA-02-L: 2730) make GEMM rows that are not 16-byte aligned
            # in 16-bit dtypes, which keeps cuBLAS off its fastest kernels (torch.compile pads such matmuls for the
            # same reason). Gate and up each get zero rows up to the next multiple of 8, so that both halves of the
            # fc1 output start aligned, and fc2 zero columns to read the zero-padded hidden: the same sums, exactly.
            self.width = mlp.fc1_g.out_features
            self.padded_width = aligned_width(self.width)
            pad = self.padded_width - self.width
            self.fc1_weight = torch.cat(
                [F.pad(mlp.fc1_g.weight, (0, 0, 0, pad)), F.pad(mlp.fc1_x.weight, (0, 0, 0, pad))]
            )
            self.fc1_bias = torch.cat([F.pad(mlp.fc1_g.bias, (0, pad)), F.pad(mlp.fc1_x.bias, (0, pad))])
            self.fc2_weight = F.pad(mlp.fc2.weight, (0, pad)) if pad else mlp.fc2.weight
            if self.sub_norm is not None and pad:
                # the sub-LN's parameters zero-padded too (the kernel then reads them 16 bytes at a time); a norm
                # without affine parameters is the same as one with weight 1 and bias 0
                norm, like = self.sub_norm, mlp.fc1_g.weight
                weight = norm.weight if norm.weight is not None else like.new_ones(self.width)
                bias = norm.bias if norm.bias is not None else like.new_zeros(self.width)
                self.sub_norm = _Norm(F.pad(weight, (0, pad)), F.pad(bias, (0, pad)), norm.eps)
        elif isinstance(mlp, SwiGLUPacked):
            self.mlp_kind = "swiglu_packed"
            self.fc1_weight, self.fc1_bias = mlp.fc1.weight, mlp.fc1.bias
        else:
            raise TypeError(f"the fused engine does not know the MLP {type(mlp).__name__}; pass fuse=False.")

    def attention(self, h: torch.Tensor, grid, rope, split_k: bool = False) -> torch.Tensor | _Partials:
        batch, tokens, channels = h.shape
        qkv = ops.linear(h, self.qkv_weight, self.qkv_bias)
        # views into the packed [B, N, 3, heads, head_dim] GEMM output: the kernel reads q, k, v through strides
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = ops.attention(
            q,
            k,
            v,
            scale=self.scale,
            rope=rope if self.uses_rope else None,
            num_prefix_tokens=self.num_prefix_tokens,
            bias=self.rel_pos_bias,
        )
        out = out.transpose(1, 2).reshape(batch, tokens, channels)
        if self.inner_norm is not None:
            out = ops.layer_norm(out, self.inner_norm.weight, self.inner_norm.bias, self.inner_norm.eps)
        return _project(out, self.proj_weight, self.proj_bias, split_k)

    def mlp(self, h: torch.Tensor, split_k: bool = False) -> torch.Tensor | _Partials:
        if self.mlp_kind == "mlp":  # bias and activation in the GEMM's epilogue where the kernel runs
            hidden = ops.linear(h, self.fc1_weight, self.fc1_bias, self.activation)
        elif self.mlp_kind == "swiglu":
            # gate and up at the padded width: their padding columns are exact zeros (zero weight rows and bias),
            # and the output's are zeros too, which fc2's zero columns read (no separate pad of the hidden)
            hidden = ops.linear(h, self.fc1_weight, self.fc1_bias)
            gate, up = hidden[..., : self.padded_width], hidden[..., self.padded_width :]
            if self.sub_norm is not None:
                norm, width = self.sub_norm, self.width if self.padded_width != self.width else None
                hidden = ops.swiglu_layer_norm(gate, up, norm.weight, norm.bias, norm.eps, width=width)
            else:
                hidden = ops.swiglu(gate, up)  # silu(0) * 0 = 0 exactly in the padding
        else:
            hidden = ops.swiglu_packed(ops.linear(h, self.fc1_weight, self.fc1_bias))
        return _project(hidden, self.fc2_weight, self.fc2_bias, split_k)


class _FusedViT:
    """The inference forward of a vitfast VisionTransformer with every residual add fused into the next LayerNorm.

    Block i computes ``x += gamma_1 * attn(norm1(x))`` then ``x += gamma_2 * mlp(norm2(x))``. Here the second add is
    left pending and done by the next block's ``norm1`` (``layer_norm_residual``), the last one by the final norm.
    With ``split_k`` (the ``"kernels-splitk"`` candidate, see :meth:`splitting_k`) proj and fc2 may leave their output
    as split-K partial sums, which that LayerNorm adds up with the bias, layer scale and residual.
    """

    def __init__(self, model: VisionTransformer) -> None:
        self.model = model
        self.split_k = False
        self.blocks = [_FusedBlock(block) for block in model.blocks]
        self.final_norm = _Norm.of(model.norm)
        self._rope_tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._pos_embeds: dict[tuple[int, int], torch.Tensor | None] = {}
        # uint8 images are normalized inside the patch embedding; device tensors built now, so that no host-to-device
        # copy happens while a graph is being captured
        cfg, device = model.pretrained_cfg, model.cls_token.device
        self._mean_std = tuple(
            torch.tensor(cfg[key], dtype=torch.float32, device=device) if key in cfg else None
            for key in ("mean", "std")
        )

    @contextlib.contextmanager
    def splitting_k(self):
        """Run proj and fc2 split-K inside the block (a plain attribute, which torch.compile guards on)."""
        previous, self.split_k = self.split_k, True
        try:
            yield
        finally:
            self.split_k = previous

    def splits_k_at(self, image: torch.Tensor) -> bool:
        """Whether any proj or fc2 GEMM of a forward of ``image`` (its batch size and grid) runs split-K."""
        grid = self.model.patch_embed.grid_size_for(image)
        rows = image.shape[0] * (grid[0] * grid[1] + self.model.num_prefix_tokens)
        sms = plan_sms(image.device)
        return any(
            split_k_splits(rows, *weight.shape, sms) > 1
            for block in self.blocks
            for weight in (block.proj_weight, block.fc2_weight)
        )

    def prepare(self, image: torch.Tensor) -> None:
        """Build the per-grid tables (RoPE, resampled position embedding) of ``image``'s size now, outside any graph."""
        grid = self.model.patch_embed.grid_size_for(image)
        self._rope(grid, image.device)
        self._pos_embed(grid)

    def _rope(self, grid: tuple[int, int], device: torch.device):
        if self.model.rope is None:
            return None
        if grid not in self._rope_tables:
            self._rope_tables[grid] = self.model.rope.table(grid, device=device)
        return self._rope_tables[grid]

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        model = self.model
        if grid not in self._pos_embeds:
            pos_embed = model.pos_embed
            if pos_embed is not None and grid != model.patch_embed.grid_size:
                pos_embed = resample_abs_pos_embed(
                    pos_embed, grid, model.patch_embed.grid_size, model.num_prefix_tokens
                )
            self._pos_embeds[grid] = pos_embed
        return self._pos_embeds[grid]

    def __call__(self, image: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        model = self.model
        grid = model.patch_embed.grid_size_for(image)
        mean, std = self._mean_std if image.dtype == torch.uint8 else (None, None)
        if image.dtype == torch.uint8 and mean is None:
            raise ValueError("this model has no mean/std in its pretrained_cfg, so uint8 images cannot be normalized.")
        proj = model.patch_embed.proj
        x = ops.patch_embed_tokens(image, proj.weight, proj.bias, self._pos_embed(grid), model.cls_token, mean, std)
        x = model.norm_pre(x)
        rope = self._rope(grid, x.device)
        # (branch, gamma) not yet added to x; the branch may be split-K partial sums
        pending: tuple[torch.Tensor | _Partials, torch.Tensor | None] | None = None
        split_k = self.split_k
        for block in self.blocks:
            h, x = _norm_after_residual(x, pending, block.norm1)
            branch = block.attention(h, grid, rope, split_k)
            h, x = _norm_after_residual(x, (branch, block.gamma_1), block.norm2)
            pending = (block.mlp(h, split_k), block.gamma_2)
        if self.final_norm is not None:
            features, _ = _norm_after_residual(x, pending, self.final_norm)
        else:
            branch, gamma = pending
            if isinstance(branch, _Partials):
                branch = branch.total(x.dtype)
            features = x + (branch if gamma is None else gamma * branch)
        return features if features_only else model.forward_head(features)


def _norm_after_residual(
    x: torch.Tensor, pending: tuple[torch.Tensor | _Partials, torch.Tensor | None] | None, norm: _Norm
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x'), x')`` with ``x' = x + gamma * branch`` for a pending ``(branch, gamma)``, else ``x' = x``; a
    branch of split-K partial sums is added up (with its bias) in the same kernel."""
    if pending is None:
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps), x
    branch, gamma = pending
    if isinstance(branch, _Partials):
        return ops.layer_norm_residual_partials(x, branch.sums, branch.bias, gamma, norm.weight, norm.bias, norm.eps)
    return ops.layer_norm_residual(x, branch, gamma, norm.weight, norm.bias, norm.eps)
