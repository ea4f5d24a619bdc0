"""Model registry: entry points, their pretrained weights, aliases, and ``create_model``.

A registered entry point is a thin function ``name(pretrained=False, **kwargs)`` that calls :func:`build_model` with
its architecture. ``create_model("name")``, ``create_model("name.tag")`` (a specific set of pretrained weights) and
``create_model("Alias")`` (seed-document names and short names) all resolve here.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "MEAN_STD",
    "Alias",
    "ModelEntry",
    "UnknownModelError",
    "Weights",
    "build_model",
    "create_model",
    "get_entry",
    "list_aliases",
    "list_models",
    "paddle_foundation_weights",
    "register_alias",
    "register_model",
    "resolve",
    "timm_weights",
]

MEAN_STD = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


@dataclass(frozen=True)
class Weights:
    """One set of pretrained weights and the preprocessing it expects.

    Exactly one source is set: ``hub_id`` (Hugging Face Hub repo; ``filename`` defaults to ``model.safetensors``
    then ``pytorch_model.bin``) or ``url`` (plain download, cached by ``torch.hub``).
    """

    tag: str
    hub_id: str | None = None
    filename: str | None = None
    url: str | None = None
    num_classes: int = 1000
    img_size: int = 224
    crop_pct: float = 0.9
    crop_mode: str = "center"
    mean_std: str = "imagenet"
    interpolation: str = "bicubic"
    license: str | None = None
    state_dict_key: str | None = None  # which entry of a wrapped checkpoint holds the weights (e.g. "model_ema")

    @property
    def source(self) -> str:
        if self.hub_id:
            return f"hf-hub:{self.hub_id}" + (f"/{self.filename}" if self.filename else "")
        return self.url or ""


def timm_weights(
    model: str, tag: str, num_classes: int, img_size: int, crop_pct: float, mean_std: str, **kw: Any
) -> Weights:
    """Weights published by timm on the Hugging Face Hub as ``timm/<model>.<tag>``."""
    return Weights(
        tag,
        hub_id=f"timm/{model}.{tag}",
        num_classes=num_classes,
        img_size=img_size,
        crop_pct=crop_pct,
        mean_std=mean_std,
        **kw,
    )


def paddle_foundation_weights(name: str, mean_std: str, img_size: int = 224, crop_pct: float = 0.875) -> Weights:
    """A PaddleClas foundation-model checkpoint (seeds/000): an embedding model with no classifier."""
    url = f"https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/foundation_models/{name}.pdparams"
    return Weights("paddle", url=url, num_classes=0, img_size=img_size, crop_pct=crop_pct, mean_std=mean_std)


@dataclass
class ModelEntry:
    name: str
    family: str
    fn: Callable[..., nn.Module]
    weights: tuple[Weights, ...] = ()
    timm_name: str | None = None  # timm model with the same architecture and state_dict keys
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def default_weights(self) -> Weights | None:
        return self.weights[0] if self.weights else None

    def find_weights(self, tag: str) -> Weights:
        for weights in self.weights:
            if weights.tag == tag:
                return weights
        known = ", ".join(w.tag for w in self.weights) or "none"
        raise UnknownModelError(f"{self.name} has no pretrained weights tagged {tag!r}; known tags: {known}.")


@dataclass(frozen=True)
class Alias:
    """Another name for a model, optionally with its own weights tag / source and architecture overrides."""

    name: str
    target: str
    weights: Weights | str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    short: bool = False  # short aliases are also importable from the top-level package
    note: str = ""


class UnknownModelError(KeyError):
    """Raised for a model name, alias or weights tag that is not registered; the message suggests close names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_MODELS: dict[str, ModelEntry] = {}
_ALIASES: dict[str, Alias] = {}


