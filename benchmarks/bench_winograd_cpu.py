"""3x3 stride-1 convolutions in CPU inference: Winograd F(4x4, 3x3) (`models/winograd_cpu`) against oneDNN's
direct convolution with a pre-packed kernel (what our inference runs otherwise), per R50x1 layer shape and a
grid of other shapes; then R50x1's whole forward with and without it. Alternating repeats in one process,
medians; the error of each against torch in float64 (largest difference / largest value).

    python benchmarks/bench_winograd_cpu.py                  # batch 16 at 224 px, then the grid and the model
    python benchmarks/bench_winograd_cpu.py --batch 1 --res 128 --skip-model
    python benchmarks/bench_winograd_cpu.py --shapes 1x512x14 8x512x7 --repeats 41   # only these (batch x C x size)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

import bigtransfer as bt  # also the allocator setting a user of ours gets
from bigtransfer.models import winograd_cpu
from bigtransfer.models.resnetv2 import StdConv2d

# (channels, stride of the map relative to the input, layers in R50x1): its stride-1 3x3 convolutions
R50_SHAPES = [(64, 4, 3), (128, 8, 3), (256, 16, 5), (512, 32, 2)]
GRID = [(batch, channels, size) for batch in (1, 4, 16, 64) for channels in (16, 32, 64, 128, 256, 512)
        for size in (4, 7, 14, 28, 56) if batch * channels * size * size <= 16 * 128 * 56 * 56]


def _time(fn, results: dict[str, list[float]], name: str) -> None:
    start = time.perf_counter()
    fn()
    results.setdefault(name, []).append((time.perf_counter() - start) * 1e3)


def measure(batch: int, channels: int, size: int, repeats: int) -> dict[str, float]:
    """Median ms of each implementation, and each one's error against float64."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3) / (3 * channels ** 0.5)
    packed = torch.ops.mkldnn._reorder_convolution_weight(weight, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
    kernel = winograd_cpu.transform_kernel(weight)
    cases = {"onednn": lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, None, [1, 1], [1, 1], [1, 1], 1,
                                                                        "none", [], ""),
             "winograd": lambda: winograd_cpu.conv3x3(x, kernel)}
    with torch.inference_mode():
        exact = F.conv2d(x.double(), weight.double(), padding=1)
        errors = {name: ((case().double() - exact).abs().max() / exact.abs().max()).item()
                  for name, case in cases.items()}
        times: dict[str, list[float]] = {}
        for _ in range(repeats):
            for name, case in cases.items():
                _time(case, times, name)
    return {**{name: statistics.median(t) for name, t in times.items()}, **{f"err {k}": v for k, v in errors.items()}}


def _row(batch: int, channels: int, size: int, repeats: int, last_column: int | None = None) -> tuple[float, float]:
    ms = measure(batch, channels, size, repeats)
    gflop = 2 * batch * size * size * channels * channels * 9 / 1e9
    picked = "yes" if winograd_cpu.worthwhile((batch, channels, size, size), channels) else "no"
    last = "" if last_column is None else last_column
    print(f"{batch:5} {channels:5} {size:>3}x{size:<3} {last:>6} | {ms['onednn']:8.2f} "
          f"{gflop / ms['onednn'] * 1e3:7.0f} {ms['err onednn']:8.1e} | {ms['winograd']:8.2f} "
          f"{gflop / ms['winograd'] * 1e3:7.0f} {ms['err winograd']:8.1e} | {ms['onednn'] / ms['winograd']:7.2f}x "
          f"{picked:>6}")
    return ms["onednn"], ms["winograd"]


def _header(first: str) -> None:
    print(f"{'batch':>5} {'C':>5} {'HxW':>7} {first:>6} | {'oneDNN':>8} {'GFLOP/s':>7} {'error':>8} | "
          f"{'Winograd':>8} {'GFLOP/s':>7} {'error':>8} | {'speed-up':>8} {'picked':>6}")


