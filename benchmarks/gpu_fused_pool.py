"""The stem max-pool's Triton kernels (`bigtransfer.models.fused_pool`) on a GPU: correctness against torch's
pad-then-pool, then forward+backward GPU time (CUDA-graph replays) against the model's torch path, at R50x1's
stem shape for the HyperRule's batch 512 at 128 px, both layouts, next to the time its bytes take at copy speed.

    python benchmarks/gpu_fused_pool.py [--batch 512] [--res 128]
"""

from __future__ import annotations

import argparse

import torch
from gpu_fused_norm import copy_bandwidth, gpu_time_us

from bigtransfer.models import fused_pool
from bigtransfer.models.resnetv2 import zero_padded_max_pool


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--res", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    fused_pool.ENABLED = False  # the model's function then runs torch's ops: the "torch" column
    bandwidth = copy_bandwidth()
    side = args.res // 2  # the stem convolution's output
    print(f"stem max-pool, bf16, ({args.batch}, 64, {side}, {side}); us of GPU time, forward+backward; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(args.batch, 64, side, side, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=layout).requires_grad_()
        dy = torch.randn_like(fused_pool.reference(x.detach()))
        ours = fused_pool.zero_padded_max_pool(x)
        (dx,) = torch.autograd.grad(ours, x, dy)
        xr = x.detach().double().requires_grad_()
        yr = fused_pool.reference(xr)
        yr.backward(dy.double())
        y_err = (ours.double() - yr).abs().max().item()
        dx_err = ((dx.double() - xr.grad).abs().max() / xr.grad.abs().max()).item()
        times = {}
        for name, fn in (("torch", zero_padded_max_pool), ("ours", fused_pool.zero_padded_max_pool)):
            times[name], how = gpu_time_us(lambda fn=fn, x=x, dy=dy: torch.autograd.grad(fn(x), x, dy))
        floor = (x.numel() * 2 * 2 + dy.numel() * (2 + 1) * 2) / bandwidth * 1e6  # x, dx; y, tap, dy, tap again
        print(f"{'channels_last' if layout == torch.channels_last else 'NCHW':14} torch {times['torch']:7.0f}  "
              f"ours {times['ours']:7.0f}  floor {floor:5.0f}  ({how}); y max abs err {y_err:.1e}, "
              f"dx max rel err {dx_err:.1e}")


if __name__ == "__main__":
    main()
