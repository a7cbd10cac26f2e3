"""The fused GroupNorm+ReLU Triton kernels (CUDA's default), run here by Triton's CPU interpreter and
checked against torch's GroupNorm + ReLU in float64: values, the three gradients, dtype and layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from bigtransfer.models import fused_norm

    torch.manual_seed(0)
    cases = [  # shape, groups, dtype, channels_last, layout of the incoming gradient, mean of x
        ((2, 16, 5, 7), 4, torch.float32, False, False, 1),
        ((2, 24, 6, 6), 8, torch.bfloat16, True, True, 1),     # 3 channels per group: a padded tile
        ((1, 4, 48, 48), 2, torch.float32, True, False, 1),    # 2,304 positions: the kernels loop over tiles
        ((3, 64, 9, 9), 32, torch.bfloat16, False, True, 1),
        ((2, 8, 5, 1), 4, torch.float32, None, False, 1),      # width 1, its stride not the dense one
        ((2, 64, 5, 5), 32, torch.bfloat16, True, True, 1),    # channels_last: 2-channel groups, 8-32 per program
        ((2, 64, 3, 3), 32, torch.float32, True, False, 1),    # fp32: 4-16 groups of 2 channels per program
        ((2, 256, 3, 3), 32, torch.bfloat16, True, False, 1),  # 2-8 groups of 8 channels per program
        ((3, 128, 1, 1), 32, torch.float32, False, False, 1),  # 1x1 maps: channels adjacent in NCHW too (2-8 groups)
        # a mean 33 standard deviations from 0, over several tiles (E[x^2] - E[x]^2 in fp32 put y off by 8.5e-5)
        ((1, 16, 30, 30), 2, torch.float32, False, False, 100),
        ((1, 64, 40, 40), 32, torch.float32, True, True, 100),
    ]
    # (bytes of each position's row one program takes where channels are adjacent, the most elements a block
    # may have to be read once and kept: 0 = re-read in each pass); 512 makes some rows narrow to fit
    width = fused_norm.ROW_BYTES
    runs = [((32, 0), case) for case in cases[5:]] + [((width, 0), case) for case in cases] + \
        [((128, 0), case) for case in cases[5:]] + [((width, 16384), case) for case in cases] + \
        [((width, 512), case) for case in cases[5:]]
    launches = set()
    for (fused_norm.ROW_BYTES, fused_norm.TILE_ELEMENTS), (shape, groups, dtype, channels_last, grad_channels_last,
                                                          mean) in runs:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = (torch.randn(shape) * 3 + mean).to(dtype).contiguous(memory_format=fmt)
        if channels_last is None:
            x = x.reshape(*shape[:2], 1, shape[2]).transpose(2, 3)
            assert x.is_contiguous() and x.stride(3) != 1
        meta = fused_norm._launch_shape(x, groups)[1]
        launches.add((meta["WHOLE"], meta["GROUP_CHANNELS"] * meta["GROUP_BLOCK"] * x.element_size()))
        w, b = torch.randn(shape[1]), torch.randn(shape[1])
        dy = torch.randn(shape).to(dtype)
        dy = dy.contiguous(memory_format=torch.channels_last if grad_channels_last else torch.contiguous_format)

        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fused_norm.group_norm_relu(xs, groups, ws, bs, 1e-5)
        y.backward(dy)
        xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
        yr = F.relu(F.group_norm(xr, groups, wr, br, 1e-5))
        yr.backward(dy.double())

        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt), (shape, y.dtype, y.stride())
        assert xs.grad.dtype == dtype and ws.grad.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 rounds the output and dx to 8 bits
        for name, ours, ref in [("y", y, yr), ("dx", xs.grad, xr.grad), ("dw", ws.grad, wr.grad),
                                ("db", bs.grad, br.grad)]:
            err = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (shape, dtype, meta, name, err)
            print(shape, dtype, fused_norm.ROW_BYTES, fused_norm.TILE_ELEMENTS, name, f"{err:.1e}")

    assert {(True, 32), (True, 64), (False, 64), (False, 128)} <= launches, launches  # narrowed to fit: (True, 32)

    # create_graph=True: the backward runs through torch's ops, so second-order gradients exist and match
    x, w, b = torch.randn(2, 8, 3, 3), torch.randn(8), torch.randn(8)
    second = []
    for fn, dtype in ((fused_norm.group_norm_relu, torch.float32),
                      (lambda *a: F.relu(F.group_norm(*a)), torch.float64)):
        xs, ws, bs = (t.to(dtype).requires_grad_() for t in (x, w, b))
        (dx,) = torch.autograd.grad(fn(xs, 4, ws, bs, 1e-5).square().sum(), xs, create_graph=True)
        second.append(torch.autograd.grad(dx.square().sum(), (xs, ws, bs)))
    for ours, ref in zip(*second):
        assert ((ours.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4

    # a NaN makes its group NaN and the ReLU keeps it so, as torch's does (a maximum would clip it to 0 and hide a
    # diverged run), in both tile modes and with the add
    x = torch.randn(2, 16, 5, 5)
    x[1, 5, 2, 3] = float("nan")
    w, b = torch.randn(16), torch.randn(16)
    expected = F.relu(F.group_norm(x, 4, w, b, 1e-5))
    for fused_norm.TILE_ELEMENTS in (0, 16384):
        for y in (fused_norm.group_norm_relu(x, 4, w, b, 1e-5),
                  fused_norm.add_group_norm_relu(x, torch.zeros_like(x), 4, w, b, 1e-5)[1]):
            torch.testing.assert_close(y, expected, equal_nan=True)
            assert y[1, 4:8].isnan().all() and not y[0].isnan().any()
    print("ok")
""")


