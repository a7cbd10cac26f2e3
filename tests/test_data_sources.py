"""Data sources on real files written here: decoding every colour mode, broken files, layouts, splits, adapters."""

import gc
import io
import os
import pickle
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
import torchvision.datasets.cifar
import torchvision.datasets.flowers102
from PIL import Image

from bigtransfer.data.packed import PackedLabels, PackedStrings
from bigtransfer.data.sources import (
    BadImageError,
    CsvImages,
    DigitsImages,
    ImageFiles,
    ImageFolderImages,
    LabelledImages,
    MissingSplit,
    TorchDatasetImages,
    _file_size,
    decode_image,
    match_classes,
    measure_image_size,
    open_dataset,
)
from bigtransfer.finetuning import open_sources
from images import make_image_folder


def _png(path: Path, size=(6, 4), color=(10, 20, 30)) -> Path:
    """A tiny RGB PNG of (width, height) ``size``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _tree(root: Path, counts: dict[str, int], size=(6, 4)) -> Path:
    for cls, n in counts.items():
        for k in range(n):
            _png(root / cls / f"{k}.png", size, (k, len(cls), 0))
    return root


# ---------------------------------------------------------------------------------------------------------------------
# decode_image


def test_decode_rgb_jpeg(tmp_path):
    p = tmp_path / "a.jpg"
    Image.new("RGB", (7, 5), (200, 100, 50)).save(p, quality=95)
    img = decode_image(p)
    assert img.mode == "RGB" and img.size == (7, 5)
    assert np.allclose(np.asarray(img)[2, 3], (200, 100, 50), atol=4)


def test_decode_grayscale_png(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (3, 2), 77).save(p)
    img = decode_image(p)
    assert img.mode == "RGB" and img.size == (3, 2)
    assert tuple(np.asarray(img)[0, 0]) == (77, 77, 77)


def test_decode_rgba_composites_on_white(tmp_path):
    p = tmp_path / "t.png"
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red
    arr[:, :2, 3] = 255  # left half opaque, right half fully transparent
    Image.fromarray(arr).save(p)
    px = np.asarray(decode_image(p))
    assert px.shape == (4, 4, 3)
    assert tuple(px[0, 0]) == (255, 0, 0)
    assert tuple(px[0, 3]) == (255, 255, 255)


def test_decode_palette_png_with_and_without_transparency(tmp_path):
    p = tmp_path / "p.png"
    Image.new("RGB", (5, 5), (0, 0, 255)).convert("P").save(p)
    with Image.open(p) as raw:
        assert raw.mode == "P"
    px = np.asarray(decode_image(p))
    assert px.shape == (5, 5, 3) and tuple(px[1, 1]) == (0, 0, 255)

    pt = tmp_path / "pt.png"
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    pal.save(pt, transparency=0)  # palette index 0 (black) is transparent
    px = np.asarray(decode_image(pt))
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[0, 1]) == (0, 255, 0)


def test_decode_cmyk_jpeg(tmp_path):
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    with Image.open(p) as raw:
        assert raw.mode == "CMYK"
    img = decode_image(p)
    assert img.mode == "RGB" and img.size == (8, 6)
    r, g, b = np.asarray(img)[3, 4].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_decode_16bit_png_scaled_not_clipped(tmp_path):
    p = tmp_path / "d.png"
    arr = np.array([[0, 1000, 32896], [65535, 65535, 0]], dtype=np.uint16)
    Image.fromarray(arr).save(p)
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    px = np.asarray(decode_image(p))
    assert px.shape == (2, 3, 3)
    # v * 255 / 65535, rounded: 1000 -> 3.89 -> 4 (clipping would give 255), 32896 -> 128
    assert list(px[0, :, 0]) == [0, 4, 128]
    assert list(px[1, :, 1]) == [255, 255, 0]


def test_decode_16bit_pgm_as_its_png_twin(tmp_path):
    """Pillow opens a 16-bit PGM as 32-bit "I" (maxval scaled to 65535): the same pixels as a 16-bit PNG, not
    stretched to the image's own range (a flat image came out white)."""
    arr = np.array([[30000, 30000], [30000, 0]], dtype=np.uint16)
    (tmp_path / "g.pgm").write_bytes(b"P5 2 2 65535\n" + arr.astype(">u2").tobytes())
    Image.fromarray(arr).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.pgm") as raw:
        assert raw.mode == "I"
    assert np.array_equal(np.asarray(decode_image(tmp_path / "g.pgm")), np.asarray(decode_image(tmp_path / "g.png")))
    assert np.asarray(decode_image(tmp_path / "g.pgm"))[0, 0, 0] == round(30000 * 255 / 65535)


def test_decode_32bit_float_scaled_by_range():
    from bigtransfer.data.sources import _to_rgb

    img = Image.fromarray(np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32))
    assert img.mode == "F"
    assert list(np.asarray(_to_rgb(img))[..., 0].ravel()) == [0, 64, 128, 255]
    unit = Image.fromarray(np.array([[0.5, 0.5], [0.5, 1.0]], dtype=np.float32))  # data in [0, 1] keeps its range
    assert list(np.asarray(_to_rgb(unit))[..., 0].ravel()) == [128, 128, 128, 255]


