"""The kernel report: what every vitfast Triton kernel compiles to for an H100 (sm_90) at real model shapes, no GPU.

    python -m benchmarks.kernel_report                  # markdown + JSON under benchmarks/results/, verdicts printed
    python -m benchmarks.kernel_report --json OUT.json  # JSON only, to that path (what the property tests read)

Each case calls one op's own launchers (``layer_norm_fwd``, ``attention_bwd``, ...) on fake CUDA tensors of a model's
shapes, with the launch function swapped for a recorder: block sizes, ``num_warps`` / ``num_stages``, constexpr flags,
argument dtypes and the integer / alignment specializations are exactly what the launcher hands to Triton on a GPU.
Every recorded launch is compiled offline for sm_90 (:mod:`benchmarks.sm90`) and gets one row:

- ``CTAs``: programs in the grid; ``SM fill``: CTAs / 132 (below 1, some SMs idle); ``waves``: CTAs / (132 x the
  CTAs one SM holds at once); ``regs``, ``local B`` (spills land there), ``smem KB``, ``CTA/SM``;
- global memory instructions in the PTX, per thread, by width in bits, ``ld`` / ``st`` (synchronous) and
  ``cp.async`` (asynchronous), in the whole kernel and in its main loop (the longest loop);
- the floor: bytes the kernel must move (its inputs read once, its outputs written once, partial-sum scratch not
  counted) and FLOPs it must do, and their time at the H100's and H200's peaks (HBM 3.35 / 4.8 TB/s, 800 TF/s
  dense bf16): a GPU timing over this floor is the fraction of the hardware the kernel gets. ``work`` notes work a
  kernel repeats beyond the floor (K rotated once per query tile, RoPE tables re-read per head, ...).

The groups: ViT-B/16 at batch 1, 8 and 64, BEiT v2-B at batch 8, EVA-02-L/448 at batch 8 (the kernels each block of
those models runs, forward and backward), REFERENCE.md section 4's other head dims, token counts and widths, and the
fp32 variants. ``MODEL_GROUPS`` are the model shapes the property tests hold the kernels to.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import sm90

OP_MODULES = ("layer_norm", "attention", "rope", "swiglu", "patch_embed", "linear")
RESULTS = Path(__file__).resolve().parent / "results"
BF16, FP32 = torch.bfloat16, torch.float32


Recorder = sm90.Recorder


# ------------------------------------------------------------------------------------------------------------ cases
# One case: one op at one shape, forward then backward, as a model block calls it (views of packed projections where
# the layers pass them). ``rec.phase = "bwd"`` marks where the backward launches start.

fake = sm90.fake


def _layer_norm(rec: Recorder, width: int, rows: int, residual: bool, gamma: bool, dtype: torch.dtype) -> None:
    ops = importlib.import_module("vitfast.ops.layer_norm")
    x = fake(rows, width, dtype=dtype)
    weight, bias = fake(width, dtype=dtype), fake(width, dtype=dtype)
    branch = fake(rows, width, dtype=dtype) if residual else None
    scale = fake(width, dtype=dtype) if gamma else None
    out, residual_out, mean, rstd = ops.layer_norm_fwd(x, branch, scale, weight, bias, 1e-6)
    rec.phase = "bwd"
    d_residual = torch.empty_like(out) if residual else None
    # as the autograd glue calls it: without a layer scale, dbranch is dx and the branch is not passed
    ops.layer_norm_bwd(
        torch.empty_like(out),
        d_residual,
        residual_out if residual else x,
        branch if gamma else None,
        scale,
        weight,
        bias,
        mean,
        rstd,
    )


def _attention(
    rec: Recorder, batch: int, heads: int, tokens: int, head_dim: int, bias: bool, dtype: torch.dtype
) -> None:
    ops = importlib.import_module("vitfast.ops.attention")
    qkv = fake(batch, tokens, 3, heads, head_dim, dtype=dtype).permute(2, 0, 3, 1, 4)  # the packed qkv projection
    q, k, v = qkv.unbind(0)
    table = index = None
    if bias:
        side = round((tokens - 1) ** 0.5)
        table = fake((2 * side - 1) ** 2 + 3, heads, dtype=dtype)  # BEiT: + cls-to-token, token-to-cls, cls-to-cls
        index = fake(tokens, tokens, dtype=torch.int32)  # vitfast's layers hold int32 (timm's int64 works alike)
    scale = head_dim**-0.5
    out, lse = ops.attention_fwd(q, k, v, scale, table, index)
    rec.phase = "bwd"
    grad_out = fake(batch, tokens, heads * head_dim, dtype=dtype).reshape(batch, tokens, heads, head_dim)
    ops.attention_bwd(grad_out.transpose(1, 2), q, k, v, out, lse, scale, table, index, bias)


def _rope(rec: Recorder, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> None:
    ops = importlib.import_module("vitfast.ops.rope")
    qkv = fake(batch, tokens, 3, heads, head_dim, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    # the tables as the layers and the engine build them (rope_2d_table: each pair's angle on both its channels)
    cos, sin = (fake(tokens - 1, head_dim, dtype=FP32) for _ in range(2))
    q_out, k_out = ops.rope_2d_qk_fwd(q, k, cos, sin, 1)
    rec.phase = "bwd"
    ops.rope_2d_qk_fwd(q_out, k_out, cos, sin, 1, inverse=True)  # the backward, on gradients in the outputs' layout


def _swiglu(rec: Recorder, kind: str, rows: int, width: int, dtype: torch.dtype) -> None:
    ops = importlib.import_module("vitfast.ops.swiglu")
    if kind == "packed":
        x = fake(rows, 2 * width, dtype=dtype)
        out = ops.swiglu_packed_fwd(x)
        rec.phase = "bwd"
        ops.swiglu_packed_bwd(torch.empty_like(out), x)
        return
    if kind == "sub-LN padded":  # the engine's layout: views of the zero-padded fc1 output, the norm's true width
        padded = -(-width // 8) * 8
        fc1 = fake(rows, 2 * padded, dtype=dtype)
        gate, up = fc1[:, :padded], fc1[:, padded:]
        weight, bias = fake(padded, dtype=dtype), fake(padded, dtype=dtype)  # zero-padded, as the engine holds them
        out, mean, rstd = ops.swiglu_layer_norm_fwd(gate, up, weight, bias, 1e-6, width)
        rec.phase = "bwd"
        ops.swiglu_layer_norm_bwd(torch.empty_like(out), gate, up, weight, mean, rstd, width)
        return
    gate, up = fake(rows, width, dtype=dtype), fake(rows, width, dtype=dtype)
    if kind == "split":
        out = ops.swiglu_fwd(gate, up)
        rec.phase = "bwd"
        ops.swiglu_bwd(torch.empty_like(out), gate, up)
        return
    weight, bias = fake(width, dtype=dtype), fake(width, dtype=dtype)
    out, mean, rstd = ops.swiglu_layer_norm_fwd(gate, up, weight, bias, 1e-6)
    rec.phase = "bwd"
    ops.swiglu_layer_norm_bwd(torch.empty_like(out), gate, up, weight, mean, rstd)


def _patch_embed(rec: Recorder, batch: int, patch: int, dim: int, image: int, dtype: torch.dtype, uint8: bool) -> None:
    ops = importlib.import_module("vitfast.ops.patch_embed")
    num_patches = (image // patch) ** 2
    x = fake(batch, 3, image, image, dtype=torch.uint8 if uint8 else dtype)
    weight = fake(dim, 3, patch, patch, dtype=dtype)
    bias, cls_token = fake(dim, dtype=dtype), fake(1, 1, dim, dtype=dtype)
    pos_embed = fake(1, num_patches + 1, dim, dtype=dtype)
    mean = std = fake(3, dtype=FP32) if uint8 else None
    out = ops.patch_embed_fwd(x, weight, bias, pos_embed, cls_token, mean, std)
    rec.phase = "bwd"
    # no image gradient for a uint8 image (the model's input): the backward then runs the weight-gradient kernel only
    ops.patch_embed_bwd(torch.empty_like(out), x, weight, mean, std, 1, not uint8, True)


def _linear(rec: Recorder, rows: int, out_features: int, in_features: int, activation: str | None) -> None:
    ops = importlib.import_module("vitfast.ops.linear")
    ops.linear_fwd(fake(rows, in_features), fake(out_features, in_features), fake(out_features), activation)


def _split_k_gemm(rec: Recorder, rows: int, out_features: int, in_features: int, splits: int) -> None:
    """A proj / fc2 GEMM of the "kernels-splitk" engine candidate: fp32 partial sums over ``splits`` K slices."""
    linear = importlib.import_module("vitfast.ops.linear")
    linear.linear_split_k_fwd(fake(rows, in_features), fake(out_features, in_features), splits)


def _split_k_reduction(rec: Recorder, rows: int, width: int, splits: int, layer_scale: bool) -> None:
    """The residual LayerNorm after it, adding the partial sums, the GEMM bias and the layer scale up."""
    layer_norm = importlib.import_module("vitfast.ops.layer_norm")
    partials = fake(splits, rows, width, dtype=FP32)
    params = [fake(width) for _ in range(4)]
    gamma = params[1] if layer_scale else None
    layer_norm.layer_norm_residual_partials_fwd(fake(rows, width), partials, params[0], gamma, *params[2:], 1e-6)


def _split_k_cases(group: str, rows: int, width: int, hidden: int) -> list:
    """proj (no layer scale) and fc2 (with one: BEiT, EVA), each its GEMM and its reduction, at the split count the
    engine takes on 132 SMs; none where that count is 1 (the engine then runs cuBLAS and the plain residual LN)."""
    linear = importlib.import_module("vitfast.ops.linear")
    cases = []
    for name, k, layer_scale in (("proj", width, False), ("fc2", hidden, True)):
        splits = linear.split_k_splits(rows, width, k, sm90.SM_COUNT)
        if splits > 1:
            label = f"split-K {name} {rows}x{width}x{k} S={splits}"
            cases.append(_case(group, "linear", label, _split_k_gemm, rows, width, k, splits))
            reduction = f"split-K sum+{'gamma+' if layer_scale else ''}residual LN C={width} S={splits}"
            cases.append(_case(group, "layer_norm", reduction, _split_k_reduction, rows, width, splits, layer_scale))
    return cases


@dataclass(frozen=True)
class Case:
    group: str
    op: str
    label: str
    run: Callable[[Recorder], None]


def _case(group: str, op: str, label: str, fn: Callable, *args: Any) -> Case:
    return Case(group, op, label, lambda rec: fn(rec, *args))


def _vit_block(group: str, batch: int, tokens: int, width: int, heads: int, mlp: int, patch: int, image: int) -> list:
    rows = batch * tokens
    return [
        _case(group, "layer_norm", f"LN C={width}", _layer_norm, width, rows, False, False, BF16),
        _case(group, "layer_norm", f"residual LN C={width}", _layer_norm, width, rows, True, False, BF16),
        _case(group, "attention", f"attention D={width // heads} N={tokens}", _attention, batch, heads, tokens,
              width // heads, False, BF16),
        _case(group, "patch_embed", f"patch embed p={patch} D={width}", _patch_embed, batch, patch, width, image, BF16,
              False),
        _case(group, "patch_embed", f"patch embed p={patch} D={width} uint8", _patch_embed, batch, patch, width, image,
              BF16, True),
        _case(group, "linear", f"fc1+GELU {rows}x{mlp}x{width}", _linear, rows, mlp, width, "gelu"),
    ]  # fmt: skip


def _cases() -> list[Case]:
    cases = []
    for batch in (1, 8, 64):
        cases += _vit_block(f"ViT-B/16 bs {batch}", batch, 197, 768, 12, 3072, 16, 224)
    # the split-K candidate where it splits: at 132 SMs batch 1 only (from batch 4 the tiles alone fill the SMs, and
    # the ViT-B/16 bs 4 / bs 8 calls add no case)
    for batch in (1, 4, 8):
        cases += _split_k_cases(f"ViT-B/16 bs {batch}", batch * 197, 768, 3072)
    cases += _split_k_cases("ViT-S/16 bs 1", 197, 384, 1536)
    cases += _split_k_cases("ViT-L/16 bs 1", 197, 1024, 4096)
    cases += _split_k_cases("EVA-02-B/224 bs 1", 257, 768, 2048)
    beit = "BEiT v2-B bs 8"
    cases += [
        _case(beit, "layer_norm", "residual+gamma LN C=768", _layer_norm, 768, 8 * 197, True, True, BF16),
        _case(beit, "attention", "attention D=64 N=197 relpos", _attention, 8, 12, 197, 64, True, BF16),
    ]
    eva, eva_rows = "EVA-02-L/448 bs 8", 8 * 1025
    cases += [
        _case(eva, "layer_norm", "residual LN C=1024", _layer_norm, 1024, eva_rows, True, False, BF16),
        _case(eva, "attention", "attention D=64 N=1025 (after rope)", _attention, 8, 16, 1025, 64, False, BF16),
        _case(eva, "rope", "rope_2d_qk D=64 N=1025", _rope, 8, 16, 1025, 64, BF16),
        _case(eva, "patch_embed", "patch embed p=14 D=1024", _patch_embed, 8, 14, 1024, 448, BF16, False),
        *(
            _case(eva, "swiglu", f"{kind} h={width}", _swiglu, kind, eva_rows, width, BF16)
            for width in (2730, 2736)  # timm's width, and the engine's zero-padded one (16-byte rows)
            for kind in ("sub-LN", "split", "packed")
        ),
        _case(eva, "swiglu", "sub-LN h=2730 padded to 2736", _swiglu, "sub-LN padded", eva_rows, 2730, BF16),
        _case("EVA-02-B/448 bs 8", "swiglu", "sub-LN h=2048", _swiglu, "sub-LN", eva_rows, 2048, BF16),
    ]
    ref = "REFERENCE s4 bs 8"
    cases += [
        _case(ref, "attention", "attention D=32 N=197", _attention, 8, 12, 197, 32, False, BF16),
        _case(ref, "attention", "attention D=80 N=257", _attention, 8, 16, 257, 80, False, BF16),
        _case(ref, "attention", "attention D=88 N=257", _attention, 8, 16, 257, 88, False, BF16),
        _case(ref, "attention", "attention D=88 N=257 relpos", _attention, 8, 16, 257, 88, True, BF16),
        _case(ref, "attention", "attention D=96 N=197", _attention, 8, 8, 197, 96, False, BF16),
        *(
            _case(ref, "attention", f"attention D=64 N={tokens}", _attention, 8, 12, tokens, 64, False, BF16)
            for tokens in (50, 145, 577, 1601)
        ),
        *(
            _case(ref, "layer_norm", f"residual+gamma LN C={width}", _layer_norm, width, 8 * 257, True, True, BF16)
            for width in (384, 1280, 1408, 2730, 6144)
        ),
        _case(ref, "rope", "rope_2d_qk D=88 N=257", _rope, 8, 16, 257, 88, BF16),
    ]
    fp32 = "fp32 bs 8"
    cases += [
        _case(fp32, "layer_norm", "LN C=1024", _layer_norm, 1024, 8 * 257, False, False, FP32),
        _case(fp32, "attention", "attention D=64 N=197", _attention, 8, 12, 197, 64, False, FP32),
        _case(fp32, "attention", "attention D=64 N=197 relpos", _attention, 8, 12, 197, 64, True, FP32),
        _case(fp32, "swiglu", "sub-LN h=2730", _swiglu, "sub-LN", 8 * 1025, 2730, FP32),
        _case(fp32, "patch_embed", "patch embed p=16 D=1024", _patch_embed, 8, 16, 1024, 224, FP32, False),
        _case(fp32, "linear", "fc1+GELU 1576x3072x768", _linear_fp32, 1576, 3072, 768),
    ]
    return cases


def _linear_fp32(rec: Recorder, rows: int, out_features: int, in_features: int) -> None:
    ops = importlib.import_module("vitfast.ops.linear")
    ops.linear_fwd(fake(rows, in_features, dtype=FP32), fake(out_features, in_features, dtype=FP32), None, None)


CASES = _cases()
MODEL_GROUPS = ("ViT-B/16 bs 1", "ViT-B/16 bs 8", "ViT-B/16 bs 64", "BEiT v2-B bs 8", "EVA-02-L/448 bs 8")

# ----------------------------------------------------------------------------------------------------------- floors
# Per kernel: the bytes it must move and the FLOPs it must do for its job at this launch, from its arguments by
# parameter name (tensors are the fake CUDA tensors the launcher passed). Absent optional inputs are stand-in
# pointers that the constexpr flags keep unread; they are not counted.


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _ln_fwd(a: dict, grid: tuple) -> dict:
    rows, cols = a["rows"], a["cols"]
    size = a["x_ptr"].element_size()
    moved = rows * cols * size * (2 + 2 * a["HAS_BRANCH"]) + 8 * rows  # x, out (+ branch, residual_out), stats
    return {"bytes": moved, "flops": 8 * rows * cols}


def _ln_bwd(a: dict, grid: tuple) -> dict:
    rows, cols = a["rows"], a["cols"]
    size = a["x_ptr"].element_size()
    # x, d_out (+ d_residual) read, dx written; the branch is read only for the layer-scale gradient, and dbranch
    # is a tensor of its own only with a layer scale (without one it equals dx)
    activations = 2 + a["HAS_D_OUT"] + a["HAS_D_RESIDUAL"] + 2 * (a["HAS_BRANCH"] and a["HAS_GAMMA"])
    return {"bytes": rows * cols * size * activations + 4 * rows, "flops": 12 * rows * cols}


def _ln_bwd_reduce(a: dict, grid: tuple) -> dict:
    params = grid[1]
    # the parameter gradients written; the fp32 partial sums read are the backward's scratch, not counted
    written = params * a["cols"] * max(a[name].element_size() for name in ("dgamma_ptr", "dweight_ptr", "dbias_ptr"))
    return {"bytes": written, "flops": params * a["programs"] * a["cols"]}


def _attention_dims(a: dict, grid: tuple) -> tuple[int, int, int]:
    return grid[1], a["seq_len"], a["HEAD_DIM"]  # batch * heads, tokens, head dim


def _attention_tables(a: dict) -> int:
    return _nbytes(a["Bias"] if "Bias" in a else a["BiasT"]) if a["BIAS"] else 0  # dK/dV: the bias transposed


def _attention_fwd(a: dict, grid: tuple) -> dict:
    bh, n, d = _attention_dims(a, grid)
    floor = {
        "bytes": _nbytes(a["Q"], a["K"], a["V"], a["Out"], a["Lse"]) + _attention_tables(a),
        "flops": 4 * bh * n * n * d,
    }
    if a["BIAS"]:
        images = bh // a["num_heads"]
        floor.update(work=f"the dense [H, N, N] bias read once per image (L2): {images}x", repeat=images)
    return floor


def _attention_dq(a: dict, grid: tuple) -> dict:
    bh, n, d = _attention_dims(a, grid)
    moved = _nbytes(a["Q"], a["K"], a["V"], a["Out"], a["GradOut"], a["Lse"], a["Delta"], a["GradQ"])
    # dQ = dS K is this kernel's share of the backward's five N^2 D GEMMs; S and dP are recomputed here as well as in
    # the dK/dV kernel
    return {"bytes": moved + _attention_tables(a), "flops": 2 * bh * n * n * d, "work": "S and dP recomputed: 3x",
            "repeat": 3}  # fmt: skip


def _attention_dkdv(a: dict, grid: tuple) -> dict:
    bh, n, d = _attention_dims(a, grid)
    moved = _nbytes(a["Q"], a["K"], a["V"], a["GradOut"], a["Lse"], a["Delta"], a["GradK"], a["GradV"])
    return {"bytes": moved + _attention_tables(a), "flops": 8 * bh * n * n * d}


def _attention_dbias(a: dict, grid: tuple) -> dict:
    bh, n, d = a["batch"] * a["num_heads"], a["seq_len"], a["HEAD_DIM"]
    moved = _nbytes(a["Q"], a["K"], a["V"], a["GradOut"], a["Lse"], a["Delta"], a["Bias"], a["GradBias"])
    # S and dP once more (the dQ and dK/dV kernels recompute them too): the price of a batch sum without atomics
    return {"bytes": moved, "flops": 4 * bh * n * n * d, "work": "S and dP recomputed: a 3rd time"}


def _rel_pos_gather(a: dict, grid: tuple) -> dict:
    return {"bytes": _nbytes(a["Table"], a["Index"], a["Bias"]), "flops": 0}


def _rope(a: dict, grid: tuple) -> dict:
    # the angles, one per channel pair, are needed once; the kernel reads them once per image (a few % of its bytes)
    pairs = a["Cos"].shape[0] * (a["HEAD_DIM"] // 2)
    floor = {"bytes": _nbytes(a["Q"], a["K"], a["QOut"], a["KOut"]) + 8 * pairs, "flops": 6 * a["Q"].numel()}
    images = grid[1]
    floor.update(work=f"angles read once per image: {images}x", repeat=images)
    # the rotation of a token per program that holds it, never per (query, key) tile pair
    floor["rotations_per_token"] = 1
    return floor


def _swiglu_fwd(a: dict, grid: tuple) -> dict:
    elements = a["n_rows"] * a["n_cols"]
    return {"bytes": 3 * elements * a["out_ptr"].element_size(), "flops": 5 * elements}


def _swiglu_bwd(a: dict, grid: tuple) -> dict:
    elements = a["n_rows"] * a["n_cols"]
    return {"bytes": 5 * elements * a["grad_ptr"].element_size(), "flops": 10 * elements}


def _swiglu_ln_fwd(a: dict, grid: tuple) -> dict:
    rows, cols = a["n_rows"], a["padded_cols"]  # the padding is read and written (zeros) too
    return {"bytes": 3 * rows * cols * a["out_ptr"].element_size() + 8 * rows, "flops": 13 * rows * cols}


def _swiglu_ln_bwd(a: dict, grid: tuple) -> dict:
    rows, cols = a["n_rows"], a["padded_cols"]
    return {"bytes": 5 * rows * cols * a["grad_ptr"].element_size() + 8 * rows, "flops": 25 * rows * cols}


def _patch_dims(a: dict) -> int:
    return 2 * a["num_rows"] * a["embed_dim"] * a["patch_dim"]  # one GEMM: patches x D x (C p p)


def _patch_fwd(a: dict, grid: tuple) -> dict:
    moved = _nbytes(a["x_ptr"], a["w_ptr"], a["out_ptr"])
    return {"bytes": moved, "flops": _patch_dims(a)}


def _patch_dw(a: dict, grid: tuple) -> dict:
    dw = a["embed_dim"] * a["patch_dim"] * a["x_ptr"].element_size()  # the weight gradient, not the fp32 partials
    return {"bytes": _nbytes(a["grad_ptr"], a["x_ptr"]) + dw, "flops": _patch_dims(a)}


def _patch_dx(a: dict, grid: tuple) -> dict:
    return {"bytes": _nbytes(a["grad_ptr"], a["w_ptr"], a["dx_ptr"]), "flops": _patch_dims(a)}


def _linear(a: dict, grid: tuple) -> dict:
    m, n, k = a["M"], a["N"], a["K"]
    return {"bytes": _nbytes(a["X"], a["W"], a["Out"]), "flops": 2 * m * n * k}


def _linear_split_k(a: dict, grid: tuple) -> dict:
    # the job is the projection: x and the weight read once, its output written once in bf16; the fp32 partial sums
    # are scratch (not counted: the bytes over the floor are the price of the split, visible in a GPU time)
    m, n, k = a["M"], a["N"], a["K"]
    return {"bytes": _nbytes(a["X"], a["W"]) + m * n * a["X"].element_size(), "flops": 2 * m * n * k}


def _ln_partials_fwd(a: dict, grid: tuple) -> dict:
    # x read, out and residual_out written; the branch is the projection's output in x's dtype (the partial sums
    # beyond one such read are split-K scratch)
    rows, cols = a["rows"], a["cols"]
    return {"bytes": 4 * rows * cols * a["x_ptr"].element_size(), "flops": (8 + a["SPLITS"]) * rows * cols}


FLOORS: dict[str, Callable[[dict, tuple], dict]] = {
    "_layer_norm_fwd_kernel": _ln_fwd,
    "_layer_norm_bwd_kernel": _ln_bwd,
    "_layer_norm_bwd_reduce_kernel": _ln_bwd_reduce,
    "_attention_fwd_kernel": _attention_fwd,
    "_attention_bwd_dq_kernel": _attention_dq,
    "_attention_bwd_dkdv_kernel": _attention_dkdv,
    "_attention_bwd_dbias_kernel": _attention_dbias,
    "_rel_pos_bias_gather_kernel": _rel_pos_gather,
    "_rope_qk_kernel": _rope,
    "_swiglu_fwd_kernel": _swiglu_fwd,
    "_swiglu_bwd_kernel": _swiglu_bwd,
    "_swiglu_layer_norm_fwd_kernel": _swiglu_ln_fwd,
    "_swiglu_layer_norm_bwd_kernel": _swiglu_ln_bwd,
    "_patch_embed_fwd_kernel": _patch_fwd,
    "_patch_embed_bwd_dw_kernel": _patch_dw,
    "_patch_embed_bwd_dx_kernel": _patch_dx,
    "_linear_fwd_kernel": _linear,
    "_linear_split_k_kernel": _linear_split_k,
    "_layer_norm_partials_fwd_kernel": _ln_partials_fwd,
}

# The kernels that move bytes rather than multiply: they are held to 128-bit accesses.
MEMORY_BOUND = (
    "_layer_norm_fwd_kernel",
    "_layer_norm_partials_fwd_kernel",
    "_layer_norm_bwd_kernel",
    "_rope_qk_kernel",
    "_swiglu_fwd_kernel",
    "_swiglu_bwd_kernel",
    "_swiglu_layer_norm_fwd_kernel",
    "_swiglu_layer_norm_bwd_kernel",
)
# What "moves 16 bytes per access" means for them: this share of the hot region's global access bits in 128-bit
# instructions (the rest: per-row fp32 statistics and parameter vectors).
MIN_VECTOR_SHARE = 2 / 3
ATTENTION = ("_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel")
# its main loop runs over the batch and streams q, k, dO, v tiles like the key loops do
ATTENTION_BIAS_GRAD = "_attention_bwd_dbias_kernel"


def finest_grain(launch: sm90.Launch) -> tuple[int, str]:
    """The most programs this launch's work splits into at the finest grain that still makes sense, and that grain.

    A grid below one program per SM is the launcher's choice when this is above the SM count, and the shape's when
    it is not (then only another algorithm, e.g. splitting the key axis, fills the GPU).
    """
    a = launch.named_args()
    name = launch.name
    if name in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_layer_norm_partials_fwd_kernel"):
        return a["rows"], "one row per program"
    if name in ("_swiglu_layer_norm_fwd_kernel", "_swiglu_layer_norm_bwd_kernel"):
        return a["n_rows"], "one row per program"
    if name == "_layer_norm_bwd_reduce_kernel":
        # a program per 128-byte line of fp32 columns and parameter (narrower, its loads would waste sectors)
        return math.ceil(a["cols"] / 32) * launch.grid[1], "32 columns of one parameter per program"
    if name in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"):
        return math.ceil(a["n_rows"] * a["n_cols"] / 1024), "1024 elements per program"
    if name == "_rope_qk_kernel":
        return math.ceil(2 * a["Q"].numel() / 1024), "1024 elements of q and k per program"
    if name in ATTENTION:
        return launch.grid[1] * math.ceil(a["seq_len"] / 64), "64-row tiles of each (batch, head)"
    if name == ATTENTION_BIAS_GRAD:
        return a["num_heads"] * math.ceil(a["seq_len"] / 64) ** 2, "64 x 64 tiles of each head's [N, N] gradient"
    if name == "_rel_pos_bias_gather_kernel":
        return a["seq_len"], "one bias row (all heads) per program"
    if name == "_linear_fwd_kernel":
        return math.ceil(a["M"] / 64) * math.ceil(a["N"] / 64), "64 x 64 output tiles"
    if name == "_linear_split_k_kernel":
        linear = importlib.import_module("vitfast.ops.linear")
        slices = max(1, min(linear.SPLIT_K_MAX, a["K"] // linear.SPLIT_K_MIN_DEPTH))
        return math.ceil(a["M"] / 64) * math.ceil(a["N"] / 64) * slices, "64 x 64 tiles x K slices >= 256 deep"
    if name == "_patch_embed_fwd_kernel":
        return math.ceil(a["num_rows"] / 64) * math.ceil(a["embed_dim"] / 64), "64 x 64 output tiles"
    if name == "_patch_embed_bwd_dx_kernel":
        return math.ceil(a["num_rows"] / 64) * math.ceil(a["patch_dim"] / 64), "64 x 64 output tiles"
    if name == "_patch_embed_bwd_dw_kernel":
        # the [D, C p p] weight gradient in 64 x 64 tiles (a split of the patch rows, the reduction, adds more)
        return math.ceil(a["embed_dim"] / 64) * math.ceil(a["patch_dim"] / 64), "64 x 64 weight-gradient tiles"
    raise KeyError(f"no grain rule for kernel {name}: add one to finest_grain")


# -------------------------------------------------------------------------------------------------------- the rows


def _bits_summary(counts: dict[str, int]) -> str:
    return " ".join(f"{n}x{bits}" for bits, n in sorted(counts.items(), key=lambda item: int(item[0]))) or "-"


def _global_bytes(ops: dict) -> tuple[int, int]:
    """(all, 128-bit) bits of global accesses per thread in a PTX region: ld + st + cp.async, static counts."""
    total = wide = 0
    for kind in ("loads", "stores", "cp_async"):
        for bits, n in ops[kind].items():
            total += int(bits) * n
            wide += int(bits) * n if int(bits) == 128 else 0
    return total, wide


def hot_region(row: dict) -> dict:
    """The PTX region that decides a kernel's memory speed: its main loop, or the whole kernel without loops."""
    return row["ptx"]["main_loop"] or row["ptx"]["kernel"]


