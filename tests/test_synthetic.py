"""Generated upstream data: deterministic, no digits among the glyphs, the promised class counts."""

import unicodedata
from collections import Counter

import numpy as np

from bigtransfer.data import open_dataset
from bigtransfer.data.synthetic import FractalImages, GlyphImages, glyph_table


def pixels(img):
    return np.asarray(img)


def test_glyph_classes_are_hundreds_and_never_digits():
    chars, fonts = glyph_table()
    assert 300 <= len(chars) <= 2000 and len(set(chars)) == len(chars)
    assert not any(unicodedata.category(c).startswith("N") for c in chars)  # no digit of any script
    assert not set("0123456789") & set(chars)
    assert {"A", "g", "?", "&", "λ", "Ж", "→", "∑"} <= set(chars)
    assert all(len(f) >= 4 for f in fonts)


def test_glyphs_are_deterministic_and_splits_differ():
    a, b = GlyphImages(per_class=3, classes=50, seed=0), GlyphImages(per_class=3, classes=50, seed=0)
    assert len(a) == 150 and Counter(a.targets) == {c: 3 for c in range(50)}
    for i in (0, 77, 149):
        img, label = a[i]
        assert img.size == (32, 32) and img.mode == "RGB" and label == i // 3
        assert np.array_equal(pixels(img), pixels(b[i][0]))
    test = GlyphImages(per_class=3, classes=50, split="test")
    other_seed = GlyphImages(per_class=3, classes=50, seed=1)
    assert not np.array_equal(pixels(a[5][0]), pixels(test[5][0]))
    assert not np.array_equal(pixels(a[5][0]), pixels(other_seed[5][0]))
    assert a.flip is False and a.classes[a.chars.index("A")].endswith("LATIN CAPITAL LETTER A")
    assert pixels(a[0][0]).max() > 100  # white strokes on black, like the digits downstream


def test_fractals_are_deterministic_with_one_system_per_class():
    f = FractalImages(classes=6, per_class=2, size=32)
    assert len(f) == 12 and f.classes == [f"ifs{c:04d}" for c in range(6)]
    img, label = f[5]
    assert label == 2 and (pixels(img) > 0).sum() > 30
    assert np.array_equal(pixels(img), pixels(FractalImages(classes=6, per_class=2, size=32)[5][0]))
    assert not np.array_equal(pixels(f[4][0]), pixels(f[5][0]))  # instances of a class differ


def test_specs():
    g = open_dataset("glyphs:2", "train")
    assert len(g) == 2 * len(g.classes) and open_dataset("glyphs:2", "eval").name.split(":")[3] == "test"
    assert len(open_dataset("fractals:5", "all").classes) == 5
