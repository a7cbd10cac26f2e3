"""GroupNorm + ReLU as one C kernel each way, for channels_last fp32 activations on CPUs.

Why: torch's NHWC GroupNorm kernels are slow -- GroupNorm + ReLU forward 1.8-5.5x, backward 4-9x the time
of one elementwise add over the same tensor (2 cores, R50x1 shapes, `benchmarks/bench_norm_cpu.py`). Here a
task per sample computes the statistics and then the output while the sample is still in cache, with the ReLU
folded in; the backward is one pass for the sums and one for the input gradient, with the ReLU's mask
computed again from the input and the forward's per-channel scale and shift (the same rounding: the same mask),
so it reads two tensors, not three, and needs no output (1.3x faster than reading the output's mask). Summed over
R50x1's shapes: forward 1.7-1.9x, backward 1.9-2.6x faster than torch's; the model's inference +4-18%, training
0-14%.

In training, the output is then kept only by the next convolutions, for their own backward. With
``BIGTRANSFER_RECOMPUTE_NORM=1`` (`RECOMPUTE`) not even there: those convolutions recompute it from the norm's
input, which the norm keeps anyway, in one pass that writes the same bits, and the outputs live only as long as
the forward needs them, on a few reused buffers (`_ScratchOutputs`). R50x1's training step at 128 px then peaks
at 0.84-0.91x timm's memory instead of 0.93-0.98x, for about 2% of its time (benchmarks/RESULTS.md): off by
default, since on CPUs the time is what users lack.

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
import threading
import weakref
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .fused_norm import differentiable_backward, plain_eager
from .native import NativeLibrary

SOURCE = pathlib.Path(__file__).with_name("fused_norm_cpu.c")
ENABLED = os.environ.get("BIGTRANSFER_FUSED_NORM", "1") != "0" and sys.platform != "win32"
# in training, convolutions of a norm's output recompute it in their backward instead of keeping it: less memory
# for a little time (`conv2d_of_norm_output`); ``BIGTRANSFER_RECOMPUTE_NORM=1`` turns it on
RECOMPUTE = os.environ.get("BIGTRANSFER_RECOMPUTE_NORM", "0") == "1"


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
    recomputable = RECOMPUTE and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                              or bias.requires_grad)  # autograd records it
    return _GroupNormReLU.apply(x, weight, bias, groups, eps, recomputable)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built into the cache on first use; None (after one warning) where that fails."""
    return _LIBRARY.get()


def _declare(lib: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.bit_group_norm_relu_forward.argtypes = [pointer] * 8 + [size] * 4 + [ctypes.c_double, ctypes.c_int]
    lib.bit_group_norm_relu_apply.argtypes = [pointer] * 4 + [size] * 3 + [ctypes.c_int]
    lib.bit_group_norm_relu_backward.argtypes = [pointer] * 10 + [size] * 4 + [ctypes.c_int]


_LIBRARY = NativeLibrary(SOURCE, _declare, "fused CPU GroupNorm")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise MemoryError(f"fused CPU GroupNorm {what}: out of memory or threads")


def _pointers(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().float().contiguous() for t in tensors]


class NormOutput(NamedTuple):
    """What the output y of `group_norm_relu` is made of: ``y = relu(x * scale + shift)`` per sample and channel
    (rounded once where the CPU has FMA), and the norm's own inputs for a differentiable recomputation."""

    x: torch.Tensor
    scale: torch.Tensor  # (N, C)
    shift: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    groups: int
    eps: float


def norm_output(y: torch.Tensor) -> NormOutput | None:
    """How `y` was made, if it is the unchanged output of `group_norm_relu` under `RECOMPUTE` in a graph autograd
    records (an in-place edit gives y another grad_fn, a view has none of y's attributes); else None."""
    norm = getattr(y, "_bit_norm_output", None)
    if norm is None or not isinstance(y.grad_fn, _GroupNormReLU._backward_cls) or torch.is_autocast_enabled("cpu") \
            or not plain_eager():
        return None
    return norm


def conv2d_of_norm_output(y: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                          norm: NormOutput) -> torch.Tensor:
    """``F.conv2d(y, weight, None, stride, padding)`` for y made as `norm` says, without keeping y for the
    backward: that recomputes y from the norm's input, which the norm keeps anyway, in one pass (the same bits).
    Every norm's output then lives only as long as the forward needs it, and a training step's peak memory drops by
    all of them (see benchmarks/RESULTS.md)."""
    return _ConvOfNormOutput.apply(y, weight, norm.x, norm.scale, norm.shift, norm.weight, norm.bias, norm.groups,
                                   norm.eps, stride, padding)


class _ScratchOutputs:
    """Memory for the outputs of norms whose convolutions recompute them: each lives only while the forward needs
    it, so a few buffers, reused across layers and steps, serve them all. Taken from the heap and given back
    instead, each left a hole that the tensors kept for the backward then split, and the heap grew nearly as
    large as with every output kept (benchmarks/RESULTS.md). A buffer is free once no tensor uses its memory:
    each tensor on one holds a numpy view of it, which this class watches through a weak reference. The buffers stay
    for the process's life: a few of the largest outputs' size."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit  # buffers at most; past it (a hook keeping outputs, say) the heap serves
        self.buffers: list[tuple[np.ndarray, weakref.ref | None]] = []  # (memory, the view in use)
        self.lock = threading.Lock()

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised channels_last fp32 tensor shaped as x, on the smallest free buffer that holds it
        (one too small is replaced), its first element on a cache line as the non-temporal stores want."""
        n, c, h, w = x.shape
        size = x.numel() + 16  # 64 bytes to align in
        with self.lock:
            free = sorted((i for i, (_, used) in enumerate(self.buffers) if used is None or used() is None),
                          key=lambda i: self.buffers[i][0].size)
            fits = [i for i in free if self.buffers[i][0].size >= size]
            if fits:
                i = fits[0]
            elif free or len(self.buffers) < self.limit:
                i = free[-1] if free else len(self.buffers)
                self.buffers[i:i + 1] = [(np.empty(size, dtype=np.float32), None)]
            else:
                return torch.empty_like(x, memory_format=torch.channels_last)
            memory = self.buffers[i][0]
            start = (-memory.ctypes.data % 64) // 4
            view = memory[start:start + x.numel()]
            self.buffers[i] = (memory, weakref.ref(view))
        # a tensor of its own, not a view (an autograd Function's output that is a view cannot be edited in place)
        storage = torch.from_numpy(view).untyped_storage()
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, (n, c, h, w), (h * w * c, 1, w * c, c))