def vector_share(row: dict) -> float:
    """Share of the hot region's global access bits moved by 128-bit instructions (1.0: all of them)."""
    total, wide = _global_bytes(hot_region(row))
    return wide / total if total else 1.0


def aligned_rows(row: dict) -> bool:
    """Whether this launch's rows start on 16-byte boundaries (the precondition for 128-bit accesses)."""
    return row.get("row_bytes") is None or row["row_bytes"] % 16 == 0


def _row_bytes(launch: sm90.Launch) -> int | None:
    a = launch.named_args()
    name = launch.name
    if name == "_layer_norm_bwd_reduce_kernel":
        return a["cols"] * a["partial_ptr"].element_size()  # the fp32 partial-sum rows it reads
    if name.startswith("_layer_norm"):
        return a["cols"] * a["x_ptr"].element_size()
    if name.startswith("_swiglu_layer_norm"):
        return a["padded_cols"] * a["gate_ptr"].element_size()  # the width in memory (true width when not padded)
    if name.startswith("_swiglu"):
        return a["n_cols"] * a["gate_ptr"].element_size()
    if name == "_rope_qk_kernel":
        return a["HEAD_DIM"] * a["Q"].element_size()
    return None


def _row(case: Case, launch: sm90.Launch, compiled: dict) -> dict:
    ctas = math.prod(launch.grid)
    row = {
        "group": case.group,
        "op": case.op,
        "case": case.label,
        "phase": launch.phase,
        "kernel": launch.name,
        "blocks": " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in launch.kwargs.items() if "BLOCK" in k),
        "grid": list(launch.grid),
        "ctas": ctas,
        "row_bytes": _row_bytes(launch),
        **compiled,
    }
    if "error" in compiled:
        return row
    row["sm_fill"] = ctas / sm90.SM_COUNT
    row["waves"] = ctas / (sm90.SM_COUNT * max(1, compiled["programs_per_sm"]))
    grain, grain_rule = finest_grain(launch)
    row["finest_grain"] = {"programs": grain, "rule": grain_rule}
    floor = FLOORS[launch.name](launch.named_args(), launch.grid)
    row["floor"] = floor
    row["floor_us"] = {
        device: 1e6 * max(floor["bytes"] / peak["bytes_per_s"], floor["flops"] / peak["flops_per_s"])
        for device, peak in sm90.PEAKS.items()
    }
    h100 = sm90.PEAKS["H100"]
    row["bound"] = (
        "memory" if floor["bytes"] / h100["bytes_per_s"] >= floor["flops"] / h100["flops_per_s"] else "compute"
    )
    row["vector_share"] = round(vector_share(row), 3)
    return row


