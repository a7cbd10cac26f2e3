"""Labelled image sources: every dataset the fine-tuner reads, behind one small interface.

Each source maps an index to ``(PIL RGB image, label)`` (a class index; a tuple of them for multi-label data) and
exposes ``targets`` without decoding anything, so few-shot sampling and held-out splits stay cheap. File discovery
and dataset formats are delegated to torchvision and scikit-learn; this module only normalises what they return
(colour modes, bit depths, broken files).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .packed import PackedLabels, PackedStrings, index_array, shared_labels

log = logging.getLogger("bigtransfer")

__all__ = [
    "BadImageError",
    "CsvImages",
    "DigitsImages",
    "ImageFolderImages",
    "LabelledImages",
    "TorchDatasetImages",
    "TorchvisionImages",
    "decode_image",
    "measure_image_size",
    "open_dataset",
]

# Splits that mean "held out" wherever a source has only one of them.
_HELD_OUT = ("val", "validation", "test")


class MissingSplit(ValueError):
    """The data has no split of that name (as opposed to a split that is there but unreadable)."""


class BadImageError(ValueError):
    """An image that cannot be decoded; carries ``.path`` and ``.reason`` so a report can name the file to fix.

    ``reason`` is optional because DataLoader workers re-raise exceptions by calling ``type(exc)(message)``.
    """

    def __init__(self, path: str, reason: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if reason else self.path)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes with both fields intact
        return (type(self), (self.path, self.reason))


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


def _scale_to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 (rather than clipping, which whites out most high-bit-depth images)."""
    arr = arr.astype(np.float64)
    if hi <= lo:
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Transparent pixels become white, not black (what ``convert("RGB")`` would give): a viewer's rendering."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB without losing the content to clipping or black transparency."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16"):  # 16-bit grey: scale by the full 16-bit range
        arr = np.asarray(img)
        grey = _scale_to_uint8(arr, 0, 65535)
        if "transparency" in img.info:  # one grey value marked transparent (PNG's tRNS): white, as below
            grey[arr == img.info["transparency"]] = 255
        return Image.fromarray(grey).convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
        if mode == "I" and img.format in ("PNG", "PPM"):  # 16-bit grey (a PGM's maxval is scaled to 65535)
            lo, hi = 0.0, 65535.0
        elif mode == "F" and lo >= 0.0 and hi <= 1.0:  # float data in [0, 1]: that is its range
            lo, hi = 0.0, 1.0
        # other 32-bit int / float data has no known range: the image's own min..max
        return Image.fromarray(_scale_to_uint8(arr, lo, hi)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        return _composite_on_white(img)  # (L and RGB: one colour marked transparent, PNG's tRNS)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's own conversions are exact enough


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored; 2-8: mirrored and/or turned). Of an image not yet loaded, only what
    its header holds: Pillow decodes a whole PNG to find an eXIf chunk that follows the pixels."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return img.getexif().get(ExifTags.Base.Orientation, 1)


