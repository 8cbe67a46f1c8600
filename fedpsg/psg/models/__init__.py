"""Scene-graph relation models: one module per model, each registering itself in `MODELS`.

Every module of this package is imported here, so adding a model is adding one file with a
`@register("name")` class.
"""

import importlib
import pkgutil

from fedpsg.psg.models.base import (
    MODELS,
    ModelSpec,
    RelationModel,
    RelationOutput,
    build_model,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MODELS", "ModelSpec", "RelationModel", "RelationOutput", "build_model", "register"]