def whole_model(batch: int, res: int, repeats: int) -> None:
    """R50x1's forward, two copies of the model (each keeps its own cached kernels), taking turns."""
    torch.manual_seed(0)
    direct = bt.create_model("BiT-M-R50x1", num_classes=1000, zero_head=False).eval()
    models = {"direct": direct, "winograd": copy.deepcopy(direct)}
    x = torch.randn(batch, 3, res, res)
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        outputs = {}
        for name, model in models.items():
            winograd_cpu.ENABLED = name == "winograd"
            outputs[name] = model(x)
        for _ in range(repeats):
            for name, model in models.items():
                winograd_cpu.ENABLED = name == "winograd"
                _time(lambda model=model: model(x), times, name)
    winograd_cpu.ENABLED = True
    ratios = sorted(d / w for d, w in zip(times["direct"], times["winograd"], strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    error = ((outputs["winograd"] - outputs["direct"]).abs().max() / outputs["direct"].abs().max()).item()
    print(f"R50x1 forward, batch {batch}, {res} px: direct {statistics.median(times['direct']):.0f} ms, Winograd "
          f"{statistics.median(times['winograd']):.0f} ms; speed-up {statistics.median(ratios):.3f}x (quartiles "
          f"{quartiles[0]:.3f}-{quartiles[2]:.3f}, {repeats} rounds); logits differ by {error:.1e} of the largest")
    preparation(models["winograd"])


def _transform_in_place(weight: torch.Tensor) -> torch.Tensor:
    """The kernel transform as it was first written (G g G^T per kernel, then permuted), to compare speeds."""
    g = torch.tensor(winograd_cpu._G, dtype=torch.float32)
    u = g @ weight.float() @ g.T  # (out, in, 6, 6)
    return u.permute(2, 3, 1, 0).reshape(winograd_cpu.POSITIONS, weight.shape[1], weight.shape[0]).contiguous()


def preparation(model: torch.nn.Module, repeats: int = 5) -> None:
    """What the first forward adds: standardising and transforming the Winograd layers' kernels, by
    `transform_kernel` (one matrix product) and by the first way of writing it."""
    layers = [m for m in model.modules() if isinstance(m, StdConv2d) and "winograd" in m._cache.kernels]
    with torch.no_grad():
        standardized = [layer.standardized_weight() for layer in layers]
    for kernel in standardized:
        torch.testing.assert_close(_transform_in_place(kernel), winograd_cpu.transform_kernel(kernel))
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for layer in layers:
            layer._cache = None
        _time(lambda: [layer._cached_kernel("winograd", None) for layer in layers], times, "prepare")
        _time(lambda: [_transform_in_place(kernel) for kernel in standardized], times, "in place")
        _time(lambda: [winograd_cpu.transform_kernel(kernel) for kernel in standardized], times, "product")
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"the first forward prepares the {len(layers)} Winograd kernels (standardise and transform): "
          f"{median['prepare']:.0f} ms; the transforms alone {median['product']:.0f} ms (written in place and "
          f"permuted, as at first: {median['in place']:.0f} ms); medians of {repeats}")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        batch, channels, size = (int(part) for part in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected batch x channels x size, e.g. 16x64x14") from None
    return batch, channels, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--model-repeats", type=int, default=11)
    p.add_argument("--skip-grid", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--shapes", nargs="+", metavar="BxCxS", type=_shape,
                   help="measure only these shapes (batch x channels x size), e.g. the ones near the rule's edges")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if winograd_cpu.library() is None or os.environ.get("BIGTRANSFER_WINOGRAD") == "0":
        raise SystemExit("the Winograd kernels are unavailable here (see the warning above)")
    print(f"torch {torch.__version__}, {args.threads} threads, channels_last fp32; ms, medians of {args.repeats}; "
          "GFLOP/s counts a direct convolution's FLOPs")
    if args.shapes:
        _header("tiles")
        for batch, channels, size in args.shapes:
            _row(batch, channels, size, args.repeats, winograd_cpu.tiles((batch, channels, size, size)))
        return
    print(f"R50x1's stride-1 3x3 convolutions, batch {args.batch}, {args.res} px")
    _header("layers")
    totals = [0.0, 0.0]
    for channels, stride, layers in R50_SHAPES:
        onednn, winograd = _row(args.batch, channels, args.res // stride, args.repeats, layers)
        totals = [totals[0] + layers * onednn, totals[1] + layers * winograd]
    print(f"all {sum(n for *_, n in R50_SHAPES)} layers: oneDNN {totals[0]:.1f} ms, Winograd {totals[1]:.1f} ms "
          f"({totals[0] / totals[1]:.2f}x)")
    if not args.skip_grid:
        print("\nother shapes (the grid behind `winograd_cpu.worthwhile`)")
        _header("")
        for batch, channels, size in GRID:
            _row(batch, channels, size, args.repeats)
    if not args.skip_model:
        print()
        whole_model(args.batch, args.res, args.model_repeats)


if __name__ == "__main__":
    main()
