"""BiT architecture (`resnetv2`) and the registry of named variants (`registry`)."""

from .factory import create_model
from .registry import ModelSpec, get_model_spec, list_models, register_model
from .resnetv2 import Architecture, ResNetV2, group_norm_groups

__all__ = ["Architecture", "ModelSpec", "ResNetV2", "create_model", "get_model_spec",
           "group_norm_groups", "list_models", "register_model"]
