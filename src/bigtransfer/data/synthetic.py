"""Upstream data that needs no download: rendered glyphs and FractalDB-style fractals.

Both are deterministic functions of (seed, class, instance), so every machine with the same
package versions renders the same images, and a "dataset" of any size costs no disk.

* `GlyphImages`: letters, punctuation and symbols (never a digit: no character of Unicode category
  N*) rendered from the DejaVu and STIX fonts that matplotlib ships, white on black like the
  handwritten digits downstream, with random font, size, stroke width, affine jitter, blur, noise and
  a low-resolution round trip. Characters that render alike (Latin A and Greek Alpha) are merged.
* `FractalImages`: random iterated-function systems (Kataoka et al. 2020, FractalDB): each class is
  one IFS of 2-4 contractive affine maps; instances perturb one map and vary colour and pose.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .packed import shared_labels
from .sources import LabelledImages

GLYPHS_VERSION = 1  # bump when rendering changes: shipped weights record the version they were trained on
FRACTALS_VERSION = 1
_FONT_NAMES = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSansMono",
               "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "DejaVuSerif",
               "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "STIXGeneral", "STIXGeneralBol",
               "STIXGeneralItalic", "STIXGeneralBolIta")
_CATEGORIES = ("Lu", "Ll", "Lt", "Po", "Ps", "Pe", "Pd", "Pi", "Pf", "Sm", "Sc", "So")
_BLOCKS = ((0x0020, 0x00FF),  # Basic Latin, Latin-1
           (0x0370, 0x03FF), (0x0400, 0x045F),  # Greek, basic Cyrillic
           (0x2010, 0x205E), (0x20A0, 0x20BF), (0x2100, 0x214F),  # punctuation, currency, letter-like
           (0x2190, 0x21FF), (0x2200, 0x22FF), (0x25A0, 0x25FF), (0x2600, 0x26FF))  # arrows, maths, shapes, symbols


def font_paths() -> list[Path]:
    """The fonts glyphs are drawn from: shipped inside matplotlib, so every install has the same files."""
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [root / f"{name}.ttf" for name in _FONT_NAMES]


@functools.lru_cache(maxsize=1)
def glyph_table() -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """(characters, for each the indices of the fonts that have it): letters, punctuation and symbols
    present in at least 4 fonts, no digits, and one representative per set of look-alikes."""
    from fontTools.ttLib import TTFont

    cmaps = [set(TTFont(p, lazy=True).getBestCmap()) for p in font_paths()]
    chars, fonts, seen = [], [], set()
    for cp in sorted(set().union(*cmaps)):
        ch = chr(cp)
        in_blocks = any(lo <= cp <= hi for lo, hi in _BLOCKS)
        if not in_blocks or unicodedata.category(ch) not in _CATEGORIES or unicodedata.combining(ch):
            continue
        have = tuple(i for i, cmap in enumerate(cmaps) if cp in cmap)
        if len(have) < 4 or 0 not in have:
            continue
        look = _silhouette(ch)
        if look is None or look in seen:  # blank, or renders like a character already taken
            continue
        seen.add(look)
        chars.append(ch)
        fonts.append(have)
    return tuple(chars), tuple(fonts)


def _silhouette(ch: str) -> bytes | None:
    img = Image.new("L", (48, 48))
    ImageDraw.Draw(img).text((24, 24), ch, fill=255, font=_font(0, 32), anchor="mm")
    small = np.asarray(img.resize((12, 12), Image.Resampling.BOX)) > 64
    return None if small.sum() < 2 else hashlib.sha1(np.packbits(small).tobytes()).digest()


@functools.lru_cache(maxsize=512)
def _font(index: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_paths()[index]), size)


class GlyphImages(LabelledImages):
    """`per_class` rendered instances of every glyph class; split "train" and "test" use disjoint
    instance seeds. Images are `size` x `size`, white strokes on black."""

    flip = False  # mirrored characters are other characters

    def __init__(self, per_class: int = 100, split: str = "train", seed: int = 0, size: int = 32,
                 classes: int | None = None) -> None:
        chars, self._fonts = glyph_table()
        self.chars = chars[:classes] if classes else chars
        self.classes = [f"U+{ord(c):04X} {unicodedata.name(c, '?')}" for c in self.chars]
        self.per_class, self.size = per_class, size
        self.split_seed = {"train": 0, "test": 1}.get(split)
        if self.split_seed is None:
            raise ValueError(f"glyphs split must be 'train' or 'test', got {split!r}")
        self.seed = seed
        self.name = f"glyphs:v{GLYPHS_VERSION}:{len(self.chars)}x{per_class}:{split}:seed{seed}"
        self.targets = shared_labels(i // per_class for i in range(len(self.chars) * per_class))

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        label = self.targets[i]
        rng = np.random.default_rng([GLYPHS_VERSION, self.seed, self.split_seed, label, i % self.per_class])
        return render_glyph(self.chars[label], self._fonts[label], rng, self.size), label

    def size_of(self, i: int) -> tuple[int, int]:
        return self.size, self.size


def render_glyph(ch: str, fonts: tuple[int, ...], rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One random rendering: font, size, stroke, rotation/shear/offset, blur, low-res round trip, noise."""
    canvas = 2 * size
    font = _font(int(fonts[rng.integers(len(fonts))]), int(size * rng.uniform(0.55, 0.9)))
    img = Image.new("L", (canvas, canvas))
    ImageDraw.Draw(img).text((canvas / 2, canvas / 2), ch, fill=int(rng.integers(170, 256)), font=font,
                             anchor="mm", stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
    angle = np.deg2rad(rng.uniform(-15, 15))
    shear, scale = rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.15)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    dx, dy = rng.uniform(-0.12, 0.12, 2) * size
    c = canvas / 2  # inverse affine about the centre, output cropped to size x size
    a, b = cos, sin + shear * cos
    d, e = -sin, cos - shear * sin
    ox, oy = size / 2 + dx, size / 2 + dy
    matrix = (a, b, c - a * ox - b * oy, d, e, c - d * ox - e * oy)
    img = img.transform((size, size), Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        low = int(rng.integers(8, size // 2 + 1))
        img = img.resize((low, low), Image.Resampling.BOX).resize((size, size), Image.Resampling.BILINEAR)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(0, 12), (size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")


class FractalImages(LabelledImages):
    """FractalDB-style images: class = one random IFS, instance = a perturbed, recoloured, posed render."""

    def __init__(self, classes: int = 100, per_class: int = 100, split: str = "train", seed: int = 0,
                 size: int = 32, points: int = 3000) -> None:
        self.split_seed = {"train": 0, "test": 1}.get(split)
        if self.split_seed is None:
            raise ValueError(f"fractals split must be 'train' or 'test', got {split!r}")
        self.seed, self.per_class, self.size, self.points = seed, per_class, size, points
        self.systems = [_random_ifs(np.random.default_rng([FRACTALS_VERSION, seed, c])) for c in range(classes)]
        self.classes = [f"ifs{c:04d}" for c in range(classes)]
        self.name = f"fractals:v{FRACTALS_VERSION}:{classes}x{per_class}:{split}:seed{seed}"
        self.targets = shared_labels(i // per_class for i in range(classes * per_class))

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        i = self._check_index(i)
        label = self.targets[i]
        rng = np.random.default_rng([FRACTALS_VERSION, self.seed, self.split_seed, label, i % self.per_class, 7])
        maps = self.systems[label].copy()
        k = rng.integers(len(maps))
        maps[k, :4] *= rng.uniform(0.9, 1.1, 4)  # FractalDB's per-instance parameter jitter
        return render_ifs(maps, rng, self.size, self.points), label

    def size_of(self, i: int) -> tuple[int, int]:
        return self.size, self.size


def _random_ifs(rng: np.random.Generator) -> np.ndarray:
    """2-4 affine maps (a, b, c, d, e, f), each contractive, with a filling factor as FractalDB's sigma
    filter asks (sum of |det| in a band): neither a dust of points nor a filled square."""
    while True:
        n = int(rng.integers(2, 5))
        maps = rng.uniform(-1, 1, (n, 6))
        linear = maps[:, :4].reshape(n, 2, 2)
        if np.all(np.linalg.norm(linear, ord=2, axis=(1, 2)) < 0.95):
            dets = np.abs(np.linalg.det(linear))
            if 0.3 < dets.sum() < 0.9:
                return maps


def render_ifs(maps: np.ndarray, rng: np.random.Generator, size: int, points: int) -> Image.Image:
    """Chaos game: apply maps picked with probability proportional to |det|, plot the orbit. 100
    independent chains run side by side (vectorised), each past a burn-in of 20 steps."""
    linear, shift = maps[:, :4].reshape(-1, 2, 2), maps[:, 4:]
    p = np.abs(np.linalg.det(linear)) + 1e-3
    chains, burn_in = 100, 20
    steps = burn_in + -(-points // chains)
    choice = rng.choice(len(maps), size=(steps, chains), p=p / p.sum())
    xy, kept = rng.uniform(-1, 1, (chains, 2)), []
    for t in range(steps):
        k = choice[t]
        xy = np.einsum("nij,nj->ni", linear[k], xy) + shift[k]
        if t >= burn_in:
            kept.append(xy)
    orbit = np.concatenate(kept)[:points]
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    orbit = orbit @ rot.T
    lo, hi = orbit.min(0), orbit.max(0)
    scaled = (orbit - lo) / np.maximum(hi - lo, 1e-6) * (size - 3) + 1
    img = np.zeros((size, size, 3), np.uint8)
    color = rng.integers(80, 256, 3).astype(np.uint8)
    img[scaled[:, 1].astype(int), scaled[:, 0].astype(int)] = color
    return Image.fromarray(img)