def _upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: phones store photos turned and say so in EXIF (torchvision's and timm's
    loaders ignore it and train on them sideways)."""
    return ImageOps.exif_transpose(img) if _orientation(img) != 1 else img


def decode_image(source: str | os.PathLike | bytes, describe: str | None = None) -> Image.Image:
    """Decode fully and convert to RGB, so a broken file fails here (naming it) rather than mid-training.

    ``img.load()`` forces the whole file to be read, which is what catches truncation. We never set
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``: that would silently train on grey padding.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        name = describe or "<bytes>"
        if len(source) == 0:
            raise BadImageError(name, "empty file (0 bytes)")
        fp: Any = io.BytesIO(bytes(source))
    else:
        name = describe or os.fspath(source)
        try:
            if os.path.getsize(source) == 0:
                raise BadImageError(name, "empty file (0 bytes)")
        except OSError as e:
            raise BadImageError(name, f"cannot read file ({e.strerror or e})") from e
        fp = source
    try:
        with Image.open(fp) as img:
            img.load()
            if img.width == 0 or img.height == 0:
                raise BadImageError(name, f"zero-size image ({img.width}x{img.height})")
            rgb = _to_rgb(_upright(img))
            if rgb is img:  # detach from the file handle the context manager is about to close
                rgb = img.copy()
    except (BadImageError, MemoryError):  # a valid image that did not fit in memory is not a corrupt one
        raise
    except UnidentifiedImageError as e:
        raise BadImageError(name, "not an image file Pillow can identify") from e
    except Image.DecompressionBombError as e:
        raise BadImageError(name, f"refused as a decompression bomb ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncation, corrupt chunks, bad headers
        raise BadImageError(name, f"corrupt or truncated image ({e})") from e
    except Exception as e:  # Pillow's other failures on corrupt files (a TIFF tag of the wrong type: TypeError)
        raise BadImageError(name, f"corrupt image ({type(e).__name__}: {e})") from e
    return rgb


def _array_to_rgb(arr: Any) -> Image.Image:
    """HWC numpy or CHW tensor, uint8 (0..255), float (0..1), uint16 (0..65535, scaled as 16-bit files are) or
    bool (a mask: white where True) -> PIL RGB; for in-memory datasets. Other integers are read as 0..255."""
    if isinstance(arr, torch.Tensor):
        t = arr.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)  # CHW -> HWC
        arr = t.numpy()
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image array, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        arr = _scale_to_uint8(arr, 0, 65535)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def _file_size(path: str) -> tuple[int, int]:
    """(height, width) from the header only: measuring a dataset must not decode it."""
    try:
        with Image.open(path) as img:
            turned = _orientation(img) in (5, 6, 7, 8)  # a quarter turn: decode_image swaps the sides
            if turned and img.format == "TIFF" and img.size != (img.tag_v2.get(256), img.tag_v2.get(257)):
                turned = False  # Pillow (13) has turned this TIFF itself: its size is no longer the stored one
            return (img.width, img.height) if turned else (img.height, img.width)
    except Image.DecompressionBombError as e:  # its header is read; Pillow refuses the size it states
        raise BadImageError(path, f"refused as a decompression bomb ({e})") from e
    except MemoryError:
        raise
    except Exception as e:  # OSError, SyntaxError, ... and whatever else a corrupt header makes Pillow raise
        raise BadImageError(path, f"cannot read image header ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------------------------------
# Base class


class LabelledImages(torch.utils.data.Dataset):
    """Base of every source: index -> (PIL RGB image, int label). Subclasses set the attributes."""

    name: str
    classes: list[str]
    targets: list[int]
    flip: bool = True  # False where a horizontal flip changes the label's meaning (digits, text)
    multi_label: bool = False  # True: every target is a tuple of class indices (ImageNet-21k / JFT style)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """How a bad-image report names item ``i``; file-backed sources return the path."""
        return f"{self.name}[{i}]"

    def size_of(self, i: int) -> tuple[int, int]:
        """(height, width) of item ``i``; this fallback decodes, file-backed sources read only the header."""
        img, _ = self[i]
        return img.height, img.width

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        """A view on some items, for splits and few-shot samples; classes stay whole so labels keep meaning."""
        return _Subset(self, indices)

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} with {n} items")
        return i % n

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, items={len(self)}, classes={len(self.classes)})"


class _Subset(LabelledImages):
    """Items of a parent by index; nested subsets collapse onto the root so lookups stay one level deep."""

    def __init__(self, parent: LabelledImages, indices: Sequence[int] | np.ndarray) -> None:
        idx = index_array(indices, len(parent), parent.name)  # an array: forked loader workers share it (packed.py)
        if isinstance(parent, _Subset):
            idx = parent.indices[idx]
            parent = parent.parent
        self.parent = parent
        self.indices = idx
        self.name = parent.name
        self.classes = list(parent.classes)
        self.flip = parent.flip
        self.multi_label = parent.multi_label
        targets = parent.targets  # packed multi-label tuples stay packed (packed.py)
        self.targets = targets.take(idx) if isinstance(targets, PackedLabels) else [targets[i] for i in idx.tolist()]

    def _parent_index(self, i: int) -> int:
        return int(self.indices[self._check_index(i)])

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.parent[self._parent_index(i)]

    def describe(self, i: int) -> str:
        return self.parent.describe(self._parent_index(i))

    def size_of(self, i: int) -> tuple[int, int]:
        return self.parent.size_of(self._parent_index(i))


