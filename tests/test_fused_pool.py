"""The stem max-pool's Triton kernels (`fused_pool`), run here by Triton's CPU interpreter against torch's pad
then pool in float64, and compiled for an H100."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from bigtransfer.models import fused_pool

    torch.manual_seed(0)
    cases = [  # shape, dtype, channels_last, input
        ((2, 3, 9, 9), torch.float32, False, "randn"),      # odd sizes: the last window overlaps the padding
        ((2, 40, 8, 10), torch.bfloat16, True, "randn"),    # 40 channels: a partial channel block
        ((1, 5, 7, 6), torch.float32, True, "negative"),    # all < 0: the padding's zero wins at the border
        ((2, 16, 16, 16), torch.bfloat16, False, "randn"),
        ((1, 4, 6, 6), torch.float32, True, "nan"),         # a NaN wins its windows, as in torch
    ]
    for shape, dtype, channels_last, kind in cases:
        x = torch.randn(shape)
        if kind == "negative":
            x = -x.abs() - 0.5
        if kind == "nan":
            x[0, 1, 2, 3] = float("nan")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = x.to(dtype).contiguous(memory_format=fmt)
        dy = torch.randn(shape[0], shape[1], (shape[2] + 1) // 2, (shape[3] + 1) // 2).to(dtype)

        xs = x.clone().requires_grad_()
        y = fused_pool.zero_padded_max_pool(xs)
        y.backward(dy)
        xr = x.double().requires_grad_()
        yr = fused_pool.reference(xr)
        yr.backward(dy.double())

        assert y.shape == yr.shape and y.dtype == dtype and y.is_contiguous(memory_format=fmt), (shape, y.stride())
        assert xs.grad.dtype == dtype and xs.grad.is_contiguous(memory_format=fmt)
        assert torch.equal(y.double().isnan(), yr.isnan())
        assert torch.equal(y.double().nan_to_num(), yr.nan_to_num().to(dtype).double()), shape  # a max: exact
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # dx: sums of up to 4 gradients in fp32, then the dtype
        if kind != "nan":  # torch sends a NaN window's gradient to its NaN; so do we, but the sums are NaN
            err = ((xs.grad.double() - xr.grad).abs().max() / xr.grad.abs().max()).item()
            assert err <= tol, (shape, err)
        if kind == "negative":
            border = torch.zeros(shape, dtype=torch.bool)
            border[:, :, 0], border[:, :, :, 0] = True, True
            assert (xs.grad[border] == 0).all()  # the zero padding won every window there
        print(shape, dtype, kind, "ok")

    # create_graph=True: the backward runs through torch's ops, so second-order gradients exist and match
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    (dx,) = torch.autograd.grad(fused_pool.zero_padded_max_pool(x).square().sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.square().sum(), x)
    xr = x.detach().double().requires_grad_()
    (dxr,) = torch.autograd.grad(fused_pool.reference(xr).square().sum(), xr, create_graph=True)
    (ddxr,) = torch.autograd.grad(dxr.square().sum(), xr)
    assert torch.allclose(ddx.double(), ddxr, rtol=1e-6, atol=1e-6)
    print("ok")
""")


def test_fused_max_pool_matches_pad_then_pool_in_float64() -> None:
    from test_fused_norm import run_interpreted

    run_interpreted(SCRIPT)


@pytest.mark.parametrize("channels_last", [True, False])
def test_pool_kernels_compile_for_hopper_without_spills(channels_last, tmp_path):
    """The GPU compiler (which the interpreter does not run) builds both kernels for R50x1's stem at 128 px,
    batch 512, and they keep everything in registers."""
    import torch

    from bigtransfer.models import fused_pool
    from test_fused_norm import _compile_for_hopper, _registers_and_spills

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(512, 64, 64, 64, device="meta").contiguous(memory_format=fmt)
    y = torch.empty(512, 64, 32, 32, device="meta").contiguous(memory_format=fmt)
    sizes = {"C": 64, "H": 64, "W": 64, "OH": 32, "OW": 32}
    meta = {"BLOCK_P": fused_pool.BLOCK_P, "BLOCK_C": fused_pool.BLOCK_C, "num_warps": 4}
    strides = lambda prefix, t: dict(zip((prefix + "n", prefix + "c", prefix + "h", prefix + "w"), t.stride(),  # noqa: E731
                                         strict=True))
    forward = _compile_for_hopper(fused_pool._max_pool_forward,
                                  {"x_ptr": "*bf16", "y_ptr": "*bf16", "tap_ptr": "*i8", **sizes, **strides("sx", x),
                                   **strides("sy", y)}, meta)
    backward = _compile_for_hopper(fused_pool._max_pool_backward,
                                   {"dy_ptr": "*bf16", "tap_ptr": "*i8", "dx_ptr": "*bf16", **sizes, **strides("sy", y),
                                    **strides("sx", x)}, meta)
    for ptx in (forward, backward):
        registers, spilled = _registers_and_spills(ptx, tmp_path)
        assert spilled == 0 and registers <= 255, (registers, spilled)
