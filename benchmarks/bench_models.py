"""Training-step and inference throughput of our BiT against timm (and HF transformers for inference),
side by side in one run: same batch, threads, precision and input; alternating repeats; medians.

    python benchmarks/bench_models.py                       # CPU: R50x1, 128 px train, 224 px infer, batch 16
    python benchmarks/bench_models.py --device cuda --batch 128 --precision bf16 --models R50x1 R101x1 R50x3
    python benchmarks/bench_models.py --modes infer --impls ours timm --compile   # Inductor for everyone

Each implementation runs in its own worker process, so that each gets what its users get by default
(importing bigtransfer changes the process's allocator, see `bigtransfer.keep_freed_memory`); the
workers take turns, one at a time. `timm+heap` is timm in a process with our allocator setting: it shows
how much of the difference is the allocator and how much the model code. `ours-unfused` is ours without
the fused GroupNorm+ReLU kernels (`BIGTRANSFER_FUSED_NORM=0`: Triton on CUDA, C on CPUs), `ours-direct`
ours without Winograd's 3x3 convolutions in CPU inference (`BIGTRANSFER_WINOGRAD=0`), `ours-bn-ws` ours with
Weight Standardization as torch's batch norm instead of its kernels (`BIGTRANSFER_FUSED_WS=0`: Triton on
CUDA, C on CPUs), `ours-recompute` ours with the CPU norms' outputs recomputed in the backward instead of kept
(`BIGTRANSFER_RECOMPUTE_NORM=1`).
Prints img/s, the ratio to timm (the median of per-round ratios, each against timm's time in the same
round, with their quartiles: robust to the drift of a noisy machine), achieved GFLOP/s (FLOPs counted by
torch.utils.flop_counter), the fraction of this machine's measured matrix-multiply rate (the ceiling), and
peak memory (CPU: the worker's peak RSS; CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bigtransfer as bt

DEPTH_WIDTH = {"R50x1": (50, 1), "R101x1": (101, 1), "R50x3": (50, 3), "R152x2": (152, 2)}


def build(impl: str, name: str, device: torch.device, channels_last: bool) -> torch.nn.Module:
    depth, width = DEPTH_WIDTH[name]
    if impl.startswith("ours"):
        model = bt.create_model(f"BiT-M-{name}", num_classes=1000, zero_head=False)
    elif impl.startswith("timm"):
        import timm

        model = timm.create_model(f"resnetv2_{depth}x{width}_bit", num_classes=1000)
    else:
        import transformers

        arch = bt.get_model_spec(f"BiT-M-{name}").arch
        config = transformers.BitConfig(**bt.checkpoints.formats.hf_config(arch, 1000))
        model = _LogitsOnly(transformers.BitForImageClassification(config))
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class _LogitsOnly(torch.nn.Module):
    def __init__(self, hf: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(x).logits


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(model: torch.nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, precision: str):
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    amp = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def run() -> None:
            with torch.inference_mode(), amp:
                model(x)
    return run


def count_flops(model: torch.nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    model.train(mode == "train")
    with counter:
        out = model(x[:1])
        if mode == "train":
            F.cross_entropy(out, y[:1]).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * x.shape[0]


def cpu_name() -> str:
    """The CPU's model and widest vector unit: the development machine has differed between sessions, and the
    ratios move with it."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    vector = next((isa for isa in ("avx512f", "avx2") if f" {isa} " in info), "")
    return f"{model}, {vector}" if vector else model