class _Relabelled(LabelledImages):
    """A parent's items under another class list: `index[label]` is a parent label's place in `classes`;
    with `multi_label`, a single label becomes a one-label tuple."""

    def __init__(self, parent: LabelledImages, classes: Sequence[str], index: Sequence[int],
                 multi_label: bool) -> None:
        self.parent, self.index = parent, list(index)
        self.name, self.classes = parent.name, list(classes)
        self.flip, self.multi_label = parent.flip, multi_label
        if isinstance(parent.targets, PackedLabels):
            self.targets = parent.targets.relabel(np.asarray(self.index))
        elif multi_label and not parent.multi_label:  # one-label tuples, packed
            n = len(parent.targets)
            self.targets = PackedLabels.from_arrays(np.asarray(self.index)[np.asarray(parent.targets, np.int64)],
                                                    np.arange(1, n + 1))
        else:
            self.targets = [self._relabel(t) for t in parent.targets]

    def _relabel(self, target: int | tuple[int, ...]) -> int | tuple[int, ...]:
        if self.parent.multi_label:
            return tuple(self.index[t] for t in target)
        return (self.index[target],) if self.multi_label else self.index[target]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, target = self.parent[i]
        return image, self._relabel(target)

    def describe(self, i: int) -> str:
        return self.parent.describe(i)

    def size_of(self, i: int) -> tuple[int, int]:
        return self.parent.size_of(i)


def match_classes(classes: Sequence[Any], held_out: LabelledImages, multi_label: bool = False) -> LabelledImages:
    """`held_out` labelled with the indices of the training data's `classes` (as one-label tuples where the
    training data is `multi_label` and `held_out` is not). Every source numbers its own classes (an image folder
    its sub-folders in sorted order), so a test folder that lacks one training class would otherwise shift
    every label after it. Matched by name; a class the training data lacks is an error."""
    names = [str(c) for c in classes]
    if held_out.multi_label and not multi_label:
        raise ValueError(f"{held_out.name} has several labels per image; the training data has one")
    if [str(c) for c in held_out.classes] == names and held_out.multi_label == multi_label:
        return held_out
    index = {c: i for i, c in enumerate(names)}
    unknown = [str(c) for c in held_out.classes if str(c) not in index]
    if unknown:
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValueError(f"{held_out.name} has classes that the training data lacks: {', '.join(unknown[:10])}{more}")
    return _Relabelled(held_out, names, [index[str(c)] for c in held_out.classes], multi_label)


class _FileImages(LabelledImages):
    """Shared behaviour of sources whose items are image files: decode on access, header-only sizes."""

    paths: PackedStrings  # not a list: forked loader workers would copy it (packed.py)
    root: str  # a held-out part carved from the source hashes its paths relative to this (`_held_out_items`)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        return decode_image(self.paths[i]), self.targets[i]

    def describe(self, i: int) -> str:
        return self.paths[self._check_index(i)]

    def size_of(self, i: int) -> tuple[int, int]:
        return _file_size(self.paths[self._check_index(i)])


# ---------------------------------------------------------------------------------------------------------------------
# Sources


class ImageFolderImages(_FileImages):
    """``root/<class>/**/<image>``: classes and order as torchvision's ImageFolder gives them, except that hidden
    names (``.ipynb_checkpoints``, macOS's ``._x.jpg`` twins and ``__MACOSX``) are skipped, as `ImageFiles` skips
    them, and that inside a class folder a link to the root, to a class folder or to a folder already read for
    this class is not entered (a link up the tree listed images without end, other classes' under this one's
    label). Other links are followed, as torchvision follows them."""

    def __init__(self, root: str | os.PathLike) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        # absolute, its files too (a run folder compares them on a re-run); ".." resolved where the system resolves
        # it, after a link, not by text, which led elsewhere
        root = self.root = os.path.realpath(root) if ".." in Path(root).parts else os.path.abspath(root)
        self.name = f"folder:{root}"
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _hidden(e.name))
        if not self.classes:
            raise FileNotFoundError(f"{root}: no class folders (expected {root}/<class>/<images>)")
        tops = {_folder_id(root)} | {_folder_id(os.path.join(root, c)) for c in self.classes}
        paths, self.targets = [], []
        skipped: collections.Counter[str] = collections.Counter()
        for target, name in enumerate(self.classes):
            found = []
            for folder, files in sorted(_walk_once(os.path.join(root, name), set(tops))):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        found.append(os.path.join(folder, f))
                    elif f.lower().endswith(_UNREAD_IMAGE_SUFFIXES):
                        skipped[os.path.splitext(f)[1].lower()] += 1
            if not found:
                raise ValueError(f"{root}: class folder {name!r} holds no image files "
                                 f"(looked for {', '.join(IMG_EXTENSIONS)})")
            paths += found
            self.targets += [target] * len(found)
        self.paths = PackedStrings(paths)
        if skipped:
            log.warning("%s: %s left out: image folders read %s, as torchvision's ImageFolder does (convert them)",
                        root, ", ".join(f"{n} {s} file{'s' * (n > 1)}" for s, n in sorted(skipped.items())),
                        " ".join(IMG_EXTENSIONS))