def under_filled_by_choice(row: dict) -> bool:
    """Fewer programs than SMs although the work splits finely enough to give every SM one."""
    return row["ctas"] < sm90.SM_COUNT <= row["finest_grain"]["programs"]


def sync_loads_in_loop(row: dict) -> int:
    loop = row["ptx"]["main_loop"]
    return sum(loop["loads"].values()) if loop else 0


def verdict(rows: list[dict]) -> str:
    """One line on what limits a kernel, over all its rows."""
    compiled = [row for row in rows if "error" not in row]
    if not compiled:
        return "does not compile: " + rows[0]["error"].splitlines()[0][:120]
    notes = []
    spilling = [row for row in compiled if row["local_bytes"]]
    if spilling:
        worst = max(spilling, key=lambda row: row["local_bytes"])
        notes.append(f"spills ({worst['local_bytes']} B local at {worst['case']})")
    if any(row["kernel"] in MEMORY_BOUND for row in compiled):
        narrow = [row for row in compiled if aligned_rows(row) and row["vector_share"] < MIN_VECTOR_SHARE]
        if narrow:
            worst = min(narrow, key=lambda row: row["vector_share"])
            region = hot_region(worst)
            notes.append(
                f"narrow global accesses at 16-byte-aligned rows ({worst['vector_share']:.0%} of bits in 128-bit; "
                f"ld {_bits_summary(region['loads'])}, st {_bits_summary(region['stores'])} at {worst['case']})"
            )
        unaligned = [row for row in compiled if not aligned_rows(row) and row["vector_share"] < 0.5]
        if unaligned:
            notes.append(f"scalar accesses at unaligned rows ({unaligned[0]['case']}: pad to 16 bytes)")
    synchronous = [
        row for row in compiled if row["kernel"] in (*ATTENTION, ATTENTION_BIAS_GRAD) and sync_loads_in_loop(row)
    ]
    if synchronous:
        worst = max(synchronous, key=sync_loads_in_loop)
        loads = worst["ptx"]["main_loop"]["loads"]
        notes.append(f"synchronous loads in the key loop ({_bits_summary(loads)} bits at {worst['case']})")
    repeated = [row for row in compiled if row["floor"].get("repeat", 1) > 1]
    if repeated:
        worst = max(repeated, key=lambda row: row["floor"]["repeat"])
        notes.append(f"repeated work ({worst['floor']['work']} at {worst['case']})")
    low = [row for row in compiled if under_filled_by_choice(row)]
    if low:
        worst = min(low, key=lambda row: row["sm_fill"])
        notes.append(f"{worst['ctas']} CTAs on 132 SMs at {worst['group']} {worst['case']}")
    single = [row for row in compiled if row["programs_per_sm"] == 1]
    if single:
        notes.append(f"one CTA per SM ({single[0]['regs']} regs, {single[0]['shared'] // 1024} KB smem)")
    bound = {row["bound"] for row in compiled}
    head = "compute-bound" if bound == {"compute"} else "memory-bound" if bound == {"memory"} else "mixed"
    return f"{head}: " + ("; ".join(notes) if notes else "no defect the report checks for")


