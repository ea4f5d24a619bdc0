"""vitfast: Vision Transformer foundation models, weight-compatible with timm, built for speed on NVIDIA GPUs.

    import vitfast
    model = vitfast.create_model("eva02_large_patch14_448", pretrained=True)
    from vitfast import eva02_large_patch14_448, eva02_large   # every entry point and short alias

Ops run through a backend chosen at call time (``vitfast.set_backend`` / ``$VITFAST_BACKEND``); the reference
backend is plain PyTorch and runs anywhere.
"""

from vitfast import models as _models
from vitfast import transforms as transforms
from vitfast.apps import embed, predict, validate
from vitfast.backend import get_backend, set_backend, use_backend
from vitfast.checkpoint import CheckpointError, LoadReport, PretrainedDownloadError, load_checkpoint
from vitfast.engine import InferenceEngine, optimize
from vitfast.hub import push_to_hub, save_pretrained
from vitfast.models import (
    UnknownModelError,
    VisionTransformer,
    ViTConfig,
    Weights,
    create_model,
    list_aliases,
    list_models,
)
from vitfast.patch import PatchSummary, patch, unpatch
from vitfast.training import BlockMaskGenerator, cosine_lr_schedule, eva02_mim_loss, param_groups_layer_decay

__version__ = "0.1.0"


def _short_alias(name: str, target: str):
    def entry_point(pretrained: bool = False, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = f"Alias of :func:`vitfast.{target}`: ``create_model({name!r}, ...)``."
    return entry_point


def _export_entry_points() -> list[str]:
    exported = []
    for name in _models.list_models():
        globals()[name] = _models.get_entry(name).fn
        exported.append(name)
    for name, alias in _models.list_aliases(short_only=True).items():
        globals()[name] = _short_alias(name, alias.target)
        exported.append(name)
    return exported


__all__ = [
    "BlockMaskGenerator",
    "CheckpointError",
    "InferenceEngine",
    "LoadReport",
    "PatchSummary",
    "PretrainedDownloadError",
    "UnknownModelError",
    "ViTConfig",
    "VisionTransformer",
    "Weights",
    "cosine_lr_schedule",
    "create_model",
    "embed",
    "eva02_mim_loss",
    "get_backend",
    "list_aliases",
    "list_models",
    "load_checkpoint",
    "optimize",
    "param_groups_layer_decay",
    "patch",
    "predict",
    "push_to_hub",
    "save_pretrained",
    "set_backend",
    "unpatch",
    "use_backend",
    "validate",
    *_export_entry_points(),
]
