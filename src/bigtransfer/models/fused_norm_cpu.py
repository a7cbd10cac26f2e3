"""GroupNorm + ReLU as one C kernel each way, for channels_last fp32 activations on CPUs.

Why: torch's NHWC GroupNorm kernels are slow -- GroupNorm + ReLU forward 1.8-5.5x, backward 4-9x the time
of one elementwise add over the same tensor (2 cores, R50x1 shapes, `benchmarks/bench_norm_cpu.py`). Here a
task per sample computes the statistics and then the output while the sample is still in cache, with the ReLU
folded in; the backward is one pass for the sums and one for the input gradient, with the ReLU's mask read
from the saved output (which the next convolution keeps for its own backward anyway). Summed over R50x1's
shapes: forward 1.7x, backward 1.9-2.2x faster than torch's; the model's inference +4-18%, training 0-14%.
On AVX-512 CPUs the forward's output goes to memory by non-temporal stores (the C file says why and what it
measured). The tasks run in torch's own OpenMP pool (see `run` in the C file). A backward with ``create_graph=True``
runs through torch's differentiable ops instead.

The C source ships with the package and is compiled on first use (`native`). Where no compiler works, the
plain torch ops run instead (one warning says why). ``BIGTRANSFER_FUSED_NORM=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys

import torch

from .fused_norm import differentiable_backward, plain_eager
from .native import NativeLibrary

SOURCE = pathlib.Path(__file__).with_name("fused_norm_cpu.c")
ENABLED = os.environ.get("BIGTRANSFER_FUSED_NORM", "1") != "0" and sys.platform != "win32"


def usable(x: torch.Tensor) -> bool:
    """Whether `x` (the norm's input) can go through the C kernels: an fp32 channels_last CPU tensor, in
    plain eager mode (`fused_norm.plain_eager`)."""
    return (ENABLED and not _LIBRARY.failed and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and type(x) is torch.Tensor and plain_eager() and x.numel() > 0  # numel after: a tracer records it
            and x.is_contiguous(memory_format=torch.channels_last) and library() is not None)


def group_norm_relu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """``relu(group_norm(x, groups, weight, bias, eps))`` for `x` that passes `usable`, in channels_last."""
    if x.shape[1] % groups or weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
        raise ValueError(f"group_norm_relu: {x.shape[1]} channels, {groups} groups, weight {tuple(weight.shape)}, "
                         f"bias {tuple(bias.shape)}: the groups must divide the channels, one weight and bias each")
    return _GroupNormReLU.apply(x, weight, bias, groups, eps)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built into the cache on first use; None (after one warning) where that fails."""
    return _LIBRARY.get()


def _declare(lib: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.bit_group_norm_relu_forward.argtypes = [pointer] * 6 + [size] * 4 + [ctypes.c_double, ctypes.c_int]
    lib.bit_group_norm_relu_backward.argtypes = [pointer] * 9 + [size] * 4 + [ctypes.c_int]


_LIBRARY = NativeLibrary(SOURCE, _declare, "fused CPU GroupNorm")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise MemoryError(f"fused CPU GroupNorm {what}: out of memory or threads")


def _pointers(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().float().contiguous() for t in tensors]


class _GroupNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        n, c, h, w = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean = torch.empty(n, groups, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        weight32, bias32 = _fp32(weight, bias)  # referenced until the call returns
        _check(library().bit_group_norm_relu_forward(*_pointers(x, weight32, bias32, y, mean, rstd), n, c, h * w,
                                                     groups, eps, torch.get_num_threads()), "forward")
        ctx.save_for_backward(x, y, weight, bias, mean, rstd)
        ctx.groups, ctx.eps = groups, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return differentiable_backward(x, weight, bias, ctx.groups, ctx.eps, dy, ctx.needs_input_grad)
        n, c, h, w = x.shape
        (weight32,) = _fp32(weight)
        dy = dy.float().contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        partial = torch.empty(2, n, c, dtype=torch.float32)  # per sample: d weight, d bias
        _check(library().bit_group_norm_relu_backward(*_pointers(x, y, dy, weight32, mean, rstd, dx, *partial),
                                                      n, c, h * w, ctx.groups, torch.get_num_threads()), "backward")
        d_weight, d_bias = partial.sum(dim=1).to(weight.dtype)
        return dx, d_weight, d_bias, None, None
