"""Weight Standardization's Triton kernels (`fused_ws`, CUDA's default), run here by Triton's CPU
interpreter against the batch-norm form `resnetv2.standardize` in float64, and compiled for an H100."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from bigtransfer.models import fused_ws
    from bigtransfer.models.resnetv2 import WS_EPS, standardize

    torch.manual_seed(0)
    cases = [  # weight shape, dtype the kernel is written in, weight layout (channels_last?), gradient's
        ((64, 3, 7, 7), torch.float32, False, False),     # the stem: 147 per row, one partial block
        ((256, 64, 1, 1), torch.bfloat16, True, False),   # autocast's dtype out; the gradient in another layout
        ((32, 512, 3, 3), torch.float32, True, True),     # 4,608 per row: the kernels loop over blocks
        ((8, 3, 1, 1), torch.bfloat16, False, False),     # 3 per row (with 2, every output is +-1: dw = 0)
        ((16, 8, 3, 3), torch.float32, "view", True),     # a transposed view: rows not runs of memory
    ]
    for shape, dtype, channels_last, grad_channels_last in cases:
        fmt = torch.channels_last if channels_last is True else torch.contiguous_format
        w = (torch.randn(shape) * 0.05 + 0.2).contiguous(memory_format=fmt)
        as_given = (lambda t: t.transpose(2, 3)) if channels_last == "view" else (lambda t: t)
        g = torch.randn(shape).to(dtype)
        g = g.contiguous(memory_format=torch.channels_last if grad_channels_last else torch.contiguous_format)

        ws = w.clone().requires_grad_()
        out = fused_ws._Standardize.apply(as_given(ws), WS_EPS, dtype)
        out.backward(g)
        wr = w.double().requires_grad_()
        ref = standardize(as_given(wr))
        ref.backward(g.double())

        assert out.dtype == dtype and ws.grad.dtype == torch.float32
        assert out.stride() == (w.stride() if channels_last != "view" else out.contiguous().stride())
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 rounds the output to 8 bits
        for name, ours, theirs in (("w", out, ref), ("dw", ws.grad, wr.grad)):
            err = ((ours.double() - theirs).abs().max() / theirs.abs().max()).item()
            assert err < tol, (shape, dtype, name, err)
            print(shape, dtype, name, f"{err:.1e}")

    # create_graph=True: the backward runs through torch's ops, so second-order gradients exist and match
    w = torch.randn(16, 8, 3, 3)
    second = []
    for fn, dt in ((lambda t: fused_ws._Standardize.apply(t, WS_EPS, t.dtype), torch.float32),
                   (standardize, torch.float64)):
        t = w.to(dt).requires_grad_()
        (dw,) = torch.autograd.grad(fn(t).pow(3).sum(), t, create_graph=True)
        second.append(torch.autograd.grad(dw.square().sum(), t)[0])
    assert ((second[0].double() - second[1]).abs().max() / second[1].abs().max()).item() < 1e-4

    # without gradients (CUDA inference standardises on every call, keeping no kernel): the same values
    w = torch.randn(32, 16, 3, 3)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = fused_ws._Standardize.apply(w, WS_EPS, torch.bfloat16)
        assert out.dtype == torch.bfloat16 and not out.requires_grad
        ref = standardize(w.double())
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-2
    print("ok")
""")


def test_fused_weight_standardization_matches_batch_norm_form_in_float64() -> None:
    from test_fused_norm import run_interpreted

    run_interpreted(SCRIPT)


def test_weight_standardization_kernels_compile_for_hopper(tmp_path):
    """The GPU compiler (which the interpreter does not run) builds both kernels for R50x1's largest rows (3x3
    convolutions of 512 channels in, fp32 weights, bf16 out) with vector loads and no spills."""
    from bigtransfer.models import fused_ws
    from test_fused_norm import _compile_for_hopper, _registers_and_spills

    fan_in = 512 * 9
    meta = {"BLOCK": fused_ws._block(fan_in), "num_warps": 4}
    stats = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "K": fan_in}
    forward = _compile_for_hopper(fused_ws._standardize_forward,
                                  {"w_ptr": "*fp32", "out_ptr": "*bf16", **stats, "eps": 1e-10}, meta)
    backward = _compile_for_hopper(fused_ws._standardize_backward,
                                   {"w_ptr": "*fp32", "g_ptr": "*bf16", "dw_ptr": "*fp32", **stats}, meta)
    for ptx in (forward, backward):
        assert "ld.global.v" in ptx and "st.global.v" in ptx
        registers, spilled = _registers_and_spills(ptx, tmp_path)
        assert spilled == 0 and registers <= 255, (registers, spilled)
