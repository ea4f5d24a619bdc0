"""What a careless user passes, and the error they get: one row per case (what is called, the error type, the words
the message must contain). A new public entry point gets its rows here.

Every model is tiny (depth 1, 32x32 or 64x64 images); the whole table runs in a few seconds.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vitfast
from vitfast import CheckpointError, UnknownModelError, load_checkpoint
from vitfast import bench as bench_module
from vitfast.cli import main

TINY = dict(depth=1, img_size=32, embed_dim=64, num_heads=2)


@pytest.fixture(scope="module")
def models() -> SimpleNamespace:
    return SimpleNamespace(
        vit=vitfast.create_model("vit_small_patch16_224", num_classes=3, **TINY).eval(),
        mim=vitfast.create_model("eva02_tiny_patch14_224_mim", depth=1, img_size=28).eval(),
    )


@pytest.fixture()
def ctx(models, tmp_path) -> SimpleNamespace:
    return SimpleNamespace(tmp=tmp_path, **vars(models))


def _create(**kwargs) -> Callable[[SimpleNamespace], object]:
    return lambda ctx: vitfast.create_model("vit_small_patch16_224", **{**TINY, **kwargs})


def _file(ctx: SimpleNamespace, name: str, data: bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(data)
    return path


def _saved(ctx: SimpleNamespace, obj: object, name: str = "ok.pth", **kwargs) -> Path:
    torch.save(obj, ctx.tmp / name, **kwargs)
    return ctx.tmp / name


def _truncated_pth(ctx: SimpleNamespace) -> Path:
    data = _saved(ctx, ctx.vit.state_dict()).read_bytes()
    return _file(ctx, "cut.pth", data[: len(data) // 2])


def _damaged_legacy_pth(ctx: SimpleNamespace) -> Path:
    """A pre-zip torch file cut inside its object pickle: torch's weights-only unpickler fails on it too."""
    data = _saved(ctx, ctx.vit.state_dict(), "legacy.pth", _use_new_zipfile_serialization=False).read_bytes()
    return _file(ctx, "legacy_cut.pth", data[:200])


def _damaged_pickle(ctx: SimpleNamespace) -> Path:
    """A well-formed start, then garbage: it used to be reported as 'Python objects, pass trust_pickle=True'."""
    return _file(ctx, "garbage.pth", pickle.dumps({"blocks.0.norm1.weight": 1})[:-3])


def _with_namespace(ctx: SimpleNamespace) -> Path:
    return _saved(ctx, {"model": ctx.vit.state_dict(), "args": argparse.Namespace(lr=0.1)}, "args.pth")


def _other_width(ctx: SimpleNamespace) -> object:
    wide = vitfast.create_model("vit_small_patch16_224", num_classes=3, **{**TINY, "embed_dim": 128})
    return load_checkpoint(ctx.vit, wide.state_dict())


def _mim_into_classifier(ctx: SimpleNamespace) -> object:
    headless = vitfast.create_model("vit_small_patch16_224", num_classes=0, **TINY)
    return load_checkpoint(ctx.vit, headless.state_dict())


IMAGE = torch.randn(2, 3, 32, 32)