def test_decode_turns_a_photo_upright_by_its_exif_orientation(tmp_path):
    """Orientation 6 (a phone held upright): stored 64 wide with red left, shown 32 wide with red on top; the
    header-only size agrees with the decoded one."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32, 0] = arr[:, 32:, 2] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    for name in ("turned.jpg", "turned.tif"):  # Pillow turns a TIFF itself when it opens it; a JPEG on request
        img.save(tmp_path / name, exif=exif, quality=95)
        shown = np.asarray(decode_image(tmp_path / name)).astype(int)
        assert shown.shape == (64, 32, 3) and _file_size(str(tmp_path / name)) == (64, 32), name
        assert shown[8, 16, 0] > 200 > shown[8, 16, 2] and shown[56, 16, 2] > 200 > shown[56, 16, 0]


def test_a_corrupt_tiff_is_a_bad_image_whatever_pillow_raises(tmp_path):
    """One bit flipped in a TIFF's directory makes Pillow raise a TypeError, not an OSError: still a named bad
    image, which training leaves out, never an exception that stops the data loader."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 1, 3), dtype=np.uint8)).convert("1").save(buf, "TIFF")
    raw = bytearray(buf.getvalue())
    raw[60] ^= 1  # the type of the StripOffsets tag
    (tmp_path / "flipped.tif").write_bytes(raw)
    with pytest.raises(BadImageError, match=r"flipped.tif: corrupt image \(TypeError: "):
        decode_image(tmp_path / "flipped.tif")


def test_decode_one_transparent_colour_of_grey_and_rgb_pngs_is_white(tmp_path):
    """PNG's tRNS marks one colour transparent in L and RGB images too; palette and alpha images are white there."""
    for mode, key, grey in (("L", 0, 90), ("RGB", (0, 0, 0), (90, 90, 90)), ("I;16", 0, 90 * 257)):
        img = Image.new(mode, (2, 1), key)
        img.putpixel((1, 0), grey)
        img.save(tmp_path / "t.png", transparency=key)
        assert np.asarray(decode_image(tmp_path / "t.png"))[0, :, 0].tolist() == [255, 90], mode


def test_a_png_size_is_read_from_its_header(tmp_path):
    """Looking for an EXIF orientation must not decode a PNG (Pillow would, for an eXIf chunk after the pixels):
    measuring a dataset reads headers only, so even a truncated file has a size."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:200])
    assert _file_size(str(tmp_path / "cut.png")) == (40, 30)
    with pytest.raises(BadImageError, match="cut.png: corrupt or truncated"):
        decode_image(tmp_path / "cut.png")


def test_decode_bytes():
    buf = io.BytesIO()
    Image.new("L", (2, 3)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).size == (2, 3)
    with pytest.raises(BadImageError, match="mem"):
        decode_image(b"", describe="mem")


def _truncated_jpeg(tmp_path) -> Path:
    p = tmp_path / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _bomb_png(path: Path) -> Path:
    """A valid PNG whose header says 100,000 x 100,000 pixels, which Pillow refuses to open."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "text", "missing", "bomb"])
def test_decode_bad_files_name_the_path(tmp_path, kind):
    if kind == "truncated":
        p = _truncated_jpeg(tmp_path)
    elif kind == "bomb":  # planning reads only its header: that must be a bad image too, not a crash
        p = _bomb_png(tmp_path / "bomb.png")
        with pytest.raises(BadImageError, match="bomb.png: refused as a decompression bomb"):
            _file_size(str(p))
    else:
        p = tmp_path / f"{kind}.jpg"
        if kind == "random":
            p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        elif kind == "empty":
            p.write_bytes(b"")
        elif kind == "text":
            p.write_text("this is not a picture\n")
    with pytest.raises(BadImageError) as info:
        decode_image(p)
    err = info.value
    assert err.path == str(p) and str(p) in str(err) and err.reason
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))  # crosses DataLoader worker boundaries intact
    assert (again.path, again.reason) == (err.path, err.reason)


# ---------------------------------------------------------------------------------------------------------------------
# Folder, CSV, open_dataset


def test_image_folder(tmp_path):
    root = _tree(tmp_path / "tree", {"cat": 2, "dog": 3, "emu": 1}, size=(6, 4))
    ds = ImageFolderImages(root)
    assert isinstance(ds, LabelledImages)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.targets == [0, 0, 1, 1, 1, 2]
    assert len(ds) == 6 and ds.flip is True and ds.name == f"folder:{root}"
    assert ds.describe(2) == str(root / "dog" / "0.png")
    assert ds.size_of(0) == (4, 6)
    img, label = ds[5]
    assert img.mode == "RGB" and img.size == (6, 4) and label == 2

    sub = ds.subset([5, 2])
    assert sub.targets == [2, 1] and sub.classes == ds.classes and sub.name == ds.name and len(sub) == 2
    assert sub.describe(0) == str(root / "emu" / "0.png") and sub[1][1] == 1
    subsub = sub.subset([1])
    assert subsub.targets == [1] and subsub.describe(0) == ds.describe(2)
    with pytest.raises(IndexError, match=f"index 6 out of range for folder:{root} with 6 items"):
        ds.subset([6])
    assert ds.subset(np.array([-1, 0])).targets == [2, 0] and ds.subset([]).targets == []
    for indices in ((i for i in (5, 2)), torch.tensor([5, 2]), [np.uint64(5), 2], np.array([5, 2], dtype=object)):
        assert ds.subset(indices).targets == [2, 1]  # any iterable of integers, as before the indices were an array
    with pytest.raises(IndexError, match="index 18446744073709551615 out of range"):  # not wrapped round to -1
        ds.subset(np.array([2**64 - 1], np.uint64))
    with pytest.raises(IndexError, match="beyond int64, out of range for folder:"):
        ds.subset([2**63])
    with pytest.raises(TypeError, match="a boolean mask"):  # a mask's items, taken one by one
        ds.subset(list(torch.tensor([True, False, True, False, True, False])))
    for not_indices in ([True, False, True, False, True, False], [0.0, 1.5], [[0, 1]]):  # a mask, floats, 2-D
        with pytest.raises(TypeError, match="must be a list of integers"):
            ds.subset(not_indices)


