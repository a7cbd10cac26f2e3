"""Decode a dataset once into one uint8 array: for small sets (CIFAR, VTAB-1k, generated upstream
data) the per-epoch decode or render cost disappears, and the array can live on a GPU too."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .parallel import map_with_progress
from .sources import BadImageError, LabelledImages


class InMemoryImages(LabelledImages):
    """Every image of `source` decoded into an (N, H, W, 3) uint8 array. Images of several sizes are resized to
    a `size` square: fine-tuning passes the HyperRule's resize side, to which its training transform resizes
    every image first anyway, so the copy changes nothing. Bad images are reported by path when the array is
    built, not later."""

    def __init__(self, source: LabelledImages, size: int | None = None, workers: int = 1,
                 progress: bool = False) -> None:
        self.name, self.classes, self.flip = f"memory:{source.name}", list(source.classes), source.flip
        self.multi_label, self.targets = source.multi_label, list(source.targets)
        sizes = sorted({source.size_of(i) for i in range(len(source))})  # headers only, for file sources
        if len(sizes) <= 1:
            size = None  # one size: kept as it is (CIFAR stays 32 px, not 160)
        elif size is None:
            shown = ", ".join(f"{h}x{w}" for h, w in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
            raise ValueError(f"{source.name}: images of {len(sizes)} sizes ({shown}) cannot share one in-memory array "
                             "without a size to resize them to; leave out --in-memory")
        self._describe = [source.describe(i) for i in range(len(source))] if len(source) <= 100_000 else None
        chunks = [(range(i, min(i + 2048, len(source))), size) for i in range(0, len(source), 2048)]
        parts = map_with_progress(_decode_chunk, source, chunks, workers=workers, description=f"decoding {source.name} "
                                  "into memory", total=len(source), size=len, progress=progress, transient=True)
        self.images = np.concatenate(parts) if parts else np.zeros((0, 1, 1, 3), np.uint8)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        return Image.fromarray(self.images[i]), self.targets[i]

    def describe(self, i: int) -> str:
        return self._describe[i] if self._describe is not None else super().describe(i)

    def size_of(self, i: int) -> tuple[int, int]:
        return self.images.shape[1], self.images.shape[2]


def _decode_chunk(source: LabelledImages, indices: range, size: int | None) -> np.ndarray:
    out = []
    for i in indices:
        try:
            image = source[i][0]
        except BadImageError as e:
            raise BadImageError(e.path, f"{e.reason}; an in-memory copy needs every image readable") from e
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.asarray(image, dtype=np.uint8))
    return np.stack(out)
