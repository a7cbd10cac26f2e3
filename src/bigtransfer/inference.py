"""Inference and export: `bit predict`, `bit embed`, `bit export`.

A model is named by a checkpoint file of any supported format (architecture inferred from its
shapes, class names from its metadata when a fine-tuning run wrote them) or by a registry name.
Export folds Weight Standardization into plain convolutions once, so ONNX / TorchScript consumers
see an ordinary ResNet-v2 with GroupNorm.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoints import SUFFIX_FORMATS, load_weights, read_checkpoint, registry_entry
from .checkpoints.formats import atomic_path
from .data.sources import ImageFiles
from .evaluate import evaluating, model_outputs
from .models import ResNetV2, create_model, get_model_spec
from .models.resnetv2 import StdConv2d, standardize
from .runtime import resolve_device

log = logging.getLogger("bigtransfer")


def load_model(model: str | os.PathLike, resolution: int | None = None
               ) -> tuple[ResNetV2, list[str] | None, int]:
    """(model in eval mode, class names or None, resolution) from a checkpoint path (a file, or an HF folder) or a
    registry name. The resolution is `resolution` when given, else the side the checkpoint was trained at."""
    path = Path(model)
    if path.exists():
        ckpt = read_checkpoint(path)
        net = ResNetV2(ckpt.arch, num_classes=ckpt.num_classes)
        load_weights(net, ckpt)  # with its head's scoring (`multi_label`)
        classes = json.loads(ckpt.metadata["bigtransfer.classes"]) if "bigtransfer.classes" in ckpt.metadata else None
        return net.eval(), classes, resolution or _resolution(ckpt.metadata, path)
    if path.suffix in SUFFIX_FORMATS or os.sep in str(model):
        raise FileNotFoundError(f"{model}: no such checkpoint file")
    spec = get_model_spec(str(model))
    return create_model(spec.name, pretrained=True).eval(), None, resolution or spec.resolution


DEFAULT_RESOLUTION = 224  # the side BiT's released checkpoints were trained and evaluated at


def _resolution(metadata: dict[str, str], path: Path) -> int:
    """The side the checkpoint's run trained at (our runs record it); else that of the registry checkpoint
    the file is named after; else BiT's upstream 224."""
    if "bigtransfer.resolution" in metadata:
        return int(metadata["bigtransfer.resolution"])
    spec = registry_entry(path)
    if spec is not None:
        return spec.resolution
    log.warning("%s records no input side (our runs and `bit convert` to .safetensors do): %d px, BiT's upstream "
                "side; --resolution sets another", path, DEFAULT_RESOLUTION)
    return DEFAULT_RESOLUTION


def predict(model: ResNetV2, files: Sequence[str | os.PathLike] | str | os.PathLike,
            classes: Sequence[str] | None = None, top_k: int = 5, resolution: int | None = None, batch_size: int = 32,
            device: str | None = None, workers: int = 0, progress: bool = False, precision: str = "fp32"
            ) -> list[dict]:
    """Top-k classes with probabilities (softmax; each class's sigmoid where `model.multi_label`) for every
    image file (folders are read recursively), in order; an image that does not decode gets ``{"file",
    "error"}`` instead of ``"top"``. `resolution`: the side the model was trained at (`load_model` returns it).
    `device`: by default the model's own; the model is left in the mode (train/eval) it came in. `precision`:
    autocast's (see `embed`)."""
    _require_head(model)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if classes is not None and len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a head of {model.num_classes} classes")
    model, images, resolution, dev = _prepared(model, files, resolution, batch_size, device)
    with evaluating(model):
        score = torch.sigmoid if getattr(model, "multi_label", False) else lambda logits: logits.softmax(-1)
        probs, errors = model_outputs(lambda x: score(model(x).float()), images, model.num_classes, resolution,
                                      batch_size, dev, workers, precision, progress)
    errors = {images.paths[i]: why for i, why in errors.items()}
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    names = list(classes) if classes is not None else [str(i) for i in range(probs.shape[1])]
    return [{"file": f, "error": errors[f]} if f in errors else
            {"file": f, "top": [{"label": names[j], "index": int(j), "probability": float(p)}
                                for p, j in zip(v.tolist(), ix.tolist(), strict=True)]}
            for f, v, ix in zip(images.paths, values, indices, strict=True)]


