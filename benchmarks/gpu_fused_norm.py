"""The fused GroupNorm+ReLU kernels on a GPU: correctness against torch, then forward+backward time per
norm layer of R50x1 (batch 128, 128 px) against what autocast runs (fp32 GroupNorm, ReLU, bf16 cast).

    python benchmarks/gpu_fused_norm.py
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import bigtransfer as bt
from bigtransfer.models import fused_norm
from bigtransfer.models.resnetv2 import GroupNormAct


def reference(x, groups, w, b):
    return F.relu(F.group_norm(x.float(), groups, w, b, 1e-5))


def check() -> None:
    torch.manual_seed(0)
    for shape, groups in [((8, 256, 32, 32), 32), ((4, 96, 15, 15), 32), ((2, 2048, 4, 4), 32)]:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(dtype).contiguous(memory_format=layout)
                w = torch.randn(shape[1], device="cuda", requires_grad=True)
                b = torch.randn(shape[1], device="cuda", requires_grad=True)
                dy = torch.randn(shape, device="cuda")
                grads = []
                for fn in (reference, lambda *a: fused_norm.group_norm_relu(*a, 1e-5)):
                    xx = x.detach().clone().requires_grad_()
                    y = fn(xx, groups, w, b)
                    (y.float() * dy).sum().backward()
                    grads.append((y.float(), xx.grad.float(), w.grad.clone(), b.grad.clone()))
                    w.grad = b.grad = None
                errs = [((p - q).abs().max() / q.abs().max()).item() for p, q in zip(grads[1], grads[0], strict=True)]
                print(f"check {str(shape):18} {str(dtype):15} {'NHWC' if layout == torch.channels_last else 'NCHW'}"
                      f"  rel max err y {errs[0]:.1e} dx {errs[1]:.1e} dw {errs[2]:.1e} db {errs[3]:.1e}", flush=True)


def layer_shapes(batch: int, res: int) -> collections.Counter:
    model = bt.create_model("BiT-M-R50x1", num_classes=10).to("cuda")
    shapes: collections.Counter = collections.Counter()
    for m in model.modules():
        if isinstance(m, GroupNormAct):
            m.register_forward_pre_hook(lambda mod, inp: shapes.update([(mod.num_groups, *inp[0].shape[1:])]))
    with torch.no_grad():
        model(torch.randn(1, 3, res, res, device="cuda"))
    return collections.Counter({(batch, *k): v for k, v in shapes.items()})


def timing(batch: int = 128, res: int = 128) -> None:
    print(f"\nforward+backward per layer, bf16 input, R50x1 batch {batch} at {res} px (us)")
    print(f"{'shape (N,C,H,W)':22} {'count':>5} {'autocast':>9} {'fused NCHW':>11} {'fused NHWC':>11}")
    totals = collections.Counter()
    for (n, groups, c, h, w), count in sorted(layer_shapes(batch, res).items()):
        weight = torch.ones(c, device="cuda", requires_grad=True)
        bias = torch.zeros(c, device="cuda", requires_grad=True)
        row = {}
        for name, layout in [("autocast", torch.contiguous_format), ("fused NCHW", torch.contiguous_format),
                             ("fused NHWC", torch.channels_last)]:
            x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=layout)
            x.requires_grad_()
            dy = torch.randn_like(x)
            fused = name.startswith("fused")

            def step(x=x, dy=dy, fused=fused, groups=groups, weight=weight, bias=bias):
                if fused:
                    y = fused_norm.group_norm_relu(x, groups, weight, bias, 1e-5)
                else:  # what autocast runs: fp32 GroupNorm and ReLU, then the next conv's cast to bf16
                    y = reference(x, groups, weight, bias).bfloat16()
                y.backward(dy)

            row[name] = do_bench(step, warmup=10, rep=40) * 1000
            totals[name] += row[name] * count
        print(f"{str((n, c, h, w)):22} {count:5} " + " ".join(f"{row[k]:{len(k) if len(k) > 9 else 9}.0f}"
                                                            for k in ("autocast", "fused NCHW", "fused NHWC")))
    print(f"{'total per step (ms)':28} " + " ".join(f"{totals[k] / 1000:{max(len(k), 9)}.2f}"
                                                    for k in ("autocast", "fused NCHW", "fused NHWC")))


if __name__ == "__main__":
    check()
    timing()