def test_packed_strings_give_back_every_name():
    names = ["cat/0.png", "", "ünïcødé/çat.jpg", os.fsdecode(b"latin1-\xe9t\xe9.jpg"), "x" * 5000]
    packed = PackedStrings(names)
    assert list(packed) == names and [packed[i] for i in range(-5, 5)] == names + names
    odd = ["\udcc3\udca9.jpg", "\ud800.png"]  # escaped bytes that would make UTF-8 ("é"), a lone surrogate (Windows)
    assert list(PackedStrings(odd)) == odd and PackedStrings(odd)[0] == odd[0]
    assert packed[1:4] == names[1:4] and packed[::-2] == names[::-2] and len(packed) == 5
    assert os.fsencode(packed[3]) == b"latin1-\xe9t\xe9.jpg"  # the name's bytes, as on disk
    assert packed == names and packed != names[:4] and packed != "".join(names)
    assert pickle.loads(pickle.dumps(packed)) == packed and PackedStrings([]) == []
    with pytest.raises(IndexError, match="index 5 out of range for 5 strings"):
        packed[5]


def test_packed_labels_are_the_tuples_they_hold_taken_and_relabelled():
    rng = np.random.default_rng(0)
    tuples = [tuple(rng.choice(9, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(50)]
    packed = PackedLabels(tuples)
    assert list(packed) == tuples and [packed[i] for i in range(-50, 50)] == tuples * 2 and packed[3:9] == tuples[3:9]
    for indices in (rng.integers(0, 50, 80), np.array([], np.int64), np.array([7])):  # repeats, none, one
        assert list(packed.take(indices)) == [tuples[i] for i in indices]
    index = rng.permutation(9)
    assert list(packed.relabel(index)) == [tuple(int(index[c]) for c in t) for t in tuples]
    assert all(type(c) is int for t in packed for c in t) and str(packed[0]) == str(tuples[0])  # as runs.py records
    assert pickle.loads(pickle.dumps(packed)) == tuples and PackedLabels([]) == []
    with pytest.raises(IndexError, match="index 50 out of range for 50 label tuples"):
        packed[50]


def _objects_held(*roots) -> int:
    """How many distinct Python objects are reachable from `roots`, classes, modules and functions left out. One
    per item is what each forked DataLoader worker copies as it reads them (packed.py)."""
    seen, todo = set(), list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) not in seen and not isinstance(obj, type | types.ModuleType | types.FunctionType):
            seen.add(id(obj))
            todo += gc.get_referents(obj)
    return len(seen)


def test_file_sources_hold_no_python_object_per_item(tmp_path):
    """The whole folder, its carved training part, a subset of that, a CSV, loose files and shards, single- and
    multi-label, hold as many Python objects for 40 images as for 4 (a list of paths held one string per image,
    a subset one int, multi-label data one tuple)."""
    from bigtransfer.data.shards import ShardImages, write_shards

    held = []
    for n in (2, 20):
        root = _tree(tmp_path / str(n) / "tree", {"cat": n, "dog": n}, size=(3, 3))
        (root.parent / "list.csv").write_text("path,label\n" + "".join(
            f"tree/{c}/{k}.png,{300 + (c == 'dog')}\n" for c in ("cat", "dog") for k in range(n)))
        (root.parent / "tags.csv").write_text("path,label\n" + "".join(
            f"tree/{c}/{k}.png,{c};{'odd' if k % 2 else 'even'}\n" for c in ("cat", "dog") for k in range(n)))
        part = open_dataset(str(root), "train", val_fraction=0.5)
        tags_part = open_dataset(str(root.parent / "tags.csv"), "train", val_fraction=0.5)
        write_shards(ImageFolderImages(root), root.parent / "shards", shard_size=n, progress=False)  # 2 shards
        write_shards(CsvImages(root.parent / "tags.csv"), root.parent / "tag_shards", shard_size=n, progress=False)
        sources = [ImageFolderImages(root), part, part.subset([0, -1]), CsvImages(root.parent / "list.csv"),
                   ImageFiles([root]), ShardImages(root.parent / "shards"), CsvImages(root.parent / "tags.csv"),
                   tags_part, tags_part.subset([-1, 0]), ShardImages(root.parent / "tag_shards"),
                   match_classes(["x", "even", "odd", "cat", "dog"], tags_part, multi_label=True),
                   match_classes(["x", "cat", "dog"], part, multi_label=True)]
        held.append([_objects_held(source) for source in sources])
        assert sources[3].targets == [0] * n + [1] * n and len(sources[5]) == 2 * n
        assert sources[6].classes == ["cat", "dog", "even", "odd"]
        assert list(sources[6].targets) == [(c, 2 + k % 2) for c in (0, 1) for k in range(n)]
        assert list(sources[8].targets) == [tags_part.targets[-1], tags_part.targets[0]]
        assert list(sources[10].targets) == [tuple([3, 4, 1, 2][c] for c in t) for t in tags_part.targets]
        assert list(sources[11].targets) == [(t + 1,) for t in part.targets]
        assert sorted(sources[9].targets) == sorted(sources[6].targets)
    assert held[0] == held[1]


def test_labels_above_256_are_one_object_per_class():
    """Python shares only the ints -5..256; labels from a tensor were one object each, copied into every worker."""

    class TensorTargets(_Tensors):
        targets = torch.arange(40) % 2 + 300

    targets = TorchDatasetImages(TensorTargets([None] * 40)).targets
    assert targets == [300, 301] * 20 and _objects_held(targets) == 3  # the list and two ints


def test_a_folder_scan_skips_hidden_names_and_enters_each_folder_once(tmp_path, caplog):
    """macOS's ._x.png twins, __MACOSX and .ipynb_checkpoints are not data; a link back up the tree listed
    images without end, another class's under this one's label."""
    root = _tree(tmp_path / "tree", {"a": 2, "b": 3})
    (root / "a" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    _png(root / "__MACOSX" / "a" / "._1.png")
    _png(root / ".ipynb_checkpoints" / "x.png")
    _png(root / "b" / "nested" / ".hidden" / "y.png")
    _png(root / "b" / "nested" / "z.png")
    (root / "a" / "up").symlink_to("..")
    (root / "a" / "b_too").symlink_to("../b")
    _png(tmp_path / "elsewhere" / "w.png")
    (root / "b" / "more").symlink_to(tmp_path / "elsewhere")  # other links are followed, as torchvision does
    Image.new("RGB", (4, 4)).save(root / "a" / "x.gif")
    (root / "a" / "notes.txt").write_text("not an image; not one of the formats ImageFolder leaves out either")
    ds = ImageFolderImages(root)
    assert "tree: 1 .gif file left out: image folders read .jpg" in caplog.text and ".txt" not in caplog.text
    assert ds.classes == ["a", "b"] and ds.targets == [0, 0, 1, 1, 1, 1, 1]
    assert [os.path.relpath(ds.describe(i), root) for i in range(len(ds))][-2:] == ["b/more/w.png", "b/nested/z.png"]
    found = ImageFiles([root]).paths
    assert len(found) == 7 and not any("/." in f or "__MACOSX" in f for f in found)
    # where torchvision's scan ends (no hidden names, no links up or across), both give the same list
    for name in ("__MACOSX", ".ipynb_checkpoints", "b/nested/.hidden", "a/x.gif", "a/._0.png", "a/up", "a/b_too"):
        (root / name).unlink() if (root / name).is_symlink() or (root / name).is_file() else shutil.rmtree(root / name)
    (root / "c").symlink_to(root / "b")  # a class folder that is a link to another one: read whole, as there
    theirs = torchvision.datasets.ImageFolder(str(root))
    ours = ImageFolderImages(root)
    assert (ours.classes, list(zip(ours.paths, ours.targets, strict=True))) == (theirs.classes, theirs.samples)
    (root / "a" / "0.png").unlink()
    (root / "a" / "1.png").unlink()
    with pytest.raises(ValueError, match="tree: class folder 'a' holds no image files"):
        ImageFolderImages(root)


def test_bad_file_in_folder_is_reported_with_path(tmp_path):
    root = _tree(tmp_path / "tree", {"a": 1})
    bad = root / "a" / "broken.png"
    bad.write_text("nope")
    ds = ImageFolderImages(root)
    i = [ds.describe(k) for k in range(len(ds))].index(str(bad))
    with pytest.raises(BadImageError, match="broken.png"):
        ds[i]


def test_open_dataset_split_folders(tmp_path):
    _tree(tmp_path / "train", {"x": 3, "y": 2})
    _tree(tmp_path / "validation", {"x": 1, "y": 1})
    train = open_dataset(str(tmp_path), "train")
    val = open_dataset(str(tmp_path), "val")
    assert (len(train), len(val)) == (5, 2)
    assert train.classes == val.classes == ["x", "y"]
    assert val.describe(0).startswith(str(tmp_path / "validation"))
    with pytest.raises(ValueError, match="test"):
        open_dataset(str(tmp_path), "test")


def test_a_single_tree_gives_up_a_held_out_part_that_added_images_never_change(tmp_path, caplog):
    root = _tree(tmp_path / "tree", {"a": 300, "b": 5, "c": 2, "d": 1})

    def part(split, seed=3, at=root):  # {file relative to the tree: label}
        d = open_dataset(str(at), split, val_fraction=0.2, split_seed=seed)
        return {os.path.relpath(d.describe(i), at): d.targets[i] for i in range(len(d))}

    train, val = part("train"), part("val")
    assert part("test") == part("eval") == val and not train.keys() & val.keys() and len(train) + len(val) == 308
    assert 0.13 < list(val.values()).count(0) / 300 < 0.27  # about a fifth of a large class (60 +- 7 expected)
    assert part("train") == train and part("val", seed=4) != val
    shutil.copytree(root, tmp_path / "moved")  # the names are read relative to the tree: moved, it splits alike
    assert part("val", at=tmp_path / "moved") == val
    for name in ("a", "b", "c", "d"):  # images added to every class, the one-image class too, and one removed:
        for k in range(20):  # no other image changes part (one that was trained on is never held out after)
            _png(root / name / f"new{k}.png")
    os.remove(root / "b" / "0.png")
    grown_train, grown_val = part("train"), part("val")
    for f in (train.keys() | val.keys()) - {"b/0.png"}:
        assert (f in grown_val) == (f in val) and (f in grown_train) == (f in train), f
    assert any(f.startswith("a/new") for f in grown_val) and len(grown_train) + len(grown_val) == 387
    latin = _tree(tmp_path / "latin", {"x": 9})
    _png(latin / "x" / os.fsdecode(b"caf\xe9.png"))  # a name not in UTF-8 is hashed as its bytes
    assert sum(len(open_dataset(str(latin), split)) for split in ("train", "eval")) == 10
    # a class left with nothing to train on is named; data with nothing held out is no evaluation data
    solo = _tree(tmp_path / "solo", {"x": 1, "y": 1})
    seed = next(k for k in range(100) if len(open_dataset(str(solo), "train", split_seed=k)) == 1)
    held_out = open_dataset(str(solo), "eval", split_seed=seed)
    unseen = held_out.classes[held_out.targets[0]]
    assert f"every image of class {unseen!r} was drawn for the held-out part: it is not trained on" in caplog.text
    empty = next(k for k in range(100) if len(open_dataset(str(solo), "train", split_seed=k)) == 2)
    with pytest.raises(MissingSplit, match=r"solo: none of its 2 images was drawn for the held-out part \(about 20%"):
        open_dataset(str(solo), "eval", split_seed=empty)


def test_a_folder_reached_through_a_link_and_dot_dot_is_the_one_the_system_reaches(tmp_path, monkeypatch):
    """``link/..`` is the parent of the link's target, not the folder beside the link (abspath's reading)."""
    _tree(tmp_path / "real" / "data", {"cat": 1, "dog": 1})
    (tmp_path / "real" / "inner").mkdir()
    _tree(tmp_path / "cwd" / "data", {"other": 1})
    (tmp_path / "cwd" / "link").symlink_to(tmp_path / "real" / "inner")
    monkeypatch.chdir(tmp_path / "cwd")
    ds = ImageFolderImages("link/../data")
    assert ds.classes == ["cat", "dog"]
    assert os.path.samefile(ds.describe(0), tmp_path / "real" / "data" / "cat" / "0.png")
    assert ImageFolderImages("./data/").describe(0) == str(tmp_path / "cwd" / "data" / "other" / "0.png")


def test_held_out_folder_is_labelled_by_class_name_and_read_whole(tmp_path):
    """A test folder that lacks a training class must not shift the labels after it (folders number their
    classes alone), and held-out data from another folder takes none of the training folder's images."""
    _tree(tmp_path / "train", {"a": 4, "b": 3, "c": 5})
    _tree(tmp_path / "test", {"b": 2, "c": 3})
    train, test = open_sources(str(tmp_path / "train"), str(tmp_path / "test"))
    assert (len(train), len(test)) == (12, 5) and test.classes == train.classes == ["a", "b", "c"]
    assert test.targets == [1, 1, 2, 2, 2]
    assert [test[i][1] for i in range(len(test))] == test.targets
    assert [Path(test.describe(i)).parent.name for i in range(len(test))] == ["b", "b", "c", "c", "c"]
    assert test.subset([2]).targets == [2]
    _tree(tmp_path / "other", {"b": 1, "zebra": 1})
    with pytest.raises(ValueError, match="classes that the training data lacks: zebra"):
        open_sources(str(tmp_path / "train"), str(tmp_path / "other"))
    same_train, same_test = open_sources(str(tmp_path / "train"), str(tmp_path / "train"))  # carved as before
    assert len(same_train) + len(same_test) == 12 and len(same_test) > 0
    assert not {same_train.describe(i) for i in range(len(same_train))} & {
        same_test.describe(i) for i in range(len(same_test))}
    assert len(open_sources(str(tmp_path / "train"), None)[0]) == 12


def test_multi_label_targets_are_relabelled_one_by_one():
    class Tags(LabelledImages):
        def __init__(self, classes, targets):
            self.name, self.classes, self.targets, self.multi_label = "tags", classes, targets, True

        def __getitem__(self, i):
            return Image.new("RGB", (2, 2)), self.targets[i]

    held_out = match_classes(["cat", "dog", "owl"], Tags(["dog", "owl"], [(0,), (0, 1)]), multi_label=True)
    assert held_out.targets == [(1,), (1, 2)] and held_out[1][1] == (1, 2)
    single = TorchDatasetImages(torch.utils.data.TensorDataset(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])))
    as_tags = match_classes(["x", "0", "1"], single, multi_label=True)  # one label per image, for a multi-label run
    assert as_tags.multi_label and as_tags.targets == [(1,), (2,)] and as_tags[0][1] == (1,)
    with pytest.raises(ValueError, match="several labels per image; the training data has one"):
        match_classes(["cat", "dog", "owl"], Tags(["dog"], [(0,)]))