def embed(model: ResNetV2, files: Sequence[str | os.PathLike] | str | os.PathLike, resolution: int | None = None,
          batch_size: int = 32, device: str | None = None, workers: int = 0, progress: bool = False,
          precision: str = "fp32") -> tuple[np.ndarray, list[str], dict[str, str]]:
    """(pre-logit features (N, C), the N files they are of, {file: why} for those that do not decode): folders
    are read recursively, and an unreadable image gets a row of NaN, so that row i is always file i.
    `resolution`: the side the model was trained at (`load_model` returns it). `device`: by default the
    model's own; the model is left in the mode (train/eval) it came in. `precision`: "fp32" (default, exact),
    "bf16" or "fp16" autocast, for speed where the hardware has it (GPUs; CPUs with AVX512-BF16 or AMX: R50x1 at
    224 px, the model alone, ran 1.5x faster in bf16 on an AMD EPYC), at about 1% relative error in a trained
    model's outputs."""
    model, images, resolution, dev = _prepared(model, files, resolution, batch_size, device)
    with evaluating(model):
        features, errors = model_outputs(model.forward_features, images, model.num_features, resolution,
                                         batch_size, dev, workers, precision, progress)
    return features.numpy(), list(images.paths), {images.paths[i]: why for i, why in errors.items()}


def _prepared(model: ResNetV2, files: Sequence[str | os.PathLike] | str | os.PathLike, resolution: int | None,
              batch_size: int, device: str) -> tuple[ResNetV2, ImageFiles, int, torch.device]:
    """The checks and set-up predict and embed share: the model on its device, the files (one name is one file
    or folder, not a sequence of characters), the side."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if resolution is None:
        log.warning("no resolution given: %d px, BiT's upstream side (load_model returns the side a checkpoint was "
                    "trained at)", DEFAULT_RESOLUTION)
        resolution = DEFAULT_RESOLUTION
    dev = next(model.parameters()).device if device is None else resolve_device(device)
    images = ImageFiles([files] if isinstance(files, str | os.PathLike) else files)
    return model.to(dev), images, resolution, dev


def embeddings_path(path: str | os.PathLike) -> Path:
    """`path` if its name says a format features are written in (checked before any image is read)."""
    path = Path(path)
    if path.suffix not in (".npy", ".safetensors"):
        raise ValueError(f"{path}: features are written as .npy or .safetensors; name the file so")
    return path


def save_embeddings(features: np.ndarray, files: Sequence[str], path: str | os.PathLike) -> Path:
    """.npy (features only) or .safetensors (features, with the file list in the metadata), atomically."""
    path = embeddings_path(path)
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
    identical outputs, no standardisation at run time, nothing exotic for exporters. The copy stays on the
    model's device and in its dtype (a bf16 kernel is standardised in fp32, then rounded once)."""
    import copy

    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, StdConv2d):
                conv = FoldedConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                    child.padding, bias=False, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    conv.weight.copy_(standardize(child.weight.float(), child.eps))
                setattr(module, name, conv)
    return folded


EXPORT_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".torchscript")}


class _Features(nn.Module):
    """A model whose output is its pre-logit features, for an embedding export."""

    def __init__(self, model: ResNetV2) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def export(model: ResNetV2, path: str | os.PathLike, fmt: str = "onnx", resolution: int = DEFAULT_RESOLUTION,
           output: str = "logits") -> Path:
    """ONNX (dynamic batch) or TorchScript, Weight Standardization folded in, traced at `resolution` (the side
    the model was trained at: `load_model` returns it), giving the logits or (`output="features"`) the pre-logit
    features `bit embed` writes. The file holds fp32 CPU weights, whatever the model's device and dtype: what
    every runtime takes."""
    if fmt not in EXPORT_SUFFIXES:
        raise ValueError(f"unknown export format {fmt!r}; choose onnx or torchscript")
    if output not in ("logits", "features"):
        raise ValueError(f"unknown export output {output!r}; choose logits or features")
    other = [f for f, suffixes in EXPORT_SUFFIXES.items() if f != fmt and Path(path).suffix in suffixes]
    if other:
        raise ValueError(f"{path}: a {fmt} file under a name that says {other[0]}; name it {EXPORT_SUFFIXES[fmt][0]}")
    if output == "logits":
        _require_head(model)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401 (torch.onnx.export needs it, and says so only after tracing)
        except ImportError as e:
            raise ImportError("ONNX export needs the onnx package: pip install onnx (TorchScript needs nothing "
                              "more: --format torchscript)") from e
    folded = fold_weight_standardization(model).to("cpu", torch.float32)
    traced = folded if output == "logits" else _Features(folded)
    # an image-like input: on zeros every norm sees a constant and the tracer's own check reports noise
    example = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with atomic_path(path) as tmp:
        if fmt == "torchscript":
            with warnings.catch_warnings():  # torch.jit's deprecation notices: TorchScript files are what is asked
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.trace(traced, example).save(str(tmp))
        else:
            torch.onnx.export(traced, (example,), str(tmp), input_names=["images"], output_names=[output],
                              dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}}, dynamo=False)
    return Path(path)


def _require_head(model: ResNetV2) -> None:
    if model.head is None:
        raise ValueError("this checkpoint has no classification head (a backbone): `bit embed` gives its features "
                         "(`bit export --output features` a model of them)")