# (id, call, error type, words the message must contain, words it must not contain)
CASES = [
    # model creation: one check where every family is configured
    ("zero heads", _create(num_heads=0), ValueError, ["num_heads", "positive whole number", "0"], []),
    ("fractional depth", _create(depth=2.5), ValueError, ["depth", "whole number", "2.5"], []),
    ("bool depth", _create(depth=True), ValueError, ["depth", "whole number"], []),
    ("negative width", _create(embed_dim=-8), ValueError, ["embed_dim", "positive", "-8"], ["mlp_ratio"]),
    ("zero patch", _create(patch_size=0), ValueError, ["patch_size", "positive"], []),
    ("zero image", _create(img_size=0), ValueError, ["img_size", "positive"], []),
    ("image below a patch", _create(img_size=8), ValueError, ["smaller than one patch", "16"], []),
    ("zero mlp ratio", _create(mlp_ratio=0), ValueError, ["mlp_ratio"], []),
    ("drop path above 1", _create(drop_path_rate=1.5), ValueError, ["drop_path_rate", "[0, 1)"], []),
    ("negative classes", _create(num_classes=-1), ValueError, ["num_classes", ">= 0"], []),
    ("misspelt argument", _create(depht=2), TypeError, ["unknown model argument", "depht", "depth"], []),
    (
        "misspelt model",
        lambda ctx: vitfast.create_model("vit_smal_patch16_224"),
        UnknownModelError,
        ["vit_small_patch16_224"],
        [],
    ),
    # forward
    ("empty batch", lambda ctx: ctx.vit(IMAGE[:0]), ValueError, ["empty", "at least one image"], []),
    ("channels last", lambda ctx: ctx.vit(IMAGE.permute(0, 2, 3, 1)), ValueError, ["input channels"], []),
    ("other size", lambda ctx: ctx.vit(torch.randn(1, 3, 48, 48)), ValueError, ["does not match", "img_size"], []),
    ("int64 image", lambda ctx: ctx.vit(IMAGE.long()), TypeError, ["uint8", "int64"], []),
    ("unbatched image", lambda ctx: ctx.vit(IMAGE[0]), ValueError, ["[B, C, H, W]"], []),
    (
        "forward_mim without a mask",
        lambda ctx: ctx.mim.forward_mim(torch.randn(2, 3, 28, 28), None),
        TypeError,
        ["bool mask", "BlockMaskGenerator"],
        [],
    ),
    (
        "forward_mim with a float mask",
        lambda ctx: ctx.mim.forward_mim(torch.randn(2, 3, 28, 28), torch.rand(2, 4)),
        ValueError,
        ["bool tensor", "[2, 4]"],
        [],
    ),
    (
        "forward_mim on a classifier",
        lambda ctx: ctx.vit.forward_mim(IMAGE, torch.zeros(2, 4, dtype=torch.bool)),
        ValueError,
        ["no MIM head", "_mim"],
        [],
    ),
    # checkpoints
    (
        "missing file",
        lambda ctx: load_checkpoint(ctx.vit, ctx.tmp / "nope.pth"),
        FileNotFoundError,
        ["does not exist"],
        [],
    ),
    (
        "truncated .pth",
        lambda ctx: load_checkpoint(ctx.vit, _truncated_pth(ctx)),
        CheckpointError,
        ["truncated", "corrupt"],
        ["trust_pickle"],
    ),
    (
        "cut legacy .pth",
        lambda ctx: load_checkpoint(ctx.vit, _damaged_legacy_pth(ctx)),
        CheckpointError,
        ["truncated", "corrupt"],
        ["trust_pickle"],
    ),
    (
        "damaged pickle",
        lambda ctx: load_checkpoint(ctx.vit, _damaged_pickle(ctx)),
        CheckpointError,
        ["malformed", "corrupt"],
        ["trust_pickle"],
    ),
    (
        "pickled Python objects",
        lambda ctx: load_checkpoint(ctx.vit, _with_namespace(ctx)),
        CheckpointError,
        ["argparse.Namespace", "trust_pickle=True"],
        [],
    ),
    (
        "checkpoint of another width",
        _other_width,
        CheckpointError,
        ["another model size", "width 128, depth 1", "width 64, depth 1", "of another shape", "more)"],
        [],
    ),
    (
        "headless checkpoint into a classifier",
        _mim_into_classifier,
        CheckpointError,
        ["head.weight", "no classifier", "reset_head=True"],
        [],
    ),
    (
        "checkpoint as a list",
        lambda ctx: load_checkpoint(ctx.vit, [ctx.vit.state_dict()]),
        TypeError,
        ["file path or a state_dict", "list"],
        [],
    ),
    (
        "unknown patch resampling",
        lambda ctx: load_checkpoint(ctx.vit, ctx.vit.state_dict(), patch_resample="nearest"),
        ValueError,
        ["patch_resample", "bicubic", "pinv"],
        [],
    ),
    # image preprocessing
    (
        "eval transform to int8",
        lambda ctx: vitfast.transforms.for_model(ctx.vit, dtype=torch.int8),
        ValueError,
        ["dtype", "floating-point", "int8"],
        [],
    ),
    (
        "preprocess with a zero std",
        lambda ctx: vitfast.ops.preprocess(torch.zeros(1, 16, 16, 3, dtype=torch.uint8), (0.5,) * 3, (0.5, 0, 0.5)),
        ValueError,
        ["std", "positive", "0.0"],
        [],
    ),
    # the inference engine
    ("engine of a non-module", lambda ctx: vitfast.optimize("model"), TypeError, ["torch.nn.Module", "str"], []),
    (
        "engine at a fractional batch size",
        lambda ctx: vitfast.optimize(ctx.vit, batch_sizes=(1.5,)),
        ValueError,
        ["batch_sizes", "positive integers", "1.5"],
        [],
    ),
    (
        "engine in float64",
        lambda ctx: vitfast.optimize(ctx.vit, dtype=torch.float64),
        ValueError,
        ["dtype must be", "float64"],
        [],
    ),
    (
        "engine on an empty batch",
        lambda ctx: vitfast.optimize(ctx.vit, batch_sizes=(2,))(IMAGE[:0]),
        ValueError,
        ["non-empty"],
        [],
    ),
]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the damaged file's protocol
@pytest.mark.parametrize(("call", "error", "words", "absent"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_an_error_that_says_what_is_wrong(ctx, call, error, words, absent) -> None:
    with pytest.raises(error) as info:
        call(ctx)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    for word in absent:
        assert word not in message, f"{word!r} should not be in: {message}"
    assert len(message) < 1500, f"a {len(message)}-character message is not a summary"


def test_a_strict_load_error_keeps_the_full_report(ctx) -> None:
    with pytest.raises(CheckpointError) as info:
        _other_width(ctx)
    report = info.value.report
    assert report is not None and len(report.mismatched) > 10 and not report.missing


def _bad_jsonl(ctx: SimpleNamespace) -> str:
    return str(_file(ctx, "rows.jsonl", b"not json\n"))


# (id, argv built from ctx, words of the one-line error)
CLI_CASES = [
    ("no timed calls", lambda ctx: ["--reps", "0"], ["--reps", "reps", "at least 1"]),
    ("negative warm-up", lambda ctx: ["--warmup", "-1"], ["warmup", "0 or more"]),
    ("zero batch", lambda ctx: ["--batch-sizes", "0"], ["batch sizes", "positive"]),
    ("zero image size", lambda ctx: ["--img-size", "0"], ["--img-size", "positive"]),
    ("unknown model", lambda ctx: ["vit_bse_patch16_224"], ["unknown model", "vit_base_patch16_224"]),
    ("unknown provider", lambda ctx: ["--providers", "tensorrt"], ["unknown provider", "timm-eager"]),
    ("missing --from-json", lambda ctx: ["--from-json", str(ctx.tmp / "no.jsonl")], ["no such file", "--json"]),
    ("--from-json not JSON", lambda ctx: ["--from-json", _bad_jsonl(ctx)], ["line 1", "not JSON"]),
    ("--json in a missing folder", lambda ctx: ["--json", str(ctx.tmp / "no" / "r.jsonl")], ["does not exist"]),
    ("--json is a folder", lambda ctx: ["--json", str(ctx.tmp)], ["is a folder"]),
    ("--plot in a missing folder", lambda ctx: ["--plot", str(ctx.tmp / "no" / "p.png")], ["does not exist"]),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("cuda without a GPU", lambda ctx: ["--device", "cuda"], ["no CUDA GPU", "--device cpu"]))


@pytest.fixture()
def nothing_measured(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the benchmark ran before the bad argument was reported")

    monkeypatch.setattr(bench_module, "run", fail)
    monkeypatch.setattr(bench_module, "build_models", fail)


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bench_fails_early_with_one_line_and_exit_code_2(ctx, capsys, nothing_measured, argv, words) -> None:
    if "--plot" in argv(ctx):
        pytest.importorskip("matplotlib")
    assert main(["bench", *argv(ctx)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitfast: error: ") and "\n" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"


def test_cli_plot_without_matplotlib_fails_before_measuring(ctx, capsys, nothing_measured, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["bench", "--plot", str(ctx.tmp / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs matplotlib" in err and "pip install" in err and "\n" not in err