class ImageFiles(_FileImages):
    """Unlabelled images for inference: the files named, and every image under a folder named (recursively,
    sorted, with the extensions ImageFolder reads, hidden names skipped), in that order. A name that does not
    exist fails here, up front; a file that does not decode is reported per image by the loader."""

    def __init__(self, names: Sequence[str | os.PathLike]) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.name, self.classes, paths = "images", [], []
        for name in map(os.fspath, names):
            if os.path.isdir(name):
                found = sorted(os.path.join(d, f) for d, files in _walk_once(name) for f in files
                               if f.lower().endswith(IMG_EXTENSIONS))
                if not found:
                    raise ValueError(f"{name}: no image files in this folder (looked for {', '.join(IMG_EXTENSIONS)})")
                paths += found
            elif os.path.exists(name):
                paths.append(name)
            else:
                raise FileNotFoundError(f"{name}: no such image file or folder")
        if not paths:
            raise ValueError("no image files given")
        self.paths, self.targets = PackedStrings(paths), [0] * len(paths)


_UNREAD_IMAGE_SUFFIXES = (".gif", ".jfif", ".avif", ".heic", ".heif", ".jp2", ".jxl", ".ico", ".tga")


def _hidden(name: str) -> bool:
    """Not data: dot-files and folders (macOS's ``._x.jpg`` resource forks, ``.ipynb_checkpoints``) and the
    ``__MACOSX`` folder of zip archives made on a Mac."""
    return name.startswith(".") or name == "__MACOSX"


