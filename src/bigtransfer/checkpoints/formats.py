"""Every format BiT weights exist in, read and written through one name/layout table.

Formats:
  ``npz``          the authors' release: numpy archive, ``resnet/...`` names, HWIO kernels
  ``timm``         timm ``resnetv2_*_bit`` state dict (``stem.conv``, ``stages.N.blocks.M``, ``head.fc``)
  ``hf``           HF transformers ``BitForImageClassification`` (``BitModel`` without the ``bit.`` prefix)
  ``safetensors``  ours: our module names, safetensors container (the default we write)

Every format is a renaming of our parameter names plus a layout change for conv kernels and the
head; `foreign_name` and `to_foreign` / `from_foreign` are the whole difference. Reading detects
the container from the file's bytes and the naming from the keys, never only the extension.
Nothing is ever unpickled: ``np.load(allow_pickle=False)``, ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.resnetv2 import Architecture, ResNetV2, group_norm_groups

log = logging.getLogger("bigtransfer")

FORMATS = ("npz", "timm", "hf", "safetensors")
SUFFIX_FORMATS = {".npz": "npz", ".pth": "timm", ".pt": "timm", ".bin": "timm", ".safetensors": "safetensors"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the file and the array."""


# --- names -------------------------------------------------------------------------------------

_NPZ_CONV = {"conv1": "a", "conv2": "b", "conv3": "c"}
_NPZ_NORM = {"norm1": "a", "norm2": "b", "norm3": "c"}
_NPZ_GN = {"weight": "gamma", "bias": "beta"}
_UNIT = re.compile(r"stages\.(\d+)\.(\d+)\.(\w+)\.(weight|bias)")


def foreign_name(fmt: str, name: str) -> str:
    """Our parameter name -> its name in `fmt`."""
    if fmt == "safetensors":
        return name
    if fmt == "npz":
        return _npz_name(name)
    if fmt == "timm":
        fixed = {"root.conv.weight": "stem.conv.weight", "head.weight": "head.fc.weight",
                 "head.bias": "head.fc.bias"}
        if name in fixed:
            return fixed[name]
        return re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", name).replace(".proj.", ".downsample.conv.")
    if fmt == "hf":
        fixed = {"root.conv.weight": "bit.embedder.convolution.weight", "head.weight": "classifier.1.weight",
                 "head.bias": "classifier.1.bias"}
        if name in fixed:
            return fixed[name]
        name = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"encoder.stages.\1.layers.\2.", name)
        return "bit." + name.replace(".proj.", ".downsample.conv.")
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose from {', '.join(FORMATS)}")


def _npz_name(name: str) -> str:
    fixed = {"root.conv.weight": "root_block/standardized_conv2d/kernel", "norm.weight": "group_norm/gamma",
             "norm.bias": "group_norm/beta", "head.weight": "head/conv2d/kernel", "head.bias": "head/conv2d/bias"}
    if name in fixed:
        return "resnet/" + fixed[name]
    stage, unit, layer, kind = _UNIT.fullmatch(name).groups()
    prefix = f"resnet/block{int(stage) + 1}/unit{int(unit) + 1:02d}/"
    if layer == "proj":
        return prefix + "a/proj/standardized_conv2d/kernel"
    if layer in _NPZ_CONV:
        return prefix + f"{_NPZ_CONV[layer]}/standardized_conv2d/kernel"
    return prefix + f"{_NPZ_NORM[layer]}/group_norm/{_NPZ_GN[kind]}"


# --- layouts -----------------------------------------------------------------------------------


