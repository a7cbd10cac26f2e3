"""Would Winograd pay in CPU training? An upper bound, measured per layer before writing any of it.

For R50x1's stride-1 3x3 convolutions (training: 128 px, batch 16), oneDNN's forward + input gradient against
what a training Winograd would do at best with the kernels we have: transform the kernel (it changes every
step), convolve, transform the flipped and transposed kernel, convolve the output gradient (the input
gradient). The weight gradient stays oneDNN's in both, so its time is printed but not compared. Then the
whole training step with exactly that (an autograd Function, below, on the layers the inference rule picks)
against ours as it is: two copies of R50x1 taking turns in one process, with the time the kernel transforms
take inside the step; and both steps' gradients against the same model's in float64. Alternating repeats,
medians.

    python benchmarks/bench_winograd_training.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from bench_winograd_cpu import R50_SHAPES, _time

import bigtransfer as bt  # also the allocator setting a user of ours gets
from bigtransfer.models import winograd_cpu
from bigtransfer.models.resnetv2 import StdConv2d

CONV = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, output padding, groups


def _input_gradient_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The input gradient of a 3x3 convolution is the output gradient convolved with this kernel."""
    return weight.flip(-1, -2).transpose(0, 1)


def _measure(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of each case."""
    flipped = _input_gradient_kernel(w)
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
                _time(case, times, name)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


class _WinogradConv(torch.autograd.Function):
    """Forward and input gradient by Winograd (kernels transformed at every call), weight gradient by oneDNN."""

    transform_seconds = 0.0  # spent in `transform_kernel`, summed over calls

    @staticmethod
    def transform(weight: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        kernel = winograd_cpu.transform_kernel(weight)
        _WinogradConv.transform_seconds += time.perf_counter() - start
        return kernel

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return winograd_cpu.conv3x3(x, _WinogradConv.transform(weight))

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = winograd_cpu.conv3x3(dy, _WinogradConv.transform(_input_gradient_kernel(weight)))
        dw = torch.ops.aten.convolution_backward(dy, x, weight, None, *CONV, [False, True, False])[1]
        return dx, dw


class _TrainingWinogradConv(StdConv2d):
    """StdConv2d that trains through `_WinogradConv` where inference would use Winograd."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not (torch.is_grad_enabled() and winograd_cpu.usable(x, self)):
            return super().forward(x, residual)
        out = _WinogradConv.apply(x, self.standardized_weight())
        return out if residual is None else out.add_(residual)


def _gradients(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), labels).backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def layer_accuracy() -> None:
    """One 64-channel layer (32x32, batch 16): each output of `_WinogradConv` against torch in float64."""
    torch.manual_seed(0)
    x = torch.randn(16, 64, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(64, 64, 3, 3) / 24).requires_grad_()
    dy = torch.randn(16, 64, 32, 32)
    out = _WinogradConv.apply(x, weight)
    out.backward(dy)
    exact = [t.detach().double().requires_grad_() for t in (x, weight)]
    y = F.conv2d(*exact, padding=1)
    y.backward(dy.double())
    errors = [((ours.double() - reference).abs().max() / reference.abs().max()).item()
              for ours, reference in ((out, y), (x.grad, exact[0].grad), (weight.grad, exact[1].grad))]
    print("one layer against float64 (largest difference over largest value): output {:.1e}, input gradient "
          "{:.1e}, weight gradient {:.1e}".format(*errors))


def whole_step(batch: int, res: int, repeats: int) -> None:
    """R50x1 training steps (forward, backward, SGD), ours as is and with `_TrainingWinogradConv`, taking turns."""
    torch.manual_seed(0)
    ours = bt.create_model("BiT-M-R50x1", num_classes=10, zero_head=False).train()
    winograd = copy.deepcopy(ours)
    models = {"ours": ours, "winograd": winograd}
    for module in winograd.modules():
        if type(module) is StdConv2d:
            module.__class__ = _TrainingWinogradConv
    x = torch.randn(batch, 3, res, res).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    exact = copy.deepcopy(ours).double()
    reference = _gradients(exact, x.double(), labels)
    differences = {name: ((_gradients(model, x, labels) - reference).norm() / reference.norm()).item()
                   for name, model in models.items()}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) for name, model in models.items()}
    times: dict[str, list[float]] = {}
    for round_ in range(repeats + 2):  # two rounds warm up
        if round_ == 2:
            _WinogradConv.transform_seconds = 0.0
        for name, model in models.items():
            _time(lambda model=model, optimizer=optimizers[name]: _step(model, optimizer, x, labels), times, name)
    ratios = sorted(o / w for o, w in zip(times["ours"][2:], times["winograd"][2:], strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"R50x1 training step, batch {batch}, {res} px: ours {statistics.median(times['ours'][2:]):.0f} ms, with "
          f"Winograd {statistics.median(times['winograd'][2:]):.0f} ms, of which kernel transforms "
          f"{_WinogradConv.transform_seconds / repeats * 1e3:.1f} ms (mean); speed-up {statistics.median(ratios):.3f}x "
          f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, {repeats} rounds)")
    print(f"the first step's gradients against the model's in float64 (norm of the difference over the norm): ours "
          f"{differences['ours']:.1e}, with Winograd {differences['winograd']:.1e}")


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), labels).backward()
    optimizer.step()


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
    layer_accuracy()
    whole_step(args.batch, args.res, args.step_repeats)


if __name__ == "__main__":
    main()
