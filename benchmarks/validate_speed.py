"""``vitfast validate`` images/s on a generated folder of JPEGs: engine against eager, and the data loader's share.

    PYTHONPATH=$PWD python benchmarks/validate_speed.py                      # ViT-B/16 and EVA-02-L/448, 2000 JPEGs
    PYTHONPATH=$PWD python benchmarks/validate_speed.py --images 16 --models vit_small_patch16_224 --device cpu

Per model and engine setting, three numbers from the same files and DataLoader settings: ``validate`` end to end
(images/s, and the share of its time spent waiting for the loader), the loader alone (decode + resize + crop in the
workers, no model), and the model alone (the same runner on one prepared batch, repeated). Weights are random
(``random_init``: no network needed; speed does not depend on them), so accuracy is not reported. The JPEGs are
synthetic (smooth gradients plus noise, 500x375, quality 90), about the size of ImageNet validation images.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

from vitfast import apps, bench


def write_jpegs(folder: Path, count: int) -> Path:
    """``count`` JPEGs and a labels file (random ImageNet-1k indices) in ``folder``; kept between runs."""
    from PIL import Image

    labels = folder / "labels.txt"
    if labels.is_file() and len(labels.read_text().splitlines()) == count:
        return labels
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp_y, ramp_x = np.mgrid[0:375, 0:500]
    lines = []
    for index in range(count):
        base = rng.uniform(0, 255, 3) + rng.uniform(-0.3, 0.3, 3) * (ramp_x[..., None] + ramp_y[..., None])
        pixels = np.clip(base + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)
        lines.append(f"{index:05d}.jpg {int(rng.integers(0, 1000))}")
    labels.write_text("\n".join(lines) + "\n")
    return labels


def loader_only(folder: Path, labels: Path, model, batch_size: int, workers: int) -> float:
    """Images/s of the DataLoader alone: Pillow decode, resize and crop in the workers, batches collated."""
    dataset = apps._ImageFiles(apps._read_labels_file(folder, labels, None), apps._eval_transform(model))
    loader = apps._loader(dataset, workers, torch.cuda.is_available(), batch_size=batch_size)
    start = time.perf_counter()
    count = sum(len(batch["indices"]) for batch in loader)
    return count / (time.perf_counter() - start)


def model_only(model, batch_size: int, device: str, engine: str, batches: int) -> float:
    """Images/s of the runner validate uses on one uint8 batch, repeated ``batches`` times (after one warm-up)."""
    transform = apps._eval_transform(model)
    run = apps._runner(model, transform, device, engine, None, batch_size)
    pixels = torch.randint(0, 256, (batch_size, *transform.input_size, 3), dtype=torch.uint8)
    if run.device.type == "cuda":
        pixels = pixels.pin_memory()
    run(pixels)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    start = time.perf_counter()
    for _ in range(batches):
        run(pixels)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_base_patch16_224,eva02_large_patch14_448")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, help="default: validate's (min(8, cores))")
    parser.add_argument("--engines", default="on,off")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--folder", default="/tmp/vitfast_validate_jpegs")
    parser.add_argument("--json", help="append one JSON line per measurement")
    args = parser.parse_args(argv)

    folder = Path(args.folder)
    labels = write_jpegs(folder, args.images)
    env = bench.environment()
    rows = []
    for name in args.models.split(","):
        for engine in args.engines.split(","):
            model = apps.load_model(name, random_init=True)
            result = apps.validate(
                model,
                folder,
                labels_file=labels,
                batch_size=args.batch_size,
                workers=args.workers,
                device=args.device,
                engine=engine,
                progress=False,
            )
            batches = max(1, min(20, args.images // args.batch_size))
            row = {
                "model": name,
                "engine": engine,
                "batch_size": args.batch_size,
                "images": result["images"],
                "dtype": result["dtype"],
                "validate_images_per_s": result["images_per_s"],
                "data_wait_share": result["data_wait_s"] / result["seconds"],
                "setup_s": result["setup_s"],
                "loader_only_images_per_s": loader_only(folder, labels, model, args.batch_size, args.workers),
                "model_only_images_per_s": model_only(model, args.batch_size, args.device, engine, batches),
                "workers": args.workers,
                **env,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps(row) + "\n")

    print(f"\n{env['device_name']}, torch {env['torch']}, {args.images} JPEGs 500x375, batch {args.batch_size}\n")
    print("| model | engine | dtype | validate img/s | waiting for data | loader alone img/s | model alone img/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['engine']} | {row['dtype']} | {row['validate_images_per_s']:.0f} | "
            f"{row['data_wait_share']:.0%} | {row['loader_only_images_per_s']:.0f} | "
            f"{row['model_only_images_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
