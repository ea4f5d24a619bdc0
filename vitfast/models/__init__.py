"""The model zoo: one file per family, all built on :class:`VisionTransformer`.

Importing this package registers every family's entry points.
"""

from vitfast.models import beit, cae, clip, eva, mae, mocov3, vit  # noqa: F401  (registration side effects)
from vitfast.models._registry import (
    MEAN_STD,
    Alias,
    ModelEntry,
    UnknownModelError,
    Weights,
    create_model,
    get_entry,
    list_aliases,
    list_models,
    resolve,
)
from vitfast.models.vision_transformer import VisionTransformer, ViTConfig

__all__ = [
    "MEAN_STD",
    "Alias",
    "ModelEntry",
    "UnknownModelError",
    "ViTConfig",
    "VisionTransformer",
    "Weights",
    "create_model",
    "get_entry",
    "list_aliases",
    "list_models",
    "resolve",
]
