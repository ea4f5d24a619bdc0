"""The ``vitfast`` command: ``vitfast bench`` (the main command), ``vitfast list [PATTERN]``, ``vitfast info MODEL``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vitfast.models import UnknownModelError, list_models
from vitfast.models._info import alias_table, markdown_table, model_info

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown_table())
        print()
        print(alias_table())
        return 0
    names = list_models(args.pattern, family=args.family, pretrained=args.pretrained, include_aliases=args.aliases)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    overrides = {"img_size": args.img_size} if args.img_size else {}
    info = model_info(args.model, flops=True, **overrides)
    cfg, pre, entry = info.config, info.pretrained_cfg, info.entry
    record = {
        "name": args.model,
        "architecture": entry.name,
        "family": entry.family,
        "description": entry.description,
        "params": info.num_params,
        "params_without_pos_embed": info.num_params_without_pos,
        "gflops": info.gflops,
        "input_size": list(pre["input_size"]),
        "layout": info.architecture,
        "num_classes": cfg.num_classes,
        "mean": pre["mean"],
        "std": pre["std"],
        "crop_pct": pre["crop_pct"],
        "interpolation": pre["interpolation"],
        "pretrained": info.weights.source if info.weights else None,
        "pretrained_tag": info.weights.tag if info.weights else None,
        "tags": [w.tag for w in entry.weights],
        "timm": entry.timm_name,
    }
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"{args.model}" + (f"  (alias of {entry.name})" if entry.name != args.model.split(".")[0] else ""))
    print(f"  {entry.description}")
    print(f"  family:       {entry.family}")
    print(f"  params:       {info.num_params / 1e6:.2f}M ({info.num_params_without_pos / 1e6:.2f}M without pos embed)")
    print(
        f"  GFLOPs:       {info.gflops:.2f} per image at {pre['input_size'][1]}x{pre['input_size'][2]} "
        "(multiply and add counted separately)"
    )
    print(
        f"  input:        {'x'.join(map(str, pre['input_size']))}, mean {pre['mean']}, std {pre['std']}, "
        f"crop_pct {pre['crop_pct']}, {pre['interpolation']}"
    )
    print(f"  layout:       {info.architecture}")
    print(f"  classes:      {cfg.num_classes or 'none (features)'}")
    if info.weights:
        print(f"  pretrained:   {info.weights.source} (tag {info.weights.tag!r})")
        if len(entry.weights) > 1:
            print(f"  other tags:   {', '.join(w.tag for w in entry.weights if w.tag != info.weights.tag)}")
    else:
        print("  pretrained:   none registered; load a file with vitfast.load_checkpoint(model, path)")
    print(f"  timm:         {entry.timm_name or '-'}")
    return 0


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item]

    return parse


def _cmd_bench(args: argparse.Namespace) -> int:
    from vitfast import bench

    # everything that can fail is checked before anything is measured
    if args.plot:
        bench.require_matplotlib()
        bench.check_output_path(args.plot, "--plot")
    if args.json:
        bench.check_output_path(args.json, "--json")
    if args.from_json:
        results, env = bench.read_json(args.from_json)
        print(bench.format_tables(results, env))
        if args.plot:
            bench.plot(results, args.plot)
        return 0
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be a positive number of pixels, got {args.img_size}.")

    config = bench.BenchConfig(
        models=args.models or ["vit_base_patch16_224"],
        batch_sizes=args.batch_sizes,
        dtype=args.dtype,
        providers=args.providers,
        device=args.device,
        warmup=args.warmup,
        reps=args.reps,
        train=args.train,
        overrides={"img_size": args.img_size} if args.img_size else {},
    )
    config.resolved()  # unknown models / providers, bad counts: an error now, not after a model was measured
    env = bench.environment()
    on_result = (lambda row: bench.append_json(args.json, row, env)) if args.json else None
    results = bench.run(config, on_result=on_result)
    print(bench.format_tables(results, env))
    if args.plot:
        bench.plot(results, args.plot)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vitfast.export import DTYPES, export_model, verify_export
    from vitfast.models import create_model

    overrides: dict = {"img_size": args.img_size} if args.img_size else {}
    if args.checkpoint:
        overrides["checkpoint_path"] = args.checkpoint
    model = create_model(args.model, pretrained=args.pretrained, **overrides)
    path = export_model(
        model, args.out, format=args.format, batch=args.batch, batch_size=args.batch_size, dtype=DTYPES[args.dtype]
    )
    input_size = list(model.pretrained_cfg["input_size"])
    print(f"wrote {path} ({args.format}, {args.batch} batch, {args.dtype}, input {input_size})")
    if args.no_verify:
        return 0
    # a static export runs only at the traced batch size; a dynamic one is checked at another
    check_batch = args.batch_size + 1 if args.batch == "dynamic" else args.batch_size
    check = verify_export(model, path, format=args.format, batch_size=check_batch)
    print(
        f"checked against the eager model: max |export - eager| = {check['max_abs_error']:.3e} "
        f"({check['scaled_error']:.3e} of the output scale), output shape {list(check['shape'])}"
    )
    return 0


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="export a model to ONNX or torch.export (reference path), checked against eager",
        description="Trace the plain-PyTorch reference path (whatever the backend) and write an ONNX file "
        "(torch.onnx dynamo exporter; checked with onnxruntime) or a torch.export program (.pt2).",
    )
    export.add_argument("model", help="model name, name.tag or alias")
    export.add_argument("out", help="output file (.onnx or .pt2)")
    export.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    export.add_argument("--batch", choices=["static", "dynamic"], default="static", help="batch dimension")
    export.add_argument("--batch-size", type=int, default=1, help="traced batch size (default 1; dynamic: 2)")
    export.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    export.add_argument("--img-size", type=int, help="input size (default: the model's)")
    export.add_argument("--pretrained", action="store_true", help="load the registered pretrained weights")
    export.add_argument("--checkpoint", metavar="PATH", help="load weights from this file")
    export.add_argument("--no-verify", action="store_true", help="skip the check against the eager model")
    export.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitfast", description="Fast, timm-compatible Vision Transformers.")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench",
        help="latency table: vitfast against timm eager / torch.compile / CUDA graphs",
        description="Measure every provider side by side on the same weights and inputs. Defaults: "
        "vit_base_patch16_224, batch sizes 1,4,8, bf16 on a GPU (fp32 on the CPU), every provider that can run here "
        "(on the CPU: timm eager and the vitfast reference).",
    )
    bench.add_argument("models", nargs="*", help="model names or aliases (default: vit_base_patch16_224)")
    bench.add_argument("--batch-sizes", type=_csv(int), default=[1, 4, 8], help="comma-separated (default 1,4,8)")
    bench.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    bench.add_argument("--providers", type=_csv(str), help="comma-separated subset of: " + ", ".join(_provider_names()))
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--warmup", type=int, help="untimed calls after the first (default 10 on GPU, 2 on CPU)")
    bench.add_argument("--reps", type=int, help="timed calls (default 50 on GPU, 10 on CPU)")
    bench.add_argument("--img-size", type=int, help="input size for every model (default: each model's own)")
    bench.add_argument("--train", action="store_true", help="time one optimizer step (fwd + bwd + AdamW) instead")
    bench.add_argument("--json", metavar="PATH", help="append one JSON line per measurement (with versions, date)")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG of latency against batch size (needs matplotlib)")
    bench.add_argument(
        "--from-json", metavar="PATH", help="print the tables of rows saved with --json; measure nothing"
    )
    bench.set_defaults(func=_cmd_bench)

    listing = commands.add_parser("list", help="list registered models")
    listing.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'eva02*'")
    listing.add_argument("--family", help="only this family (vit, clip, mae, mocov3, beit, cae, eva, eva02)")
    listing.add_argument("--pretrained", action="store_true", help="list name.tag for every set of weights")
    listing.add_argument("--aliases", action="store_true", help="include aliases (seed names and short names)")
    listing.add_argument("--markdown", action="store_true", help="print the README model and alias tables")
    listing.set_defaults(func=_cmd_list)

    info = commands.add_parser("info", help="parameters, GFLOPs, input size and pretrained source of a model")
    info.add_argument("model", help="model name, name.tag or alias")
    info.add_argument("--img-size", type=int, help="count FLOPs at this input size")
    info.add_argument("--json", action="store_true", help="print a JSON record")
    info.set_defaults(func=_cmd_info)
    _add_app_commands(commands)
    _add_export_parser(commands)
    return parser


# ---------------------------------------------------------------------------- predict / validate / embed (vitfast.apps)

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _app_model(args: argparse.Namespace):
    from vitfast.apps import load_model

    name = f"{args.model}.{args.pretrained}" if args.pretrained else args.model
    return load_model(name, checkpoint=args.checkpoint, num_classes=args.num_classes, random_init=args.random_init)


def _app_options(args: argparse.Namespace) -> dict:
    import torch

    return {
        "device": args.device,
        "engine": args.engine,
        "dtype": getattr(torch, _DTYPES[args.dtype]) if args.dtype else None,
        "strict": args.strict,
        "batch_size": args.batch_size,
        "workers": args.workers,
    }


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _reports_os_errors(command):
    """Missing files, folders and packages are user errors: one line, not a traceback (``main`` handles the rest)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (OSError, ImportError) as exc:
            print(f"vitfast: error: {exc}", file=sys.stderr)
            return 2

    return run