def test_open_dataset_csv(tmp_path):
    _png(tmp_path / "imgs" / "1.png")
    _png(tmp_path / "imgs" / "2.png", size=(3, 3))
    _png(tmp_path / "abs.png")
    csv_path = tmp_path / "sub" / "m.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(f"path,label\n../imgs/1.png,zebra\n../imgs/2.png,ant\n{tmp_path / 'abs.png'},zebra\n")
    ds = open_dataset(str(csv_path), "all")
    assert isinstance(ds, CsvImages)
    assert ds.classes == ["ant", "zebra"] and ds.targets == [1, 0, 1]
    assert ds.size_of(1) == (3, 3) and ds[0][0].mode == "RGB"
    assert os.path.samefile(ds.describe(0), tmp_path / "imgs" / "1.png")


def test_a_csv_that_is_also_the_evaluation_data_gives_up_a_held_out_part(tmp_path, monkeypatch):
    """As a single folder tree does: the same manifest as --data and --eval-data scored the training images.
    Both parts come from one reading of the manifest (or of the folder tree), and are what the parts opened
    one by one are."""
    import bigtransfer.data.sources as sources

    rows = [f"{_png(tmp_path / f'{k}.png', color=(k, 0, 0)).name},{'ab'[k % 2]}" for k in range(10)]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    _tree(tmp_path / "tree", {"a": 6, "b": 6})
    for spec, reader in ((tmp_path / "m.csv", "_manifest_rows"), (tmp_path / "tree", "_walk_once")):
        reads = []
        real = getattr(sources, reader)
        monkeypatch.setattr(sources, reader, lambda *a, real=real, reads=reads, **k: reads.append(a) or real(*a, **k))
        train, held_out = open_sources(str(spec), str(spec))
        assert len(reads) == (1 if reader == "_manifest_rows" else 2)  # the CSV once, or each class folder once
        monkeypatch.undo()
        for part, split in ((train, "train"), (held_out, "eval")):
            alone = open_dataset(str(spec), split)
            assert (part.name, part.targets) == (alone.name, alone.targets)
            assert [part.describe(i) for i in range(len(part))] == [alone.describe(i) for i in range(len(alone))]
    seen, scored = ({d.describe(i) for i in range(len(d))} for d in (train, held_out))
    assert len(seen | scored) == 12 and not seen & scored and sorted(set(held_out.targets)) == [0, 1]
    train, held_out = open_sources(str(tmp_path / "m.csv"), str(tmp_path / "m.csv"))
    seen, scored = ({d.describe(i) for i in range(len(d))} for d in (train, held_out))
    assert len(seen | scored) == 10 and not seen & scored and sorted(set(held_out.targets)) == [0, 1]
    again = open_sources(str(tmp_path / "m.csv"), str(tmp_path / "m.csv"))  # fixed
    assert [again[1].describe(i) for i in range(len(again[1]))] == [held_out.describe(i) for i in range(len(held_out))]
    other = tmp_path / "other.csv"
    other.write_text("path,label\n0.png,a\n1.png,b\n")
    assert [len(d) for d in open_sources(str(tmp_path / "m.csv"), str(other))] == [10, 2]  # from elsewhere: whole
    # a multi-label manifest is split as a whole (a class per image would not be a partition)
    (tmp_path / "tags.csv").write_text("path,label\n" + "\n".join(r.replace(",a", ",a;b") for r in rows) + "\n")
    tags, tags_held_out = open_sources(str(tmp_path / "tags.csv"), str(tmp_path / "tags.csv"))
    seen, scored = ({d.describe(i) for i in range(len(d))} for d in (tags, tags_held_out))
    assert len(seen | scored) == 10 and not seen & scored and scored and tags_held_out.multi_label
    (tmp_path / "one.csv").write_text("path,label\n0.png,a;b\n")  # refused before any training, not after it
    with pytest.raises(MissingSplit, match=r"one.csv: (none|every one) of its 1 image was drawn for the held-out"):
        open_sources(str(tmp_path / "one.csv"), str(tmp_path / "one.csv"))
    assert len(open_dataset(str(tmp_path / "m.csv"), "test", hold_out=False)) == 10  # held out elsewhere: whole