RESIDUAL_SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from bigtransfer.models import fused_norm
    from bigtransfer.models.resnetv2 import Architecture, ResNetV2

    torch.manual_seed(0)
    cases = [  # shape, groups, dtype, channels_last
        ((2, 16, 5, 7), 4, torch.float32, False),
        ((2, 64, 5, 5), 32, torch.bfloat16, True),
        ((1, 4, 48, 48), 2, torch.float32, True),  # the kernels loop over tiles: the output pass reads the sum
        ((1, 64, 40, 40), 32, torch.float32, False),
    ]
    for fused_norm.TILE_ELEMENTS in (0, 16384):
        for shape, groups, dtype, channels_last in cases:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            a, r = ((torch.randn(shape) * 3 + 1).to(dtype).contiguous(memory_format=fmt) for _ in range(2))
            w, b = torch.randn(shape[1]), torch.randn(shape[1])
            dy, d_sum = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
            for sum_used in (True, False):  # the sum used again (an identity shortcut) or only normalised
                As, rs, ws, bs = (t.clone().requires_grad_() for t in (a, r, w, b))
                s, y = fused_norm.add_group_norm_relu(As, rs, groups, ws, bs, 1e-5)
                torch.autograd.backward([y, s] if sum_used else [y], [dy, d_sum] if sum_used else [dy])
                assert s.dtype == y.dtype == dtype and s.is_contiguous(memory_format=fmt)
                # the sum as stored, within the dtype's rounding (the interpreter rounds bf16 its own way: torch
                # rounds to nearest); the reference normalises that
                exact = a.double() + r.double()
                assert ((s.double() - exact).abs() <= exact.abs() * (2e-7 if dtype == torch.float32 else 8e-3)).all()
                sr, wr, br = (t.detach().double().requires_grad_() for t in (s, w, b))
                F.relu(F.group_norm(sr, groups, wr, br, 1e-5)).backward(dy.double())
                ds = sr.grad + d_sum.double() if sum_used else sr.grad
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                for name, ours, ref in [("y", y, F.relu(F.group_norm(sr, groups, wr, br, 1e-5))),
                                        ("dx", As.grad, ds), ("dr", rs.grad, ds), ("dw", ws.grad, wr.grad),
                                        ("db", bs.grad, br.grad)]:
                    err = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
                    assert err < tol, (shape, dtype, fused_norm.TILE_ELEMENTS, sum_used, name, err)

    # create_graph=True: second-order gradients through the add too
    a, r, w, b = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3), torch.randn(8), torch.randn(8)
    second = []
    for fn, dtype in ((fused_norm.add_group_norm_relu, torch.float32),
                      (lambda a, r, *args: (a + r, F.relu(F.group_norm(a + r, *args))), torch.float64)):
        As, rs, ws, bs = (t.to(dtype).requires_grad_() for t in (a, r, w, b))
        s, y = fn(As, rs, 4, ws, bs, 1e-5)
        da, dr = torch.autograd.grad(y.square().sum() + s.pow(3).sum(), (As, rs), create_graph=True)
        second.append(torch.autograd.grad(da.square().sum() + (dr * rs).sum(), (As, rs, ws, bs)))
    for ours, ref in zip(*second):
        assert ((ours.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5

    # a model whose residual adds run in the norms (as on CUDA) against the same model adding them itself
    fused_norm.usable = lambda x: x.dim() == 4 and fused_norm.plain_eager()  # here: CPU tensors, interpreted
    calls = []
    add_group_norm_relu = fused_norm.add_group_norm_relu
    fused_norm.add_group_norm_relu = lambda *args: calls.append(1) or add_group_norm_relu(*args)
    model = ResNetV2(Architecture((1, 2, 1, 1), 0.25), num_classes=5, zero_head=False)
    x = torch.randn(2, 3, 32, 32)
    results = []
    for fused_norm.RESIDUAL in (True, False):
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    assert len(calls) == 5, calls  # the units after the first, then the head norm
    for ours, ref in zip(*results):
        assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5

    # hooks on a unit (the path calls none as a module) or activation checkpointing: the units run as modules
    fused_norm.RESIDUAL, seen = True, []
    handle = model.stages[1][1].register_forward_hook(lambda *args: seen.append(1))
    assert torch.equal(model(x), results[1][0]) and seen == [1] and len(calls) == 5
    handle.remove()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    assert len(calls) == 5
    print("ok")
""")


def run_interpreted(script: str) -> None:
    """Runs `script` in a fresh Python under Triton's CPU interpreter (it must be set before Triton is imported)
    and expects it to finish by printing "ok"."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


def test_fused_group_norm_relu_matches_torch_in_float64() -> None:
    run_interpreted(SCRIPT)


def test_residual_add_fused_into_the_norm_matches_torch_in_float64() -> None:
    """`add_group_norm_relu` (the sum and its norm; the backward adding the sum's own gradient), and a model whose
    residual adds it runs (``BIGTRANSFER_FUSED_RESIDUAL=1``) against the model adding them itself."""
    run_interpreted(RESIDUAL_SCRIPT)


def _compile_for_hopper(kernel, args: dict, meta: dict) -> str:
    """PTX of `kernel` compiled for sm_90 (no GPU needed: Triton ships ptxas), specialised on the argument
    values as Triton's launcher does (an int equal to 1 becomes a constant, pointers and multiples of 16
    are marked 16-divisible: what lets the compiler vectorise)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = {}, {k: v for k, v in meta.items() if k != "num_warps"}, {}
    for i, (name, value) in enumerate(args.items()):
        if isinstance(value, str):  # a pointer, given as its type
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({k: "constexpr" for k in meta if k != "num_warps"})
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": meta["num_warps"]}).asm["ptx"]


def _registers_and_spills(ptx: str, tmp_path: Path) -> tuple[int, int]:
    """Registers per thread and bytes spilled to local memory, as ptxas reports them for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    (tmp_path / "k.ptx").write_text(ptx)
    out = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(tmp_path / "k.ptx"), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Used (\d+) registers", out)[1]), int(re.search(r"(\d+) bytes spill stores", out)[1])


@pytest.mark.parametrize("adds", [False, True])
@pytest.mark.parametrize("tile_elements", [0, 16384])
@pytest.mark.parametrize("shape,channels_last", [((512, 64, 32, 32), True), ((512, 256, 32, 32), True),
                                                 ((512, 2048, 4, 4), True), ((512, 64, 32, 32), False)])
def test_kernels_compile_for_hopper_with_vector_loads(shape, channels_last, tile_elements, adds, tmp_path):
    """The kernels compile for an H100 (the interpreter above does not run Triton's GPU compiler), and the bf16
    activations move in vector loads and stores: in channels_last a group of 2-8 channels is 4-16 bytes of
    each row, which one program per group read 2 bytes at a time (ld.global.b16); blocks of whole groups
    (64 bytes of each row by default), whose channel count the compiler knows, are read 16 bytes at a time
    (ld.global.v4.b32). A block kept in registers (`tile_elements`) must not spill: 16,384 bf16 values per
    program of 16 warps, 32 per thread. `adds`: the variant that adds the residual (and its gradient) in."""
    import torch

    from bigtransfer.models import fused_norm

    x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    n, c, h, w = shape
    sizes = {"C": c, "S": h * w, "stride_n": x.stride(0), "stride_c": x.stride(1),
             "stride_s": fused_norm._spatial_stride(x)}
    stats = {"weight": "*fp32", "bias": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
    _, meta = fused_norm._launch_shape(x, 32, tile_elements=tile_elements)
    assert meta["WHOLE"] == (tile_elements > 0)  # R50x1's shapes at 128 px all fit
    forward = _compile_for_hopper(fused_norm._forward_kernel,
                                  {"x_ptr": "*bf16", "r_ptr": "*bf16", "total_ptr": "*bf16", "y_ptr": "*bf16", **stats,
                                   **sizes, "eps": 1e-5}, {**meta, "ADD": adds})
    backward = _compile_for_hopper(fused_norm._backward_kernel,
                                   {"x_ptr": "*bf16", "dy_ptr": "*bf16", "d_total_ptr": "*bf16", "dx_ptr": "*bf16",
                                    **stats, "partial_ptr": "*fp32", "N": n, **sizes}, {**meta, "ADD_GRAD": adds})
    for ptx in (forward, backward):
        assert "ld.global.b16" not in ptx and "st.global.b16" not in ptx
        assert "ld.global.v" in ptx and "st.global.v" in ptx
        registers, spilled = _registers_and_spills(ptx, tmp_path)
        assert spilled == 0 and registers * 32 * meta["num_warps"] <= 65536, (registers, spilled)