def _folder_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_once(root: str, seen: set[tuple[int, int]] | None = None) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) under `root`, hidden names left out, following links to folders but entering each
    folder once: a link back up the tree would otherwise list the same images again and again. `seen`: folders
    not to enter (but `root` itself); it gains those entered."""
    seen = set() if seen is None else seen
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not _hidden(d))  # sorted: which link is followed is fixed
        key = _folder_id(folder)
        if key in seen and folder != root:
            subfolders.clear()
            continue
        seen.add(key)
        yield folder, [f for f in files if not _hidden(f)]


class CsvImages(_FileImages):
    """A ``path,label`` manifest: for datasets whose labels live in a spreadsheet rather than folder names.

    A label cell may name several classes separated by ``;`` (multi-label data, as ImageNet-21k): then
    every target is a tuple of class indices and ``multi_label`` is True.

    Every row is checked up front (columns present, file exists, listed once) so a typo fails at startup with
    its line number.
    """

    def __init__(self, csv_path: str | os.PathLike) -> None:
        csv_path = os.fspath(csv_path)
        self.name = f"csv:{os.path.abspath(csv_path)}"
        self.root = os.path.dirname(os.path.abspath(csv_path))  # what its relative paths are relative to
        paths, labels = _manifest_rows(csv_path)
        if not paths:
            raise ValueError(f"{csv_path}: the manifest lists no images")
        self.paths = PackedStrings(paths)
        if any(";" in x for x in labels):
            self.multi_label = True
            parts = [tuple(sorted({p.strip() for p in x.split(";") if p.strip()})) for x in labels]
            self.classes = sorted({c for p in parts for c in p})
            index = {c: k for k, c in enumerate(self.classes)}
            self.targets = PackedLabels(tuple(index[c] for c in p) for p in parts)
            return
        if not all(re.fullmatch(r"[+-]?[0-9]+", x) for x in labels):
            self.classes = sorted(set(labels))
            index = {c: k for k, c in enumerate(self.classes)}
            self.targets = [index[x] for x in labels]
        else:  # integer labels sort as numbers (2 before 10), and "01" and "1" are the same class
            ints = [int(x) for x in labels]
            self.classes = [str(v) for v in sorted(set(ints))]
            index = {c: k for k, c in enumerate(self.classes)}
            self.targets = [index[str(v)] for v in ints]


def _manifest_rows(csv_path: str) -> tuple[list[str], list[str]]:
    """(image paths, label cells) of a ``path,label`` manifest, every row checked, errors naming the line."""
    base = os.path.dirname(os.path.abspath(csv_path))
    paths: list[str] = []
    labels: list[str] = []
    first_line: dict[str, int] = {}
    line = 1
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in fields]
            if missing:
                raise ValueError(f"{csv_path}, line 1: header must name columns 'path' and 'label'; missing {missing} "
                                 f"(found {fields})")
            reader.fieldnames = fields
            for row in reader:
                line = reader.line_num
                rel = (row.get("path") or "").strip()
                label = (row.get("label") or "").strip()
                if not rel or not label:
                    raise ValueError(f"{csv_path}, line {line}: empty 'path' or 'label' in {row}")
                if not any(part.strip() for part in label.split(";")):
                    raise ValueError(f"{csv_path}, line {line}: label {label!r} names no class")
                path = rel if os.path.isabs(rel) else os.path.join(base, rel)
                if not os.path.isfile(path):
                    raise ValueError(f"{csv_path}, line {line}: image file not found: {path}")
                first = first_line.setdefault(os.path.normpath(path), line)
                if first != line:  # else a held-out part carved from this manifest could hold training images
                    raise ValueError(f"{csv_path}, line {line}: {rel} is listed again (first on line {first}); "
                                     "one row per image, with its classes as 'a;b'")
                paths.append(path)
                labels.append(label)
    except UnicodeDecodeError as e:  # a spreadsheet saved in its local encoding (Latin-1, ...)
        raise ValueError(f"{csv_path}, after line {line}: not UTF-8 text ({e.reason}); save it as UTF-8") from e
    return paths, labels


class DigitsImages(LabelledImages):
    """scikit-learn's bundled handwritten digits (8x8): real images that need no download, for smoke tests and CI.

    The train/test split is fixed (stratified, seed 0) so numbers are comparable across runs and machines.
    """

    TEST_SIZE = 797

    def __init__(self, split: str = "train") -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        split = {"val": "test", "validation": "test"}.get(split, split)
        if split not in ("train", "test"):
            raise ValueError(f"digits split must be 'train' or 'test' (or 'val'), got {split!r}")
        digits = load_digits()
        all_idx = np.arange(len(digits.target))
        train_idx, test_idx = train_test_split(
            all_idx, test_size=self.TEST_SIZE, random_state=0, stratify=digits.target
        )
        self.indices = [int(i) for i in (train_idx if split == "train" else test_idx)]  # into load_digits()
        pixels = np.rint(digits.images[self.indices] * (255.0 / 16.0))
        self.pixels = np.clip(pixels, 0, 255).astype(np.uint8)  # (N, 8, 8)
        self.targets = [int(digits.target[i]) for i in self.indices]
        self.classes = [str(d) for d in range(10)]
        self.name = "digits"
        self.split = split
        self.flip = False  # a mirrored 2, 3, 7 ... is not that digit

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        return Image.fromarray(self.pixels[i]).convert("RGB"), self.targets[i]

    def size_of(self, i: int) -> tuple[int, int]:
        self._check_index(i)
        return 8, 8


class TorchDatasetImages(LabelledImages):
    """Any map-style dataset of (image, label): image a PIL image, a CHW tensor or an HWC array.

    Targets come from ``dataset.targets`` when it exists; otherwise every item is loaded once at construction
    (a full pass, decoding every image) because labels must be known without decoding later.
    """

    def __init__(
        self, dataset: torch.utils.data.Dataset, classes: Sequence[str] | None = None, name: str | None = None
    ) -> None:
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        targets = getattr(dataset, "targets", None)
        if targets is None:
            targets = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
        self.targets = shared_labels(targets)
        if classes is None:
            classes = getattr(dataset, "classes", None)
        if classes is None:
            n = getattr(dataset, "num_classes", None) or (max(self.targets) + 1 if self.targets else 0)
            classes = [str(k) for k in range(int(n))]
        self.classes = [str(c) for c in classes]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        image, label = self.dataset[i]
        if isinstance(image, Image.Image):
            try:
                image.load()
                rgb = _to_rgb(image)
            except (OSError, SyntaxError, ValueError) as e:
                raise BadImageError(self.describe(i), f"cannot decode ({e})") from e
        else:
            rgb = _array_to_rgb(image)
        return rgb, int(label)


@dataclass(frozen=True)
class _TorchvisionSpec:
    """How to build one torchvision dataset and read its labels and raw samples without its transforms."""

    factory: Callable[[str, str, bool], Any]  # (root, our split, download) -> torchvision dataset
    targets: Callable[[Any], Sequence[int]]
    sample: Callable[[Any, int], Any]  # a file path (decoded by decode_image) or an HWC uint8 array
    classes: Callable[[Any], Sequence[Any]] = lambda ds: ds.classes
    downloadable: bool = True
    files: bool = True  # samples are file paths, read once into `PackedStrings`


def _train_or(split: str, held_out: str) -> str:
    return "train" if split == "train" else held_out


def _cifar(cls_name: str) -> _TorchvisionSpec:
    def factory(root: str, split: str, download: bool) -> Any:
        import torchvision.datasets as tvd

        return getattr(tvd, cls_name)(root, train=split == "train", download=download)

    return _TorchvisionSpec(factory, lambda ds: ds.targets, lambda ds, i: ds.data[i], files=False)


def _pets(root: str, split: str, download: bool) -> Any:
    from torchvision.datasets import OxfordIIITPet

    return OxfordIIITPet(root, split="trainval" if split in ("train", "trainval") else "test", download=download)


def _flowers(root: str, split: str, download: bool) -> Any:
    from torchvision.datasets import Flowers102

    return Flowers102(root, split={"validation": "val"}.get(split, split), download=download)


def _imagenet(root: str, split: str, download: bool) -> Any:
    from torchvision.datasets import ImageNet

    return ImageNet(root, split=_train_or(split, "val"))  # test labels were never released: test means val


_TORCHVISION: dict[str, _TorchvisionSpec] = {
    "cifar10": _cifar("CIFAR10"),
    "cifar100": _cifar("CIFAR100"),
    "pets": _TorchvisionSpec(_pets, lambda ds: ds._labels, lambda ds, i: ds._images[i]),
    "flowers102": _TorchvisionSpec(_flowers, lambda ds: ds._labels, lambda ds, i: ds._image_files[i]),
    "imagenet": _TorchvisionSpec(
        _imagenet,
        lambda ds: ds.targets,
        lambda ds, i: ds.samples[i][0],
        classes=lambda ds: [c[0] if isinstance(c, tuple) else c for c in ds.classes],  # ("tench", "Tinca tinca")
        downloadable=False,
    ),
}


class TorchvisionImages(LabelledImages):
    """A torchvision standard dataset read through its own class; one adapter for all of them (see _TORCHVISION).

    We bypass its ``__getitem__`` to decode files with :func:`decode_image` (RGB, named errors) and to read
    labels from its internal lists without touching any image.
    """

    def __init__(self, kind: str, root: str | os.PathLike = "./data", split: str = "train", download: bool = False):
        if kind not in _TORCHVISION:
            raise ValueError(f"unknown torchvision dataset {kind!r}; known: {sorted(_TORCHVISION)}")
        spec = _TORCHVISION[kind]
        root = os.fspath(root)
        if split not in ("train", "trainval", *_HELD_OUT):
            raise ValueError(f"{kind} split must be train, val or test, got {split!r}")
        if download and not spec.downloadable:
            raise ValueError(
                f"{kind} cannot be downloaded automatically; place its official archives in {os.path.abspath(root)}"
            )
        try:
            ds = spec.factory(root, split, download)
        except (RuntimeError, FileNotFoundError) as e:
            hint = (
                "pass download=True (`--download` on the command line) where a network is available"
                if spec.downloadable
                else "download the archives by hand into that folder"
            )
            why = str(e).rstrip(".")
            raise FileNotFoundError(
                f"{kind} not found (or corrupt) under {os.path.abspath(root)}: {why}. To fetch it, {hint}."
            ) from e
        self.name = kind
        self.split = split
        self.root = root
        self.classes = [str(c) for c in spec.classes(ds)]
        self.targets = shared_labels(spec.targets(ds))
        # file paths are packed and the dataset's own lists (ImageNet's 1.28M (path, label) tuples) let go:
        # forked loader workers would copy them (packed.py); array data is read from the dataset
        self.paths = PackedStrings(os.fspath(spec.sample(ds, i)) for i in range(len(self))) if spec.files else None
        self.dataset, self._sample = (None, None) if spec.files else (ds, spec.sample)

    def _raw(self, i: int) -> Any:
        i = self._check_index(i)
        return self.paths[i] if self.paths is not None else self._sample(self.dataset, i)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        raw = self._raw(i)
        if isinstance(raw, str | os.PathLike):
            return decode_image(raw), self.targets[self._check_index(i)]
        return _array_to_rgb(raw), self.targets[self._check_index(i)]

    def describe(self, i: int) -> str:
        raw = self._raw(i)
        return os.fspath(raw) if isinstance(raw, str | os.PathLike) else f"{self.name}[{i}]"

    def size_of(self, i: int) -> tuple[int, int]:
        raw = self._raw(i)
        if isinstance(raw, str | os.PathLike):
            return _file_size(os.fspath(raw))
        return int(raw.shape[0]), int(raw.shape[1])


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def measure_image_size(data: LabelledImages, sample: int = 256, seed: int = 0) -> tuple[int, int]:
    """Median (height, width) over a seeded sample of items: what the HyperRule resolution rule needs.

    Median, not mean, so a few huge or tiny outliers don't move the chosen resolution; header reads keep it cheap.
    """
    n = len(data)
    if n == 0:
        raise ValueError(f"cannot measure image size of empty dataset {data.name}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    sizes = []
    for i in idx:
        try:
            sizes.append(data.size_of(int(i)))
        except BadImageError:  # reported by path when training meets it; one bad file must not stop planning
            continue
    if not sizes:
        raise ValueError(f"no readable image among the {len(idx)} sampled from {data.name}")
    h, w = np.median(np.array(sizes), axis=0)
    return int(np.rint(h)), int(np.rint(w))


def _held_out_items(whole: _FileImages, val_fraction: float, seed: int) -> np.ndarray:
    """Which items of a folder tree or CSV manifest are held out (a bool per item): those whose path (relative to
    the tree or the manifest's folder) hashes, with the seed, below ``val_fraction``.

    Why a hash of each name alone, and not a shuffled list or a rule per class: an image's part depends on
    nothing else, so images added to the data later (or removed) never move an earlier one between the parts,
    and a model trained before is never scored on its own training images after. The price: a small class may
    have no image in one of the parts (`_held_out_part` says so)."""
    prefix = os.path.join(whole.root, "")  # what a folder's paths start with (os.path.relpath takes 3x longer)
    return np.fromiter((_unit_hash(f"{seed}/{_relative_name(path, whole.root, prefix)}") < val_fraction
                        for path in whole.paths), bool, len(whole))


def _relative_name(path: str, root: str, prefix: str) -> str:
    if path.startswith(prefix):
        name = path[len(prefix):]
    else:
        try:
            name = os.path.relpath(path, root)
        except ValueError:  # Windows: a CSV row on another drive than the manifest
            name = os.path.abspath(path)
    return os.path.normpath(name).replace(os.sep, "/")


def _unit_hash(key: str) -> float:
    """A number in [0, 1) fixed by `key`, the same on every machine and Python (unlike `hash`)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8)  # a name's bytes, as on disk
    return int.from_bytes(digest.digest(), "big") / 2.0**64