def test_csv_integer_labels_sort_numerically(tmp_path):
    for k in range(3):
        _png(tmp_path / f"{k}.png")
    (tmp_path / "m.csv").write_text("label,path\n10,0.png\n2,1.png\n02,2.png\n")
    ds = CsvImages(tmp_path / "m.csv")
    assert ds.classes == ["2", "10"] and ds.targets == [1, 0, 0]
    (tmp_path / "m.csv").write_text("label,path\n1_2,0.png\n12,1.png\n 21 ,2.png\n")  # int() reads 1_2 as 12
    assert CsvImages(tmp_path / "m.csv").classes == ["12", "1_2", "21"]


def test_csv_errors_name_file_and_line(tmp_path):
    _png(tmp_path / "ok.png")
    _png(tmp_path / "ok2.png")
    m = tmp_path / "m.csv"
    m.write_text("path,label\nok.png,a\nok2.png,b\nmissing.png,a\n")
    with pytest.raises(ValueError, match=r"m\.csv, line 4.*missing\.png"):
        CsvImages(m)
    m.write_text("path,label\nok.png,a\nok2.png,b\n./ok.png,b\n")  # a held-out part could hold a training image
    with pytest.raises(ValueError, match=r"m\.csv, line 4: ./ok.png is listed again \(first on line 2\)"):
        CsvImages(m)
    m.write_bytes("path,label\nok.png,caf\u00e9\n".encode("latin-1"))  # a spreadsheet's local encoding
    with pytest.raises(ValueError, match=r"m\.csv, after line 1: not UTF-8 text .*save it as UTF-8"):
        CsvImages(m)
    m.write_text("file,label\nok.png,a\n")
    with pytest.raises(ValueError, match=r"m\.csv, line 1.*path"):
        CsvImages(m)
    m.write_text("path,label\nok.png,\n")
    with pytest.raises(ValueError, match=r"line 2"):
        CsvImages(m)
    m.write_text("path,label\nok.png,cat;dog\nok2.png, ; ; ; \n")
    with pytest.raises(ValueError, match=r"m\.csv, line 3: label '; ; ;' names no class"):
        CsvImages(m)


