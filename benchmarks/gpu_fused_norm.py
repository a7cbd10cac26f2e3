"""The fused GroupNorm+ReLU kernels on a GPU: correctness against torch (and that of the Weight
Standardization kernels, `fused_ws`, and of the norm with the residual add, `add_group_norm_relu`), then
forward+backward time per norm layer of R50x1 (the HyperRule's batch 512, 128 px) against what autocast runs
(fp32 GroupNorm, ReLU, bf16 cast), and per residual sum with and without the add in the norm. Times are GPU
times of CUDA-graph replays (`triton.testing.do_bench_cudagraph`): launched one by one from Python, these
layers take longer to launch than to run, and the times would measure Python.

    python benchmarks/gpu_fused_norm.py [--batch 128]
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import traceback

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

import bigtransfer as bt
from bigtransfer.models import fused_norm, fused_ws
from bigtransfer.models.resnetv2 import GroupNormAct, standardize


def reference(x, groups, w, b):
    return F.relu(F.group_norm(x.float(), groups, w, b, 1e-5))


def check() -> None:
    torch.manual_seed(0)
    for shape, groups in [((8, 256, 32, 32), 32), ((8, 64, 32, 32), 32), ((4, 96, 15, 15), 32), ((2, 2048, 4, 4), 32)]:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(dtype).contiguous(memory_format=layout)
                w = torch.randn(shape[1], device="cuda", requires_grad=True)
                b = torch.randn(shape[1], device="cuda", requires_grad=True)
                dy = torch.randn(shape, device="cuda")
                grads = []
                # where the pre-ReLU value is within rounding of 0, the two may pick different sides of the
                # ReLU; such an element's gradient differs by its whole value, and through the group's means
                # every dx of its group a little: compare dx outside the groups that hold one
                pre = F.group_norm(x.float(), groups, w, b, 1e-5)
                edge = pre.abs() < 1e-5 * pre.abs().max()
                edge_groups = edge.reshape(shape[0], groups, -1).any(-1).repeat_interleave(shape[1] // groups, 1)
                clear = ~edge_groups[:, :, None, None].expand(shape)
                for tile in (None, 0, WHOLE):  # torch, then ours re-reading the block and keeping it whole
                    xx = x.detach().clone().requires_grad_()
                    if tile is None:
                        y = reference(xx, groups, w, b)
                    else:
                        fused_norm.TILE_ELEMENTS = tile
                        y = fused_norm.group_norm_relu(xx, groups, w, b, 1e-5)
                    (y.float() * dy).sum().backward()
                    grads.append((y.float(), xx.grad.float(), w.grad.clone(), b.grad.clone()))
                    w.grad = b.grad = None
                fused_norm.TILE_ELEMENTS = TILE_ELEMENTS
                for tile, ours in zip((0, WHOLE), grads[1:], strict=True):
                    errs = [((p - q).abs().max() / q.abs().max()).item() for p, q in zip(ours, grads[0], strict=True)]
                    dx_clear = ((ours[1] - grads[0][1]).abs()[clear].max() / grads[0][1].abs().max()).item()
                    print(f"check {str(shape):18} {str(dtype):15} {'NHWC' if layout == torch.channels_last else 'NCHW'}"
                          f" {'whole' if tile else 're-read'}  rel max err y {errs[0]:.1e} dx {errs[1]:.1e} "
                          f"dw {errs[2]:.1e} db {errs[3]:.1e}; {int(edge.sum())} at the ReLU's edge, dx in the other "
                          f"groups {dx_clear:.1e}", flush=True)
    # create_graph=True (gradient penalties): second-order gradients through torch's ops, against float64
    x, w, b = torch.randn(4, 64, 8, 8, device="cuda"), torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    second = []
    for fn, dtype in ((lambda *a: fused_norm.group_norm_relu(*a, 1e-5), torch.float32),
                      (lambda *a: F.relu(F.group_norm(*a, 1e-5)), torch.float64)):
        xs, ws, bs = (t.to(dtype).requires_grad_() for t in (x, w, b))
        (dx,) = torch.autograd.grad(fn(xs, 32, ws, bs).square().sum(), xs, create_graph=True)
        second.append(torch.autograd.grad(dx.square().sum(), (xs, ws, bs)))
    errs = [((p.double() - q).abs().max() / q.abs().max()).item() for p, q in zip(*second, strict=True)]
    print("double backward, rel max err of d/dx, d/dw, d/db:", " ".join(f"{e:.1e}" for e in errs), flush=True)


def check_ws() -> None:
    """Weight Standardization under bf16 autocast, as training runs it (`fused_ws`: bf16 out, bf16 gradient in)
    against the batch-norm form in fp32 with an fp32 gradient: errors of bf16's rounding expected."""
    torch.manual_seed(0)
    for shape in [(64, 3, 7, 7), (256, 64, 1, 1), (128, 128, 3, 3), (2048, 1024, 1, 1)]:
        for layout in (torch.contiguous_format, torch.channels_last):
            w = (torch.randn(shape, device="cuda") * 0.05 + 0.01).contiguous(memory_format=layout).requires_grad_()
            g = torch.randn(shape, device="cuda")
            results = []
            for fused in (True, False):
                fused_ws.ENABLED = fused
                with torch.autocast("cuda", torch.bfloat16, enabled=fused):
                    out = standardize(w)
                (out.float() * g).sum().backward()
                results.append((out, w.grad))
                w.grad = None
            fused_ws.ENABLED = True
            (ours, dw), (ref, dw_ref) = results
            errs = [((p.float() - q).abs().max() / q.abs().max()).item() for p, q in ((ours, ref), (dw, dw_ref))]
            print(f"check WS {str(shape):18} {'NHWC' if layout == torch.channels_last else 'NCHW'} out {ours.dtype} "
                  f"rel max err w {errs[0]:.1e} dw {errs[1]:.1e}", flush=True)


