"""Save, publish and load models in timm's Hugging Face Hub layout: ``config.json`` + ``model.safetensors``.

::

    vitfast.save_pretrained(model, "my_vit")               # timm.create_model("local-dir:my_vit", pretrained=True)
    vitfast.push_to_hub(model, "me/my_vit")                 # timm.create_model("hf-hub:me/my_vit", pretrained=True)
    model = vitfast.create_model("local-dir:my_vit", pretrained=True)   # and "hf-hub:org/name", timm's repos too

``config.json`` follows the schema timm reads (``timm.models._hub._parse_model_cfg``): ``architecture`` (the timm
model name), ``num_classes``, ``num_features``, ``global_pool``, ``model_args`` (keyword arguments for the
architecture, e.g. ``depth``) and ``pretrained_cfg`` (input size, crop, interpolation, mean / std, label names). A
``vitfast`` entry, which timm ignores, records vitfast's own architecture name and every field of its config that
differs from the registered default, so vitfast rebuilds exactly what was saved even when timm has no counterpart.
As in timm, ``create_model("local-dir:...")`` builds the architecture and ``pretrained=True`` loads the weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SOURCES", "create_from_source", "push_to_hub", "save_pretrained"]

logger = logging.getLogger("vitfast")

SOURCES = ("hf-hub", "local-dir")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PRETRAINING_WEIGHTS_NAME = "vitfast_pretraining_heads.safetensors"  # MIM mask token and head (vitfast only)
_FALLBACK_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# ViTConfig fields that mean the same thing as timm's VisionTransformer / Eva keyword arguments of the same name
_TIMM_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
# training-time settings: not part of the architecture a checkpoint describes
_TRAINING_ONLY = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "head_init_scale")
_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _architecture_diff(model: nn.Module) -> tuple[Any, dict[str, Any]]:
    """The registry entry of a vitfast model and the config fields that differ from that entry's default."""
    from vitfast.models import create_model, get_entry

    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name or not hasattr(model, "config"):
        raise TypeError(
            f"save_pretrained expects a vitfast model (from vitfast.create_model), got {type(model).__name__}; "
            "for a timm model use timm.models.save_for_hf."
        )
    entry = get_entry(name)
    with torch.device("meta"):
        default = create_model(name).config
    ours = model.config
    diff = {}
    for field in dataclasses.fields(ours):
        value = getattr(ours, field.name)
        if field.name not in _TRAINING_ONLY and value != getattr(default, field.name):
            diff[field.name] = _jsonable(value)
    return entry, diff


def _timm_model_args(entry: Any, diff: dict[str, Any], config: Any) -> dict[str, Any] | None:
    """timm keyword arguments rebuilding this architecture, or None when timm's counterpart cannot express it."""
    if not entry.timm_name or set(diff) - set(_TIMM_ARGS) - {"num_classes", "global_pool"}:
        return None
    args = {key: _jsonable(value) for key, value in entry.timm_kwargs.items()}
    args.update({key: value for key, value in diff.items() if key in _TIMM_ARGS})
    args["img_size"] = list(config.img_size)
    return args