def test_a_folder_is_named_by_its_absolute_path_and_an_empty_class_by_its_folder(tmp_path, monkeypatch):
    """A run folder compares the data's name on a re-run: `ds` from one directory and `ds` from another are
    different data, and ./ds and its absolute path the same."""
    make_image_folder(tmp_path / "ds" / "train", classes=2, per_class=2)
    monkeypatch.chdir(tmp_path)
    assert open_dataset("ds", "train").name == open_dataset(str(tmp_path / "ds"), "train").name == \
        f"folder:{tmp_path / 'ds' / 'train'}"
    with pytest.raises(MissingSplit, match="has split folders .* but none for split 'test'"):
        open_dataset("ds", "test")  # no test split: what the command line's default evaluation data falls back on
    (tmp_path / "ds" / "test" / "class1").mkdir(parents=True)  # a test split whose only class holds no image
    with pytest.raises(ValueError, match=r"ds/test: class folder 'class1' holds no image files") as info:
        open_dataset("ds", "test")
    assert not isinstance(info.value, MissingSplit)  # an error to report, not a split to skip


def test_all_of_a_split_folder_is_its_training_split(tmp_path):
    make_image_folder(tmp_path / "train", classes=2, per_class=3)
    make_image_folder(tmp_path / "test", classes=2, per_class=1)
    assert len(open_dataset(str(tmp_path), "all")) == 6 and len(open_dataset(str(tmp_path / "train"), "all")) == 6