@_reports_os_errors
def _cmd_predict(args: argparse.Namespace) -> int:
    from vitfast.apps import predict

    records = predict(_app_model(args), args.images, topk=args.topk, **_app_options(args))
    if args.json:
        lines = "".join(json.dumps(record) + "\n" for record in records)
        if args.json == "-":
            sys.stdout.write(lines)
        else:
            Path(args.json).write_text(lines)
    if args.json != "-":
        for record in records:
            print(record["file"])
            if "error" in record:
                print(f"  skipped: {record['error']}")
                continue
            for rank, hit in enumerate(record["topk"], 1):
                label = f"  {hit['name']} ({hit['label']})" if hit["label"] else "  (class names unknown)"
                print(f"  {rank}. {hit['prob']:7.2%}  class {hit['index']:>5}{label}")
    return 1 if any("error" in record for record in records) else 0


@_reports_os_errors
def _cmd_validate(args: argparse.Namespace) -> int:
    from vitfast.apps import validate

    result = validate(
        _app_model(args), args.data_dir, labels_file=args.labels, progress=not args.no_progress, **_app_options(args)
    )
    if not _is_main_process():
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    engine = "vitfast.optimize" if result["engine"] else "eager"
    print(
        f"{args.model}: top-1 {result['top1']:.3f} %  top-5 {result['top5']:.3f} %  on {result['images']} images "
        f"({result['skipped']} unreadable, skipped)"
    )
    share = result["data_wait_s"] / result["seconds"] if result["seconds"] else 0.0
    print(
        f"  {result['images_per_s']:.1f} images/s over {result['processes']} process(es) on {result['device']}, "
        f"{result['dtype']}, {engine}; {share:.0%} of the {result['seconds']:.2f} s waiting for data"
    )
    return 0