# ----------------------------------------------------------------------------------------------------------- running


def collect(ops: tuple[str, ...] | None = None) -> dict:
    """Record and compile every case (of ``ops`` only, when given); the report as a JSON-able dict
    (``{"unavailable": why}`` without ptxas)."""
    problem = sm90.toolchain_problem()
    if problem is not None:
        return {"unavailable": problem}
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    modules = [importlib.import_module(f"vitfast.ops.{name}") for name in OP_MODULES]
    recorder = Recorder()
    rows = []
    with sm90.offline_sm90(modules, recorder):
        compile_launch = sm90.Compiler()
        for case in CASES:
            if ops is not None and case.op not in ops:
                continue
            recorder.launches.clear()
            recorder.phase = "fwd"
            try:
                with FakeTensorMode():
                    case.run(recorder)
            except Exception:  # a launcher that rejects its case fails the report like a compile error would
                rows.append({"group": case.group, "op": case.op, "case": case.label, "kernel": "(launcher)",
                             "error": traceback.format_exc(limit=4)})  # fmt: skip
                continue
            for launch in recorder.launches:
                try:
                    compiled = compile_launch(launch)
                except Exception as exc:
                    compiled = {"error": f"{type(exc).__name__}: {exc}"[-4000:]}
                rows.append(_row(case, launch, compiled))
                print(f"{case.group:<18} {case.label:<34} {launch.name}", file=sys.stderr, flush=True)
    kernels = [
        f"{module.__name__.rsplit('.', 1)[1]}.{name}"
        for module in modules
        for name, value in vars(module).items()
        if isinstance(value, JITFunction) and name.endswith("_kernel")
    ]
    names = dict.fromkeys(row["kernel"] for row in rows)
    return {
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "target": "sm_90 (H100 / H200), offline",
        "model_groups": list(MODEL_GROUPS),
        "rows": rows,
        "kernels": kernels,
        "verdicts": {name: verdict([row for row in rows if row["kernel"] == name]) for name in names},
    }