def test_open_dataset_unknown_spec_lists_forms(tmp_path):
    with pytest.raises(ValueError, match="cifar10.*csv.*directory"):
        open_dataset(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------------------------
# Digits


def test_digits():
    from sklearn.datasets import load_digits

    train, test = DigitsImages("train"), DigitsImages("test")
    assert (len(train), len(test)) == (1000, 797)
    assert train.classes == test.classes == [str(d) for d in range(10)]
    assert train.flip is False and test.flip is False
    assert len(DigitsImages("val")) == 797
    assert isinstance(open_dataset("digits", "val"), DigitsImages)

    y = load_digits().target
    for c in range(10):
        assert train.targets.count(c) + test.targets.count(c) == int((y == c).sum())
        assert abs(train.targets.count(c) / 1000 - (y == c).mean()) < 0.01  # stratified
    assert not set(train.indices) & set(test.indices)
    assert len(set(train.indices) | set(test.indices)) == len(y)
    assert DigitsImages("train").indices == train.indices  # fixed split

    img, label = train[0]
    assert img.mode == "RGB" and img.size == (8, 8) and label == train.targets[0]
    raw = load_digits().images[train.indices[0]]
    assert np.array_equal(np.asarray(img)[..., 0], np.rint(raw * 255 / 16).astype(np.uint8))
    assert train.size_of(3) == (8, 8) and train.describe(3) == "digits[3]"
    assert measure_image_size(train) == (8, 8)
    with pytest.raises(ValueError):
        DigitsImages("holdout")


# ---------------------------------------------------------------------------------------------------------------------
# torchvision standard datasets


def _fake_cifar10(root: Path, per_batch: int = 4) -> None:
    """torchvision's own on-disk CIFAR-10 format (pickled dicts), tiny."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
            "labels": [(k + j) % 10 for j in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path)
    # torchvision md5-checks the real release files; only that check is bypassed, the reading is torchvision's own
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train = open_dataset(f"cifar10:{tmp_path}", "train")
    test = open_dataset(f"cifar10:{tmp_path}", "test")
    assert (len(train), len(test)) == (20, 4)
    assert train.classes[0] == "airplane" and len(train.classes) == 10 and train.name == "cifar10"
    assert train.targets[:4] == [0, 1, 2, 3] and test.targets == [5, 6, 7, 8]
    img, label = train[1]
    assert img.mode == "RGB" and img.size == (32, 32) and label == 1
    tv = torchvision.datasets.CIFAR10(str(tmp_path), train=True)
    assert np.array_equal(np.asarray(img), np.asarray(tv[1][0]))
    assert train.size_of(0) == (32, 32) and train.describe(2) == "cifar10[2]"


def _fake_flowers102(root: Path, images: int) -> None:
    from scipy.io import savemat

    base = root / "flowers-102"
    for k in range(1, images + 1):
        _png(base / "jpg" / f"image_{k:05d}.jpg", (5 + k, 4), (k, 2 * k, 3))
    savemat(base / "imagelabels.mat", {"labels": np.arange(images) % 3 + 1})
    ids = np.arange(1, images + 1)
    savemat(base / "setid.mat", {"trnid": ids[::2], "valid": ids[1::4], "tstid": ids[3::4]})


def test_flowers102_files_through_torchvision_as_packed_paths(tmp_path, monkeypatch):
    """Files of a torchvision dataset are read once into packed paths (its own per-image lists are let go);
    items, labels and names are torchvision's."""
    monkeypatch.setattr(torchvision.datasets.flowers102, "check_integrity", lambda *a, **k: True)  # md5 only
    held = []
    for images in (8, 40):
        _fake_flowers102(tmp_path / str(images), images)
        ours = open_dataset(f"flowers102:{tmp_path / str(images)}", "train")
        theirs = torchvision.datasets.Flowers102(str(tmp_path / str(images)), split="train")
        assert len(ours) == len(theirs) == images // 2 and ours.targets == theirs._labels
        assert [ours.describe(i) for i in range(len(ours))] == list(map(str, theirs._image_files))
        assert all(np.array_equal(np.asarray(ours[i][0]), np.asarray(theirs[i][0])) for i in (0, -1))
        assert ours.size_of(1) == (4, 8) and ours[1][1] == 2  # image 3: label 3 of 1..3
        held.append(_objects_held(ours))
    assert held[0] == held[1]


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "pets", "flowers102"])
def test_missing_torchvision_dataset_says_where_and_how(tmp_path, kind):
    with pytest.raises(FileNotFoundError) as info:
        open_dataset(f"{kind}:{tmp_path / 'none'}")
    msg = str(info.value)
    assert str(tmp_path / "none") in msg and "download=True" in msg and "--download" in msg


