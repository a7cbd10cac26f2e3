"""Would Winograd pay in CPU training? An upper bound, measured per layer before writing any of it.

For R50x1's stride-1 3x3 convolutions (training: 128 px, batch 16), oneDNN's forward + input gradient against
what a training Winograd would do at best with the kernels we have: transform the kernel (it changes every
step), convolve, transform the flipped and transposed kernel, convolve the output gradient (the input
gradient). The weight gradient stays oneDNN's in both, so its time is printed but not compared. Then the
whole training step with exactly that (an autograd Function, below, on the layers the inference rule picks)
against ours as it is: two copies of R50x1 taking turns in one process. Alternating repeats, medians.

    python benchmarks/bench_winograd_training.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import bigtransfer as bt  # also the allocator setting a user of ours gets
from bigtransfer.models import winograd_cpu
from bigtransfer.models.resnetv2 import StdConv2d

R50_SHAPES = [(64, 4, 3), (128, 8, 3), (256, 16, 5), (512, 32, 2)]  # (channels, stride, layers)
CONV = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, output padding, groups


def _measure(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of each case; the input gradient is the convolution of dy with the flipped, transposed kernel."""
    flipped = w.flip(-1, -2).transpose(0, 1)
    transform = winograd_cpu.transform_kernel
    cases = {
        "onednn": lambda: (torch.ops.aten.convolution(x, w, None, *CONV),
                           torch.ops.aten.convolution_backward(dy, x, w, None, *CONV, [True, False, False])),
        "wgrad": lambda: torch.ops.aten.convolution_backward(dy, x, w, None, *CONV, [False, True, False]),
        "transforms": lambda: (transform(w), transform(flipped)),
        "winograd": lambda: (winograd_cpu.conv3x3(x, transform(w)), winograd_cpu.conv3x3(dy, transform(flipped))),
    }
    times: dict[str, list[float]] = {}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for name, case in cases.items():
                start = time.perf_counter()
                case()
                times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


class _WinogradConv(torch.autograd.Function):
    """Forward and input gradient by Winograd (kernels transformed at every call), weight gradient by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return winograd_cpu.conv3x3(x, winograd_cpu.transform_kernel(weight))

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = winograd_cpu.conv3x3(dy, winograd_cpu.transform_kernel(weight.flip(-1, -2).transpose(0, 1)))
        dw = torch.ops.aten.convolution_backward(dy, x, weight, None, *CONV, [False, True, False])[1]
        return dx, dw


class _TrainingWinogradConv(StdConv2d):
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not (torch.is_grad_enabled() and winograd_cpu.usable(x, self)):
            return super().forward(x, residual)
        out = _WinogradConv.apply(x, self.standardized_weight())
        return out if residual is None else out.add_(residual)


def whole_step(batch: int, res: int, repeats: int) -> None:
    """R50x1 training steps (forward, backward, SGD), ours as is and with `_TrainingWinogradConv`, taking turns."""
    torch.manual_seed(0)
    ours = bt.create_model("BiT-M-R50x1", num_classes=10, zero_head=False).train()
    winograd = copy.deepcopy(ours)
    for module in winograd.modules():
        if type(module) is StdConv2d:
            module.__class__ = _TrainingWinogradConv
    x = torch.randn(batch, 3, res, res).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {}
    gradients = {}
    for name, model in (("ours", ours), ("winograd", winograd)):
        F.cross_entropy(model(x), labels).backward()
        gradients[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                  for name, model in (("ours", ours), ("winograd", winograd))}
    for _ in range(repeats + 2):  # two rounds warm up
        for name, model in (("ours", ours), ("winograd", winograd)):
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels).backward()
            optimizers[name].step()
            times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
    ratios = sorted(o / w for o, w in zip(times["ours"][2:], times["winograd"][2:], strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    difference = ((gradients["winograd"] - gradients["ours"]).norm() / gradients["ours"].norm()).item()
    print(f"R50x1 training step, batch {batch}, {res} px: ours {statistics.median(times['ours'][2:]):.0f} ms, with "
          f"Winograd {statistics.median(times['winograd'][2:]):.0f} ms; speed-up {statistics.median(ratios):.3f}x "
          f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, {repeats} rounds); the first step's gradients differ "
          f"by {difference:.1e} (norm of the difference over the norm)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--step-repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.res} px, fp32 channels_last;"
          f" ms, medians of {args.repeats}")
    print(f"{'C':>5} {'HxW':>7} {'layers':>6} {'picked':>6} | {'oneDNN fwd+dgrad':>16} {'wgrad':>7} | "
          f"{'kernel transforms':>17} {'Winograd fwd+dgrad':>18} | {'saved':>7}")
    saved = 0.0
    for channels, stride, layers in R50_SHAPES:
        size = args.res // stride
        x, dy = (torch.randn(args.batch, channels, size, size).contiguous(memory_format=torch.channels_last)
                 for _ in range(2))
        w = torch.randn(channels, channels, 3, 3) / (3 * channels ** 0.5)
        ms = _measure(x, dy, w, args.repeats)
        picked = winograd_cpu.worthwhile(x.shape, channels)
        if picked:
            saved += layers * (ms["onednn"] - ms["winograd"])
        print(f"{channels:5} {size:>3}x{size:<3} {layers:6} {'yes' if picked else 'no':>6} | {ms['onednn']:16.2f} "
              f"{ms['wgrad']:7.2f} | {ms['transforms']:17.2f} {ms['winograd']:18.2f} | "
              f"{ms['onednn'] - ms['winograd']:7.2f}")
    print(f"at most {saved:.1f} ms saved per training step over the layers the inference rule picks\n")
    whole_step(args.batch, args.res, args.step_repeats)


if __name__ == "__main__":
    main()
