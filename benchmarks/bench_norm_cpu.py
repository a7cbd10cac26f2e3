"""GroupNorm + ReLU on CPU, per R50x1 layer shape: the fused C kernels against torch's two ops, forward and
backward, and elementwise adds over the same tensor as the memory-traffic yardsticks: `add` adds a scalar
(a read and a write), `add2` a second tensor (two reads and a write: the forward's passes). Alternating
repeats in one process, medians.

    python benchmarks/bench_norm_cpu.py                 # batch 16, 224 px shapes (inference)
    python benchmarks/bench_norm_cpu.py --res 128       # the training shapes
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bigtransfer  # noqa: F401  (the allocator setting a user of ours gets)
from bigtransfer.models import fused_norm_cpu

# (channels, stride of the map relative to the input): every distinct norm input of R50x1
SHAPES = [(64, 4), (256, 4), (128, 4), (128, 8), (512, 8), (256, 8), (256, 16), (1024, 16), (512, 16),
          (512, 32), (2048, 32)]


def torch_ops(x, w, b):
    return F.relu(F.group_norm(x, 32, w, b, 1e-5), inplace=True)


def fused(x, w, b):
    return fused_norm_cpu.group_norm_relu(x, 32, w, b, 1e-5)


def measure(batch: int, channels: int, size: int, repeats: int) -> dict[str, float]:
    """Median ms of an add, and of each implementation's forward (no grad) and backward, taking turns."""
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    dy = torch.randn_like(x)
    other = torch.randn_like(x)
    leaf = x.clone().requires_grad_()
    graphs = {fn: fn(leaf, w, b) for fn in (torch_ops, fused)}

    def forward(fn):
        with torch.no_grad():
            fn(x, w, b)

    def backward(fn):
        torch.autograd.grad(graphs[fn], (leaf, w, b), dy, retain_graph=True)

    cases = {"add": lambda: torch.add(x, 1.0), "add2": lambda: torch.add(x, other)}
    for fn in (torch_ops, fused):
        cases[f"fwd {fn.__name__}"] = lambda fn=fn: forward(fn)
        cases[f"bwd {fn.__name__}"] = lambda fn=fn: backward(fn)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():
        case()  # warm up
    for _ in range(repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if fused_norm_cpu.library() is None:
        raise SystemExit("the fused kernels are unavailable here (see the warning above)")
    print(f"batch {args.batch}, {args.res} px, {args.threads} threads, channels_last fp32; ms, medians of "
          f"{args.repeats}")
    print(f"{'C':>5} {'HxW':>7} {'MB':>6} {'add':>6} {'add2':>6} | {'torch fwd':>9} {'fused fwd':>9} {'speed-up':>8} | "
          f"{'torch bwd':>9} {'fused bwd':>9} {'speed-up':>8}")
    totals = [0.0] * 4
    for channels, stride in SHAPES:
        size = args.res // stride
        ms = measure(args.batch, channels, size, args.repeats)
        row = [ms["fwd torch_ops"], ms["fwd fused"], ms["bwd torch_ops"], ms["bwd fused"]]
        totals = [t + r for t, r in zip(totals, row, strict=True)]
        megabytes = args.batch * channels * size * size * 4 / 1e6
        print(f"{channels:5} {size:>3}x{size:<3} {megabytes:6.1f} {ms['add']:6.2f} {ms['add2']:6.2f} | {row[0]:9.2f} "
              f"{row[1]:9.2f} {row[0] / row[1]:7.2f}x | {row[2]:9.2f} {row[3]:9.2f} {row[2] / row[3]:7.2f}x")
    print(f"{'sum':>5} {'':7} {'':6} {'':6} {'':6} | {totals[0]:9.2f} {totals[1]:9.2f} {totals[0] / totals[1]:7.2f}x | "
          f"{totals[2]:9.2f} {totals[3]:9.2f} {totals[2] / totals[3]:7.2f}x")


if __name__ == "__main__":
    main()
