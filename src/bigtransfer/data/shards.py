"""WebDataset tar shards for upstream-scale data: write them, stream them, index them.

Layout (readable by the `webdataset` library too): ``shard-000000.tar`` ... each holding, per sample,
``KEY.jpg`` and ``KEY.cls`` (the class index as text) or ``KEY.json`` (``{"labels": [...]}`` for
multi-label data), plus ``manifest.json`` with the classes, per-shard counts and sha256 checksums, and
``shard-000000.index.npz`` ... (where each sample lies in its shard, its key and label) for `ShardImages`.

`bit shards` writes the samples in a seeded random order, so that every shard (and every window of a few)
holds a mix of classes, not a run of one.

Streaming (`ShardStream`) is exact and resumable:
* epoch e permutes the shard list with (seed, e); process r of W takes every W-th shard, its loader
  worker w of K every K-th of those. All W x K streams yield the same number of samples per epoch (the
  shortest one's, the rest of the longer ones' last window is left out of that epoch), so they move from
  epoch to epoch in step: every sample is read at most once per epoch, all of them with one stream, and
  with more, all but at most (W x K - 1) shards' worth, other ones each epoch (plus, for each of those streams,
  what a short last shard lacks of a full one);
* samples are shuffled inside windows of a few shards with a seeded buffer;
* everything is a function of (seed, rank, worker, position), so a restart at step s skips exactly
  the samples steps 0..s-1 consumed (whole windows by the manifest's counts, without reading them).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..checkpoints.download import sha256_of
from ..checkpoints.formats import atomic_path, remove_stale_temporaries
from .loader import SEED_STRIDE, target_tensor
from .packed import PackedLabels, PackedStrings, shared_labels
from .parallel import map_with_progress
from .sources import BadImageError, LabelledImages, decode_image

log = logging.getLogger("bigtransfer")
MANIFEST = "manifest.json"


# --- writing -----------------------------------------------------------------------------------


def write_shards(source: LabelledImages, out_dir: str | os.PathLike, shard_size: int = 1000, max_side: int = 512,
                 quality: int = 90, workers: int = 1, progress: bool = True) -> dict:
    """Re-encode every image of `source` (longest side at most `max_side`, JPEG `quality`) into shards
    of `shard_size` samples, in `workers` processes. Unreadable images are reported by path in the
    manifest and left out. Returns the manifest (also written to OUT_DIR/manifest.json)."""
    if len(source) == 0:
        raise ValueError(f"{source.name} holds no images to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    # no manifest while shards are replaced: a rewrite stopped part-way leaves no folder that reads as whole
    # (the old manifest listed a mix of old and new shards, an old run resumed on it, an index could match it)
    (out / MANIFEST).unlink(missing_ok=True)
    order = np.random.default_rng(0).permutation(len(source)).tolist()  # classes mixed in every shard
    groups = [order[i:i + shard_size] for i in range(0, len(source), shard_size)]
    jobs = [(idx, out / f"shard-{k:06d}.tar", max_side, quality) for k, idx in enumerate(groups)]
    results = map_with_progress(_write_shard, source, jobs, workers=workers, description=f"writing {len(jobs)} shards",
                                total=len(source), size=lambda r: r["count"] + len(r["bad"]), progress=progress)
    bad = [b for r in results for b in r.pop("bad")]
    for b in bad:
        log.warning("bad image left out of the shards: %s", b)
    manifest = {"format": "webdataset", "source": source.name, "classes": list(source.classes),
                "multi_label": source.multi_label, "flip": source.flip, "total": sum(r["count"] for r in results),
                "max_side": max_side, "quality": quality, "shards": results, "bad_images": bad}
    if manifest["total"] == 0:
        raise ValueError(f"{source.name}: every image was unreadable; nothing to train on (see the warnings above)")
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


def _write_shard(source: LabelledImages, indices: Sequence[int], path: Path, max_side: int, quality: int) -> dict:
    count, bad = 0, []
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in indices:
                try:
                    image, target = source[i]
                except BadImageError as e:
                    bad.append(str(e))
                    continue
                if max(image.size) > max_side:
                    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=quality)
                key = f"{i:09d}"
                label = (f"{key}.json", json.dumps({"labels": list(target)}).encode()) if source.multi_label else (
                    f"{key}.cls", str(target).encode())
                for name, data in ((f"{key}.jpg", buf.getvalue()), label):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        # indexed before the shard takes its place: a run killed between the two leaves the old shard with an
        # index of the new one (another checksum than the manifest's: not used), never the new with the old's
        sha256, size = sha256_of(tmp), tmp.stat().st_size
        index = _write_index(tmp, path.name, sha256, source.multi_label, len(source.classes), count)
    return {"name": path.name, "count": count, "bytes": size, "sha256": sha256, "index": index, "bad": bad}


# --- reading -----------------------------------------------------------------------------------


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {MANIFEST}; write shards with `bit shards SRC {root}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in ("classes", "multi_label", "shards", "total") if k not in manifest]
        missing += [f"shards[{i}].{k}" for i, s in enumerate(manifest.get("shards", []))
                    for k in ("name", "count", "sha256") if k not in s]
        counts = [("total", manifest.get("total", 0))] + [
            (f"shards[{i}].count", s.get("count", 0)) for i, s in enumerate(manifest.get("shards", []))]
        not_counts = [k for k, v in counts if type(v) is not int]
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not UTF-8, or not a mapping of mappings
        raise ValueError(f"{path}: not a shard manifest ({e}); `bit shards SRC {root}` writes it again") from e
    if missing:
        raise ValueError(f"{path}: the manifest has no {', '.join(missing)}; `bit shards SRC {root}` writes it again")
    if not_counts:
        raise ValueError(f"{path}: the manifest's {', '.join(not_counts)}: not a whole number; `bit shards SRC "
                         f"{root}` writes it again")
    for shard in manifest["shards"]:
        if not (Path(root) / shard["name"]).is_file():
            raise FileNotFoundError(f"{root}: shard {shard['name']} listed in {MANIFEST} is missing")
    return manifest


def shard_fingerprint(manifest: dict) -> str:
    """A digest of the shard list (names, order, counts, contents): what an exact resume depends on."""
    listed = [(s["name"], s["count"], s["sha256"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:16]


def verify_shards(root: str | os.PathLike) -> None:
    """Check every shard against the manifest's sha256 (reads all bytes once)."""
    for shard in read_manifest(root)["shards"]:
        actual = sha256_of(Path(root) / shard["name"])
        if actual != shard["sha256"]:
            raise ValueError(f"{root}/{shard['name']}: sha256 {actual} does not match the manifest's {shard['sha256']}")


