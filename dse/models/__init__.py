"""The model zoo: every family of the paper behind one registry, and the paper-name grammar."""

from dse.models import modified_squeezenext, shallow_squeezenext, squeezenet, squeezenext  # noqa: F401  (register)
from dse.models.names import config_from_name, create_model, depth, paper_name, parse_name
from dse.models.registry import (
    ModelConfig,
    build_model,
    list_models,
    model_family,
    register_model,
    resolve_config,
)

__all__ = [
    "ModelConfig",
    "build_model",
    "config_from_name",
    "create_model",
    "depth",
    "list_models",
    "model_family",
    "paper_name",
    "parse_name",
    "register_model",
    "resolve_config",
]