def _measured(row: dict) -> str:
    if "measured_us" not in row:
        return "- | -"
    return f"{row['measured_us']:.1f} | {row['floor_fraction']:.0%}"


def markdown(report: dict) -> str:
    lines = [
        f"# Kernel report, {report['date']}: {report['target']}",
        "",
        f"triton {report['triton']}, torch {report['torch']}; `python -m benchmarks.kernel_report`"
        + (f" --gpu on {report['gpu']} (measured: do_bench median, L2 flushed). " if "gpu" in report else " (no GPU). ")
        + "How to read it: the module docstring of `benchmarks/kernel_report.py` and the README's section "
        '"Kernel speed without a GPU". Global accesses are static PTX instruction counts per thread as `count x bits`.',
        "",
        "## Verdicts",
        "",
        *(f"- `{name}`: {text}" for name, text in report["verdicts"].items()),
        "",
        "## Rows",
        "",
        "| group | case | pass | kernel | blocks | warps/stages | CTAs | SM fill | waves | regs | local B | smem KB "
        "| CTA/SM | loop ld | loop cp.async | loop st | kernel ld / st | 128-bit share | floor MB | floor GFLOP "
        "| floor us H100 / H200 | bound | work | measured us | of floor |",
        "|" + "---|" * 25,
    ]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['group']} | {row['case']} | | {row['kernel']} | FAILED: "
                         f"{row['error'].splitlines()[0][:80]} |" + " |" * 18)  # fmt: skip
            continue
        loop = row["ptx"]["main_loop"] or {"loads": {}, "cp_async": {}, "stores": {}}
        whole = row["ptx"]["kernel"]
        floor = row["floor"]
        lines.append(
            f"| {row['group']} | {row['case']} | {row['phase']} | `{row['kernel']}` | {row['blocks']} "
            f"| {row['num_warps']}/{row['num_stages']} | {row['ctas']} | {row['sm_fill']:.2f} | {row['waves']:.2f} "
            f"| {row['regs']} | {row['local_bytes']} | {row['shared'] / 1024:.1f} | {row['programs_per_sm']} "
            f"| {_bits_summary(loop['loads'])} | {_bits_summary(loop['cp_async'])} | {_bits_summary(loop['stores'])} "
            f"| {_bits_summary(whole['loads'])} / {_bits_summary(whole['stores'])} | {row['vector_share']:.2f} "
            f"| {floor['bytes'] / 1e6:.2f} | {floor['flops'] / 1e9:.2f} "
            f"| {row['floor_us']['H100']:.1f} / {row['floor_us']['H200']:.1f} | {row['bound']} "
            f"| {floor.get('work', '')} | {_measured(row)} |"
        )
    return "\n".join(lines) + "\n"