def check_residual() -> None:
    """`add_group_norm_relu` (the residual add in the norm's kernels) against torch's add, then the fused norm,
    with a gradient for the sum too (its use as the next shortcut): the sum must be torch's exactly, the rest
    within the dtype's rounding."""
    torch.manual_seed(0)
    for shape in [(8, 256, 32, 32), (8, 1024, 8, 8), (2, 2048, 4, 4)]:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                for tile in (0, WHOLE):
                    fused_norm.TILE_ELEMENTS = tile
                    a, r = ((torch.randn(shape, device="cuda") * 2).to(dtype).contiguous(memory_format=layout)
                            for _ in range(2))
                    w, b = (torch.randn(shape[1], device="cuda") for _ in range(2))
                    dy, ds = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(2))
                    results = []
                    for fused in (True, False):
                        inputs = [t.clone().requires_grad_() for t in (a, r, w, b)]
                        if fused:
                            total, y = fused_norm.add_group_norm_relu(*inputs[:2], 32, *inputs[2:], 1e-5)
                        else:
                            total = inputs[0] + inputs[1]
                            y = fused_norm.group_norm_relu(total, 32, *inputs[2:], 1e-5)
                        torch.autograd.backward([y, total], [dy, ds])
                        results.append([total, y] + [t.grad for t in inputs])
                    fused_norm.TILE_ELEMENTS = TILE_ELEMENTS
                    errs = [((p.float() - q.float()).abs().max() / q.float().abs().max()).item()
                            for p, q in zip(*results, strict=True)]
                    print(f"check residual {str(shape):18} {str(dtype):15} "
                          f"{'NHWC' if layout == torch.channels_last else 'NCHW'} {'whole' if tile else 're-read'}"
                          f"  rel max err sum {errs[0]:.1e} y {errs[1]:.1e} dx {errs[2]:.1e} dr {errs[3]:.1e} "
                          f"dw {errs[4]:.1e} db {errs[5]:.1e}", flush=True)


def layer_shapes(batch: int, res: int, residual: bool = False) -> collections.Counter:
    """(batch, groups, C, H, W) of each norm of R50x1 and how often it occurs; `residual`: only the norms whose
    input is a residual sum (each unit's first norm but the first unit's, and the head norm)."""
    model = bt.create_model("BiT-M-R50x1", num_classes=10).to("cuda")
    shapes: collections.Counter = collections.Counter()
    norms = [m for m in model.modules() if isinstance(m, GroupNormAct)]
    if residual:
        norms = [unit.norm1 for stage in model.stages for unit in stage][1:] + [model.norm]
    for m in norms:
        m.register_forward_pre_hook(lambda mod, inp: shapes.update([(mod.num_groups, *inp[0].shape[1:])]))
    with torch.no_grad():
        model(torch.randn(1, 3, res, res, device="cuda"))
    return collections.Counter({(batch, *k): v for k, v in shapes.items()})


def gpu_time_us(fn) -> tuple[float, str]:
    """GPU time of `fn` replayed as a CUDA graph, or (where capturing fails) of plain calls."""
    try:
        return do_bench_cudagraph(fn, rep=40) * 1000, "graph"
    except RuntimeError:
        return do_bench(fn, warmup=10, rep=40) * 1000, "eager"


def copy_bandwidth() -> float:
    """Bytes per second read plus written by a 1 GiB device-to-device copy."""
    big = torch.empty(1 << 30, device="cuda", dtype=torch.uint8)
    return 2 * big.numel() / (do_bench(big.clone, rep=100) / 1000)


LAUNCH = fused_norm._launch_shape
TILE_ELEMENTS = fused_norm.TILE_ELEMENTS
WHOLE = 16384  # the most elements of a block kept in registers (fused_norm.TILE_ELEMENTS) in the "whole" columns
# column: (channels_last, the launch's row bytes and tile elements); None: what autocast runs
# ("NHWC 8K": blocks of up to 8,192 elements kept, in 8 warps: two programs fit in an SM's registers, not one;
# the largest layers do not fit and re-read). Row widths other than the 64 bytes that ship were measured on
# 2026-11-27 (benchmarks/RESULTS.md, call 2)
COLUMNS = {"autocast": None, "NCHW": (False, None, 0), "NCHW whole": (False, None, WHOLE),
           "NHWC 64B": (True, 64, 0), "NHWC whole": (True, 64, WHOLE), "NHWC 8K": (True, 64, 8192), "floor": None}


