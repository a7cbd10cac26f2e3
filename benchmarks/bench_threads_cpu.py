"""OpenMP thread settings for CPU training: does any beat the runtime's defaults?

The settings must be in the environment before torch loads its OpenMP runtime, so each is measured in a fresh
process: R50x1 training steps (128 px, batch 16, 2 threads), one process at a time (an idle process whose threads
spin would slow the others), the settings taking turns across rounds; median of per-round ratios to the default.

    python benchmarks/bench_threads_cpu.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "default": {},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},    # threads spin between ops, never sleep
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},  # threads sleep at once
    "OMP_PROC_BIND=true": {"OMP_PROC_BIND": "true", "OMP_PLACES": "cores"},  # one thread pinned per core
}


def worker(steps: int, threads: int) -> None:
    """Time `steps` training steps after two warm-up steps; print seconds per step."""
    import torch
    import torch.nn.functional as F

    import bigtransfer as bt

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = bt.create_model("BiT-M-R50x1", num_classes=1000, zero_head=False).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x, labels = torch.randn(16, 3, 128, 128), torch.randint(0, 1000, (16,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()

    step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print((time.perf_counter() - start) / steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.steps, args.threads)
        return
    names = list(SETTINGS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            done = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps), "--threads",
                                   str(args.threads)], env={**os.environ, **SETTINGS[name]}, capture_output=True,
                                  text=True, check=True)
            times[name].append(float(done.stdout.split()[-1]))
    print(f"R50x1 training step, 128 px, batch 16, {args.threads} threads; {args.rounds} rounds of {args.steps} steps, "
          f"a fresh process each")
    for name in names:
        ratios = sorted(d / t for d, t in zip(times["default"], times[name], strict=True))
        quartiles = statistics.quantiles(ratios, n=4)
        print(f"  {name:24} {statistics.median(times[name]) * 1e3:6.0f} ms  speed-up against the default "
              f"{statistics.median(ratios):.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})")


if __name__ == "__main__":
    main()
