"""``"auto"``'s training table from a GPU run of the op benchmarks: which kernel beat PyTorch at forward + backward.

Usage, after ``bash benchmarks/gpu_session.sh ops`` on a GPU (it writes ``$OUT/ops.json``)::

    python -m benchmarks.training_table gpu_out/ops.json --results benchmarks/results/DATE_training_table.md

Reads the pytest-benchmark JSON of ``benchmarks/test_ops.py``, pairs each ``fwd+bwd`` group's ``vitfast`` row (the
Triton kernels) with its ``torch`` row (what a user runs instead, eager), and writes a markdown table of the ratios
plus the :class:`vitfast.backend.TrainingCell` literals of the widths where the kernels won by at least ``--margin``
(5 % by default: below that a median is within the noise of one run). A cell covers exactly the width measured
(``min_width == max_width``), on the device the JSON names; paste the printed cells into
``vitfast.backend.TRAINING_TABLE`` with the results file committed beside them. Nothing here guesses: no measured
win, no cell.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.test_ops import PROVIDERS

# The width each op passes to vitfast.backend.dispatch, from the benchmark's shape (benchmarks/test_ops.py CASES):
# the last dimension for the row ops, the head dim for attention and RoPE ([B, H, N, D, extra]).
WIDTH_OF: dict[str, Callable[[tuple], int]] = {
    "layer_norm": lambda shape: shape[-1],
    "layer_norm_residual": lambda shape: shape[-1],
    "swiglu": lambda shape: shape[-1],
    "swiglu_layer_norm": lambda shape: shape[-1],
    "rope_2d_qk": lambda shape: shape[3],
    "attention": lambda shape: shape[3],
}


@dataclass(frozen=True)
class Row:
    op: str
    shape: tuple
    dtype: str
    width: int
    vitfast_ms: float
    torch_ms: float

    @property
    def ratio(self) -> float:
        return self.vitfast_ms / self.torch_ms


def _parse_group(group: str) -> tuple[str, tuple, str, str] | None:
    """``"op (shape) dtype passes"`` (test_ops.py's ``benchmark.group``) -> its parts, or None for other groups."""
    op, _, rest = group.partition(" ")
    shape_text, _, tail = rest.rpartition(")")
    parts = tail.split()
    if not shape_text.startswith("(") or len(parts) != 2:
        return None
    return op, ast.literal_eval(shape_text + ")"), parts[0], parts[1]


def _provider(name: str) -> str:
    """The provider of ``test_gpu_op[op-shape-provider-passes]`` (test_ops.py's parametrization), or ``""``."""
    params = name[name.find("[") + 1 : -1].rsplit("-", 1)[0]  # drop the pass ("fwd", "fwd+bwd")
    matches = [provider for provider in PROVIDERS if params.endswith(f"-{provider}")]
    return max(matches, key=len, default="")  # "torch-compile" before "torch"


def rows_from(report: dict) -> list[Row]:
    """The ``fwd+bwd`` groups of a pytest-benchmark report that have both a ``vitfast`` and a ``torch`` row."""
    groups: dict[tuple, dict[str, float]] = {}
    for bench in report["benchmarks"]:
        parsed = _parse_group(bench.get("group") or "")
        if parsed is None or parsed[3] != "fwd+bwd" or parsed[0] not in WIDTH_OF:
            continue
        groups.setdefault(parsed[:3], {})[_provider(bench["name"])] = bench["stats"]["median"] * 1e3
    return [
        Row(op, shape, dtype, WIDTH_OF[op](shape), times["vitfast"], times["torch"])
        for (op, shape, dtype), times in sorted(groups.items(), key=str)
        if "vitfast" in times and "torch" in times
    ]


def cells(rows: list[Row], device: str, measured: str, source: str, margin: float) -> list[str]:
    """TrainingCell literals for every (op, width) whose every measured shape won by ``margin``."""
    by_width: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        by_width.setdefault((row.op, row.width), []).append(row)
    return [
        f"TrainingCell({op!r}, 'triton', {width}, {width}, {device!r}, {measured!r}, {source!r}),"
        for (op, width), group in sorted(by_width.items())
        if all(row.ratio <= 1.0 - margin for row in group)
    ]


def markdown(rows: list[Row], device: str, margin: float, found: list[str]) -> str:
    lines = [
        f"# Training table: forward + backward, vitfast kernels vs PyTorch eager, {device}",
        "",
        "| op | shape | dtype | width | vitfast ms | torch ms | ratio | cell |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        won = "yes" if row.ratio <= 1.0 - margin else "no"
        lines.append(
            f"| {row.op} | {row.shape} | {row.dtype} | {row.width} | {row.vitfast_ms:.3f} | {row.torch_ms:.3f} "
            f"| {row.ratio:.2f}x | {won} |"
        )
    if rows:
        lines += ["", f"Median ratio over all rows: {statistics.median(r.ratio for r in rows):.2f}x."]
    lines += ["", f"Cells (wins by >= {margin:.0%} at every shape of the width):", ""]
    lines += [f"    {cell}" for cell in found] or ["    (none: training keeps PyTorch everywhere)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_table", description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="pytest-benchmark JSON of benchmarks/test_ops.py (GPU run)")
    parser.add_argument("--results", type=Path, help="write the markdown here (the cells' source)")
    parser.add_argument("--device", help="GPU name (default: the report's machine_info, from benchmarks/conftest.py)")
    parser.add_argument("--margin", type=float, default=0.05, help="smallest win that makes a cell (default 0.05)")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    device = args.device or report.get("machine_info", {}).get("cuda_device")
    if not device:
        parser.error("the report names no GPU (machine_info.cuda_device); pass --device")
    measured = (report.get("datetime") or datetime.date.today().isoformat())[:10]
    source = str(args.results or args.report)
    rows = rows_from(report)
    found = cells(rows, device, measured, source, args.margin)
    text = markdown(rows, device, args.margin, found)
    if args.results:
        args.results.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