def matmul_rate(device: torch.device, precision: str) -> float:
    """The machine's ceiling: FLOP/s of a large square matrix multiply in this precision, the best of
    several rounds (a busy moment must not lower the ceiling and inflate the fractions)."""
    n = 4096 if device.type == "cuda" else 1536
    dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best, reps = 0.0, 5
    for _ in range(7):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def worker(conn, impl: str, name: str, mode: str, res: int, args: argparse.Namespace) -> None:
    """One implementation in its own process: build, count FLOPs, warm up, then time `iters` steps
    whenever the parent asks, until it sends None."""
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, res, res, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    model = build(impl, name, device, args.channels_last)
    flops = count_flops(model, mode, x, y)
    if args.compile:  # the same for every implementation; the warm-up below compiles
        model = torch.compile(model)
    run = step_fn(model, mode, x, y, args.precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run()
    run()
    sync(device)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    conn.send((flops, peak))
    while (iters := conn.recv()) is not None:
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            run()
        sync(device)
        conn.send((time.perf_counter() - t) / iters)


def start_worker(ctx, impl: str, *args) -> tuple:
    """Peers run with the system allocator even though this module imports bigtransfer, timm+heap with
    ours (a spawned child inherits the environment at start, and imports bigtransfer first)."""
    os.environ["BIGTRANSFER_MALLOC"] = "system" if impl in ("timm", "hf") else "default"
    os.environ["BIGTRANSFER_FUSED_NORM"] = "0" if impl == "ours-unfused" else "1"
    os.environ["BIGTRANSFER_WINOGRAD"] = "0" if impl == "ours-direct" else "1"
    os.environ["BIGTRANSFER_FUSED_WS"] = "0" if impl == "ours-bn-ws" else "1"
    os.environ["BIGTRANSFER_RECOMPUTE_NORM"] = "1" if impl == "ours-recompute" else "0"
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(child, impl, *args), daemon=True)
    proc.start()
    return proc, parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["R50x1"], choices=sorted(DEPTH_WIDTH))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-res", type=int, default=128)
    p.add_argument("--infer-res", type=int, default=224)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (at least 2); the median is reported")
    p.add_argument("--iters", type=int, default=3, help="timed steps per round")
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=("train", "infer"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every implementation")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN times its algorithms for every implementation (as `bit finetune`, timm train.py)")
    p.add_argument("--impls", nargs="+", default=["ours", "timm", "timm+heap", "hf"],
                   choices=("ours", "ours-unfused", "ours-direct", "ours-bn-ws", "ours-recompute", "timm", "timm+heap",
                            "hf"))
    args = p.parse_args()
    if args.repeats < 2:
        p.error("--repeats must be at least 2: the ratios are quartiles of per-round ratios")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ceiling = matmul_rate(device, args.precision)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {args.threads} threads"
    print(f"device {device} ({where}), "
          f"torch {torch.__version__}, precision {args.precision}, batch {args.batch}; "
          f"matrix-multiply ceiling {ceiling / 1e9:.0f} GFLOP/s")
    print(f"{'model':8} {'mode':6} {'res':>4} {'impl':14} {'img/s':>9} {'vs timm':>8} {'quartiles':>11} {'GFLOP/s':>9} "
          f"{'of ceiling':>10} {'peak MiB':>9}", flush=True)
    ctx = mp.get_context("spawn")
    for name in args.models:
        for mode in args.modes:
            res = args.train_res if mode == "train" else args.infer_res
            impls = [i for i in args.impls if not (i == "hf" and mode == "train")]
            workers = {i: start_worker(ctx, i, name, mode, res, args) for i in impls}
            ready = {i: conn.recv() for i, (_, conn) in workers.items()}  # (flops, peak MiB)
            times: dict[str, list[float]] = {i: [] for i in impls}
            for round_ in range(args.repeats):  # alternate, so that a noisy moment hits everyone alike,
                for i in impls[round_ % len(impls):] + impls[:round_ % len(impls)]:  # and rotate who goes first
                    conn = workers[i][1]
                    conn.send(args.iters)
                    times[i].append(conn.recv())
            for proc, conn in workers.values():
                conn.send(None)
                proc.join()
            speed = {i: args.batch / statistics.median(times[i]) for i in impls}
            for i in impls:
                flops, peak = ready[i]
                rate = flops / statistics.median(times[i])
                ratio, spread = f"{'-':>8}", ""
                if "timm" in speed:  # per round, against timm's time in the same round: robust to drift
                    quartiles = statistics.quantiles([t / o for t, o in zip(times["timm"], times[i], strict=True)],
                                                     n=4, method="inclusive")
                    ratio, spread = f"{quartiles[1]:7.2f}x", f"{quartiles[0]:.2f}-{quartiles[2]:.2f}"
                print(f"{name:8} {mode:6} {res:4} {i:14} {speed[i]:9.1f} {ratio} {spread:>11} "
                      f"{rate / 1e9:9.1f} {rate / ceiling:9.0%} {peak:9.0f}", flush=True)


if __name__ == "__main__":
    main()