@_reports_os_errors
def _cmd_embed(args: argparse.Namespace) -> int:
    from vitfast.apps import embed

    try:
        result = embed(
            _app_model(args),
            args.images,
            args.out,
            normalize=args.normalize,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            **_app_options(args),
        )
    except KeyboardInterrupt:
        print(
            f"vitfast: interrupted; the batches done are kept in {args.out}.partial: run the same command to continue.",
            file=sys.stderr,
        )
        return 130
    print(f"wrote {result['images']} x {result['dim']} features to {result['out']} ({len(result['failures'])} skipped)")
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model name, name.tag, alias, local-dir:PATH or hf-hub:ORG/NAME")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", metavar="TAG", help="which registered weights (default: the model's first)")
    weights.add_argument("--checkpoint", metavar="FILE", help="load these weights instead of pretrained ones")
    weights.add_argument("--random-init", action="store_true", help="no weights (timing only: outputs mean nothing)")
    parser.add_argument("--num-classes", type=int, help="classifier width of --checkpoint (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (default: min(8, CPU cores))")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument(
        "--engine",
        choices=["auto", "on", "off"],
        default="auto",
        help="run through vitfast.optimize (auto: on a GPU; off: eager PyTorch)",
    )
    parser.add_argument("--dtype", choices=list(_DTYPES), help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping")


def _add_app_commands(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="top-k classes of image files, with class names",
        description="Classify images with the model's own eval transform. Class names: the model's saved label names, "
        "or ImageNet-1k / 12k / 21k names from timm (when installed) for heads of those widths; else indices. "
        "Exit status 1 when a file could not be read (it is reported and skipped).",
    )
    _add_model_arguments(predict)
    predict.add_argument("images", nargs="+", help="image files and / or folders (searched recursively)")
    predict.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    predict.add_argument("--json", metavar="OUT", help="write one JSON line per image to OUT ('-': stdout)")
    predict.set_defaults(func=_cmd_predict)

    validate = commands.add_parser(
        "validate",
        help="top-1 / top-5 accuracy and images/s on a labelled folder (torchrun for many GPUs)",
        description="DATA_DIR is an ImageFolder (one sub-folder per class; folders named by the head's labels, e.g. "
        "ImageNet synsets, are matched by name), or any folder with --labels. Under torchrun --nproc_per_node N the "
        "files are sharded across the processes and the counts reduced.",
    )
    _add_model_arguments(validate)
    validate.add_argument("data_dir", help="ImageFolder root, or a folder of images with --labels")
    validate.add_argument("--labels", metavar="FILE", help="lines 'RELATIVE_PATH LABEL' (class index or label name)")
    validate.add_argument("--json", metavar="OUT", help="write the summary as JSON to OUT")
    validate.add_argument("--no-progress", action="store_true", help="no progress bar")
    validate.set_defaults(func=_cmd_validate)

    embed = commands.add_parser(
        "embed",
        help="pooled features of image files to .safetensors / .npy (resumable)",
        description="Pre-logits features (the pooled, normalized tokens before the classifier), one row per file. "
        "An interrupted run keeps its finished batches in OUT.partial/ and the same command continues.",
    )
    _add_model_arguments(embed)
    embed.add_argument("images", nargs="+", help="image files and / or folders (searched recursively)")
    embed.add_argument(
        "--out", required=True, help="FILE.safetensors (names in its metadata) or FILE.npy (+ .files.txt)"
    )
    embed.add_argument("--normalize", action="store_true", help="L2-normalize each feature vector")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    embed.set_defaults(func=_cmd_embed)


def _provider_names() -> list[str]:
    from vitfast.bench import PROVIDERS

    return list(PROVIDERS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UnknownModelError, ValueError, TypeError, RuntimeError) as exc:
        print(f"vitfast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
