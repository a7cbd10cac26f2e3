"""Memory that every DataLoader worker copies from its parent while it reads its share of a large image folder.

A forked worker shares its parent's pages until it writes to one; reading a Python object writes to it (its
reference count), and the garbage collector's passes write to every list and tuple. So a source that keeps one
Python string per image (torchvision's ImageFolder keeps a (path, label) tuple) is copied, page by page, into
each worker that reads it: at ImageNet's 1.28M images, a few hundred MiB per worker, times 8 workers per GPU.

Makes a tree of empty files (`--images` in `--classes` folders, ImageNet's names), then, for torchvision's
ImageFolder and for ours (the whole folder, the training part carved from it, a multi-label CSV listing the
files), forks `--workers` loader
workers that each read the path and label of every `--workers`-th item of a random order (what an epoch does,
without decoding) and report how much of their memory became private.

    python benchmarks/bench_loader_memory.py [--images 200000] [--classes 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def private_mib() -> float:
    """This process's private (unshared) memory: what it holds that no other process does."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


class _Share(Dataset):
    """Item w: worker w reads every `workers`-th item of `order` and reports the memory that became private."""

    def __init__(self, read, order: np.ndarray, workers: int) -> None:
        self.read, self.order, self.workers = read, order, workers

    def __len__(self) -> int:
        return self.workers

    def __getitem__(self, w: int) -> float:
        before = private_mib()
        for i in self.order[w::self.workers].tolist():
            self.read(i)
        gc.collect()  # a worker's allocations run full collections over an epoch; here, once
        return private_mib() - before


def copied_per_worker(read, n: int, workers: int) -> float:
    order = np.random.default_rng(0).permutation(n)
    loader = DataLoader(_Share(read, order, workers), batch_size=None, num_workers=workers)
    return float(np.median(list(loader)))


def make_tree(root: Path, images: int, classes: int) -> None:
    """The files, and ``tags.csv`` beside the tree listing each with its class and one of 50 tags (multi-label)."""
    with open(root.parent / "tags.csv", "w") as csv:
        csv.write("path,label\n")
        for c in range(classes):
            folder = root / f"n{1440764 + c * 7919:08d}"
            folder.mkdir(parents=True)
            for k in range(c, images, classes):
                (folder / f"{folder.name}_{k + 10000}.JPEG").touch()
                csv.write(f"{root.name}/{folder.name}/{folder.name}_{k + 10000}.JPEG,{folder.name};tag{k % 50}\n")


SOURCES = {  # name: (build(root) -> source, read(source, i))
    "none (the control: the interpreter's own pages)": (lambda root: range(N_CONTROL), lambda s, i: None),
    "torchvision ImageFolder": (lambda root: _torchvision(root), lambda s, i: s.samples[i]),
    "ours, the whole folder": (lambda root: _ours(root, "all"), lambda s, i: (s.describe(i), s.targets[i])),
    "ours, its training part": (lambda root: _ours(root, "train"), lambda s, i: (s.describe(i), s.targets[i])),
    "ours, a multi-label CSV of the same files": (lambda root: _ours(str(Path(root).parent / "tags.csv"), "all"),
                                                  lambda s, i: (s.describe(i), s.targets[i])),
}
N_CONTROL = 200_000


def _torchvision(root: str):
    from torchvision.datasets import ImageFolder

    return ImageFolder(root, loader=lambda p: None)


def _ours(root: str, split: str):
    from bigtransfer.data import open_dataset

    return open_dataset(root, split=split)  # "train": the part carved off, as the folder has no val/


def measure(name: str, root: str, workers: int) -> None:
    """In a process of its own, so that no other source's objects are in the heap the workers copy; every row
    imports the same modules, whose objects the workers' garbage collections copy too."""
    import torchvision.datasets  # noqa: F401

    import bigtransfer.data  # noqa: F401

    build, read = SOURCES[name]
    source = build(root)
    print(len(source), copied_per_worker(lambda i: read(source, i), len(source), workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, args.root, args.workers)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imagenet" / "train"
        root.mkdir(parents=True)
        t0 = time.perf_counter()
        make_tree(root, args.images, args.classes)
        print(f"{args.images} empty files in {args.classes} folders under {root}: {time.perf_counter() - t0:.0f} s")
        print(f"\nprivate memory each of {args.workers} workers gains as it reads its share of an epoch (median):\n")
        print("| source | items | MiB per worker | beyond the control, per 1.28M images |\n|---|---|---|---|")
        control = None
        for name in SOURCES:
            out = subprocess.run([sys.executable, __file__, "--measure", name, "--root", str(root),
                                  "--workers", str(args.workers)], capture_output=True, text=True, check=True)
            n, mib = out.stdout.split()
            n, mib = int(n), float(mib)
            if control is None:
                control = mib
                print(f"| {name} | - | {mib:.1f} | - |")
            else:
                print(f"| {name} | {n} | {mib:.1f} | {(mib - control) * 1_281_167 / n:.0f} MiB |")
        print(f"\ntorch {torch.__version__}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