def time_on_gpu(report: dict) -> None:
    """Run every case's launches on this machine's GPU and add ``measured_us`` and ``floor_fraction`` to its rows.

    The cases' tensors are real CUDA tensors here (no fake mode, :func:`benchmarks.sm90.fake` fills them); each
    recorded launch is replayed alone and timed
    by ``triton.testing.do_bench`` (median, L2 flushed between calls). ``floor_fraction`` is the row's floor at the
    peaks of the GPU named by ``--gpu-peaks`` over the measured time: 1.0 would be the hardware's limit.
    """
    import triton.testing

    modules = [importlib.import_module(f"vitfast.ops.{name}") for name in OP_MODULES]
    recorder = Recorder()
    saved = [(module, module.launch) for module in modules]
    for module in modules:
        module.launch = recorder
    rows = iter(row for row in report["rows"] if row["kernel"] != "(launcher)")
    try:
        for case in CASES:
            recorder.launches.clear()
            recorder.phase = "fwd"
            with torch.no_grad():
                case.run(recorder)
            for launch in recorder.launches:
                row = next(rows)
                if (row["case"], row["kernel"], row["phase"]) != (case.label, launch.name, launch.phase):
                    raise RuntimeError(f"report row {row['case']} / {row['kernel']} does not match {case.label}")

                def replay(launch: sm90.Launch = launch) -> None:
                    launch.kernel[launch.grid](*launch.args, **launch.kwargs)

                milliseconds = triton.testing.do_bench(replay, return_mode="median")
                row["measured_us"] = 1e3 * milliseconds
            torch.cuda.empty_cache()
    finally:
        for module, launch_fn in saved:
            module.launch = launch_fn
    report["gpu"] = torch.cuda.get_device_name()


