"""This checkout's bigtransfer against the package of another commit, in one process, taking turns: the way to
see a change of a few percent on a noisy machine, where two runs of `bench_models.py` differ by more than that.

The other commit's `src/bigtransfer` is extracted (`git archive`) into a temporary folder as the package
`bigtransfer_base` (its imports are relative, so both load side by side, each with its own C kernels built into the
cache). Each round times a few training steps (forward, backward, SGD) or inference forwards of both models,
in alternating order; prints the medians and the median of per-round ratios with their quartiles.

    python benchmarks/bench_ab.py --base ce8e230                         # R50x1 training, 128 px, batch 16
    python benchmarks/bench_ab.py --base ce8e230 --mode infer --res 224
    python benchmarks/bench_ab.py --base ce8e230 --model demo --batch 32 --res 32 --iters 20   # `bit demo`'s net
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bigtransfer

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"R50x1": ((3, 4, 6, 3), 1.0), "demo": ((1, 1, 1, 1), 0.25)}  # demo: the embedded BiT-R14x0.25's shape


def base_package(commit: str, folder: Path):
    """The package of `commit`, importable as `bigtransfer_base`."""
    archive = folder / "base.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), commit, "src/bigtransfer"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    (folder / "src" / "bigtransfer").rename(folder / "bigtransfer_base")
    sys.path.insert(0, str(folder))
    return importlib.import_module("bigtransfer_base")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare with (anything `git archive` takes)")
    p.add_argument("--model", default="R50x1", choices=sorted(MODELS))
    p.add_argument("--mode", default="train", choices=("train", "infer"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--iters", type=int, default=3, help="timed steps per round and package")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        packages = {"base": base_package(args.base, Path(folder)), "this": bigtransfer}
        depths, width = MODELS[args.model]
        x = torch.randn(args.batch, 3, args.res, args.res)
        target = torch.randint(0, 10, (args.batch,))
        runs = {}
        for name, package in packages.items():
            torch.manual_seed(0)
            model = package.ResNetV2(package.Architecture(depths, width), num_classes=10, zero_head=False)
            model.train(args.mode == "train")
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step(model=model, opt=opt) -> None:
                if args.mode == "infer":
                    with torch.inference_mode():
                        model(x)
                    return
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), target).backward()
                opt.step()

            runs[name] = step
        times: dict[str, list[float]] = {name: [] for name in runs}
        for step in runs.values():  # warm-up: kernels built and loaded, caches filled
            step()
        for r in range(args.rounds):
            for name in (("base", "this") if r % 2 else ("this", "base")):
                start = time.perf_counter()
                for _ in range(args.iters):
                    runs[name]()
                times[name].append((time.perf_counter() - start) / args.iters)
    ratios = [b / t for b, t in zip(times["base"], times["this"], strict=True)]
    low, _, high = statistics.quantiles(ratios, n=4)
    print(f"{args.model} {args.mode}, {args.res} px, batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}; {args.rounds} rounds of {args.iters}")
    for name in runs:
        print(f"  {name:5} {statistics.median(times[name]) * 1e3:9.1f} ms per step")
    print(f"  this checkout's speed-up over {args.base}: {statistics.median(ratios):.3f}x "
          f"(quartiles {low:.3f}-{high:.3f})")


if __name__ == "__main__":
    main()
