"""Data: sources (folders, CSV, torchvision layouts, digits, shards, any Dataset), HyperRule and
upstream transforms, few-shot sampling, and the step-indexed loaders the engine uses."""

from .fewshot import sample_per_class, select_examples
from .loader import StepSampler, eval_loader, train_loader
from .sources import (
    BadImageError,
    LabelledImages,
    TorchDatasetImages,
    decode_image,
    match_classes,
    measure_image_size,
    open_dataset,
)
from .transforms import HyperRuleTransform, InceptionCropTransform, to_model_input

__all__ = ["BadImageError", "HyperRuleTransform", "InceptionCropTransform", "LabelledImages", "StepSampler",
           "TorchDatasetImages", "decode_image", "eval_loader", "match_classes", "measure_image_size", "open_dataset",
           "sample_per_class", "select_examples", "to_model_input", "train_loader"]