def json_or_unavailable(report: dict, json_path: Path | None) -> int | None:
    """The exit status when a report's command is done before its markdown: 0 after writing ``--json`` (an
    unavailable toolchain included, which the JSON says), 2 when sm_90 cannot be compiled here (said on stderr);
    None to go on. Shared with :mod:`benchmarks.pdl_check`."""
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1))
        return 0
    if "unavailable" in report:
        print(f"cannot compile for sm_90 here: {report['unavailable']}", file=sys.stderr)
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the JSON report to this path only (no markdown)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the dated markdown + JSON go")
    parser.add_argument(
        "--gpu", action="store_true", help="also run every launch on this machine's GPU: measured time beside the floor"
    )
    parser.add_argument("--gpu-peaks", choices=sorted(sm90.PEAKS), default="H200", help="peaks the GPU run is read at")
    parser.add_argument(
        "--only", nargs="+", choices=OP_MODULES, help="only these ops' cases (while iterating on a kernel; prints them)"
    )
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA GPU, and torch.cuda.is_available() is False here")
    report = collect(tuple(args.only) if args.only else None)
    if args.only and "unavailable" not in report:
        print(markdown(report))
        return 0
    if args.gpu and "unavailable" not in report:
        time_on_gpu(report)
        for row in report["rows"]:
            if "measured_us" in row:
                row["floor_fraction"] = row["floor_us"][args.gpu_peaks] / row["measured_us"]
        report["gpu_peaks"] = args.gpu_peaks
    done = json_or_unavailable(report, args.json)
    if done is not None:
        return done
    suffix = f"_{report['gpu_peaks'].lower()}" if args.gpu else ""
    stem = args.out_dir / f"{report['date']}_kernel_report{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    for name, text in report["verdicts"].items():
        print(f"{name}: {text}")
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
