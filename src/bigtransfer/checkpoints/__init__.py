"""Checkpoints: every released format (`formats`), download and cache (`download`), and the glue
that moves weights in and out of a model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from ..models.registry import ModelSpec, get_model_spec, list_models
from .download import BadDownload, DownloadError, cache_dir, download
from .formats import (
    FORMATS,
    SUFFIX_FORMATS,
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)

__all__ = ["FORMATS", "SUFFIX_FORMATS", "BadDownload", "Checkpoint", "CheckpointError", "DownloadError", "cache_dir",
           "cached_path", "download", "download_pretrained", "load_weights", "read_checkpoint", "save_weights",
           "write_checkpoint"]

log = logging.getLogger("bigtransfer")


def cached_path(spec: ModelSpec) -> Path | None:
    """Where the released checkpoint of `spec` lives in the cache (None: it has no released weights)."""
    return None if spec.file is None else cache_dir() / "checkpoints" / spec.file


def bundled_path(name: str) -> Path:
    """A file shipped in the package's weights folder."""
    from importlib.resources import files

    path = Path(str(files("bigtransfer") / "weights" / name))
    if not path.is_file():
        raise DownloadError(f"bundled weights {name} are missing from the installed package ({path})")
    return path


def download_pretrained(name: str | ModelSpec, progress: bool = True) -> Path:
    """The cached checkpoint of a registered model, downloading it first if needed."""
    spec = name if isinstance(name, ModelSpec) else get_model_spec(name)
    if spec.bundled is not None:
        return bundled_path(spec.bundled)
    if spec.url is None:
        raise DownloadError(f"{spec.name} has no released weights to download")
    dest = cached_path(spec)
    try:
        return download(spec.url, dest, spec.sha256, progress=progress, check=lambda part: _check_released(part, spec))
    except BadDownload:  # the server answered, with something else: no advice about being offline
        raise
    except DownloadError as e:  # an offline machine: say where a copy fetched elsewhere goes
        raise DownloadError(f"{e}. Without internet here, fetch {spec.url} elsewhere and copy it to {dest} "
                            "(the cache; $BIT_HOME moves it), or pass the file's path (--pretrained FILE, or "
                            "pretrained=FILE in Python)") from e


def _check_released(path: Path, spec: ModelSpec) -> None:
    """A downloaded file is read whole (an npz's CRCs catch a cut or damaged body) and must hold `spec`'s network
    and head: the released files have no published digests to check them by."""
    ckpt = read_checkpoint(path)
    if (ckpt.arch, ckpt.num_classes) != (spec.arch, spec.num_classes):
        raise CheckpointError(f"it holds a BiT-{ckpt.arch.name} with {ckpt.num_classes} classes, {spec.name} is a "
                              f"BiT-{spec.arch.name} with {spec.num_classes}")


def registry_entry(path: str | os.PathLike) -> ModelSpec | None:
    """The registry checkpoint a file is named after (a downloaded or bundled one), if any."""
    name = Path(path).name
    return next((spec for spec in map(get_model_spec, list_models())
                 if name in {Path(f).name for f in (spec.file, spec.bundled) if f}), None)


def head_is_multi_label(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's head scores every class on its own (sigmoid cross-entropy on multi-label data)
    rather than one class among all (softmax). Our runs record it (`bigtransfer.multi_label`, also HF's
    `problem_type`); a file without the record goes by the registry entry it is named after (BiT-M's
    ImageNet-21k head; downloads and bundled files keep the registry's file names)."""
    if "bigtransfer.multi_label" in ckpt.metadata:
        return ckpt.metadata["bigtransfer.multi_label"] == "true"
    return _released_multi_label(ckpt, registry_entry(ckpt.path))


def _released_multi_label(ckpt: Checkpoint, spec: ModelSpec | None) -> bool:
    return spec is not None and spec.multi_label and ckpt.num_classes == spec.num_classes


def implied_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """The checkpoint's metadata, with what the registry entry it is named after says and it does not record
    (its side, its head's scoring): a released file converted keeps them, where its name no longer gives them."""
    spec = registry_entry(ckpt.path)
    implied = {} if spec is None else {"bigtransfer.resolution": str(spec.resolution)}
    if _released_multi_label(ckpt, spec):  # what the file records comes after, and wins
        implied["bigtransfer.multi_label"] = "true"
    return {**implied, **ckpt.metadata}


def load_weights(model: nn.Module, path: str | os.PathLike | Checkpoint) -> Checkpoint:
    """Load a checkpoint of any supported format into a BiT `model`.

    The architecture must match. A checkpoint head of another size than the model's (or none) is
    not loaded: the model keeps its own new head, and that is logged.
    """
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    if ckpt.arch != model.arch:
        raise CheckpointError(f"{ckpt.path}: holds a BiT-{ckpt.arch.name} (depths {ckpt.arch.depths}), "
                              f"the model is a BiT-{model.arch.name} (depths {model.arch.depths})")
    state = dict(ckpt.state)
    head_fits = ckpt.num_classes == model.num_classes
    if not head_fits:
        state.pop("head.weight", None)
        state.pop("head.bias", None)
        log.info("%s: checkpoint head has %d classes, model has %d: keeping the model's new head",
                 ckpt.path.name, ckpt.num_classes, model.num_classes)
    missing, unexpected = model.load_state_dict(state, strict=head_fits)
    if unexpected or any(not k.startswith("head.") for k in missing):  # a model whose modules were changed
        raise CheckpointError(f"{ckpt.path}: does not fit the model (missing {missing}, unexpected {unexpected})")
    if head_fits:  # the head's weights, and how they score
        model.multi_label = head_is_multi_label(ckpt)
    return ckpt


def save_weights(model: nn.Module, path: str | os.PathLike, format: str | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write `model`'s weights in any supported format (see `formats.write_checkpoint`); by default the one the
    suffix names (.pth/.pt/.bin timm, .npz the authors'), else ours (safetensors). An HF folder: format="hf".
    A multi-label head's scoring is recorded with them (a released BiT-M head has it from its file's name)."""
    if getattr(model, "multi_label", False):
        metadata = {"bigtransfer.multi_label": "true", **(metadata or {})}
    return write_checkpoint(model.state_dict(), model.arch, path,
                            format or SUFFIX_FORMATS.get(Path(path).suffix, "safetensors"), metadata)