def to_foreign(fmt: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """Our tensor -> the layout `fmt` stores (HWIO kernels for npz, a 1x1 conv head for npz/timm)."""
    if fmt == "npz" and t.ndim == 4:
        return t.permute(2, 3, 1, 0)
    if name == "head.weight" and fmt == "npz":
        return t.t()[None, None]
    if name == "head.weight" and fmt == "timm":
        return t[:, :, None, None]
    return t


def from_foreign(fmt: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_foreign`."""
    if name == "head.weight" and fmt == "npz":
        return t.reshape(t.shape[-2], t.shape[-1]).t()
    if name == "head.weight" and fmt == "timm":
        return t.reshape(t.shape[0], -1)
    if fmt == "npz" and t.ndim == 4:
        return t.permute(3, 2, 0, 1)
    return t


# --- containers --------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    """Container type from the first bytes: 'npz', 'torch', 'safetensors' or 'pickle'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path}: broken or truncated zip archive ({e})") from e
        if any(n.endswith("/constants.pkl") for n in names):
            raise CheckpointError(f"{path}: a TorchScript program (`bit export --format torchscript`), not a "
                                  "checkpoint: run it with torch.jit.load, or give the checkpoint it was exported from")
        return "torch" if any(n.endswith("data.pkl") for n in names) else "npz"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(f"{path}: not a checkpoint this package reads (npz, safetensors or torch state dict)")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All named arrays of a checkpoint file plus its string metadata, without unpickling anything."""
    path = Path(path)
    if path.is_dir():  # an HF transformers folder (save_pretrained, `bit convert ... --to hf`)
        folder = path
        path = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), path)
        if path.is_file():
            tensors, metadata = read_tensors(path)
            return tensors, {**metadata, **_hf_folder_metadata(folder)}  # config.json is what HF users edit
    if not path.is_file():
        raise CheckpointError(f"{path}: " + ("a folder without model.safetensors or pytorch_model.bin"
                                             if path.is_dir() else "no such checkpoint file"))
    kind = _sniff(path)
    try:
        if kind == "npz":
            return _read_npz(path), {}
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a dict)
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return _unwrap(obj, path), _own_metadata(obj)
    except CheckpointError:
        raise
    except Exception as e:  # every reader raises its own types for truncation and bad payloads
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
            raise CheckpointError(f"{path}: refusing to unpickle: it holds Python objects, not only tensors "
                                  f"(torch.load(weights_only=True) said: {str(e).splitlines()[0]})") from e
        raise CheckpointError(f"{path}: unreadable or truncated {kind} checkpoint ({type(e).__name__}: {e})") from e


# BitConfig values that change what the weights compute, and BiT's own (HF's defaults, and google/bit-*'s)
_HF_BIT_LAYOUT = {"layer_type": "preactivation", "global_padding": None, "embedding_dynamic_padding": False,
                  "hidden_act": "relu", "output_stride": 32, "num_groups": 32}


def _hf_folder_metadata(folder: Path) -> dict[str, str]:
    """What an HF folder's config.json says that the tensors cannot: its class names, and whether its head is
    multi-label (`problem_type`). A config for another
    layout (SAME padding, dynamic stem padding, a bottleneck ViT-hybrid backbone...) would load without a
    missing array and compute something else, so it is refused."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("id2label", {}), dict):
        raise CheckpointError(f"{path}: not an HF model config (a JSON object, its id2label an object)")
    other = {k: config[k] for k, v in _HF_BIT_LAYOUT.items() if k in config and config[k] != v}
    if other:
        raise CheckpointError(f"{path}: {', '.join(f'{k}={v!r}' for k, v in other.items())}: not BiT's layout "
                              f"({', '.join(f'{k}={v!r}' for k, v in _HF_BIT_LAYOUT.items() if k in other)})")
    labels = config.get("id2label") or {}
    names = [labels.get(str(i), "") for i in range(len(labels))]
    metadata = {}
    if names and any(n != f"LABEL_{i}" for i, n in enumerate(names)):
        metadata["bigtransfer.classes"] = json.dumps(names)
    if config.get("problem_type") in ("multi_label_classification", "single_label_classification"):
        metadata["bigtransfer.multi_label"] = str(config["problem_type"] == "multi_label_classification").lower()
    return metadata


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            try:
                out[key] = torch.from_numpy(np.ascontiguousarray(z[key]))
            except ValueError as e:
                raise CheckpointError(f"{path}: array {key!r} cannot be loaded without unpickling ({e})") from e
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                raise CheckpointError(f"{path}: array {key!r} is truncated or corrupt ({e})") from e
    return out


def _own_metadata(obj: object) -> dict[str, str]:
    """The string metadata a training run's checkpoint.pt carries beside its weights (classes, side)."""
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(metadata, dict):
        return {}
    return {k: v for k, v in metadata.items() if isinstance(k, str) and isinstance(v, str)}


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """A torch file may wrap the state dict ({'state_dict': ...}, {'model': ...}) and carry DDP's 'module.'."""
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block completes."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name to write", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # created 0666 less the umask (without setting the process's umask, which threads share)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            continue
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)  # safetensors writes its file in tmp's place as 0600: make it look like any other file
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a full disk or a file size limit says only "File too large": name the file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except Exception as e:  # safetensors reports a failed write as its own error, "... (os error 27)"
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete what `atomic_path` left in `folder` when its process was killed (no `finally` runs then): a
    near-complete checkpoint each time. Only for a folder one process writes, before it writes."""
    for path in Path(folder).glob(".*.*.tmp"):
        path.unlink(missing_ok=True)


# --- checkpoints as a whole --------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint read into our names: `state` fits `ResNetV2(arch)` (head present iff num_classes)."""

    path: Path
    format: str
    arch: Architecture
    num_classes: int
    state: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.state.values())


def detect_format(keys: set[str]) -> str:
    for fmt in ("npz", "timm", "hf", "safetensors"):
        if foreign_name(fmt, "root.conv.weight") in keys:
            return fmt
    raise CheckpointError("no BiT root convolution found under any known name "
                          f"(looked for {', '.join(foreign_name(f, 'root.conv.weight') for f in FORMATS)})")


_UNIT_ARRAYS = tuple(f"{layer}.{p}" for layer in ("norm1", "norm2", "norm3") for p in ("weight", "bias")) + tuple(
    f"{conv}.weight" for conv in ("conv1", "conv2", "conv3"))


def _laid_out(fmt: str, name: str, t: torch.Tensor) -> torch.Tensor | None:
    """`from_foreign`, or None for a shape that cannot even be laid out as ours (torch's reshape or index error
    would name neither the file nor the array)."""
    try:
        return from_foreign(fmt, name, t)
    except (RuntimeError, IndexError):
        return None


def infer_architecture(fmt: str, tensors: dict[str, torch.Tensor]) -> tuple[Architecture, int]:
    """Units per stage (by probing names: a unit is there if any of its arrays is, so that a missing one is
    reported by name, not read as a shallower network) and width (root conv channels / 64); head size or 0."""
    def unit(s: int, u: int) -> bool:
        return any(foreign_name(fmt, f"stages.{s}.{u}.{a}") in tensors for a in _UNIT_ARRAYS)

    root_key, head_key = foreign_name(fmt, "root.conv.weight"), foreign_name(fmt, "head.bias")
    if tensors[root_key].ndim != 4:
        raise CheckpointError(f"array {root_key!r} has shape {tuple(tensors[root_key].shape)}: a convolution "
                              "kernel has 4 dimensions")
    if head_key in tensors and tensors[head_key].ndim != 1:
        raise CheckpointError(f"array {head_key!r} has shape {tuple(tensors[head_key].shape)}: a bias is a vector")
    root = from_foreign(fmt, "root.conv.weight", tensors[root_key])
    depths = []
    while unit(len(depths), 0):
        units = 0
        while unit(len(depths), units):
            units += 1
        depths.append(units)
    if not depths:
        raise CheckpointError(f"no residual units (no array like {foreign_name(fmt, 'stages.0.0.conv1.weight')!r}): "
                              "not a BiT ResNet-v2")
    head, kernel_key = tensors.get(head_key), foreign_name(fmt, "head.weight")
    if head is not None and kernel_key in tensors:  # the bias sets the head size: a wrong one is named, not the kernel
        kernel = _laid_out(fmt, "head.weight", tensors[kernel_key])  # None: the shape check names the kernel
        classes = head.shape[0] if kernel is None else kernel.shape[0]
        if classes != head.shape[0]:
            raise CheckpointError(f"array {head_key!r} has {head.shape[0]} classes, {kernel_key!r} {classes}")
    return Architecture(depths=tuple(depths), width=root.shape[0] / 64), 0 if head is None else head.shape[0]


def expected_shapes(arch: Architecture, num_classes: int) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = ResNetV2(arch, num_classes=num_classes)
    return {k: v.shape for k, v in model.state_dict().items()}


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any supported checkpoint into our names, checking every array's presence and shape."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    if "embedder.convolution.weight" in tensors:  # HF BitModel: the backbone without the "bit." prefix
        tensors = {"bit." + k: v for k, v in tensors.items()}
    try:
        fmt = detect_format(set(tensors))
        arch, num_classes = infer_architecture(fmt, tensors)
        shapes = expected_shapes(arch, num_classes)
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e
    state, used = {}, set()
    for name, shape in shapes.items():
        key = foreign_name(fmt, name)
        if key not in tensors:
            raise CheckpointError(f"{path}: missing array {key!r} (a {fmt} checkpoint of a BiT-{arch.name})")
        t = _laid_out(fmt, name, tensors[key])
        if t is None or t.shape != shape:
            want = tuple(to_foreign(fmt, name, torch.empty(shape, device="meta")).shape)
            raise CheckpointError(f"{path}: array {key!r} has shape {tuple(tensors[key].shape)}, "
                                  f"a BiT-{arch.name} needs {want}")
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: array {key!r} holds {t.dtype} values; weights are floating point")
        state[name] = t.float()
        used.add(key)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} arrays not part of a BiT-{arch.name}: "
                              f"{', '.join(repr(k) for k in unexpected[:5])}")
    bad = first_non_finite(state)  # a diverged run's weights predict NaN
    if bad is not None:
        raise CheckpointError(f"{path}: array {foreign_name(fmt, bad)!r} holds NaN or infinite values")
    _check_metadata(path, metadata, num_classes)
    return Checkpoint(path, fmt, arch, num_classes, state, metadata)


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or an infinity, or None: one check for all of them (one wait
    for a GPU)."""
    finite = torch.stack([t.detach().isfinite().all() for t in tensors.values()]).tolist()
    return next((name for name, ok in zip(tensors, finite, strict=True) if not ok), None)


def _check_metadata(path: Path, metadata: dict[str, str], num_classes: int) -> None:
    """Our keys, if present, as `load_model` reads them: class names for the head, a positive input side, the
    head's scoring (multi-label or not)."""
    if "bigtransfer.classes" in metadata:
        try:
            classes = json.loads(metadata["bigtransfer.classes"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: metadata 'bigtransfer.classes' is not JSON ({e})") from e
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or (
                num_classes and len(classes) != num_classes):
            raise CheckpointError(f"{path}: metadata 'bigtransfer.classes' must list the head's {num_classes} class "
                                  f"names as strings, got {metadata['bigtransfer.classes'][:80]!r}")
    side = metadata.get("bigtransfer.resolution", "1")
    if not side.isdigit() or int(side) < 1:
        raise CheckpointError(f"{path}: metadata 'bigtransfer.resolution' must be a positive number of pixels, "
                              f"got {side!r}")
    if metadata.get("bigtransfer.multi_label", "false") not in ("true", "false"):
        raise CheckpointError(f"{path}: metadata 'bigtransfer.multi_label' must be 'true' or 'false', got "
                              f"{metadata['bigtransfer.multi_label'][:80]!r}")


def write_checkpoint(state: dict[str, torch.Tensor], arch: Architecture, path: str | os.PathLike,
                     fmt: str = "safetensors", metadata: dict[str, str] | None = None) -> Path:
    """Write our-named `state` in `fmt`, atomically.

    ``hf`` to a directory (a name without a checkpoint suffix) writes ``model.safetensors`` + ``config.json`` so
    that ``BitForImageClassification.from_pretrained(dir)`` loads it; ``timm`` to ``.pth``/``.pt``/``.bin``
    writes a torch state dict, ``npz`` the authors' numpy archive (tensors only: `metadata` is dropped with a
    warning), otherwise safetensors (with `metadata`, e.g. class names).
    """
    path = Path(path)
    torch_file = SUFFIX_FORMATS.get(path.suffix) == "timm"
    container = "npz" if fmt == "npz" else "torch" if fmt == "timm" and torch_file else "safetensors"
    misnamed = path.suffix == ".safetensors" and container != "safetensors"
    if misnamed or (container == "npz") != (path.suffix == ".npz"):
        raise ValueError(f"{path}: a {fmt} checkpoint is written as a {container} file, which the name's "
                         f"{path.suffix} would misname")
    kept = sorted(k.removeprefix("bigtransfer.") for k in metadata or {} if k in (
        "bigtransfer.classes", "bigtransfer.resolution", "bigtransfer.multi_label"))
    if kept and container != "safetensors":
        log.warning("%s: a %s file holds tensors only: the checkpoint's %s are left out (a .safetensors file "
                    "keeps them)", path, container, " and ".join(kept))
    tensors = {foreign_name(fmt, k): to_foreign(fmt, k, v.detach().cpu().float()).contiguous()
               for k, v in state.items()}
    if fmt == "hf" and path.suffix not in SUFFIX_FORMATS:  # a folder, also under a name such as bit-r50.v2
        config = hf_config(arch, state["head.bias"].shape[0] if "head.bias" in state else 0)  # may refuse: no folder
        if "bigtransfer.classes" in (metadata or {}):  # HF's pipelines and model cards show these names
            config["id2label"] = dict(enumerate(json.loads(metadata["bigtransfer.classes"])))
            config["label2id"] = {name: i for i, name in config["id2label"].items()}
        if (metadata or {}).get("bigtransfer.multi_label") == "true":  # HF's name for a sigmoid head
            config["problem_type"] = "multi_label_classification"
        with atomic_path(path / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
        path = path / "model.safetensors"
    with atomic_path(path) as tmp:
        if fmt == "npz":
            with open(tmp, "wb") as f:
                np.savez(f, **{k: v.numpy() for k, v in tensors.items()})
        elif container == "torch":
            torch.save(tensors, tmp)
        else:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={**(metadata or {}), "format": "pt", "bigtransfer.arch": arch.name,
                                                   "bigtransfer.naming": fmt})
    return path


def hf_config(arch: Architecture, num_classes: int) -> dict:
    """HF transformers BitConfig for the exact BiT layout: symmetric padding, zero pad + pool in the stem."""
    normed = {arch.root_channels, *arch.stage_channels, *(c // 4 for c in arch.stage_channels)}
    if any(group_norm_groups(c) != 32 for c in normed):
        raise CheckpointError(f"HF transformers' Bit uses 32 groups everywhere; BiT-{arch.name} has narrower layers")
    return {"model_type": "bit", "architectures": ["BitForImageClassification"], "layer_type": "preactivation",
            "depths": list(arch.depths), "hidden_sizes": list(arch.stage_channels), "width_factor": 1,
            "embedding_size": arch.root_channels, "global_padding": None, "embedding_dynamic_padding": False,
            "num_groups": 32, "num_labels": num_classes, "hidden_act": "relu", "output_stride": 32}