HELD_OUT_PART = "held-out part"  # how the name of a source carved from its data ends (`_held_out_part`)


def _held_out_part(whole: _FileImages, split: str, val_fraction: float, seed: int) -> LabelledImages:
    """The "train" part of a source with no splits of its own, or the held-out rest for any other split. Its
    name says which part it is: a run folder that recorded the whole data, or a part carved otherwise (before
    `_held_out_items`), is not the same data."""
    return _carved_part(whole, split == "train", _held_out_items(whole, val_fraction, seed), val_fraction)


def held_out_rest(training_part: LabelledImages) -> LabelledImages | None:
    """The held-out part of the data a training part was carved from by `open_dataset` (None for any other
    source): the same as ``open_dataset(spec, "eval")``, without reading the folder or manifest again and
    hashing every name again (both parts of a 300,000-row CSV: 1.8 s, where opening each part took 3.7)."""
    carving = getattr(training_part, "_carving", None)
    if carving is None:
        return None
    held, val_fraction = carving
    return _carved_part(training_part.parent, False, held, val_fraction)


def _carved_part(whole: _FileImages, train: bool, held: np.ndarray, val_fraction: float) -> LabelledImages:
    part = whole.subset(np.flatnonzero(held != train))
    part.name = f"{whole.name} ({'training part' if train else HELD_OUT_PART})"
    if train:
        part._carving = (held, val_fraction)  # for `held_out_rest`
    if not len(part):
        message = (f"{whole.name}: {'every one' if train else 'none'} of its {len(whole)} image"
                   f"{'s' * (len(whole) > 1)} was drawn for "
                   f"the held-out part (about {val_fraction:.0%} are, by a hash of each file's name); give "
                   "evaluation data of its own (--eval-data)")
        raise ValueError(message) if train else MissingSplit(message)
    if train and not whole.multi_label:
        unseen = sorted(set(whole.targets) - set(part.targets))
        if unseen:
            log.warning("%s: every image of class %s was drawn for the held-out part: it is not trained on "
                        "(add images to it, or give evaluation data of its own: --eval-data)", whole.name,
                        ", ".join(repr(whole.classes[c]) for c in unseen[:10]) + (" ..." if len(unseen) > 10 else ""))
    return part


