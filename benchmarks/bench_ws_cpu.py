"""Weight Standardization on CPUs in training: the C kernels (`fused_ws_cpu`, the default) against torch's batch
norm over a (1, out, in*kh*kw) view (what ran before, `BIGTRANSFER_FUSED_WS=0`).

1. The op over R50x1's 53 kernels, as a training step runs it: the forward hands the convolution a channels_last
   kernel (the C kernels write it so; the batch-norm form's output is copied into that layout, as oneDNN does
   for channels_last activations), the backward takes the channels_last gradient the convolution returns.
2. The whole training step (forward, backward, SGD): one R50x1 taking turns with and without the kernels in one
   process, many rounds, median of per-round ratios (2% is within one round's noise on a 2-core VM).
3. Where a step's time goes with each, from torch.profiler: the copies and the standardisation ops (the one copy
   of each 3x3 kernel left with the C kernels is torch's, inside oneDNN's backward: its weight gradient made
   in torch's layout, then copied channels_last).
Also both forms' errors against float64 for one kernel.

    python benchmarks/bench_ws_cpu.py [--step-repeats 101]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import bigtransfer as bt  # also the allocator setting a user of ours gets
from bigtransfer.models import fused_ws_cpu
from bigtransfer.models.resnetv2 import WS_EPS, StdConv2d, batch_norm_standardize

PROFILED_STEPS = 5
FORMS = {
    "C kernels": lambda w: fused_ws_cpu.standardize(w, WS_EPS),
    "batch norm + copy": lambda w: batch_norm_standardize(w).contiguous(memory_format=torch.channels_last),
}


def op_times(model: torch.nn.Module, repeats: int) -> None:
    weights = [m.weight.detach().clone().requires_grad_() for m in model.modules() if isinstance(m, StdConv2d)]
    grads = [torch.randn(w.shape).contiguous(memory_format=torch.channels_last) for w in weights]
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "backward": []} for name in FORMS}
    for _ in range(repeats + 1):  # the first round warms up
        for name, form in FORMS.items():
            start = time.perf_counter()
            outs = [form(w) for w in weights]
            middle = time.perf_counter()
            torch.autograd.backward(outs, grads)
            times[name]["forward"].append(middle - start)
            times[name]["backward"].append(time.perf_counter() - middle)
    print(f"Weight Standardization of R50x1's {len(weights)} kernels ({sum(w.numel() for w in weights) / 1e6:.1f}M "
          f"weights), ms, medians of {repeats}:")
    for name, parts in times.items():
        forward, backward = (statistics.median(parts[p][1:]) * 1e3 for p in ("forward", "backward"))
        print(f"  {name:18} forward {forward:6.1f}  backward {backward:6.1f}  total {forward + backward:6.1f}")


def accuracy() -> None:
    """Largest error of the output and the weight gradient, over the largest value, against float64, for a
    512x512x3x3 kernel (R50x1's largest 3x3) and a channels_last gradient, as the convolution returns it."""
    torch.manual_seed(0)
    w = torch.randn(512, 512, 3, 3) * 0.02 + 0.001
    g = torch.randn(512, 512, 3, 3).contiguous(memory_format=torch.channels_last)
    w64 = w.double().requires_grad_()
    reference = batch_norm_standardize(w64)
    reference.backward(g.double())
    for name, form in FORMS.items():
        leaf = w.clone().requires_grad_()
        out = form(leaf)
        out.backward(g)
        errors = [((a.double() - b).abs().max() / b.abs().max()).item()
                  for a, b in ((out, reference), (leaf.grad, w64.grad))]
        print(f"  {name:18} against float64: output {errors[0]:.1e}, gradient {errors[1]:.1e}")


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor,
          fused: bool) -> None:
    fused_ws_cpu.ENABLED = fused
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), labels).backward()
    optimizer.step()


def whole_step(model: torch.nn.Module, batch: int, res: int, repeats: int) -> None:
    x = torch.randn(batch, 3, res, res)
    labels = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    times: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(repeats + 2):  # two rounds warm up
        for fused in ((True, False) if round_ % 2 else (False, True)):  # and take turns going first
            start = time.perf_counter()
            _step(model, optimizer, x, labels, fused)
            times[fused].append(time.perf_counter() - start)
    ratios = sorted(b / c for b, c in zip(times[False][2:], times[True][2:], strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    fused, batch_norm = (statistics.median(times[f][2:]) * 1e3 for f in (True, False))
    print(f"R50x1 training step, batch {batch}, {res} px: with the C kernels {fused:.0f} ms, with the batch-norm "
          f"form {batch_norm:.0f} ms; speed-up "
          f"{statistics.median(ratios):.3f}x (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, {repeats} rounds)")
    for fused in (False, True):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(PROFILED_STEPS):
                _step(model, optimizer, x, labels, fused)
        ops = {e.key: e.self_cpu_time_total / PROFILED_STEPS / 1e3 for e in prof.key_averages()}
        kernel_copies = [e for e in prof.key_averages(group_by_input_shape=True)
                         if e.key == "aten::copy_" and e.input_shapes and e.input_shapes[0][2:] == [3, 3]]
        standardise = sum(ops.get(k, 0.0) for k in ("aten::native_batch_norm", "aten::native_batch_norm_backward",
                                                    "_Standardize", "_StandardizeBackward"))
        count = sum(e.count for e in kernel_copies) // PROFILED_STEPS
        seconds = sum(e.self_cpu_time_total for e in kernel_copies) / PROFILED_STEPS / 1e3
        print(f"  profile, {'C kernels' if fused else 'batch-norm form'}, per step: standardisation {standardise:5.1f}"
              f" ms, copies {ops.get('aten::copy_', 0.0):5.1f} ms, of which {count} of 3x3 kernels, {seconds:.1f} ms")
    fused_ws_cpu.ENABLED = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--step-repeats", type=int, default=101)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    model = bt.create_model("BiT-M-R50x1", num_classes=1000, zero_head=False).train()
    op_times(model, args.repeats)
    accuracy()
    whole_step(model, args.batch, args.res, args.step_repeats)


if __name__ == "__main__":
    main()
