"""Where a training step's GPU time goes: kernel time per category (convolutions forward and backward, layout
conversions, our GroupNorm+ReLU, Weight Standardization, residual adds, casts, optimizer, ...) and the ops
that launch it, for each memory layout, next to the step's wall time (so idle gaps between kernels show).

    python benchmarks/gpu_profile.py                         # R50x1, batch 512, 128 px, bf16: NCHW and channels_last
    python benchmarks/gpu_profile.py --impls ours timm --batch 128
    python benchmarks/gpu_profile.py --device cpu --batch 4 --res 64 --precision fp32   # a CPU run of the script

The training step is `bench_models.step_fn` (the plain user loop: autocast, cross-entropy, SGD with momentum),
with cuDNN autotuning on as `bit finetune` sets it (`BIGTRANSFER_CUDNN_AUTOTUNE=0` for cuDNN's heuristics).
Categories come from kernel names, which differ between cuDNN versions: the top kernels are printed as well,
so that a kernel filed under "other" can be looked at. On a CPU there are no kernels: the categories are
those of the aten ops' own time (a smoke test of the script more than a measurement).
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import torch
from bench_models import DEPTH_WIDTH, build, step_fn, sync
from torch.profiler import ProfilerActivity, profile

from bigtransfer.runtime import autotune_convolutions

# first match wins, ignoring case; kernel names (CUDA) or aten op names (CPU)
CATEGORIES = [
    ("GroupNorm+ReLU forward (ours)", r"^_forward_kernel"),
    ("GroupNorm+ReLU backward (ours)", r"^_backward_kernel"),
    ("layout conversions", r"nchwToNhwc|nhwcToNchw|transpose|permute"),
    ("conv weight gradient", r"wgrad|convolution_backward_weight"),
    ("conv input gradient", r"dgrad|convolution_backward"),
    ("conv forward", r"fprop|implicit_gemm|xmma|cudnn|cutlass|conv(?!ert)"),
    ("matrix multiplies (head)", r"gemm|nvjet|cublas|matmul|addmm"),
    ("GroupNorm (torch)", r"group_norm|groupnorm|RowwiseMoments|ComputeFusedParams"),
    ("Weight Standardization", r"batch_norm|batchnorm|welford|standardize"),
    ("optimizer", r"multi_tensor_apply|foreach|sgd"),
    ("max-pool", r"max_pool"),
    ("residual adds, gradient sums", r"add"),
    ("ReLU", r"relu|threshold|clamp"),
    ("casts and copies", r"copy|cast|convert"),
    ("reductions (sums, means)", r"reduce|sum|mean"),
    ("fills", r"fill|zero|memset"),
    ("loss", r"softmax|nll|cross_entropy"),
]


def category(name: str) -> str:
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other")


def profile_step(impl: str, model_name: str, channels_last: bool, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    autotune_convolutions(device)
    model = build(impl, model_name, device, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.res, args.res, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    run = step_fn(model, "train", x, y, args.precision)
    for _ in range(args.warmup):
        run()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        run()
    sync(device)
    wall_ms = (time.perf_counter() - t) / args.steps * 1000

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            run()
        sync(device)
    events = prof.key_averages()
    kernel_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU

    def own_ms(e) -> float:  # a kernel's time on CUDA; an op's own CPU time (children excluded) on a CPU
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000 / args.steps

    kernels = [e for e in events if e.device_type == kernel_type and (cuda or e.key.startswith("aten::"))]
    busy_ms = sum(own_ms(e) for e in kernels)
    by_category: collections.Counter = collections.Counter()
    for e in kernels:
        by_category[category(e.key)] += own_ms(e)
    layout = "channels_last" if channels_last else "NCHW"
    print(f"\n## {impl} {model_name}, {layout}, batch {args.batch}, {args.res} px, {args.precision}: "
          f"{wall_ms:.2f} ms per step ({args.batch / wall_ms * 1000:,.0f} img/s), "
          f"{'kernels' if cuda else 'aten ops'} busy {busy_ms:.2f} ms ({busy_ms / wall_ms:.0%} of the wall time)")
    print(f"{'category':38} {'ms/step':>8} {'share':>6}")
    for cat, ms in by_category.most_common():
        print(f"{cat:38} {ms:8.2f} {ms / busy_ms:6.1%}")
    print(f"\ntop {args.top} {'kernels' if cuda else 'ops'}: ms/step, calls/step, category")
    for e in sorted(kernels, key=own_ms, reverse=True)[:args.top]:
        print(f"{own_ms(e):7.2f} {e.count / args.steps:6.0f}  {category(e.key)[:22]:22} {e.key[:110]}")
    if cuda:  # which ops launch the kernels (an op's own kernels, not its children's)
        ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.self_device_time_total > 0]
        print(f"\ntop {args.top} ops by the GPU time of the kernels they launch: ms/step, calls/step")
        for e in sorted(ops, key=lambda e: e.self_device_time_total, reverse=True)[:args.top]:
            print(f"{e.self_device_time_total / 1000 / args.steps:7.2f} {e.count / args.steps:6.0f}  {e.key[:110]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=["R50x1"], choices=sorted(DEPTH_WIDTH))
    p.add_argument("--impls", nargs="+", default=["ours"], choices=("ours", "timm"))
    p.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=("nchw", "channels_last"))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps, then the same number profiled")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    if args.device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for model_name in args.models:
        for impl in args.impls:
            for layout in args.layouts:
                profile_step(impl, model_name, layout == "channels_last", args)
                if args.device == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