_SPLIT_DIRS = {
    "train": ("train",),
    "val": ("val", "validation"),
    "validation": ("validation", "val"),
    "test": ("test",),
    "eval": ("test", "val", "validation"),  # the held-out part, whatever it is called
    # what `bit shards` writes: every image of a one-split source or a single class tree, else the training split
    "all": ("train",),
}

_SPEC_HELP = (
    "accepted dataset specs: 'digits'; 'glyphs[:PER_CLASS]', 'fractals[:CLASSES]' (generated); 'cifar10[:ROOT]', "
    "'cifar100[:ROOT]', 'pets[:ROOT]', 'flowers102[:ROOT]', "
    "'imagenet[:ROOT]' (ROOT defaults to ./data); a path to a .csv manifest with columns path,label; a folder of "
    "shards written by `bit shards`; or a directory of class folders, optionally inside train/ val/ test/ sub-folders"
)


def open_dataset(
    spec: str,
    split: str = "train",
    *,
    download: bool = False,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    hold_out: bool = True,
) -> LabelledImages:
    """Turn a command-line dataset spec into a source; see ``_SPEC_HELP`` for the forms.

    A single class-folder tree or CSV manifest has no held-out part, so one is carved out deterministically
    (``split_seed``, `_held_out_items`): about ``val_fraction`` of the images, each chosen by a hash of its file's
    name, is "val"/"test"/"eval", the rest "train". With ``hold_out=False`` (the held-out data comes from
    elsewhere) every split of it is all of it. Shards cannot be carved: they are all of it, or refused as
    held-out data.
    """
    if split not in _SPLIT_DIRS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_DIRS)}, got {split!r}")
    standard = {"eval": "test", "all": "train"}.get(split, split)  # for data that comes with its own splits
    if spec == "digits":
        return DigitsImages(standard)
    kind, _, arg = spec.partition(":")
    if kind in ("glyphs", "fractals"):  # generated upstream data: "glyphs[:PER_CLASS]", "fractals[:CLASSES]"
        from .synthetic import FractalImages, GlyphImages

        part = {"val": "test", "validation": "test"}.get(standard, standard)
        if kind == "glyphs":
            return GlyphImages(per_class=int(arg or 100), split=part)
        return FractalImages(classes=int(arg or 100), split=part)
    kind, _, root = spec.partition(":")
    if kind in _TORCHVISION:  # names always mean torchvision; write ./pets for a local folder called pets
        return TorchvisionImages(kind, root or "./data", standard, download=download)
    path = Path(spec).expanduser()
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if path.suffix.lower() == ".csv" or (path / "manifest.json").is_file():
        if path.suffix.lower() == ".csv":
            if not path.is_file():
                raise FileNotFoundError(f"CSV manifest not found: {path}")
            whole: LabelledImages = CsvImages(path)
        else:  # shards written by `bit shards`
            from .shards import ShardImages

            whole = ShardImages(path)
        carve = hold_out and isinstance(whole, CsvImages)
        if split == "all" or not hold_out or (split == "train" and not carve):
            return whole
        if not carve:  # never evaluate on the training data by accident
            raise MissingSplit(f"{path} holds a single split and no held-out part can be taken from it "
                               "(streamed shards); give other evaluation data (--eval-data)")
        return _held_out_part(whole, split, val_fraction, split_seed)
    if path.is_dir():
        present = [d for d in ("train", "val", "validation", "test") if (path / d).is_dir()]
        for candidate in _SPLIT_DIRS[split]:
            if (path / candidate).is_dir():
                return ImageFolderImages(path / candidate)
        if present:
            raise MissingSplit(f"{path} has split folders {present} but none for split {split!r}")
        tree = ImageFolderImages(path)
        return tree if split == "all" or not hold_out else _held_out_part(tree, split, val_fraction, split_seed)
    raise ValueError(f"unknown dataset spec {spec!r} (not a known name, .csv file or directory); {_SPEC_HELP}")
