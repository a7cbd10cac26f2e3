"""Decode a dataset once into one uint8 array: for small sets (CIFAR, VTAB-1k, generated upstream
data) the per-epoch decode or render cost disappears, and the array can live on a GPU too."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from .parallel import map_with_progress
from .sources import BadImageError, LabelledImages

log = logging.getLogger("bigtransfer")


class InMemoryImages(LabelledImages):
    """Every image of `source` decoded into an (N, H, W, 3) uint8 array. Images of several sizes are resized to
    a `size` square: fine-tuning passes the side its training transform resizes every image to first, so the copy
    changes nothing. An unreadable image keeps its index (a blank in the array) and raises its `BadImageError`
    when read, as from the files: the training loop reports it and leaves it out."""

    def __init__(self, source: LabelledImages, size: int | None = None, workers: int = 1,
                 progress: bool = False) -> None:
        self.name, self.classes, self.flip = f"memory:{source.name}", list(source.classes), source.flip
        self.multi_label, self.targets = source.multi_label, list(source.targets)
        self._describe = [source.describe(i) for i in range(len(source))] if len(source) <= 100_000 else None
        chunks = [range(i, min(i + 2048, len(source))) for i in range(0, len(source), 2048)]
        parts = map_with_progress(_decode_chunk, source, [(c,) for c in chunks], workers=workers, total=len(source),
                                  description=f"decoding {source.name} into memory", size=len, progress=progress,
                                  transient=True)
        images = [image for part in parts for image in part]  # one pass, at their own sizes
        self.bad = {i: image for i, image in enumerate(images) if isinstance(image, BadImageError)}
        if self.bad:
            log.warning("%s: %d unreadable image(s) kept out of training, the first %s", source.name, len(self.bad),
                        next(iter(self.bad.values())))
        shapes = sorted({image.shape for image in images if not isinstance(image, BadImageError)})
        if len(shapes) > 1:  # only now is it known: one size is kept as it is (CIFAR stays 32 px, not 160)
            if size is None:
                shown = ", ".join(f"{h}x{w}" for h, w, _ in shapes[:3]) + (", ..." if len(shapes) > 3 else "")
                raise ValueError(f"{source.name}: images of {len(shapes)} sizes ({shown}) cannot share one in-memory "
                                 "array without a size to resize them to; leave out --in-memory")
            images = [image if isinstance(image, BadImageError) else _resized(image, size) for image in images]
            shapes = [(size, size, 3)]
        blank = np.zeros(shapes[0] if shapes else (1, 1, 3), np.uint8)
        images = [blank if isinstance(image, BadImageError) else image for image in images]
        self.images = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        if i in self.bad:
            raise BadImageError(self.bad[i].path, self.bad[i].reason)
        return Image.fromarray(self.images[i]), self.targets[i]

    def describe(self, i: int) -> str:
        return self._describe[i] if self._describe is not None else super().describe(i)

    def size_of(self, i: int) -> tuple[int, int]:
        return self.images.shape[1], self.images.shape[2]


def _decode_chunk(source: LabelledImages, indices: range) -> list[np.ndarray | BadImageError]:
    out: list[np.ndarray | BadImageError] = []
    for i in indices:
        try:
            out.append(np.asarray(source[i][0], dtype=np.uint8))
        except BadImageError as e:
            out.append(BadImageError(e.path, e.reason))  # kept: without the decoder's frames and bytes
    return out


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    """As the PIL path resizes it (bilinear), so that the copy equals what the transform would make."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