def test_imagenet_cannot_download(tmp_path):
    with pytest.raises(ValueError, match="by hand|cannot be downloaded"):
        open_dataset(f"imagenet:{tmp_path}", download=True)


# ---------------------------------------------------------------------------------------------------------------------
# Arbitrary torch datasets, measure_image_size


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_torch_dataset_tensors_and_arrays():
    u8 = torch.zeros(3, 5, 7, dtype=torch.uint8)
    u8[0] = 255
    f32 = torch.full((1, 5, 7), 0.5)
    hwc = np.zeros((4, 6, 3), np.uint8)
    hwc[..., 2] = 9
    gray = np.full((4, 6), 0.25, np.float32)
    ds = TorchDatasetImages(_Tensors([(u8, 1), (f32, torch.tensor(0)), (hwc, 2), (gray, 1)]))
    assert ds.targets == [1, 0, 2, 1] and ds.classes == ["0", "1", "2"]
    imgs = [ds[i][0] for i in range(4)]
    assert all(im.mode == "RGB" for im in imgs)
    assert [im.size for im in imgs] == [(7, 5), (7, 5), (6, 4), (6, 4)]
    assert tuple(np.asarray(imgs[0])[0, 0]) == (255, 0, 0)
    assert tuple(np.asarray(imgs[1])[0, 0]) == (128, 128, 128)
    assert tuple(np.asarray(imgs[2])[0, 0]) == (0, 0, 9)
    assert tuple(np.asarray(imgs[3])[0, 0]) == (64, 64, 64)
    assert ds[1][1] == 0 and ds.size_of(0) == (5, 7)


def test_torch_dataset_16_bit_and_mask_arrays_as_their_files(tmp_path):
    """A 16-bit array is scaled by the 16-bit range as a 16-bit PNG is (clipping at 255 whitened it), and a
    bool mask is black and white (it came out 0 and 1)."""
    grey = np.array([[0, 30000], [65535, 257]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    mask = np.array([[True, False], [False, True]])
    ds = TorchDatasetImages(_Tensors([(grey, 0), (mask, 1)]))
    assert np.array_equal(np.asarray(ds[0][0]), np.asarray(decode_image(tmp_path / "g.png")))
    assert np.asarray(ds[1][0])[..., 0].tolist() == [[255, 0], [0, 255]]


def test_torch_dataset_uses_targets_attribute_and_fakedata():
    from torchvision.datasets import FakeData

    class WithTargets(_Tensors):
        targets = [3, 3]
        classes = ["a", "b", "c", "d"]

        def __getitem__(self, i):
            raise AssertionError("targets must not need items")

    ds = TorchDatasetImages(WithTargets([None, None]))
    assert ds.targets == [3, 3] and ds.classes == ["a", "b", "c", "d"]

    fake = TorchDatasetImages(FakeData(size=5, image_size=(3, 12, 10), num_classes=4), name="fake")
    assert len(fake) == 5 and fake.classes == ["0", "1", "2", "3"] and fake.name == "fake"
    img, label = fake[2]
    assert img.mode == "RGB" and img.size == (10, 12) and label == fake.targets[2]


def test_measure_image_size_median(tmp_path):
    sizes = [(10, 20), (30, 40), (50, 60), (70, 80), (1000, 1000)]  # (w, h); the outlier must not move it
    for k, (w, h) in enumerate(sizes):
        _png(tmp_path / "c" / f"{k}.png", (w, h))
    ds = ImageFolderImages(tmp_path)
    assert measure_image_size(ds) == (60, 50)
    assert measure_image_size(ds, sample=3, seed=1) == measure_image_size(ds, sample=3, seed=1)
    with pytest.raises(ValueError):
        measure_image_size(ds.subset([]))
