"""predict / validate / embed over real image files the tests write (JPEG and PNG, odd sizes, grayscale, RGBA,
palette, a corrupt file), with a one-block ViT at 32x32; each checked against a hand-run of transform + model."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitfast
from tests.helpers import randomize_
from vitfast.apps import ImageError, _folder_targets, load_model
from vitfast.checkpoint import PretrainedDownloadError
from vitfast.models.vision_transformer import VisionTransformer
from vitfast.transforms import for_model

CLASSES = ["cat", "dog", "fox", "owl"]
UNREADABLE = ["dog/broken.jpg", "owl/notes.png"]
# (size, mode, format): odd sizes, portrait and landscape, every decoder path the transform must normalize to RGB
IMAGE_KINDS = [
    ((37, 53), "RGB", "JPEG"),
    ((41, 29), "L", "PNG"),
    ((64, 48), "RGBA", "PNG"),
    ((33, 33), "P", "PNG"),
    ((50, 31), "L", "JPEG"),
]


def _write_image(path: Path, size: tuple[int, int], mode: str, fmt: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "P":
        image = image.quantize(16)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, fmt)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("apps")
    folder = root / "val"
    seed = 0
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for size, mode, fmt in IMAGE_KINDS:
            seed += 1
            _write_image(folder / name / f"{seed:02d}_{mode}.{fmt.lower()}", size, mode, fmt, seed)
    # a real JPEG cut short, as a failed copy leaves one
    _write_image(root / "whole.jpg", (40, 40), "RGB", "JPEG", 99)
    whole = (root / "whole.jpg").read_bytes()
    (folder / "dog" / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "owl" / "notes.png").write_text("a text file with an image's name\n")
    # a 23rd file: two processes get 12 each, DistributedSampler repeating one, which must not count twice
    _write_image(folder / "owl" / "zz_cmyk.jpg", (45, 39), "CMYK", "JPEG", 77)
    model = randomize_(vitfast.create_model("vit_small_patch16_224", depth=1, img_size=32, num_classes=4)).eval()
    vitfast.save_pretrained(model, root / "model")
    return {"root": root, "folder": folder, "model_dir": root / "model", "model": model}


def _decode(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _hand_logits(model, paths: list[Path]) -> torch.Tensor:
    with torch.no_grad():
        return model(for_model(model)([_decode(p) for p in paths]))


def _readable(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("broken.jpg", "notes.png"))


def test_predict_matches_transform_model_softmax_and_reports_the_corrupt_file(data) -> None:
    model = data["model"]
    records = vitfast.predict(model, [data["folder"]], topk=3, batch_size=7)
    files = sorted(p for p in data["folder"].rglob("*") if p.is_file())
    assert [r["file"] for r in records] == [str(p) for p in files]
    broken = [r for r in records if "error" in r]
    assert [r["file"] for r in broken] == [str(data["folder"] / name) for name in UNREADABLE]
    assert broken[0]["error"].startswith("OSError") and "truncated" in broken[0]["error"]
    assert broken[1]["error"].startswith("UnidentifiedImageError")

    good = [r for r in records if "error" not in r]
    expected = _hand_logits(model, [Path(r["file"]) for r in good]).softmax(-1).topk(3, dim=-1)
    got_probs = torch.tensor([[hit["prob"] for hit in r["topk"]] for r in good])
    got_index = torch.tensor([[hit["index"] for hit in r["topk"]] for r in good])
    torch.testing.assert_close(got_index, expected.indices, rtol=0, atol=0)
    torch.testing.assert_close(got_probs, expected.values, rtol=1e-5, atol=1e-6)
    assert good[0]["topk"][0]["label"] is None  # a 4-class head without saved names: shown by index


def test_predict_strict_stops_at_the_corrupt_file(data) -> None:
    with pytest.raises(ImageError, match="broken.jpg"):
        vitfast.predict(data["model"], [data["folder"] / "dog"], strict=True)


def test_predict_imagenet_head_gets_timm_class_names(data) -> None:
    pytest.importorskip("timm")
    model = vitfast.create_model("vit_small_patch16_224", depth=1, img_size=32).eval()  # 1000 classes
    (record,) = vitfast.predict(model, [next((data["folder"] / "cat").iterdir())], topk=2)
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    for hit in record["topk"]:
        assert hit["label"] == info.index_to_label_name(hit["index"])
        assert hit["name"] == info.index_to_description(hit["index"])


def _independent_accuracy(model, folder: Path) -> tuple[float, float, int]:
    top1 = top5 = count = 0
    for target, name in enumerate(sorted(p.name for p in folder.iterdir())):
        paths = [p for p in _readable(folder / name)]
        top = _hand_logits(model, paths).topk(min(5, model.num_classes), dim=-1).indices
        top1 += int((top[:, 0] == target).sum())
        top5 += int((top == target).any(dim=1).sum())
        count += len(paths)
    return 100.0 * top1 / count, 100.0 * top5 / count, count


def test_validate_equals_an_independent_count(data) -> None:
    result = vitfast.validate(data["model"], data["folder"], batch_size=6, workers=0, progress=False)
    top1, top5, count = _independent_accuracy(data["model"], data["folder"])
    assert (result["top1"], result["top5"], result["images"], result["skipped"]) == (top1, top5, count, 2)
    assert list(result["failures"]) == [str(data["folder"] / name) for name in UNREADABLE]
    assert result["engine"] is False and result["dtype"] == "float32"  # CPU: eager fp32
    assert result["images_per_s"] > 0 and 0 <= result["data_wait_s"] <= result["seconds"]


def test_validate_with_a_labels_file(data, tmp_path) -> None:
    lines = [f"{p.relative_to(data['folder'])} {CLASSES.index(p.parent.name)}" for p in _readable(data["folder"])]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(lines) + "\n")
    # one DataLoader worker process: decoding and the transform run there (pickled dataset, collate)
    by_file = vitfast.validate(data["model"], data["folder"], labels_file=labels, workers=1, progress=False)
    by_folder = vitfast.validate(data["model"], data["folder"], workers=0, progress=False)
    assert (by_file["top1"], by_file["top5"], by_file["images"]) == (
        by_folder["top1"],
        by_folder["top5"],
        by_folder["images"],
    )
    labels.write_text(lines[0].rsplit(" ", 1)[0] + " 4\n")  # a 4-class head has classes 0..3
    with pytest.raises(ValueError, match="outside the head's classes 0..3"):
        vitfast.validate(data["model"], data["folder"], labels_file=labels, workers=0, progress=False)


def test_class_names_without_timm_are_indices(data, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm.data", None)  # import timm.data now raises ImportError
    with torch.device("meta"):
        imagenet = vitfast.create_model("vit_small_patch16_224", depth=1)
    assert vitfast.apps.class_names(imagenet) == (None, None)
    data["model"].pretrained_cfg["label_names"] = list(CLASSES)  # names saved with a model need no timm
    try:
        assert vitfast.apps.class_names(data["model"]) == (CLASSES, CLASSES)
    finally:
        del data["model"].pretrained_cfg["label_names"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_validate_under_torchrun_two_gloo_processes_equals_one(data, tmp_path) -> None:
    single = vitfast.validate(f"local-dir:{data['model_dir']}", data["folder"], workers=0, progress=False)
    out = tmp_path / "two.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "vitfast.cli",
        "validate",
        f"local-dir:{data['model_dir']}",
        str(data["folder"]),
        "--batch-size=5",
        "--workers=0",
        "--no-progress",
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2
    for key in ("top1", "top5", "images", "skipped", "failures"):
        assert two[key] == single[key], key


def test_embed_resumes_after_an_interruption(data, tmp_path, monkeypatch) -> None:
    model = data["model"]
    files = sorted(p for p in data["folder"].rglob("*") if p.is_file())
    calls = {"n": 0}
    forward = VisionTransformer.forward

    def interrupted_forward(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, x)

    out = tmp_path / "features.safetensors"
    monkeypatch.setattr(VisionTransformer, "forward", interrupted_forward)
    with pytest.raises(KeyboardInterrupt):
        vitfast.embed(model, [data["folder"]], out, batch_size=4, workers=0, progress=False, normalize=True)
    partial = tmp_path / "features.safetensors.partial"
    assert sorted(p.name for p in partial.glob("chunk_*")) == ["chunk_000000.safetensors", "chunk_000001.safetensors"]
    assert not out.exists()

    other_weights = randomize_(copy.deepcopy(model), seed=1)
    with pytest.raises(ValueError, match="unfinished run with other files, weights"):
        vitfast.embed(other_weights, [data["folder"]], out, batch_size=4, workers=0, progress=False, normalize=True)

    calls["n"] = -100  # no more interruptions; count the batches the second run computes
    result = vitfast.embed(model, [data["folder"]], out, batch_size=4, workers=0, progress=False, normalize=True)
    chunks = -(-len(files) // 4)
    assert calls["n"] + 100 == chunks - 2  # only the batches the first run did not finish
    assert not partial.exists()

    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        names = json.loads(handle.metadata()["files"])
        features = handle.get_tensor("features")
    readable = _readable(data["folder"])
    assert names == [str(p) for p in readable]
    assert list(result["failures"]) == [str(data["folder"] / name) for name in UNREADABLE]
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(for_model(model)([_decode(p) for p in readable])), True)
    torch.testing.assert_close(features, torch.nn.functional.normalize(expected, dim=-1), rtol=1e-5, atol=1e-6)


def test_embed_npy_writes_the_names_beside_it_and_keeps_existing_outputs(data, tmp_path) -> None:
    out = tmp_path / "features.npy"
    folder = data["folder"] / "cat"
    result = vitfast.embed(data["model"], [folder], out, workers=0, progress=False)
    array = np.load(out)
    names = (tmp_path / "features.files.txt").read_text().splitlines()
    assert array.shape == (len(names), data["model"].num_features) == (result["images"], result["dim"])
    assert names == [str(p) for p in sorted(folder.iterdir())]
    with pytest.raises(FileExistsError, match="--overwrite"):
        vitfast.embed(data["model"], [folder], out, workers=0, progress=False)


def test_embed_refuses_a_partial_run_of_other_inputs(data, tmp_path, monkeypatch) -> None:
    out = tmp_path / "f.safetensors"
    (tmp_path / "f.safetensors.partial").mkdir()
    (tmp_path / "f.safetensors.partial" / "manifest.json").write_text(json.dumps({"files": ["other.jpg"]}))
    with pytest.raises(ValueError, match="unfinished run"):
        vitfast.embed(data["model"], [data["folder"] / "cat"], out, workers=0, progress=False)


# ---------------------------------------------------------------------------------------------- bad input


def test_empty_folder_says_what_is_expected(data, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no image files"):
        vitfast.predict(data["model"], [tmp_path])
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        vitfast.validate(data["model"], tmp_path, workers=0, progress=False)


def test_folder_classes_that_do_not_fit_the_head(data, tmp_path) -> None:
    for name in [*CLASSES, "yak"]:
        (tmp_path / name).mkdir()
        _write_image(tmp_path / name / "a.png", (20, 20), "RGB", "PNG", 1)
    with pytest.raises(ValueError, match="5 classes .* head has 4"):
        vitfast.validate(data["model"], tmp_path, workers=0, progress=False)

    with torch.device("meta"):
        imagenet = vitfast.create_model("vit_small_patch16_224", depth=1)
    assert _folder_targets(["n01440764", "n01443537"], imagenet) == [0, 1]  # synset folders: matched by name
    with pytest.raises(ValueError, match="not among the model's label names: tabby"):
        _folder_targets(["n01440764", "tabby"], imagenet)


def test_model_without_weights_or_head_asked_for_predictions(data) -> None:
    with pytest.raises(ValueError, match="no pretrained weights registered.*--checkpoint"):
        load_model("cae_base_patch16_224")
    embedder = vitfast.create_model("vit_small_patch16_224", depth=1, img_size=32, num_classes=0)
    with pytest.raises(ValueError, match="no classifier head.*vitfast embed"):
        vitfast.predict(embedder, [data["folder"] / "cat"])


def test_no_network_for_a_download_says_what_to_do(monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # real offline mode: the request is never made
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedDownloadError, match="offline.*load_checkpoint"):
        load_model("vit_small_patch16_224", num_classes=1000)


# ---------------------------------------------------------------------------------------------- the commands


def test_commands_predict_validate_embed(data, tmp_path, capsys) -> None:
    from vitfast.cli import main

    model = f"local-dir:{data['model_dir']}"
    lines = tmp_path / "predictions.jsonl"
    assert (
        main(["predict", model, str(data["folder"] / "cat"), "--topk", "2", "--workers", "0", "--json", str(lines)])
        == 0
    )
    table = capsys.readouterr().out
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(records) == len(IMAGE_KINDS) and all(len(r["topk"]) == 2 for r in records)
    assert records[0]["file"] in table and f"{records[0]['topk'][0]['prob']:7.2%}" in table

    summary = tmp_path / "val.json"
    assert (
        main(["validate", model, str(data["folder"]), "--workers", "0", "--no-progress", "--json", str(summary)]) == 0
    )
    printed = capsys.readouterr().out
    result = json.loads(summary.read_text())
    assert f"top-1 {result['top1']:.3f} %" in printed and result["images"] == 4 * len(IMAGE_KINDS) + 1

    out = tmp_path / "emb.safetensors"
    assert (
        main(["embed", model, str(data["folder"] / "fox"), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    )
    assert f"wrote {len(IMAGE_KINDS)} x 384 features" in capsys.readouterr().out

    assert main(["predict", model, str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg does not exist" in capsys.readouterr().err


def test_validate_through_the_engine_on_the_cpu_counts_the_same(data) -> None:
    eager = vitfast.validate(data["model"], data["folder"], batch_size=8, workers=0, progress=False)
    engine = vitfast.validate(data["model"], data["folder"], batch_size=8, workers=0, progress=False, engine="on")
    assert engine["engine"] is True and eager["engine"] is False
    assert (engine["top1"], engine["top5"], engine["images"]) == (eager["top1"], eager["top5"], eager["images"])


def test_predict_and_embed_refuse_to_run_under_torchrun(data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # each process would write the same output
    with pytest.raises(RuntimeError, match="without torchrun"):
        vitfast.predict(data["model"], [data["folder"] / "cat"])
    with pytest.raises(RuntimeError, match="without torchrun"):
        vitfast.embed(data["model"], [data["folder"] / "cat"], tmp_path / "f.npy")


def test_commands_report_a_skipped_file_and_strict_stops(data, capsys) -> None:
    from vitfast.cli import main

    model = f"local-dir:{data['model_dir']}"
    dog = str(data["folder"] / "dog")
    assert (
        main(["predict", model, dog, "--workers", "0"]) == 1
    )  # the others are classified, the status says one was not
    out = capsys.readouterr().out
    assert "broken.jpg\n  skipped: OSError: image file is truncated" in out and out.count("  1. ") == len(IMAGE_KINDS)
    assert main(["predict", model, dog, "--workers", "0", "--strict"]) == 2
    assert "broken.jpg as an image" in capsys.readouterr().err
