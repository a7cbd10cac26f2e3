"""GroupNorm + ReLU on CPU, per R50x1 layer shape: the fused C kernels against torch's two ops, forward and
backward, and elementwise adds over the same tensor as the memory-traffic yardsticks: `add` adds a scalar
(a read and a write), `add2` a second tensor (two reads and a write: the forward's passes). Alternating
repeats in one process, medians.

    python benchmarks/bench_norm_cpu.py                 # batch 16, 224 px shapes (inference)
    python benchmarks/bench_norm_cpu.py --res 128       # the training shapes
    python benchmarks/bench_norm_cpu.py --stores-ab     # the forward's non-temporal stores against plain ones

`--stores-ab` builds the C file twice more, with -DSTREAM_MIN_BYTES=4194304 (non-temporal stores only for outputs
of 4 MB or more) and with -DBIT_PLAIN_STORES (none), times the three builds' forward per layer shape, then runs
one R50x1 taking turns with them in one process, inference at 224 px, then training steps at 128 px, and prints
the median of per-round ratios against the plain build (a 2% change is within one round's noise on a 2-core VM).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bigtransfer as bt  # also the allocator setting a user of ours gets
from bigtransfer.models import fused_norm_cpu
from bigtransfer.models.native import NativeLibrary

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


def _build(flag: str) -> NativeLibrary:
    build = NativeLibrary(fused_norm_cpu.SOURCE, fused_norm_cpu._declare, f"GroupNorm built with {flag}",
                          extra_flags=(flag,))
    if build.get() is None:
        raise SystemExit(f"the build with {flag} failed (see the warning above)")
    return build


def _take_turns(builds: dict[str, NativeLibrary], fn, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of `fn` with each build, taking turns (the order reversed every other round), warm-up dropped."""
    times: dict[str, list[float]] = {name: [] for name in builds}
    for round_ in range(rounds + warmup):
        for name in (list(builds) if round_ % 2 else list(reversed(builds))):
            fused_norm_cpu._LIBRARY = builds[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: t[warmup:] for name, t in times.items()}


def stores_ab(batch: int, repeats: int, model_repeats: int) -> None:
    builds = {"default": fused_norm_cpu._LIBRARY, "from 4 MB": _build(f"-DSTREAM_MIN_BYTES={4 << 20}"),
              "plain": _build("-DBIT_PLAIN_STORES")}
    variants = [name for name in builds if name != "plain"]
    print(f"forward per layer shape, batch {batch}, 224 px, ms, medians of {repeats} "
          f"(default: streamed; from 4 MB: streamed from 4 MB; plain: no streaming):")
    sums = dict.fromkeys(builds, 0.0)
    for channels, stride in SHAPES:
        size = 224 // stride
        x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(channels), torch.randn(channels)
        with torch.no_grad():
            times = _take_turns(builds, lambda x=x, w=w, b=b: fused(x, w, b), repeats, warmup=1)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        sums = {name: sums[name] + ms[name] for name in builds}
        print(f"  {channels:5} {size:>3}x{size:<3} {x.numel() * 4 / 2**20:5.1f} MB  "
              + "  ".join(f"{name} {ms[name]:6.2f}" for name in builds)
              + "  " + "  ".join(f"{ms['plain'] / ms[name]:5.2f}x" for name in variants))
    print(f"  {'sum':22} " + "  ".join(f"{name} {sums[name]:6.2f}" for name in builds)
          + "  " + "  ".join(f"{sums['plain'] / sums[name]:5.2f}x" for name in variants))
    model = bt.create_model("BiT-M-R50x1", num_classes=1000, zero_head=False)
    images = {224: torch.randn(batch, 3, 224, 224), 128: torch.randn(batch, 3, 128, 128)}
    labels = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def infer() -> torch.Tensor:
        with torch.inference_mode():
            return model(images[224])

    def train() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images[128]), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    model.eval()
    outputs = []
    for build in builds.values():
        fused_norm_cpu._LIBRARY = build
        outputs.append(infer())
    print(f"R50x1, batch {batch}: logits of the three builds equal: "
          f"{all(torch.equal(outputs[0], other) for other in outputs[1:])}")
    for what, mode, fn in (("inference, 224 px", False, infer), ("training step, 128 px", True, train)):
        model.train(mode)
        times = _take_turns(builds, fn, model_repeats, warmup=2)
        line = "  ".join(f"{name} {statistics.median(t) * 1e3:6.1f}" for name, t in times.items())
        print(f"  {what:22} ms: {line}; speed-up against plain, median of per-round ratios ({model_repeats} rounds):")
        for name in variants:
            ratios = [p / s for p, s in zip(times["plain"], times[name], strict=True)]
            quartiles = statistics.quantiles(ratios, n=4)
            print(f"    {name:9} {statistics.median(ratios):.3f}x (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})")
    fused_norm_cpu._LIBRARY = builds["default"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--stores-ab", action="store_true", help="the model A/B of the forward's stores (see above)")
    p.add_argument("--ab-repeats", type=int, default=61)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if fused_norm_cpu.library() is None:
        raise SystemExit("the fused kernels are unavailable here (see the warning above)")
    if args.stores_ab:
        print(f"torch {torch.__version__}, {args.threads} threads")
        stores_ab(args.batch, args.repeats, args.ab_repeats)
        return
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
