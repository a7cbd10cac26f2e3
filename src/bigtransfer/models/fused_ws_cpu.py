"""Weight Standardization as one C kernel each way, for fp32 kernels on CPUs.

Why: on CPUs the activations are channels_last (`resnetv2._cpu_layout`), so oneDNN wants the standardised
kernel channels_last too. Standardised in torch's layout (the batch-norm form), a 3x3 kernel was copied into
that layout in the forward and again in the backward, and its gradient, which the backward makes channels_last,
copied back: four transposing copies per 3x3 kernel per training step. Here a thread standardises one output
channel's row while it sits in cache and writes it channels_last; the backward reads the gradient in whatever
layout it comes and writes the weight's. The parameters keep torch's layout. Sums in double. Measured (R50x1,
128 px, batch 16, 2 cores, benchmarks/RESULTS.md): the op over its 53 kernels 27 against 47 ms per step, one copy
per 3x3 kernel left (torch's, inside oneDNN's backward), the training step 1.032x. Same conditions as
`fused_norm_cpu` (plain eager mode); a backward with ``create_graph=True`` runs through torch's differentiable
ops instead. ``BIGTRANSFER_FUSED_WS=0`` turns it off, as it does the CUDA kernels of `fused_ws`.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys

import torch

from .fused_norm import _dense, plain_eager
from .fused_ws import differentiable_backward
from .native import NativeLibrary

SOURCE = pathlib.Path(__file__).with_name("fused_ws_cpu.c")
ENABLED = os.environ.get("BIGTRANSFER_FUSED_WS", "1") != "0" and sys.platform != "win32"


def usable(weight: torch.Tensor) -> bool:
    """Whether standardising `weight` goes through the C kernels: an fp32 4-d CPU tensor in plain eager mode."""
    return (ENABLED and not _LIBRARY.failed and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.dim() == 4 and type(weight) in (torch.Tensor, torch.nn.Parameter) and plain_eager()
            and weight.numel() > 0
            and _LIBRARY.get() is not None)


def standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per output channel, zero mean and unit (biased) variance over (in, kh, kw), returned channels_last."""
    return _Standardize.apply(weight, eps)


def _declare(lib: ctypes.CDLL) -> None:
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bit_standardize_forward.argtypes = [pointer] * 4 + [size] * 3 + [flag, ctypes.c_double, flag]
    lib.bit_standardize_backward.argtypes = [pointer] * 5 + [size] * 3 + [flag] * 3


_LIBRARY = NativeLibrary(SOURCE, _declare, "CPU Weight Standardization")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise MemoryError(f"CPU Weight Standardization {what}: out of memory for a scratch row")


def _channels_last(x: torch.Tensor) -> int:
    """1 where `x` (from `_dense`) holds each row as (kh, kw, in), 0 where as (in, kh, kw)."""
    return int(not x.is_contiguous())


class _Standardize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, eps):
        w = _dense(weight)
        rows, cin, kh, kw = w.shape
        out = torch.empty_like(w, memory_format=torch.channels_last)
        mean = torch.empty(rows, dtype=torch.float64)
        rstd = torch.empty_like(mean)
        status = _LIBRARY.get().bit_standardize_forward(w.data_ptr(), out.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                                                        rows, cin, kh * kw, _channels_last(w), eps,
                                                        torch.get_num_threads())
        _check(status, "forward")
        ctx.save_for_backward(weight, mean, rstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: second-order gradients through torch's ops
            return differentiable_backward(weight, ctx.eps, grad), None
        w, g = _dense(weight), _dense(grad.float())
        rows, cin, kh, kw = w.shape
        dw = torch.empty_like(w)
        status = _LIBRARY.get().bit_standardize_backward(w.data_ptr(), g.data_ptr(), dw.data_ptr(), mean.data_ptr(),
                                                         rstd.data_ptr(), rows, cin, kh * kw, _channels_last(w),
                                                         _channels_last(g), torch.get_num_threads())
        _check(status, "backward")
        return dw, None
