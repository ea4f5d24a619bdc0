"""End-to-end benchmarks: vitfast against timm eager, ``torch.compile`` and CUDA graphs, side by side in one run.

Method (the same for every provider):

- one set of weights (vitfast's random init, copied into timm with ``strict=True``) and one random input per batch
  size, shared by all providers; inference runs under ``torch.inference_mode()`` with the weights cast to the dtype;
- the first call is timed on its own and reported as "first-call time" (it includes compilation, CUDA-graph capture
  and autotuning); then ``warmup`` untimed calls; then ``reps`` timed calls, each started from an idle device
  (synchronize, record a CUDA event, call, record an event), so a number is the latency of one isolated call;
- medians with the interquartile range; img/s and achieved TF/s from the forward FLOPs counted by
  ``torch.utils.flop_counter`` (multiply and add counted separately);
- every provider's output is compared with the reference provider's (timm eager when present): the scaled max error
  is reported and a provider beyond the dtype's tolerance is marked as disagreeing and never counted as faster.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import vitfast

# the agreement rule and the timer live beneath both the engine and the benchmarks; re-exported here, where they
# have always been public
from vitfast._measure import AGREEMENT_TOLERANCE, DTYPES, agreement, scaled_error, summarize, time_call
from vitfast.backend import override_impl, use_backend
from vitfast.checkpoint import PRETRAINING_ONLY_KEYS
from vitfast.models import resolve
from vitfast.models._info import model_info

__all__ = [
    "AGREEMENT_TOLERANCE",
    "DTYPES",
    "PROVIDERS",
    "BenchConfig",
    "Measurement",
    "agreement",
    "check_agreement",
    "format_tables",
    "forward_flops",
    "make_call",
    "read_json",
    "run",
    "scaled_error",
    "skip_reason",
    "summarize",
    "time_call",
]


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    library: str  # "timm" (a peer) or "vitfast"
    compile_mode: str | None = None  # None: eager; else torch.compile mode
    backend: str = "auto"  # vitfast backend for vitfast providers
    requires: str | None = None  # importable module the provider needs
    cuda_only: bool = False
    default: bool = True  # part of the default provider set
    engine: bool = False  # run through vitfast.optimize() (CUDA graphs + fused blocks), inference only
    patched: bool = False  # the timm model with vitfast.patch() (vitfast's layers in a user's timm model)


PROVIDERS = {
    p.name: p
    for p in (
        Provider("timm-eager", "timm, eager", "timm"),
        Provider("timm-compile", "timm, torch.compile(dynamic=False)", "timm", compile_mode="default"),
        Provider(
            "timm-graphs", "timm, torch.compile(mode='reduce-overhead')", "timm", "reduce-overhead", cuda_only=True
        ),
        Provider("vitfast", "vitfast, best available backend", "vitfast"),
        Provider(
            "vitfast-graphs", "vitfast.optimize(): CUDA graphs + fused blocks", "vitfast", cuda_only=True, engine=True
        ),
        Provider("vitfast-reference", "vitfast, reference backend", "vitfast", backend="reference"),
        Provider("vitfast-compile", "vitfast, torch.compile(dynamic=False)", "vitfast", "default", default=False),
        # the training path: a user's timm model with vitfast.patch(), eager and compiled (same weights as timm's)
        Provider("timm-patched", "timm + vitfast.patch(), eager", "vitfast", default=False, patched=True),
        Provider(
            "timm-patched-triton",
            "timm + vitfast.patch(backend='triton'), eager",
            "vitfast",
            backend="triton",
            requires="triton",
            cuda_only=True,
            default=False,
            patched=True,
        ),
        Provider(
            "timm-patched-compile",
            "timm + vitfast.patch(), torch.compile(dynamic=False)",
            "vitfast",
            "default",
            default=False,
            patched=True,
        ),
        # peers: vitfast's layers on the PyTorch reference, with one library's kernels swapped in
        Provider(
            "xformers",
            "vitfast layers, xformers attention",
            "peer",
            backend="reference",
            requires="xformers",
            cuda_only=True,
        ),
        Provider(
            "liger",
            "vitfast layers, Liger-Kernel LayerNorm + SwiGLU",
            "peer",
            backend="reference",
            requires="liger_kernel",
            cuda_only=True,
        ),
    )
}
PEER_LIBRARIES = ("timm", "peer")


# CPU defaults: a ViT-B forward takes 0.1-1 s there, so fewer calls than on a GPU keep the default run near a minute
# on two cores; ten timed calls give a median and an interquartile range that mean something
CPU_WARMUP = 2
CPU_REPS = 10


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["vit_base_patch16_224"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8])
    dtype: str | None = None  # default: bf16 on GPU, fp32 on CPU
    providers: list[str] | None = None  # default: every default provider that can run here
    device: str | None = None  # default: cuda when available
    warmup: int | None = None
    reps: int | None = None
    train: bool = False
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture overrides for every model (img_size, ...)

    def resolved(self) -> BenchConfig:
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was requested but no CUDA GPU is visible; use --device cpu.")
        on_gpu = device.startswith("cuda")
        dtype = self.dtype or ("bf16" if on_gpu else "fp32")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
        unknown = [p for p in self.providers or [] if p not in PROVIDERS]
        if unknown:
            raise ValueError(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}.")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}.")
        if self.reps is not None and self.reps < 1:
            raise ValueError(f"reps (--reps, the timed calls) must be at least 1, got {self.reps}.")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup (--warmup) must be 0 or more calls, got {self.warmup}.")
        if not self.models:
            raise ValueError("no model to measure: name at least one (see `vitfast list`).")
        for name in self.models:
            resolve(name)  # an unknown name fails now, with suggestions, not after the first model's measurements
        return BenchConfig(
            models=list(self.models),
            batch_sizes=list(self.batch_sizes),
            dtype=dtype,
            providers=self.providers or default_providers(device),
            device=device,
            warmup=self.warmup if self.warmup is not None else (10 if on_gpu else CPU_WARMUP),
            reps=self.reps if self.reps is not None else (50 if on_gpu else CPU_REPS),
            train=self.train,
            seed=self.seed,
            overrides=dict(self.overrides),
        )


def default_providers(device: str) -> list[str]:
    """Every default provider that can run on ``device``.

    On the CPU: timm eager and the vitfast reference only, so that a run takes seconds, not minutes (compiling takes
    long there, and vitfast's automatic backend is the reference path on the CPU, so ``vitfast`` would repeat it).
    """
    if not device.startswith("cuda"):
        return ["timm-eager", "vitfast-reference"]
    return [p.name for p in PROVIDERS.values() if p.default and unavailable_reason(p, device) is None]


def unavailable_reason(provider: Provider, device: str) -> str | None:
    if provider.cuda_only and not device.startswith("cuda"):
        return "needs a CUDA GPU"
    if provider.requires is not None:
        try:
            __import__(provider.requires)
        except Exception as exc:  # a broken install (e.g. an extension built for another torch) counts as missing
            return f"{provider.requires} is not usable here ({type(exc).__name__}: {exc})"
    return None


@dataclass
class Measurement:
    """One (model, provider, batch size) result; the JSON row."""

    model: str
    provider: str
    batch_size: int
    dtype: str
    mode: str  # "infer" or "train"
    img_size: list[int]
    median_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    min_ms: float | None = None
    reps: int = 0
    first_call_s: float | None = None
    img_per_s: float | None = None
    tflops: float | None = None
    max_error: float | None = None
    agrees: bool | None = None
    peak_mem_gb: float | None = None
    skipped: str | None = None  # reason, when the provider could not run
    engine_choice: str | None = None  # the candidate vitfast.optimize() captured (engine providers)
    engine_tuning_ms: dict[str, float] | None = None  # median replay ms of every candidate it timed
    engine_skipped: dict[str, str] | None = None  # candidates it left out, and why (rejected or pruned)


def check_agreement(
    outputs: dict[str, torch.Tensor], reference: str, tolerance: float
) -> dict[str, tuple[float, bool]]:
    """Scaled max error of every output against ``outputs[reference]``, and whether it is within ``tolerance``.

    A non-finite output never agrees.
    """
    return {name: agreement(output, outputs[reference], tolerance) for name, output in outputs.items()}


# ---------------------------------------------------------------------------------------------- providers


def _xformers_attention(q, k, v, scale=None, rope=None, num_prefix_tokens=0, table=None, index=None, dropout_p=0.0):
    import xformers.ops as xops

    from vitfast.ops.attention import gather_rel_pos_bias
    from vitfast.ops.rope import rope_2d_ref

    if rope is not None:
        q, k = rope_2d_ref(q, *rope, num_prefix_tokens), rope_2d_ref(k, *rope, num_prefix_tokens)
    bias = None
    if table is not None:
        batch, heads, tokens, _ = q.shape
        padded = -(-tokens // 8) * 8  # xformers wants the bias' last dimension aligned to 8
        storage = q.new_zeros(batch, heads, tokens, padded)
        storage[..., :tokens] = gather_rel_pos_bias(table, index).to(q.dtype)
        bias = storage[..., :tokens]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p, scale=scale
    )
    return out.transpose(1, 2)


def _liger_layer_norm(x, weight, bias, eps):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return LigerLayerNormFunction.apply(x, weight, bias, eps)


def _liger_swiglu(gate, up):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


def _liger_swiglu_packed(x):
    return _liger_swiglu(*x.chunk(2, dim=-1))


def _liger_layer_norm_residual(x, branch, gamma, weight, bias, eps):
    residual = x + (branch if gamma is None else gamma * branch)
    return _liger_layer_norm(residual, weight, bias, eps), residual


def _liger_swiglu_layer_norm(gate, up, weight, bias, eps, width=None):
    if width is not None:  # rows zero-padded past the norm's width: the peer normalizes the true width
        out = _liger_swiglu_layer_norm(gate[..., :width], up[..., :width], weight[:width], bias[:width], eps)
        return F.pad(out, (0, gate.shape[-1] - width))
    return _liger_layer_norm(_liger_swiglu(gate, up), weight, bias, eps)


_PEER_OVERRIDES = {
    "xformers": {"attention": _xformers_attention},
    "liger": {
        "layer_norm": _liger_layer_norm,
        "layer_norm_residual": _liger_layer_norm_residual,
        "swiglu": _liger_swiglu,
        "swiglu_packed": _liger_swiglu_packed,
        "swiglu_layer_norm": _liger_swiglu_layer_norm,
    },
}


@contextlib.contextmanager
def provider_context(provider: Provider) -> Iterator[None]:
    """The backend / op overrides a provider's calls run under."""
    with contextlib.ExitStack() as stack:
        if provider.library != "timm":
            stack.enter_context(use_backend(provider.backend))
        for op, fn in _PEER_OVERRIDES.get(provider.name, {}).items():
            stack.enter_context(override_impl(op, fn))
        yield


def build_models(
    name: str, device: torch.device | str, seed: int = 0, **overrides: Any
) -> tuple[nn.Module, nn.Module | None]:
    """The vitfast model (random init, seeded) and its timm counterpart holding the same weights (or None)."""
    torch.manual_seed(seed)
    with torch.device(device):
        ours = vitfast.create_model(name, **overrides).eval()
    entry = resolve(name)[0]
    if entry.timm_name is None:
        return ours, None
    import timm

    with torch.device(device):
        reference = timm.create_model(entry.timm_name, **{**entry.timm_kwargs, **_timm_overrides(ours)}).eval()
    state = {k: v for k, v in ours.state_dict().items() if k not in PRETRAINING_ONLY_KEYS}
    reference.load_state_dict(state, strict=True)
    return ours, reference


def _timm_overrides(model: nn.Module) -> dict[str, Any]:
    cfg = model.config
    return {
        "num_classes": cfg.num_classes,
        "img_size": cfg.img_size,
        "global_pool": cfg.global_pool,
        "depth": cfg.depth,
    }


def prepare(provider: Provider, ours: nn.Module, reference: nn.Module | None, dtype: torch.dtype, train: bool):
    """The module a provider runs: the shared weights in the right dtype, compiled when the provider compiles."""
    if provider.library == "timm" or provider.patched:
        if reference is None:
            raise LookupError("no timm counterpart")
        module = reference
    else:
        module = ours
    # patch() swaps layers in place: on a copy, so that the timm providers keep timm's model
    module = copy.deepcopy(module) if train or provider.patched else module.to(dtype)
    if provider.patched:
        module = vitfast.patch(module if train else module.to(dtype))  # its ops run under the provider's backend
    if provider.compile_mode is not None:
        # a fresh dynamo cache per compiled provider: each (batch size, mode) recompiles the same model class, and past
        # dynamo's recompile limit (8) it would silently run eager
        torch._dynamo.reset()
        module = torch.compile(
            module, mode=None if provider.compile_mode == "default" else provider.compile_mode, dynamic=False
        )
    return module


# ---------------------------------------------------------------------------------------------- run


def environment() -> dict[str, Any]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vitfast": vitfast.__version__,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    for package in ("triton", "timm"):
        try:
            info[package] = __import__(package).__version__
        except Exception:
            info[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(config: BenchConfig, on_result: Callable[[Measurement], None] | None = None) -> list[Measurement]:
    """Measure every (model, batch size, provider) of ``config``; ``on_result`` sees each row as it completes."""
    config = config.resolved()
    device = torch.device(config.device)
    dtype = DTYPES[config.dtype]
    results: list[Measurement] = []
    providers = [PROVIDERS[name] for name in config.providers]
    total = len(config.models) * len(config.batch_sizes) * len(providers)
    step = 0
    for model_name in config.models:
        ours, reference = build_models(model_name, device, config.seed, **config.overrides)
        img_size = list(ours.config.img_size)
        flops = forward_flops(model_name, tuple(sorted(config.overrides.items())))
        engines: dict[str, vitfast.InferenceEngine] = {}  # one per engine provider, across the batch sizes
        reasons = {p.name: skip_reason(p, config.device, reference, config.train) for p in providers}
        # the reference provider runs first, so every later row is checked (and written) as soon as it is measured
        first = next(
            (
                p
                for name in ("timm-eager", "vitfast-reference")
                for p in providers
                if p.name == name and reasons[name] is None
            ),
            None,
        )
        ordered = ([first] if first else []) + [p for p in providers if p is not first]
        for batch_size in config.batch_sizes:
            generator = torch.Generator(device=device).manual_seed(config.seed + batch_size)
            image = torch.randn(batch_size, 3, *img_size, device=device, generator=generator)
            labels = torch.randint(0, max(ours.num_classes, 1), (batch_size,), device=device, generator=generator)
            expected = None
            for provider in ordered:
                step += 1
                row = Measurement(
                    model_name, provider.name, batch_size, config.dtype, "train" if config.train else "infer", img_size
                )
                row.skipped = reasons[provider.name]
                if row.skipped is None:
                    _progress(f"[{step}/{total}] {model_name} bs={batch_size} {provider.name}: first call ...")
                    output = _measure(row, provider, ours, reference, image, labels, dtype, config, engines)
                    row.img_per_s = batch_size / (row.median_ms / 1e3)
                    # a training step counts as 3x the forward FLOPs (forward + two backward matmuls per forward matmul)
                    row.tflops = (3 if config.train else 1) * flops * batch_size / (row.median_ms / 1e3) / 1e12
                    expected = output if expected is None else expected
                    row.max_error, row.agrees = agreement(output, expected, AGREEMENT_TOLERANCE[config.dtype])
                    _progress(f"    median {row.median_ms:.3f} ms (first call {row.first_call_s:.1f} s)")
                results.append(row)
                if on_result is not None:
                    on_result(row)
        del ours, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def forward_flops(name: str, overrides: tuple[tuple[str, Any], ...] = ()) -> float:
    """Forward FLOPs of one image of ``name`` (``torch.utils.flop_counter`` on the meta device: every matmul, the
    attention's two included, multiply and add counted separately), cached per model and architecture overrides."""
    return _forward_flops(name, overrides)


@functools.cache
def _forward_flops(name: str, overrides: tuple[tuple[str, Any], ...]) -> float:
    return model_info(name, flops=True, **dict(overrides)).gflops * 1e9


def make_call(
    provider: Provider,
    ours: nn.Module,
    reference: nn.Module | None,
    image: torch.Tensor,
    labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    train: bool = False,
    engine: vitfast.InferenceEngine | None = None,
) -> tuple[Callable[[], Any], Callable[[], torch.Tensor] | None]:
    """What one timed call of ``provider`` runs (shared by ``vitfast bench`` and ``pytest benchmarks/``).

    Returns the call and, in training mode, a function giving the first step's loss (for the agreement check). An
    engine provider runs on ``engine`` when one is given (``vitfast bench`` keeps one per model across the batch
    sizes, as a user would, so that its pruning by smaller sizes applies), else on a new one for this batch size.
    """
    if provider.engine:
        if train:
            raise ValueError(f"{provider.name} is an inference engine; it has no training step.")
        if engine is None:
            engine = vitfast.optimize(ours, batch_sizes=(image.shape[0],), dtype=dtype, device=image.device)
        x = image.to(dtype)

        def call():
            with provider_context(provider):
                return engine(x)

        return call, None
    module = prepare(provider, ours, reference, dtype, train)
    if train:
        step, first_loss = _train_step(module, image, labels, image.device)
    else:
        x = image.to(dtype)

        def step():
            with torch.inference_mode():
                return module(x)

        first_loss = None

    def call():
        with provider_context(provider):
            return step()

    return call, first_loss


def skip_reason(provider: Provider, device: str, reference: nn.Module | None, train: bool = False) -> str | None:
    """Why ``provider`` cannot run here for this model (its needs, or no timm counterpart), or None."""
    if train and provider.engine:
        return "inference engine (no training step)"
    reason = unavailable_reason(provider, device)
    if reason is None and (provider.library == "timm" or provider.patched) and reference is None:
        reason = "no timm counterpart"
    return reason


def _measure(row, provider, ours, reference, image, labels, dtype, config, engines) -> torch.Tensor:
    device = image.device
    engine = None
    if provider.engine:
        if provider.name not in engines:
            # every batch size of the run named, each captured (and tuned) on its first call, in the row's first call
            engines[provider.name] = vitfast.optimize(ours, batch_sizes=config.batch_sizes, dtype=dtype, device=device)
        engine = engines[provider.name]
    fn, output_of = make_call(provider, ours, reference, image, labels, dtype, config.train, engine)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_call, times, output = time_call(fn, device, config.warmup, config.reps)
    row.first_call_s = first_call
    row.reps = len(times)
    for key, value in summarize(times).items():
        setattr(row, key, value)
    if device.type == "cuda":
        row.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 1e9
    if engine is not None:
        key = ("forward", image.shape[0], tuple(image.shape[1:]), dtype)
        row.engine_choice = engine.choices.get(key)
        row.engine_tuning_ms = engine.tuning.get(key) or None
        row.engine_skipped = engine.skipped.get(key) or None
    return output_of() if output_of is not None else output.float()


def _train_step(module: nn.Module, image: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """One optimizer step: forward + backward + AdamW, autocast bf16 on the GPU. Returns (step, first loss)."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=device.type == "cuda")
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(module(image).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        return loss

    return step, lambda: losses[0].reshape(1).float()


# ---------------------------------------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _speedup(ours: Measurement, peer: Measurement) -> str:
    """``peer / ours`` median latency; ``~`` in front when the two interquartile ranges overlap (within the noise:
    another run may order them the other way)."""
    ratio = f"{peer.median_ms / ours.median_ms:.2f}x"
    spreads = (ours.p25_ms, ours.p75_ms, peer.p25_ms, peer.p75_ms)
    if None not in spreads and ours.p25_ms <= peer.p75_ms and peer.p25_ms <= ours.p75_ms:
        return "~" + ratio
    return ratio


def format_tables(results: list[Measurement], env: dict[str, Any] | None = None) -> str:
    """Markdown: per model, latency (median ms) per batch size for each provider in the seed documents' shape,
    with vitfast's speed-up over the best agreeing peer, img/s and TF/s at the largest batch; then the details."""
    if not results:
        return "no results"
    lines = []
    if env:
        lines.append(
            f"Device: {env.get('device_name')} | torch {env.get('torch')} | triton {env.get('triton')} | "
            f"timm {env.get('timm')} | vitfast {env.get('vitfast')} ({env.get('git_commit')}) | {env.get('date')}"
        )
        lines.append("")
    batch_sizes = sorted({r.batch_size for r in results})
    largest = batch_sizes[-1]
    mode = results[0].mode
    lines.append(
        "| model | size | dtype | provider | "
        + " | ".join(f"bs={b} ({'step' if mode == 'train' else 'ms'})" for b in batch_sizes)
        + f" | speed-up vs best peer | img/s @{largest} | TF/s @{largest} |"
    )
    lines.append("|---|---|---|---|" + "---:|" * len(batch_sizes) + "---|---:|---:|")
    for model in dict.fromkeys(r.model for r in results):
        model_rows = [r for r in results if r.model == model]
        best_peer = {}
        for b in batch_sizes:
            peers = [
                r
                for r in model_rows
                if r.batch_size == b and r.median_ms and r.agrees and PROVIDERS[r.provider].library in PEER_LIBRARIES
            ]
            best_peer[b] = min(peers, key=lambda r: r.median_ms) if peers else None
        for provider in dict.fromkeys(r.provider for r in model_rows):
            by_bs = {r.batch_size: r for r in model_rows if r.provider == provider}
            cells = []
            for b in batch_sizes:
                r = by_bs.get(b)
                if r is None or r.median_ms is None:
                    cells.append("n/a")
                else:
                    cells.append(_fmt(r.median_ms) + ("" if r.agrees is not False else " (wrong)"))
            speedups = "-"
            if PROVIDERS[provider].library == "vitfast":
                parts = []
                for b in batch_sizes:
                    r = by_bs.get(b)
                    ok = r is not None and r.median_ms and r.agrees and best_peer[b]
                    parts.append(_speedup(r, best_peer[b]) if ok else "-")
                speedups = " / ".join(parts)
            top = by_bs.get(largest)
            size = "x".join(map(str, model_rows[0].img_size))
            throughput = f"{_fmt(top.img_per_s if top else None, 0)} | {_fmt(top.tflops if top else None, 1)}"
            lines.append(
                f"| {model} | {size} | {model_rows[0].dtype} | {provider} | "
                + " | ".join(cells)
                + f" | {speedups} | {throughput} |"
            )
    if any("~" in line for line in lines):
        lines.append("")
        lines.append("~: within the noise (the interquartile ranges overlap); another run may order them otherwise.")
    lines += [
        "",
        "| model | bs | provider | median ms | p25-p75 ms | img/s | TF/s | first call s | max err | agrees | peak GB "
        "| note |",
    ]
    lines.append("|---|---:|---|---:|---|---:|---:|---:|---:|---|---:|---|")
    for r in results:
        spread = f"{_fmt(r.p25_ms, 3)}-{_fmt(r.p75_ms, 3)}" if r.median_ms is not None else "-"
        error = "-" if r.max_error is None else f"{r.max_error:.1e}"
        agrees = "-" if r.agrees is None else ("yes" if r.agrees else "NO")
        timing = f"{_fmt(r.median_ms, 3)} | {spread} | {_fmt(r.img_per_s, 0)} | {_fmt(r.tflops, 2)}"
        timing += f" | {_fmt(r.first_call_s, 1)}"
        note = r.skipped or (f"engine: {r.engine_choice}" if r.engine_choice else "")
        lines.append(
            f"| {r.model} | {r.batch_size} | {r.provider} | {timing} | {error} | {agrees} | "
            f"{_fmt(r.peak_mem_gb, 2)} | {note} |"
        )
    return "\n".join(lines)


def check_output_path(path: str | Path, option: str) -> None:
    """Fail before measuring when ``path`` cannot be written (missing folder, a folder, no permission)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name.")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {parent} does not exist; create it or choose another path.")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path} is not writable here; choose another path.")


def require_matplotlib() -> None:
    """``--plot`` needs matplotlib: checked before measuring, not after the whole run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'vitfast[plot]' (or pip install matplotlib).") from exc


def append_json(path: str | Path, row: Measurement, env: dict[str, Any]) -> None:
    """Append one JSON line: the environment (device, versions, date, commit) and the measurement."""
    with open(path, "a") as f:
        f.write(json.dumps({**env, **asdict(row)}) + "\n")


def read_json(path: str | Path) -> tuple[list[Measurement], dict[str, Any]]:
    """Rows appended by ``--json``: the measurements and the environment of the last one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--from-json {path}: no such file (write one with `vitfast bench --json {path}`).")
    fields = set(Measurement.__dataclass_fields__)
    required = {name for name, f in Measurement.__dataclass_fields__.items() if f.default is dataclasses.MISSING}
    results, env = [], {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            message = f"--from-json {path}, line {number} is not JSON ({exc.msg}); is it a --json file?"
            raise ValueError(message) from exc
        if not isinstance(record, dict) or not required <= set(record):
            raise ValueError(f"--from-json {path}, line {number} is not a `vitfast bench --json` row.")
        results.append(Measurement(**{k: v for k, v in record.items() if k in fields}))
        env = {k: v for k, v in record.items() if k not in fields}
    if not results:
        raise ValueError(f"--from-json {path} holds no rows.")
    return results, env


def plot(results: list[Measurement], path: str | Path) -> None:
    """Latency against batch size, one line per provider, one panel per model (needs matplotlib)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        for provider in dict.fromkeys(r.provider for r in results if r.model == model):
            points = sorted(
                (r.batch_size, r.median_ms)
                for r in results
                if r.model == model and r.provider == provider and r.median_ms
            )
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=provider)
        axis.set(title=model, xlabel="batch size", ylabel="latency (ms)", xscale="log", yscale="log")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