def _unreadable(path: Path, why: object) -> ValueError:
    return ValueError(f"{path}: unreadable shard ({why}); bigtransfer.data.shards.verify_shards(FOLDER) checks every "
                      "shard against the manifest's sha256, `bit shards` writes them again")


def _samples(path: Path, expected: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, reading the tar front to back (streaming-friendly); a shard that
    ends before the manifest's `expected` count, or inside a sample, before its label (cut at a member boundary,
    which tar does not notice) fails."""
    key, members, count = None, {}, 0

    def labelled() -> tuple[str, dict[str, bytes]]:
        if "cls" not in members and "json" not in members:
            raise _unreadable(path, f"sample {key} has no label (.cls or .json)")
        return key, members

    try:
        with tarfile.open(path, "r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, _, ext = info.name.partition(".")
                if key is not None and k != key:
                    yield labelled()
                    members, count = {}, count + 1
                key = k
                members[ext] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise _unreadable(path, e) from e
    if key is not None:
        yield labelled()
        count += 1
    if expected is not None and count != expected:
        raise _unreadable(path, f"{count} samples, the manifest says {expected}")


def _target(members: dict[str, bytes], multi_label: bool, num_classes: int, where: str
            ) -> int | tuple[int, ...]:
    """The sample's class index (or indices), checked against the manifest's classes: a label out of range
    would otherwise surface as an index error in the loss (a device-side assert on a GPU)."""
    member = "json" if multi_label else "cls"
    if member not in members:
        raise ValueError(f"{where}: no .{member} member, the label of every sample of a "
                         f"{'multi' if multi_label else 'single'}-label manifest's shards")
    raw = members[member]
    try:
        labels = json.loads(raw)["labels"] if multi_label else [int(raw)]
        if not all(type(c) is int and 0 <= c < num_classes for c in labels):
            raise ValueError(f"not in 0..{num_classes - 1}, the manifest's {num_classes} classes")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: label {raw[:40]!r}: {e}") from e
    return tuple(labels) if multi_label else labels[0]


def _decode(key: str, members: dict[str, bytes], where: str) -> Image.Image:
    if "jpg" not in members:
        raise BadImageError(f"{where}:{key}", "no .jpg member")
    return decode_image(members["jpg"], describe=f"{where}:{key}")


def _index_shard(path: Path, count: int, multi_label: bool, num_classes: int
                 ) -> tuple[np.ndarray, list[str], list[int | tuple[int, ...]]]:
    """((offset, size) of every image's bytes, its key, its label), from the tar headers of shard `path`, which
    the manifest says holds `count` images."""
    member = "json" if multi_label else "cls"  # the label; other members (metadata) are not read
    labels, images = {}, []
    try:
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                key, _, ext = info.name.partition(".")
                if ext == "jpg":
                    images.append((info.offset_data, info.size, key))
                elif ext == member:
                    labels[key] = _target({ext: tar.extractfile(info).read()}, multi_label, num_classes,
                                          f"{path}:{key}")
    except tarfile.TarError as e:
        raise _unreadable(path, e) from e
    if len(images) != count:
        raise _unreadable(path, f"{len(images)} images, the manifest says {count}")
    unlabelled = [key for *_, key in images if key not in labels]  # pairs by key, never by position
    if unlabelled:
        raise _unreadable(path, f"sample {unlabelled[0]} has no label (.{member}, as the manifest's "
                                f"{'multi' if multi_label else 'single'}-label samples hold)")
    places = np.array([(offset, size) for offset, size, _ in images], np.int64).reshape(-1, 2)
    return places, [key for *_, key in images], [labels[key] for *_, key in images]


def _index_name(shard_name: str) -> str:
    return shard_name.removesuffix(".tar") + ".index.npz"


def _write_index(path: Path, name: str, sha256: str, multi_label: bool, num_classes: int, count: int) -> str:
    """Index the shard at `path`, to be named `name` (`_index_shard`), into a file beside it, with the shard's
    checksum and size: a shard written again or cut short is never read through the index of the one before.
    Returns the index file's name."""
    places, keys, labels = _index_shard(path, count, multi_label, num_classes)
    arrays = {"sha256": np.array(sha256), "bytes": np.array(path.stat().st_size), "places": places,
              "keys": np.array(keys, dtype=str)}
    if multi_label:
        arrays |= {"labels": np.array([c for t in labels for c in t], np.int64),
                   "label_ends": np.cumsum([len(t) for t in labels], dtype=np.int64)}
    else:
        arrays["labels"] = np.array(labels, np.int64)
    index = _index_name(name)
    with atomic_path(path.parent / index) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return index


def _read_index(root: Path, shard: dict, multi_label: bool, num_classes: int
                ) -> tuple[np.ndarray, list[str], list[int | tuple[int, ...]]] | None:
    """What `_index_shard` gives, from the shard's index file; None where there is none, where it is not of this
    shard (the manifest's checksum, or the shard's size, is another: written again, cut short, changed) or where
    it is not readable. The size is what is checked of the shard, as its checksum would read all of it: a shard
    changed by hand to the same size is read through its old index (`verify_shards` finds it changed)."""
    path = root / _index_name(shard["name"])
    if "index" not in shard or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as index:
            if str(index["sha256"]) != shard["sha256"] or int(index["bytes"]) != (root / shard["name"]).stat().st_size:
                return None
            places, keys, labels = index["places"], index["keys"].tolist(), index["labels"]
            ends = index["label_ends"] if multi_label else None
    except Exception as e:  # anything unreadable (cut short, not a zip, not ours): the tar headers are always right
        log.warning("%s: unreadable shard index (%s); reading the shard's tar headers instead", path, e)
        return None
    count = shard["count"]
    if places.shape != (count, 2) or len(keys) != count or (ends is None and len(labels) != count) or (
            ends is not None and (len(ends) != count or (count and ends[-1] != len(labels)))):
        return None
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise ValueError(f"{path}: a label out of 0..{num_classes - 1}, the manifest's {num_classes} classes")
    if ends is None:
        return places.astype(np.int64), keys, labels.tolist()
    flat = labels.tolist()
    return places.astype(np.int64), keys, [tuple(flat[a:b]) for a, b in itertools.pairwise([0, *ends.tolist()])]


class ShardImages(LabelledImages):
    """Shards as a map-style source (evaluation, small data): any sample is read with one seek. Where each sample
    lies, with its key and label, is read from the index files `write_shards` writes beside the shards (under
    1 s per million images) or, for a shard without one or changed since, from its tar headers (about 40 s per
    million images: a seek per member)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        manifest = read_manifest(root)
        self.name = f"shards:{os.path.abspath(root)}"
        self.classes, self.multi_label = manifest["classes"], manifest["multi_label"]
        self.flip = manifest.get("flip", True)  # the source's rule, as `write_shards` recorded it
        self.shard_names = [shard["name"] for shard in manifest["shards"]]
        locations, keys, targets, unindexed = [], [], [], []
        for number, shard in enumerate(manifest["shards"]):
            index = _read_index(self.root, shard, self.multi_label, len(self.classes))
            if index is None:
                unindexed.append(shard["name"])
                index = _index_shard(self.root / shard["name"], shard["count"], self.multi_label, len(self.classes))
            places, shard_keys, labels = index
            locations.append(np.concatenate([np.full((len(places), 1), number), places], axis=1))
            keys += shard_keys
            targets += labels
        if unindexed:
            log.warning("%s: %d of %d shards have no index file that matches them (written before shards had one, "
                        "or changed since; first: %s): their tar headers were read instead, about 40 s per million "
                        "images; `bit shards` writes shards with index files", root, len(unindexed),
                        len(self.shard_names), unindexed[0])
        # arrays, not lists of tuples: forked loader workers would copy those (packed.py)
        self.locations = np.concatenate(locations) if locations else np.zeros((0, 3), np.int64)  # shard, offset, size
        self.keys = PackedStrings(keys)
        self.targets = PackedLabels(targets) if self.multi_label else shared_labels(targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int | tuple[int, ...]]:
        i = self._check_index(i)
        shard, offset, size = self.locations[i].tolist()
        with open(self.root / self.shard_names[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        return decode_image(data, describe=self.describe(i)), self.targets[i]

    def describe(self, i: int) -> str:
        i = self._check_index(i)
        return f"{self.root / self.shard_names[int(self.locations[i, 0])]}:{self.keys[i]}"


class ShardStream(IterableDataset):
    """This process's infinite stream of (uint8 image, target, bad-image report, key), exact per
    epoch and resumable at `start_step` (see the module docstring). Batches of `local_batch` samples
    are formed by the DataLoader inside each worker, which hands them out round-robin."""

    def __init__(self, root: str | os.PathLike, transform, local_batch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0, start_step: int = 0, window: int = 4,
                 shuffle_buffer: int = 1000) -> None:
        self.root = Path(root)
        manifest = read_manifest(root)
        self.shards = [(s["name"], s["count"]) for s in manifest["shards"]]
        self.classes, self.multi_label = manifest["classes"], manifest["multi_label"]
        self.flip = manifest.get("flip", True)  # the source's rule, as `write_shards` recorded it
        self.total = manifest["total"]
        self.transform, self.local_batch, self.seed = transform, local_batch, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.num_workers = max(1, workers)
        self.window, self.shuffle_buffer = window, shuffle_buffer
        if len(self.shards) < world_size * self.num_workers:
            raise ValueError(f"{root}: {len(self.shards)} shards cannot feed {world_size} processes x "
                             f"{self.num_workers} loader workers; write smaller shards (bit shards --shard-size)")

    def _epoch_order(self, epoch: int) -> list[tuple[str, int]]:
        g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]

    def worker_shards(self, epoch: int, worker: int) -> list[tuple[str, int]]:
        """The shards (name, count) one loader worker of this process reads in `epoch`, in order."""
        return self._epoch_order(epoch)[self.rank::self.world_size][worker::self.num_workers]

    def epoch_length(self, epoch: int) -> int:
        """Samples each of the W x K streams yields in `epoch`: the shortest one's, so that no stream runs into
        the next epoch while another is still in this one."""
        order = self._epoch_order(epoch)
        return min(sum(count for _, count in order[r::self.world_size][w::self.num_workers])
                   for r in range(self.world_size) for w in range(self.num_workers))

    def raw_stream(self, worker: int, skip: int = 0) -> Iterator[tuple[str, dict[str, bytes], int]]:
        """(key, members, ordinal) of one worker's stream, endless over epochs, after `skip` samples."""
        ordinal, epoch = 0, 0
        while True:
            length = self.epoch_length(epoch)
            if length == 0:
                raise ValueError(f"{self.root}: some of the {self.world_size} x {self.num_workers} streams get no "
                                 "samples in an epoch; write smaller shards (bit shards --shard-size)")
            shards, taken = self.worker_shards(epoch, worker), 0
            for wi in range(0, len(shards), self.window):
                if taken == length:
                    break
                group = shards[wi:wi + self.window]
                size = min(sum(count for _, count in group), length - taken)
                taken += size
                if ordinal + size <= skip:  # consumed before the restart: skip without reading
                    ordinal += size
                    continue
                rng = np.random.default_rng([self.seed, epoch, self.rank, worker, wi])
                for _, (key, members) in zip(range(size), self._shuffled(group, rng), strict=False):
                    if ordinal >= skip:
                        yield key, members, ordinal
                    ordinal += 1
            epoch += 1

    def _shuffled(self, group: list[tuple[str, int]], rng: np.random.Generator) -> Iterator[tuple[str, dict]]:
        buffer: list = []
        for name, count in group:
            for sample in _samples(self.root / name, count):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = int(rng.integers(len(buffer)))
                yield buffer[j]
                buffer[j] = sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int | torch.Tensor, str, str]]:
        info = get_worker_info()
        k = info.num_workers if info is not None else 1
        if k != self.num_workers:
            raise RuntimeError(f"ShardStream was built for {self.num_workers} workers, the DataLoader has {k}")
        worker = ((info.id if info is not None else 0) + self.start_step) % k  # batch s comes from worker s % k
        batches_before = (self.start_step - worker + k - 1) // k
        for key, members, ordinal in self.raw_stream(worker, batches_before * self.local_batch):
            target = target_tensor(_target(members, self.multi_label, len(self.classes), f"{self.root}:{key}"), self)
            seed = (self.seed * SEED_STRIDE + (self.rank * k + worker) * 2**40 + ordinal) % 2**62
            try:
                image = self.transform(_decode(key, members, str(self.root)), seed)
                report = ""
            except BadImageError as e:
                image, report = torch.zeros(3, self.transform.crop, self.transform.crop, dtype=torch.uint8), str(e)
            yield image, target, report, key
