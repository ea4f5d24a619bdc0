"""Hub round-trip, offline: save_pretrained -> timm reads it, timm's save_for_hf -> vitfast reads it (identical
outputs), push_to_hub through a mocked huggingface_hub client, and create_model("hf-hub:...") from a mocked download."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import vitfast
from tests.helpers import randomize_
from vitfast.checkpoint import PretrainedDownloadError

timm = pytest.importorskip("timm")

LABELS = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def model():
    return randomize_(vitfast.create_model("vit_small_patch16_224", depth=1, img_size=32, num_classes=3)).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    return vitfast.save_pretrained(model, tmp_path_factory.mktemp("hub") / "tiny", label_names=LABELS)


def _outputs(module: torch.nn.Module) -> torch.Tensor:
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return module(image)


def test_save_pretrained_writes_timms_layout_and_timm_loads_it(model, saved) -> None:
    config = json.loads((saved / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_224"
    assert config["model_args"] == {"img_size": [32, 32], "depth": 1}
    assert config["label_names"] == LABELS and config["pretrained_cfg"]["input_size"] == [3, 32, 32]

    theirs = timm.create_model(f"local-dir:{saved}", pretrained=True).eval()
    assert torch.equal(_outputs(theirs), _outputs(model))
    assert list(theirs.pretrained_cfg["label_names"]) == LABELS
    assert timm.data.resolve_data_config({}, model=theirs)["input_size"] == (3, 32, 32)


def test_vitfast_loads_its_own_folder_and_timms(model, saved, tmp_path) -> None:
    ours = vitfast.create_model(f"local-dir:{saved}", pretrained=True).eval()
    assert torch.equal(_outputs(ours), _outputs(model))
    assert ours.pretrained_cfg["label_names"] == LABELS
    assert ours.pretrained_cfg["mean"] == tuple(model.pretrained_cfg["mean"])

    reference = randomize_(timm.create_model("vit_small_patch16_224", depth=1, img_size=48, num_classes=5), 1).eval()
    timm.models.save_for_hf(reference, tmp_path)
    from_timm = vitfast.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    image = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(from_timm(image), reference(image))
    assert from_timm.config.img_size == (48, 48) and from_timm.num_classes == 5

    refit = vitfast.create_model(f"local-dir:{saved}", pretrained=True, num_classes=7)  # a fresh head, as in timm
    assert refit.num_classes == 7 and "label_names" not in refit.pretrained_cfg
    assert torch.equal(refit.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)

    unloaded = vitfast.create_model(f"local-dir:{tmp_path}")  # timm's convention: weights only when pretrained
    assert not torch.equal(unloaded.head.weight, from_timm.head.weight)


def test_an_architecture_timm_cannot_express_is_saved_for_vitfast_and_says_so(tmp_path, caplog) -> None:
    model = randomize_(vitfast.create_model("vit_small_patch16_224", depth=1, img_size=32, mlp="swiglu")).eval()
    with caplog.at_level(logging.WARNING, logger="vitfast"):
        vitfast.save_pretrained(model, tmp_path)
    assert "no timm counterpart" in caplog.text
    loaded = vitfast.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_push_to_hub_through_a_mocked_client(model, monkeypatch, tmp_path) -> None:
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
            calls.append(("create_repo", repo_id, private, exist_ok, repo_type))

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None, repo_type=None):
            shutil.copytree(folder_path, tmp_path / "uploaded")  # what the hub would now hold
            calls.append(("upload_folder", repo_id, commit_message, repo_type))
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = vitfast.push_to_hub(model, "me/tiny-vit", private=True, token="t0k", label_names=LABELS)
    assert url == "https://huggingface.co/me/tiny-vit/commit/abc"
    assert calls == [
        ("init", "t0k"),
        ("create_repo", "me/tiny-vit", True, True, "model"),
        ("upload_folder", "me/tiny-vit", "Upload model with vitfast", "model"),
    ]
    assert sorted(p.name for p in (tmp_path / "uploaded").iterdir()) == ["config.json", "model.safetensors"]
    theirs = timm.create_model(f"local-dir:{tmp_path / 'uploaded'}", pretrained=True).eval()
    assert torch.equal(_outputs(theirs), _outputs(model))


def test_create_model_hf_hub_from_a_mocked_download(model, saved, monkeypatch, tmp_path) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    requested = []

    def fake_download(repo_id, filename, revision=None):
        requested.append((repo_id, filename, revision))
        if not (saved / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(saved / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = vitfast.create_model("hf-hub:me/tiny-vit@v1", pretrained=True).eval()
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert requested == [("me/tiny-vit", "config.json", "v1"), ("me/tiny-vit", "model.safetensors", "v1")]
    assert loaded.pretrained_cfg["hf_hub_id"] == "me/tiny-vit@v1"


def test_hub_names_offline_and_missing_folders_say_what_to_do(monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedDownloadError, match="offline.*local-dir:PATH"):
        vitfast.create_model("hf-hub:me/not-cached")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        vitfast.create_model(f"local-dir:{tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="expected 'hf-hub:ORG/NAME'"):
        vitfast.create_model("local-dir:")


def test_mim_token_and_head_survive_the_round_trip_beside_a_timm_loadable_file(tmp_path) -> None:
    model = randomize_(vitfast.create_model("eva02_tiny_patch14_224_mim", depth=1, img_size=28)).eval()
    vitfast.save_pretrained(model, tmp_path)
    theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # strict: no MIM keys in its file
    image = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(theirs.forward_features(image), model.forward_features(image))
    ours = vitfast.create_model(f"local-dir:{tmp_path}", pretrained=True)
    for key in ("mask_token", "lm_head.weight", "lm_head.bias"):
        assert torch.equal(ours.state_dict()[key], model.state_dict()[key]), key


def test_timms_legacy_single_dict_config_still_loads(model, saved, tmp_path) -> None:
    shutil.copy(saved / "model.safetensors", tmp_path)
    legacy = {  # the layout of timm's older hub uploads: one dict, no model_args
        "architecture": "vit_small_patch16_224",
        "num_classes": 3,
        "num_features": 384,
        "labels": LABELS,
        "input_size": [3, 224, 224],
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    loaded = vitfast.create_model(f"local-dir:{tmp_path}", pretrained=True, depth=1, img_size=32).eval()
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert loaded.pretrained_cfg["label_names"] == LABELS