_SCRATCH = _ScratchOutputs()


def _apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    y = _SCRATCH.empty_like(x)
    _check(library().bit_group_norm_relu_apply(*_pointers(x, scale, shift, y), n, c, h * w, torch.get_num_threads()),
           "recomputation")
    return y


class _GroupNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, recomputable):
        n, c, h, w = x.shape
        y = _SCRATCH.empty_like(x) if recomputable else torch.empty_like(x, memory_format=torch.channels_last)
        mean = torch.empty(n, groups, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        scale = torch.empty(n, c, dtype=torch.float32)
        shift = torch.empty_like(scale)
        weight32, bias32 = _fp32(weight, bias)  # referenced until the call returns
        _check(library().bit_group_norm_relu_forward(*_pointers(x, weight32, bias32, y, mean, rstd, scale, shift),
                                                     n, c, h * w, groups, eps, torch.get_num_threads()), "forward")
        ctx.save_for_backward(x, weight, bias, mean, rstd, scale, shift)  # not y: the backward needs only x
        ctx.groups, ctx.eps = groups, eps
        if recomputable:
            y._bit_norm_output = NormOutput(x, scale, shift, weight, bias, groups, eps)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd, scale, shift = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return *differentiable_backward(x, weight, bias, ctx.groups, ctx.eps, dy, ctx.needs_input_grad), None
        n, c, h, w = x.shape
        (weight32,) = _fp32(weight)
        dy = dy.float().contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        partial = torch.empty(2, n, c, dtype=torch.float32)  # per sample: d weight, d bias
        _check(library().bit_group_norm_relu_backward(
            *_pointers(x, dy, weight32, mean, rstd, scale, shift, dx, *partial), n, c, h * w, ctx.groups,
            torch.get_num_threads()), "backward")
        d_weight, d_bias = partial.sum(dim=1).to(weight.dtype)
        return dx, d_weight, d_bias, None, None, None


class _ConvOfNormOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, x, scale, shift, norm_weight, norm_bias, groups, eps, stride, padding):
        ctx.save_for_backward(weight, x, scale, shift, norm_weight, norm_bias)
        ctx.groups, ctx.eps, ctx.stride, ctx.padding = groups, eps, list(stride), list(padding)
        return F.conv2d(y, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, d_out):
        weight, x, scale, shift, norm_weight, norm_bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: y through torch's ops, so that d weight's own gradient
            y = F.relu(F.group_norm(x, ctx.groups, norm_weight, norm_bias, ctx.eps))  # reaches x and the norm
        else:
            y = _apply(x, scale, shift)
        dy, d_weight, _ = torch.ops.aten.convolution_backward(
            d_out, y, weight, None, ctx.stride, ctx.padding, [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return dy, d_weight, *[None] * 9