def timing(batch: int, res: int = 128) -> None:
    """`floor`: the time to move the bytes the fused kernels must move (read x, write y; read x and dy, write
    dx) at the bandwidth of a large device-to-device copy measured here. `whole`: each program's block read
    once and kept in registers; the others re-read it in each pass (see `fused_norm._launch_shape`)."""
    bandwidth = copy_bandwidth()
    print(f"\nforward+backward per layer, bf16 input, R50x1 batch {batch} at {res} px (us of GPU time); "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'shape (N,C,H,W)':22} {'count':>5} " + " ".join(f"{k:>10}" for k in COLUMNS) + "  best")
    totals = collections.Counter()
    methods = set()
    for (n, groups, c, h, w), count in sorted(layer_shapes(batch, res).items()):
        weight = torch.ones(c, device="cuda", requires_grad=True)
        bias = torch.zeros(c, device="cuda", requires_grad=True)
        row = {"floor": 5 * n * c * h * w * 2 / bandwidth * 1e6}
        for name, launch in list(COLUMNS.items())[:-1]:
            layout = torch.channels_last if launch and launch[0] else torch.contiguous_format
            x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=layout)
            x.requires_grad_()
            dy = torch.randn_like(x)

            def step(x=x, dy=dy, fused=launch is not None, groups=groups, weight=weight, bias=bias):
                if fused:
                    y = fused_norm.group_norm_relu(x, groups, weight, bias, 1e-5)
                else:  # what autocast runs: fp32 GroupNorm and ReLU, then the next conv's cast to bf16
                    y = reference(x, groups, weight, bias).bfloat16()
                torch.autograd.grad(y, (x, weight, bias), dy)  # no .grad accumulation: replayable

            if launch is not None:
                fused_norm._launch_shape = functools.partial(LAUNCH, row_bytes=launch[1], tile_elements=launch[2])
            try:
                row[name], how = gpu_time_us(step)
            finally:
                fused_norm._launch_shape = LAUNCH
            methods.add(how)
        for k in COLUMNS:
            totals[k] += row[k] * count
        best = min((k for k, launch in COLUMNS.items() if launch), key=row.get)
        print(f"{str((n, c, h, w)):22} {count:5} " + " ".join(f"{row[k]:10.0f}" for k in COLUMNS) + f"  {best}")
    print(f"{'total per step (ms)':28} " + " ".join(f"{totals[k] / 1000:10.2f}" for k in COLUMNS))
    print("timed as:", ", ".join(sorted(methods)))


def timing_residual(batch: int, res: int = 128) -> None:
    """Per residual sum of R50x1 (channels_last, bf16, the default launch): a separate add, the norm and the
    gradient sum autograd makes where the sum's two uses meet, against `add_group_norm_relu` doing all three."""
    print(f"\nresidual sums of R50x1 batch {batch} at {res} px, channels_last bf16, forward+backward (us of GPU time)")
    print(f"{'shape (N,C,H,W)':22} {'count':>5} {'add+norm':>10} {'in norm':>10}")
    totals = collections.Counter()
    for (n, groups, c, h, w), count in sorted(layer_shapes(batch, res, residual=True).items()):
        a, r = (torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last).requires_grad_() for _ in range(2))
        weight = torch.ones(c, device="cuda", requires_grad=True)
        bias = torch.zeros(c, device="cuda", requires_grad=True)
        dy, ds = torch.randn_like(a), torch.randn_like(a)

        def step(fused: bool, a=a, r=r, dy=dy, ds=ds, groups=groups, weight=weight, bias=bias) -> None:
            if fused:
                total, y = fused_norm.add_group_norm_relu(a, r, groups, weight, bias, 1e-5)
            else:
                total = a + r
                y = fused_norm.group_norm_relu(total, groups, weight, bias, 1e-5)
            torch.autograd.grad((y, total), (a, r, weight, bias), (dy, ds))

        row = {name: gpu_time_us(functools.partial(step, fused))[0] for name, fused in
               (("add+norm", False), ("in norm", True))}
        totals.update({k: v * count for k, v in row.items()})
        print(f"{str((n, c, h, w)):22} {count:5} " + " ".join(f"{v:10.0f}" for v in row.values()))
    print(f"{'total per step (ms)':28} " + " ".join(f"{totals[k] / 1000:10.2f}" for k in ("add+norm", "in norm")))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    failed = []
    # each part on its own: one that fails (a kernel this Triton cannot build, say) must not cost the others'
    # numbers in a device call that cannot be repeated at will
    for part in (check, check_ws, check_residual, lambda: timing(args.batch), lambda: timing_residual(args.batch)):
        try:
            part()
        except Exception:  # noqa: BLE001 -- reported, and the exit status says so
            traceback.print_exc()
            failed.append(part)
    sys.exit(1 if failed else 0)
