"""Weight Standardization as one Triton kernel each way, on CUDA.

Why: every convolution standardises its kernel on every step, and under bf16 autocast the standardised fp32
kernel is then cast to bf16 for cuDNN and its gradient cast back: per convolution a batch_norm forward, a
cast, a cast back and a batch_norm backward, each a small kernel (an R50x1 step on an H100 spent 0.76 ms in
the batch norms and 1.08 in casts and copies, benchmarks/RESULTS.md). Here the forward writes the
standardised kernel directly in the dtype the convolution runs in (autocast's, where it is on) and the
backward takes the gradient in that dtype: two kernels per convolution (one without gradients). Same
conditions as `fused_norm` (not under ``torch.compile``, tracing or a dispatch mode); ``BIGTRANSFER_FUSED_WS=0``
turns it off.
"""

from __future__ import annotations

import os

import torch

from .fused_norm import _dense, _dense_format, plain_eager, triton

if triton is not None:
    import triton.language as tl

ENABLED = triton is not None and os.environ.get("BIGTRANSFER_FUSED_WS", "1") != "0"


def usable(weight: torch.Tensor) -> bool:
    """Whether standardising `weight` goes through the fused kernels: any CUDA weight, in plain eager mode
    (without gradients too: `StdConv2d` keeps no kernel between calls on CUDA, and this writes autocast's
    dtype directly, where the batch-norm form would need a cast after it)."""
    return ENABLED and weight.is_cuda and plain_eager()


def standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per output channel, zero mean and unit (biased) variance over (in, kh, kw), in the dtype autocast would
    cast it to for a CUDA convolution (float64 it leaves alone), else in the weight's; in the weight's layout."""
    autocast = torch.is_autocast_enabled("cuda") and weight.dtype != torch.float64
    dtype = torch.get_autocast_dtype("cuda") if autocast else weight.dtype
    return _Standardize.apply(weight, eps, dtype)


def differentiable_backward(weight: torch.Tensor, eps: float, grad: torch.Tensor) -> torch.Tensor:
    """The weight's gradient through torch's differentiable ops, for ``create_graph=True`` (gradient penalties,
    double backward): the kernels' backward (here and in `fused_ws_cpu`) is not itself differentiable."""
    dims = tuple(range(1, weight.dim()))
    with torch.enable_grad():
        mean = weight.mean(dim=dims, keepdim=True)
        var = weight.var(dim=dims, unbiased=False, keepdim=True)
        standardized = ((weight - mean) * torch.rsqrt(var + eps)).to(grad.dtype)
        (dw,) = torch.autograd.grad(standardized, weight, grad, create_graph=True)
    return dw


def _block(fan_in: int) -> int:
    return min(triton.next_power_of_2(fan_in), 1024)


class _Standardize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, eps, dtype):
        w = _dense(weight)  # rows as runs of memory; standardising does not depend on the order within one
        out = torch.empty_like(w, dtype=dtype)
        mean = torch.empty(w.shape[0], device=w.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        fan_in = w[0].numel()
        _standardize_forward[(w.shape[0],)](w, out, mean, rstd, fan_in, eps, BLOCK=_block(fan_in))
        ctx.save_for_backward(weight, mean, rstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: second-order gradients through torch's ops
            return differentiable_backward(weight, ctx.eps, grad), None, None
        w = _dense(weight)
        grad = grad.contiguous(memory_format=_dense_format(w))
        dw = torch.empty_like(w)
        fan_in = w[0].numel()
        _standardize_backward[(w.shape[0],)](w, grad, dw, mean, rstd, fan_in, BLOCK=_block(fan_in))
        return dw, None, None


if triton is not None:

    @triton.jit
    def _standardize_forward(w_ptr, out_ptr, mean_ptr, rstd_ptr, K, eps, BLOCK: tl.constexpr):
        """One program per output channel: the mean, then the centred variance (weights are small and stay in
        cache, so the exact form costs nothing), then the standardised row in the output's dtype."""
        row = tl.program_id(0)
        base = row.to(tl.int64) * K
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            total += tl.load(w_ptr + base + k, mask=k < K, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / K
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            centred = tl.where(k < K, tl.load(w_ptr + base + k, mask=k < K, other=0.0).to(tl.float32) - mean, 0.0)
            total += centred * centred
        rstd = 1.0 / tl.sqrt(tl.sum(total, axis=0) / K + eps)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            w = tl.load(w_ptr + base + k, mask=k < K, other=0.0).to(tl.float32)
            tl.store(out_ptr + base + k, ((w - mean) * rstd).to(out_ptr.dtype.element_ty), mask=k < K)

    @triton.jit
    def _standardize_backward(w_ptr, g_ptr, dw_ptr, mean_ptr, rstd_ptr, K, BLOCK: tl.constexpr):
        """With what = (w - mean) * rstd and g the gradient of the standardised row:
        dw = rstd * (g - mean(g) - what * mean(g * what))."""
        row = tl.program_id(0)
        base = row.to(tl.int64) * K
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        sum_g = tl.zeros([BLOCK], dtype=tl.float32)
        sum_g_what = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            g = tl.load(g_ptr + base + k, mask=k < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + base + k, mask=k < K, other=0.0).to(tl.float32)
            sum_g += g
            sum_g_what += g * (w - mean) * rstd
        mean_g = tl.sum(sum_g, axis=0) / K
        mean_g_what = tl.sum(sum_g_what, axis=0) / K
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            g = tl.load(g_ptr + base + k, mask=k < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + base + k, mask=k < K, other=0.0).to(tl.float32)
            dw = rstd * (g - mean_g - (w - mean) * rstd * mean_g_what)
            tl.store(dw_ptr + base + k, dw.to(dw_ptr.dtype.element_ty), mask=k < K)
