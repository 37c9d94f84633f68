"""Backbones: transformers' own Llama/Mistral/Qwen2/Qwen3 models behind one small adapter, and their loading."""

from .adapter import SUPPORTED_MODEL_TYPES, Backbone, Shapes, UnsupportedModelError
from .loading import (
    MODELS,
    BrokenModelError,
    ModelNotFoundError,
    checkpoint_dir,
    load_backbone,
)

__all__ = [
    "MODELS",
    "SUPPORTED_MODEL_TYPES",
    "Backbone",
    "BrokenModelError",
    "ModelNotFoundError",
    "Shapes",
    "UnsupportedModelError",
    "checkpoint_dir",
    "load_backbone",
]