def _config_dict(model: nn.Module, label_names: list[str] | None) -> dict[str, Any]:
    entry, diff = _architecture_diff(model)
    cfg = model.config
    pretrained = dict(model.pretrained_cfg)
    timm_args = _timm_model_args(entry, diff, cfg)
    if timm_args is None:
        logger.warning(
            "%s with %s has no timm counterpart: the saved folder loads in vitfast only.",
            entry.name,
            ", ".join(f"{k}={v}" for k, v in diff.items()) or "its default config",
        )
    pretrained_cfg = {
        "tag": pretrained.get("tag"),
        "custom_load": False,
        "input_size": [cfg.in_chans, *cfg.img_size],
        "fixed_input_size": not cfg.dynamic_img_size,
        "interpolation": pretrained.get("interpolation", "bicubic"),
        "crop_pct": pretrained.get("crop_pct", 0.9),
        "crop_mode": pretrained.get("crop_mode", "center"),
        "mean": list(pretrained.get("mean", (0.485, 0.456, 0.406))),
        "std": list(pretrained.get("std", (0.229, 0.224, 0.225))),
        "num_classes": cfg.num_classes,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if pretrained.get("license"):
        pretrained_cfg["license"] = pretrained["license"]
    config = {
        "architecture": entry.timm_name if timm_args is not None else entry.name,
        "num_classes": cfg.num_classes,
        "num_features": cfg.embed_dim,
        "global_pool": cfg.global_pool,
        "model_args": timm_args if timm_args is not None else {},
        "pretrained_cfg": pretrained_cfg,
        "vitfast": {"architecture": entry.name, "model_args": diff},
    }
    label_names = label_names if label_names is not None else pretrained.get("label_names")
    if label_names is not None:
        if len(label_names) != cfg.num_classes:
            raise ValueError(f"{len(label_names)} label names for a head of {cfg.num_classes} classes.")
        config["label_names"] = list(label_names)
    return config


def save_pretrained(model: nn.Module, directory: str | os.PathLike, label_names: list[str] | None = None) -> Path:
    """Write ``model`` to ``directory`` as ``config.json`` + ``model.safetensors`` (timm's Hub layout).

    ``timm.create_model("local-dir:DIR", pretrained=True)`` and ``vitfast.create_model("local-dir:DIR",
    pretrained=True)`` read it back (timm only when the architecture has a timm counterpart; a warning says when not).
    ``label_names`` (one per class) are saved for ``vitfast predict`` and timm; default: the model's own, if any.
    """
    from safetensors.torch import save_file

    from vitfast.checkpoint import PRETRAINING_ONLY_KEYS

    config = _config_dict(model, label_names)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # timm models have no MIM token / head: they go to a file of their own, so model.safetensors loads in timm with
    # strict=True and vitfast still gets every parameter back
    pretraining = {k: state.pop(k) for k in PRETRAINING_ONLY_KEYS if k in state}
    if pretraining:
        save_file(pretraining, str(directory / PRETRAINING_WEIGHTS_NAME), metadata={"format": "pt"})
        config["vitfast"]["extra_weights"] = PRETRAINING_WEIGHTS_NAME
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload model with vitfast",
    token: str | None = None,
    revision: str | None = None,
    label_names: list[str] | None = None,
) -> str:
    """Save ``model`` as :func:`save_pretrained` does and upload it to the Hugging Face Hub repo ``repo_id``.

    The repo is created if needed. Returns the commit URL. Needs a token (``huggingface-cli login`` or ``token=``).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, label_names=label_names)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, repo_type="model"
        )
    return str(commit)


# ---------------------------------------------------------------------------------------------- loading


def _split_source(name: str) -> tuple[str, str]:
    source, _, location = name.partition(":")
    if source not in SOURCES or not location:
        raise ValueError(f"expected 'hf-hub:ORG/NAME' or 'local-dir:PATH', got {name!r}.")
    return source, location


def _hub_file(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from vitfast.checkpoint import PretrainedDownloadError

    repo_id, _, revision = repo.partition("@")  # timm's 'org/name@revision'
    try:
        return hf_hub_download(repo_id, filename, revision=revision or None)
    except LocalEntryNotFoundError as exc:
        raise PretrainedDownloadError(
            f"{repo_id}/{filename} is not in the local Hugging Face cache and could not be downloaded (offline?). "
            f"Where you have network access run `huggingface-cli download {repo_id}`, or copy the repo's folder here "
            f"and use 'local-dir:PATH'."
        ) from exc


def _find_entry(architecture: str, model_args: dict[str, Any]) -> Any:
    from vitfast.models import get_entry, list_models

    if architecture in list_models():
        return get_entry(architecture)
    matches = [get_entry(n) for n in list_models() if get_entry(n).timm_name == architecture]
    # several vitfast entries may share a timm class (e.g. at another image size): prefer the one whose timm
    # arguments the saved ones agree with
    for entry in matches:
        if all(_jsonable(model_args.get(k, v)) == _jsonable(v) for k, v in entry.timm_kwargs.items()):
            return entry
    if matches:
        return matches[0]
    raise ValueError(
        f"architecture {architecture!r} in config.json has no vitfast counterpart; vitfast.list_models() lists the "
        "architectures vitfast builds."
    )


def _read_config(source: str, location: str) -> tuple[dict[str, Any], Path]:
    if source == "local-dir":
        folder = Path(location)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{folder / CONFIG_NAME} does not exist: 'local-dir:PATH' needs a folder written by "
                "vitfast.save_pretrained or timm's save_for_hf (config.json + model.safetensors)."
            )
        return json.loads((folder / CONFIG_NAME).read_text()), folder
    path = Path(_hub_file(location, CONFIG_NAME))
    return json.loads(path.read_text()), path.parent


def _weights_file(source: str, location: str, folder: Path) -> str:
    if source == "local-dir":
        for name in _FALLBACK_WEIGHTS:
            if (folder / name).is_file():
                return str(folder / name)
        raise FileNotFoundError(f"{folder} has none of {', '.join(_FALLBACK_WEIGHTS)}.")
    from huggingface_hub.errors import EntryNotFoundError

    for name in _FALLBACK_WEIGHTS:
        try:
            return _hub_file(location, name)
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(f"Hugging Face Hub repo {location} has none of {', '.join(_FALLBACK_WEIGHTS)}.")


def create_from_source(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``create_model("hf-hub:ORG/NAME")`` / ``create_model("local-dir:PATH")``: the saved architecture (with
    ``kwargs`` as overrides), and its weights when ``pretrained`` (timm's convention)."""
    from vitfast.checkpoint import load_checkpoint

    source, location = _split_source(name)
    config, folder = _read_config(source, location)
    if "pretrained_cfg" not in config:  # timm's legacy single-dict layout
        config = {"architecture": config.get("architecture"), "pretrained_cfg": config, **config}
    ours = config.get("vitfast") or {}
    if ours:
        entry_name, model_args = ours["architecture"], dict(ours.get("model_args", {}))
        entry = _find_entry(entry_name, {})
    else:
        model_args = dict(config.get("model_args") or {})
        entry = _find_entry(config["architecture"], model_args)
    for key in ("num_classes", "global_pool"):
        if key in config:
            model_args.setdefault(key, config[key])
    load_options = {k: kwargs.pop(k) for k in ("patch_resample", "trust_pickle") if k in kwargs}
    reset_head = kwargs.pop("reset_head", False)
    try:
        model = entry.fn(pretrained=False, weights=None, **{**model_args, **kwargs})
    except TypeError as exc:
        raise ValueError(f"{name}: config.json's model_args do not fit vitfast's {entry.name}: {exc}") from exc
    saved = config.get("pretrained_cfg", {})
    model.pretrained_cfg.update(
        {k: tuple(saved[k]) if isinstance(saved[k], list) else saved[k] for k in _DATA_KEYS if k in saved}
    )
    model.pretrained_cfg["input_size"] = (model.config.in_chans, *model.config.img_size)
    model.pretrained_cfg.update(
        source=name,
        hf_hub_id=location if source == "hf-hub" else None,
        url=None,
        tag=saved.get("tag"),
        license=saved.get("license"),
    )
    label_names = config.get("label_names") or saved.get("label_names") or saved.get("labels")  # legacy: "labels"
    if label_names:
        model.pretrained_cfg["label_names"] = list(label_names)
    if pretrained:
        # another classifier width than the saved one: a fresh head, as timm does (and as registered weights do)
        reset_head = reset_head or model.num_classes != config.get("num_classes", model.num_classes)
        if reset_head:
            model.pretrained_cfg.pop("label_names", None)
        weights = _weights_file(source, location, folder)
        extra = ours.get("extra_weights")
        if extra:
            from safetensors.torch import load_file

            from vitfast.checkpoint import read_checkpoint

            extra_path = folder / extra if source == "local-dir" else Path(_hub_file(location, extra))
            state = {**read_checkpoint(weights, load_options.get("trust_pickle", False)), **load_file(extra_path)}
            resample = load_options.get("patch_resample", "bicubic")
            load_checkpoint(model, state, patch_resample=resample, reset_head=reset_head)
        else:
            load_checkpoint(model, weights, reset_head=reset_head, **load_options)
    return model
