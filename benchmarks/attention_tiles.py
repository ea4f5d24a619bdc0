"""GPU only: the attention choices the kernel report cannot decide, timed on the device (CUDA events, median).

    python benchmarks/attention_tiles.py --json OUT.jsonl

- ``fwd_rows``: the forward's query rows per program at N <= ``FWD_SMALL_N`` (ViT-B/16's 197 tokens, BEiT's 257):
  64 rows with 4 warps (the default: twice the CTAs at batch 1-8) against 128 rows with 8 warps (each K / V tile
  read half as often), bf16, 12 heads of 64, batch 1 / 8 / 64, with and without the relative position bias.
- ``bias_grad``: what the relative-position table gradient costs in a training backward (BEiT v2-B shapes, bf16): the
  backward with the table gradient (one more gather, the batch-looping bias-gradient kernel, one ``index_add_``)
  against the same backward with a frozen table; and the forward with the table (its gather launch) against the
  forward on the pre-gathered dense bias (what the inference engine can hold).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from unittest import mock

import torch
import triton.testing

from vitfast.layers.rel_pos import num_relative_positions, relative_position_index
from vitfast.ops import attention as attention_ops


def _median_us(fn) -> float:
    return 1e3 * triton.testing.do_bench(fn, return_mode="median")


def _inputs(batch: int, tokens: int, heads: int = 12, head_dim: int = 64, bias: bool = False):
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # the packed projection's views, as the layers pass them
    if not bias:
        return q, k, v, None, None
    side = round((tokens - 1) ** 0.5)
    table = 0.5 * torch.randn(num_relative_positions((side, side)), heads, device="cuda")
    return q, k, v, table, relative_position_index((side, side), device="cuda").int()


def fwd_rows(rows: int):
    """``_tiles`` with the forward's query rows forced to ``rows`` (4 warps at 64, 8 at 128)."""
    original = attention_ops._tiles

    def tiles(*args):
        chosen = original(*args)
        chosen["fwd"] = {**chosen["fwd"], "BLOCK_M": rows, "num_warps": 4 if rows == 64 else 8}
        return chosen

    return mock.patch.object(attention_ops, "_tiles", tiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="append one JSON line per measurement to this file")
    args = parser.parse_args()
    fwd, bwd = attention_ops.attention_fwd, attention_ops.attention_bwd
    records = []
    for tokens in (197, 257):
        for batch in (1, 8, 64):
            for bias in (False, True):
                q, k, v, table, index = _inputs(batch, tokens, bias=bias)
                call = partial(fwd, q, k, v, q.shape[-1] ** -0.5, table, index)
                times = {}
                for rows in (64, 128):
                    with fwd_rows(rows):
                        times[rows] = _median_us(call)
                records.append({"what": "fwd_rows", "tokens": tokens, "batch": batch, "bias": bias,
                                "us_64_rows": times[64], "us_128_rows": times[128]})  # fmt: skip
                print(f"fwd N={tokens} bs {batch:>2} bias={bias!s:<5} 64 rows {times[64]:8.1f} us   "
                      f"128 rows {times[128]:8.1f} us")  # fmt: skip
    for batch in (8, 64):
        q, k, v, table, index = _inputs(batch, 197, bias=True)
        scale = q.shape[-1] ** -0.5
        out, lse = fwd(q, k, v, scale, table, index)
        grad_out = torch.randn_like(out)
        dense = attention_ops.gather_rel_pos_bias(table, index, aligned=True).to(q.dtype)
        calls = {
            "bwd_table_grad": partial(bwd, grad_out, q, k, v, out, lse, scale, table, index, True),
            "bwd_frozen_table": partial(bwd, grad_out, q, k, v, out, lse, scale, table, index),
            "fwd_table": partial(fwd, q, k, v, scale, table, index),
            "fwd_dense_bias": partial(fwd, q, k, v, scale, bias=dense),
        }
        measured = {name: _median_us(call) for name, call in calls.items()}
        records.append({"what": "bias_grad", "tokens": 197, "batch": batch, **measured})
        print(f"BEiT v2-B bs {batch}: " + ", ".join(f"{name} {us:.1f} us" for name, us in measured.items()))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    if args.json:
        with open(args.json, "a") as handle:
            for record in records:
                handle.write(json.dumps({**meta, **record}) + "\n")


if __name__ == "__main__":
    main()
