"""Inference and export: `bit predict`, `bit embed`, `bit export`.

A model is named by a checkpoint file of any supported format (architecture inferred from its
shapes, class names from its metadata when a fine-tuning run wrote them) or by a registry name.
Export folds Weight Standardization into plain convolutions once, so ONNX / TorchScript consumers
see an ordinary ResNet-v2 with GroupNorm.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoints import SUFFIX_FORMATS, load_weights, read_checkpoint
from .checkpoints.formats import atomic_path
from .data import HyperRuleTransform, decode_image, to_model_input
from .models import ResNetV2, create_model, get_model_spec, list_models
from .models.resnetv2 import StdConv2d, standardize
from .runtime import resolve_device


def load_model(model: str | os.PathLike, pretrained: bool = True) -> tuple[ResNetV2, list[str] | None, int]:
    """(model in eval mode, class names or None, default resolution) from a checkpoint path (a file, or an HF
    folder) or a registry name."""
    path = Path(model)
    if path.exists():
        ckpt = read_checkpoint(path)
        net = ResNetV2(ckpt.arch, num_classes=ckpt.num_classes)
        load_weights(net, ckpt)
        classes = json.loads(ckpt.metadata["bigtransfer.classes"]) if "bigtransfer.classes" in ckpt.metadata else None
        return net.eval(), classes, _resolution(ckpt.metadata, path)
    if path.suffix in SUFFIX_FORMATS or os.sep in str(model):
        raise FileNotFoundError(f"{model}: no such checkpoint file")
    spec = get_model_spec(str(model))
    return create_model(spec.name, pretrained=pretrained).eval(), None, spec.resolution


def _resolution(metadata: dict[str, str], path: Path) -> int:
    """The side the checkpoint's run trained at (our runs record it); else that of the registry checkpoint
    the file is named after (a downloaded or bundled one); else BiT's upstream 224."""
    if "bigtransfer.resolution" in metadata:
        return int(metadata["bigtransfer.resolution"])
    for name in list_models():
        spec = get_model_spec(name)
        if path.name in {Path(f).name for f in (spec.file, spec.bundled) if f}:
            return spec.resolution
    return 224


@torch.no_grad()
def _batches(model: nn.Module, files: Sequence[str | os.PathLike], resolution: int, batch_size: int,
             device: torch.device, fn) -> list:
    transform = HyperRuleTransform(resolution, resolution, train=False)
    out = []
    for i in range(0, len(files), batch_size):
        chunk = files[i:i + batch_size]
        x = torch.stack([transform(decode_image(f), 0) for f in chunk]).to(device)
        with torch.inference_mode():
            out.append(fn(to_model_input(x)))
    return out


def predict(model: nn.Module, files: Sequence[str | os.PathLike], classes: Sequence[str] | None = None,
            top_k: int = 5, resolution: int = 224, batch_size: int = 32, device: str = "cpu") -> list[dict]:
    """Top-k classes with probabilities for every image file."""
    _require_head(model)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    probs = torch.cat(_batches(model, files, resolution, batch_size, dev, lambda x: model(x).softmax(-1).cpu()))
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    names = list(classes) if classes is not None else [str(i) for i in range(probs.shape[1])]
    return [{"file": str(f), "top": [{"label": names[j], "index": int(j), "probability": float(p)}
                                     for p, j in zip(v.tolist(), ix.tolist(), strict=True)]}
            for f, v, ix in zip(files, values, indices, strict=True)]


def embed(model: ResNetV2, files: Sequence[str | os.PathLike], resolution: int = 224, batch_size: int = 32,
          device: str = "cpu") -> np.ndarray:
    """Pre-logit features (N, C) of every image file."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    return torch.cat(_batches(model, files, resolution, batch_size, dev,
                              lambda x: model.forward_features(x).float().cpu())).numpy()


def save_embeddings(features: np.ndarray, files: Sequence[str], path: str | os.PathLike) -> Path:
    """.npy (features only) or .safetensors (features, with the file list in the metadata), atomically."""
    path = Path(path)
    if path.suffix not in (".npy", ".safetensors"):
        raise ValueError(f"{path}: features are written as .npy or .safetensors; name the file so")
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({"features": features}, str(tmp), metadata={"files": json.dumps([str(f) for f in files])})
        else:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name
                np.save(f, features, allow_pickle=False)
    return path


class FoldedConv2d(nn.Conv2d):
    """A plain convolution holding a standardised kernel; takes the unit's residual like `StdConv2d`."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        return out if residual is None else out + residual


def fold_weight_standardization(model: ResNetV2) -> ResNetV2:
    """A copy whose weight-standardised convolutions are plain Conv2d with the standardised kernels:
    identical outputs, no standardisation at run time, nothing exotic for exporters."""
    import copy

    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, StdConv2d):
                conv = FoldedConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                    child.padding, bias=False)
                with torch.no_grad():
                    conv.weight.copy_(standardize(child.weight, child.eps))
                setattr(module, name, conv)
    return folded


def export(model: ResNetV2, path: str | os.PathLike, fmt: str = "onnx", resolution: int = 224) -> Path:
    """ONNX (dynamic batch) or TorchScript, Weight Standardization folded in."""
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"unknown export format {fmt!r}; choose onnx or torchscript")
    _require_head(model)
    folded = fold_weight_standardization(model)
    # an image-like input: on zeros every norm sees a constant and the tracer's own check reports noise
    example = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with atomic_path(path) as tmp:
        if fmt == "torchscript":
            torch.jit.trace(folded, example).save(str(tmp))
        else:
            torch.onnx.export(folded, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return Path(path)


def _require_head(model: ResNetV2) -> None:
    if model.head is None:
        raise ValueError("this checkpoint has no classification head (a backbone): `bit embed` gives its features")