def register_model(
    family: str,
    weights: tuple[Weights, ...] | list[Weights] = (),
    timm: str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering an entry point under its function name."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS or name in _ALIASES:
            raise ValueError(f"model {name!r} is registered twice.")
        description = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _MODELS[name] = ModelEntry(name, family, fn, tuple(weights), timm, dict(timm_kwargs or {}), description)
        return fn

    return decorator


def register_alias(
    name: str, target: str, weights: Weights | str | None = None, short: bool = False, note: str = "", **kwargs: Any
) -> None:
    if name in _MODELS or name in _ALIASES:
        raise ValueError(f"alias {name!r} collides with a registered name.")
    _ALIASES[name] = Alias(name, target, weights, kwargs, short, note)


def get_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise _unknown(name)
    return _MODELS[name]


def _unknown(name: str) -> UnknownModelError:
    candidates = list(_MODELS) + list(_ALIASES)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    lowered = {c.lower(): c for c in candidates}
    if name.lower() in lowered and lowered[name.lower()] not in close:
        close.insert(0, lowered[name.lower()])
    for length in range(len(name) - 1, 2, -1):  # no close spelling: names sharing the longest prefix
        if close:
            break
        matches = [c for c in candidates if c.lower().startswith(name[:length].lower())]
        close = sorted(matches, key=lambda c: (c not in _MODELS, c))[:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownModelError(
        f"unknown model {name!r}.{hint} vitfast.list_models() lists models; list_models(include_aliases=True) "
        "adds aliases."
    )


def resolve(name: str) -> tuple[ModelEntry, Weights | None, dict[str, Any]]:
    """``name``, ``name.tag`` or an alias -> (entry, weights to use, alias architecture overrides)."""
    base, _, tag = name.partition(".")
    if base in _ALIASES:
        alias = _ALIASES[base]
        entry = get_entry(alias.target)
        if tag:
            weights = entry.find_weights(tag)
        elif isinstance(alias.weights, str):
            weights = entry.find_weights(alias.weights)
        else:
            weights = alias.weights or entry.default_weights
        return entry, weights, dict(alias.kwargs)
    if base not in _MODELS:
        raise _unknown(base)
    entry = _MODELS[base]
    return entry, entry.find_weights(tag) if tag else entry.default_weights, {}


def list_models(
    pattern: str = "*", *, family: str | None = None, pretrained: bool = False, include_aliases: bool = False
) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (case-insensitive), sorted.

    ``pretrained=True`` keeps models with known weights and lists each as ``name.tag``.
    """
    names = []
    for entry in _MODELS.values():
        if family and entry.family != family:
            continue
        if pretrained:
            names += [f"{entry.name}.{w.tag}" for w in entry.weights]
        else:
            names.append(entry.name)
    if include_aliases:
        names += [a.name for a in _ALIASES.values() if not family or _MODELS[a.target].family == family]
    pattern = pattern.lower()
    return sorted(n for n in names if fnmatch.fnmatchcase(n.lower(), pattern))


def list_aliases(short_only: bool = False) -> dict[str, Alias]:
    return {n: a for n, a in _ALIASES.items() if a.short or not short_only}


def pretrained_cfg(entry: ModelEntry, weights: Weights | None, model: nn.Module) -> dict[str, Any]:
    """The timm-style ``pretrained_cfg`` dict of a built model."""
    cfg = model.config
    mean, std = MEAN_STD[weights.mean_std if weights else "imagenet"]
    return {
        "architecture": entry.name,
        "tag": weights.tag if weights else None,
        "hf_hub_id": weights.hub_id if weights else None,
        "url": weights.url if weights else None,
        "source": weights.source if weights else None,
        "num_classes": cfg.num_classes,
        "input_size": (cfg.in_chans, *cfg.img_size),
        "crop_pct": weights.crop_pct if weights else 0.9,
        "crop_mode": weights.crop_mode if weights else "center",
        "interpolation": weights.interpolation if weights else "bicubic",
        "mean": mean,
        "std": std,
        "license": weights.license if weights else None,
        "timm_name": entry.timm_name,
        # the fields timm's helpers read: in_chans adaptation (first_conv), layer grouping and head reset (classifier)
        "pool_size": None,
        "fixed_input_size": True,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def build_model(
    name: str,
    pretrained: bool,
    arch: dict[str, Any],
    kwargs: dict[str, Any],
) -> nn.Module:
    """Build the registered model ``name`` from its architecture ``arch`` and the caller's ``kwargs``.

    ``kwargs`` may hold architecture overrides plus ``weights`` (a tag or :class:`Weights`), ``checkpoint_path``
    (load this file instead of downloading), and the :func:`vitfast.load_checkpoint` options ``patch_resample``,
    ``trust_pickle`` and ``reset_head``.
    """
    from vitfast.checkpoint import load_checkpoint, load_pretrained
    from vitfast.models.vision_transformer import VisionTransformer, ViTConfig

    entry = get_entry(name)
    kwargs = dict(kwargs)
    weights = kwargs.pop("weights", None)
    checkpoint_path = kwargs.pop("checkpoint_path", None)
    reset_head = kwargs.pop("reset_head", False)
    load_options = {
        "patch_resample": kwargs.pop("patch_resample", "bicubic"),
        "trust_pickle": kwargs.pop("trust_pickle", False),
    }
    if isinstance(weights, str):
        weights = entry.find_weights(weights)
    elif weights is None:
        weights = entry.default_weights

    base = dict(arch)
    if weights is not None:
        base["num_classes"] = weights.num_classes
    config = ViTConfig.from_kwargs(base, kwargs)
    model = VisionTransformer(config)
    model.family = entry.family
    model.pretrained_cfg = pretrained_cfg(entry, weights, model)

    if checkpoint_path is not None:  # the user's own file: its head is kept unless they ask otherwise
        load_checkpoint(model, checkpoint_path, reset_head=reset_head, **load_options)
    elif pretrained:
        if weights is None:
            raise ValueError(
                f"no pretrained weights are registered for {name}; load your own with "
                f"vitfast.load_checkpoint(model, path) or create_model({name!r}, checkpoint_path=path)."
            )
        # registered weights with another classifier width: replace the head, as timm does (reported in the log)
        reset_head = reset_head or weights.num_classes != config.num_classes
        load_pretrained(model, weights, reset_head=reset_head, **load_options)
    return model


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a model by registered name, ``name.tag`` or alias.

    Args:
        name: e.g. ``"eva02_large_patch14_448"``, ``"eva02_large_patch14_448.mim_m38m_ft_in1k"``,
            ``"BEiTv2_vit_base_patch16_224"`` or ``"eva02_large"``.
        pretrained: download (or take from the local cache) the weights and load them.
        **kwargs: architecture overrides (``depth``, ``embed_dim``, ``num_heads``, ``img_size``, ``num_classes``,
            ``drop_path_rate``, ``dynamic_img_size``, ... see :class:`vitfast.ViTConfig`), ``checkpoint_path``,
            and the :func:`vitfast.load_checkpoint` options ``patch_resample``, ``trust_pickle``, ``reset_head``.
            ``features_only=True`` (with ``out_indices``, default the last 3 blocks) returns timm's feature getter:
            a module whose forward gives the listed blocks' patch tokens as ``[B, C, H / p, W / p]`` maps.

    ``"hf-hub:ORG/NAME"`` and ``"local-dir:PATH"`` build a model saved in timm's Hub layout (config.json +
    weights; by :func:`vitfast.save_pretrained` or timm); ``pretrained=True`` loads its weights, as in timm.
    """
    if name.startswith(("hf-hub:", "local-dir:")):
        from vitfast.hub import create_from_source

        return create_from_source(name, pretrained=pretrained, **kwargs)
    entry, weights, alias_kwargs = resolve(name)
    if weights is not None and "weights" not in kwargs:
        kwargs["weights"] = weights
    features_only = kwargs.pop("features_only", False)
    feature_kwargs = {key: kwargs.pop(key) for key in ("out_indices", "feature_cls") if key in kwargs}
    if feature_kwargs and not features_only:
        raise TypeError(f"{', '.join(feature_kwargs)} only apply with features_only=True.")
    model = entry.fn(pretrained=pretrained, **{**alias_kwargs, **kwargs})
    if features_only:
        from vitfast.models.features import FeatureGetterNet

        feature_cls = feature_kwargs.pop("feature_cls", "getter")
        if feature_cls != "getter":
            raise ValueError(
                f"feature_cls={feature_cls!r} is not supported: vitfast models give features through "
                "forward_intermediates, as timm's ViTs do (feature_cls='getter', the default)."
            )
        model = FeatureGetterNet(model, out_indices=feature_kwargs.get("out_indices", 3))
    return model
