"""GroupNorm + ReLU as one Triton kernel each way, for CUDA: every norm in BiT is followed by a ReLU.

Why: under bf16 autocast, ``F.group_norm`` runs in fp32, so each norm casts its bf16 input up, writes
fp32, a ReLU reads and writes fp32 again and the next convolution casts back down -- and it returns NCHW
whatever layout it was given, so channels_last convolutions pay a transpose on each side. Here the
statistics are fp32, the activations stay in the input's dtype and layout (NCHW or channels_last, the
kernels take strides), and the backward pass recomputes the ReLU mask from the saved input instead of
keeping an fp32 copy. Measured on an H100 (bf16, R50x1, batch 128, benchmarks/RESULTS.md): training went
from 0.92x to 1.14x timm's img/s with half its peak memory, inference from 1.04x to 2.0x. Not used under
``torch.compile`` (Inductor fuses the plain ops itself) or on CPUs (`fused_norm_cpu` has C kernels for them).
A backward with ``create_graph=True`` (gradient penalties) runs through torch's differentiable ops instead.
``BIGTRANSFER_FUSED_NORM=0`` turns it off.

`add_group_norm_relu` also takes a unit's residual add: it reads both addends, writes their sum (the next
unit's shortcut) with the activation, and its backward adds the sum's other gradient in the same pass -- one
pass over the activations less forward and two less backward than a separate add and gradient sum. Off by
default until a GPU has measured it (``BIGTRANSFER_FUSED_RESIDUAL=1`` turns it on; `resnetv2` uses it).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only builds of torch come without Triton
    triton = None

ENABLED = triton is not None and os.environ.get("BIGTRANSFER_FUSED_NORM", "1") != "0"
RESIDUAL = ENABLED and os.environ.get("BIGTRANSFER_FUSED_RESIDUAL", "0") == "1"


def usable(x: torch.Tensor) -> bool:
    """Whether `x` (the norm's input) goes through the fused kernels."""
    return ENABLED and x.is_cuda and x.dim() == 4 and plain_eager() and x.numel() > 0  # empty: torch's own


def plain_eager() -> bool:
    """Not compiling, tracing or exporting, under no dispatch mode (fake tensors, the FLOP counter) and no
    torch.func transform: those need to see the plain ops, which the fused kernels' autograd Functions hide."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and _get_current_dispatch_mode() is None
            and torch._C._functorch.peek_interpreter_stack() is None)


def group_norm_relu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """``relu(group_norm(x, groups, weight, bias, eps))`` in x's dtype and memory layout."""
    return _GroupNormReLU.apply(x, None, weight, bias, groups, eps)


def add_group_norm_relu(x: torch.Tensor, residual: torch.Tensor, groups: int, weight: torch.Tensor,
                        bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (rounded to x's dtype, as a separate add stores it) and ``relu(group_norm(s, ...))``,
    in one kernel each way; returns both. `residual` must match x's shape, dtype and layout."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_group_norm_relu: residual {tuple(residual.shape)} {residual.dtype} does not match "
                         f"the input {tuple(x.shape)} {x.dtype}")
    return _GroupNormReLU.apply(x, residual, weight, bias, groups, eps)


def differentiable_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                            dy: torch.Tensor, needs_input_grad: tuple[bool, ...]) -> tuple:
    """The backward of GroupNorm + ReLU through torch's ops, for ``create_graph=True`` (gradient penalties, double
    backward): the fused backward kernels are not themselves differentiable. Returns the gradients of an autograd
    Function whose forward takes (x, weight, bias, groups, eps)."""
    inputs = [t for t, needed in zip((x, weight, bias), needs_input_grad, strict=False) if needed]
    with torch.enable_grad():
        y = F.relu(F.group_norm(x.float(), groups, weight.float(), bias.float(), eps)).to(x.dtype)
    grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True))
    return tuple(next(grads) if needed else None for needed in needs_input_grad[:3]) + (None, None)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x as NCHW- or channels_last-contiguous memory (the kernels index through strides)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _dense_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a tensor `_dense` returned. Two tensors of one shape in one such format hold every
    element at the same offset, so a kernel may index both through one's strides."""
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def _spatial_stride(x: torch.Tensor) -> int:
    """The stride of the flattened H*W index (for a width of 1 the W stride is arbitrary: take H's)."""
    return x.stride(3) if x.shape[3] > 1 else x.stride(2)


ROW_BYTES = int(os.environ.get("BIGTRANSFER_NORM_ROW_BYTES", "64"))
TILE_ELEMENTS = int(os.environ.get("BIGTRANSFER_NORM_TILE_ELEMENTS", "0"))


def _launch_shape(x: torch.Tensor, groups: int, row_bytes: int | None = None,
                  tile_elements: int | None = None) -> tuple[tuple[int], dict]:
    """One program per (sample, block of groups).

    Where neighbouring channels are neighbours in memory (channels_last, or 1x1 maps), a program takes enough
    whole groups to fill `row_bytes` of each position's row (at least a 32-byte sector: with one group of 2-8
    channels, rows were 4-16 bytes and the loads went 2 bytes at a time); 64 bytes measured best for R50x1 on
    an H100 (benchmarks/RESULTS.md). The kernels read a program's block twice each way (statistics, then
    output), hoping the re-read hits L2; in channels_last it seems not to (an H100 took as long as moving about
    10 passes' worth of bytes, not 5, when the forward still read it three times). With `tile_elements` > 0, a
    block of at most that many elements is read once and kept in registers (``WHOLE``), rows narrowing towards
    32 bytes where that makes the block fit. Off by default until a GPU has measured it against the re-reads
    (``BIGTRANSFER_NORM_TILE_ELEMENTS=16384`` turns it on: no spills for R50x1's shapes in the sm_90 build);
    ``BIGTRANSFER_NORM_ROW_BYTES`` sets another width."""
    row_bytes = row_bytes or ROW_BYTES
    tile_elements = TILE_ELEMENTS if tile_elements is None else tile_elements
    n, c, h, w = x.shape
    group_channels = c // groups
    positions = triton.next_power_of_2(h * w)

    def fits(block: int) -> bool:
        return triton.next_power_of_2(group_channels * block) * positions <= tile_elements

    group_block = 1
    if x.stride(1) == 1 and group_channels & (group_channels - 1) == 0:  # power-of-2 groups tile exactly
        group_block = max(1, row_bytes // x.element_size() // group_channels)
        while groups % group_block:
            group_block //= 2
        narrow = group_block
        while not fits(narrow) and narrow > 1 and group_channels * (narrow // 2) * x.element_size() >= 32:
            narrow //= 2
        group_block = narrow if fits(narrow) else group_block
    block_c = triton.next_power_of_2(group_channels * group_block)
    whole = fits(group_block)
    block_s = positions if whole else min(positions, max(16, 4096 // block_c))
    tile = block_c * block_s
    return (n * (groups // group_block),), {"GROUP_CHANNELS": group_channels, "GROUP_BLOCK": group_block,
                                            "BLOCK_C": block_c, "BLOCK_S": block_s, "WHOLE": whole,
                                            "num_warps": 16 if tile >= 16384 else 8 if tile >= 4096 else 4}


class _GroupNormReLU(torch.autograd.Function):
    """relu(group_norm(x)), or with a residual (s, relu(group_norm(s))) for s = x + residual."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, groups, eps):
        x = _dense(x)
        n, c, h, w = x.shape
        adds = residual is not None
        if adds:
            residual = residual.contiguous(memory_format=_dense_format(x))
            total = torch.empty_like(x)
        else:
            residual = total = x  # read as x, never written
        y = torch.empty_like(x)
        mean = torch.empty(n * groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        grid, meta = _launch_shape(x, groups)
        _forward_kernel[grid](x, residual, total, y, weight, bias, mean, rstd, c, h * w, x.stride(0), x.stride(1),
                              _spatial_stride(x), eps, ADD=adds, **meta)
        ctx.save_for_backward(total, weight, bias, mean, rstd)
        ctx.groups, ctx.eps, ctx.adds = groups, eps, adds
        ctx.set_materialize_grads(False)  # an unused sum's gradient stays None, not a tensor of zeros
        return (total, y) if adds else y

    @staticmethod
    def backward(ctx, *grads):
        d_total, dy = grads if ctx.adds else (None, *grads)
        x, weight, bias, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if dy is None:  # only the sum was used
            return d_total, d_total, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            dx, d_weight, d_bias, _, _ = differentiable_backward(x, weight, bias, ctx.groups, ctx.eps, dy,
                                                                 (needs[0] or needs[1], needs[2], needs[3]))
            dx = dx if d_total is None else dx + d_total
        else:
            layout = _dense_format(x)
            dy = dy.contiguous(memory_format=layout)
            n, c, h, w = x.shape
            dx = torch.empty_like(x)
            d_total = dy if d_total is None else d_total.contiguous(memory_format=layout)
            # per channel and sample: d weight, d bias; samples innermost, so that summing them is a reduction
            # over contiguous rows (summed across rows, 49 such sums took 0.85 ms of an R50x1 step on an H100)
            partial = torch.empty(2, c, n, device=x.device, dtype=torch.float32)
            grid, meta = _launch_shape(x, ctx.groups)
            _backward_kernel[grid](x, dy, d_total, dx, weight, bias, mean, rstd, partial, n, c, h * w,
                                   x.stride(0), x.stride(1), _spatial_stride(x), ADD_GRAD=d_total is not dy, **meta)
            d_weight, d_bias = partial.sum(dim=2).to(weight.dtype)
        return dx, dx if ctx.adds else None, d_weight, d_bias, None, None


if triton is not None:

    @triton.jit
    def _offsets(n, c0, s0, channels, S, stride_n, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """Element offsets and mask of one [BLOCK_C, BLOCK_S] tile of sample n: `channels` channels from c0,
        positions from s0."""
        c = c0 + tl.arange(0, BLOCK_C)
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (tl.arange(0, BLOCK_C) < channels)[:, None] & (s < S)[None, :]
        return n * stride_n + c[:, None] * stride_c + s[None, :] * stride_s, mask

    @triton.jit
    def _per_group(per_channel, GROUP_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        """Sums a [BLOCK_C] vector over each group's channels and hands every channel its group's sum."""
        sums = tl.sum(tl.reshape(per_channel, [GROUP_BLOCK, BLOCK_C // GROUP_BLOCK]), axis=1)
        return tl.reshape(tl.broadcast_to(sums[:, None], [GROUP_BLOCK, BLOCK_C // GROUP_BLOCK]), [BLOCK_C])

    @triton.jit
    def _program(C, GROUP_CHANNELS: tl.constexpr, GROUP_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's sample, first channel, channel count, and for each tile row its channel, its
        validity and its (sample, group) index into the statistics."""
        groups = C // GROUP_CHANNELS
        blocks = groups // GROUP_BLOCK
        pid = tl.program_id(0)
        n = (pid // blocks).to(tl.int64)  # int64: n * stride_n passes 2**31 on big batches
        channels = GROUP_CHANNELS * GROUP_BLOCK
        c0 = (pid % blocks) * channels
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = tl.arange(0, BLOCK_C) < channels
        return n, c0, channels, c, cmask, n * groups + c // GROUP_CHANNELS

    @triton.jit
    def _input(x_ptr, r_ptr, total_ptr, n, c0, s0, channels, S, stride_n, stride_c, stride_s, BLOCK_C: tl.constexpr,
               BLOCK_S: tl.constexpr, ADD: tl.constexpr):
        """One tile of the norm's input, in fp32: x, or with ADD the sum x + r, rounded to the sum's dtype (as a
        separate add would store it) and stored at total_ptr; and the tile's offsets and mask (every tensor the
        kernels touch has x's shape and strides)."""
        offsets, mask = _offsets(n, c0, s0, channels, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        if ADD:
            r = tl.load(r_ptr + offsets, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(total_ptr.dtype.element_ty)
            tl.store(total_ptr + offsets, x, mask=mask)
        return x.to(tl.float32), offsets, mask

    @triton.jit
    def _forward_kernel(x_ptr, r_ptr, total_ptr, y_ptr, weight, bias, mean_ptr, rstd_ptr, C, S, stride_n, stride_c,
                        stride_s, eps, GROUP_CHANNELS: tl.constexpr, GROUP_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_S: tl.constexpr, WHOLE: tl.constexpr, ADD: tl.constexpr):
        """Per group: the mean and the variance, then normalise, scale, shift and ReLU. WHOLE: the block is one
        tile, read once, and the variance is the centred one. Else the statistics take one read of the block
        (not one per moment): sums of x - pivot and its square, the pivot being the group's mean over the
        first tile, so that a mean far from 0 does not cancel the variance away (E[x^2] - E[x]^2 would), and
        a second read normalises. ADD: the input is x + r, written to total_ptr as it is first read (the second
        read takes it from there: one tensor, not two); without ADD, total_ptr is x_ptr."""
        n, c0, channels, c, cmask, stat = _program(C, GROUP_CHANNELS, GROUP_BLOCK, BLOCK_C)
        count = GROUP_CHANNELS * S
        x, offsets, mask = _input(x_ptr, r_ptr, total_ptr, n, c0, 0, channels, S, stride_n, stride_c, stride_s,
                                  BLOCK_C, BLOCK_S, ADD)
        if WHOLE:
            mean = _per_group(tl.sum(x, axis=1), GROUP_BLOCK, BLOCK_C) / count
            centred = tl.where(mask, x - mean[:, None], 0.0)
            variance = _per_group(tl.sum(centred * centred, axis=1), GROUP_BLOCK, BLOCK_C) / count
        else:
            pivot = _per_group(tl.sum(x, axis=1), GROUP_BLOCK, BLOCK_C) / (GROUP_CHANNELS * tl.minimum(S, BLOCK_S))
            total = tl.where(mask, x - pivot[:, None], 0.0)
            squares = total * total
            for s0 in range(BLOCK_S, S, BLOCK_S):
                x, _, mask = _input(x_ptr, r_ptr, total_ptr, n, c0, s0, channels, S, stride_n, stride_c, stride_s,
                                    BLOCK_C, BLOCK_S, ADD)
                shifted = tl.where(mask, x - pivot[:, None], 0.0)
                total += shifted
                squares += shifted * shifted
            offset = _per_group(tl.sum(total, axis=1), GROUP_BLOCK, BLOCK_C) / count
            mean = pivot + offset
            variance = tl.maximum(_per_group(tl.sum(squares, axis=1), GROUP_BLOCK, BLOCK_C) / count - offset * offset,
                                  0.0)
        rstd = 1.0 / tl.sqrt(variance + eps)
        first = cmask & (c % GROUP_CHANNELS == 0)  # one row per group stores its statistics
        tl.store(mean_ptr + stat, mean, mask=first)
        tl.store(rstd_ptr + stat, rstd, mask=first)
        gamma = tl.load(weight + c, mask=cmask, other=0.0).to(tl.float32)
        beta = tl.load(bias + c, mask=cmask, other=0.0).to(tl.float32)
        scale = (gamma * rstd)[:, None]
        shift = (beta - mean * gamma * rstd)[:, None]
        if WHOLE:
            tl.store(y_ptr + offsets, _relu(x * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)
        else:
            if ADD:
                tl.debug_barrier()  # the sum's stores above, by all of this program's threads, before they read it
            for s0 in range(0, S, BLOCK_S):
                offsets, mask = _offsets(n, c0, s0, channels, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S)
                x = tl.load(total_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                y = _relu(x * scale + shift)
                tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _relu(v):
        """max(v, 0) that keeps a NaN, as torch's ReLU does (a plain maximum returns 0): a diverged run must show."""
        return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _input_and_relu_grad(x_ptr, dy_ptr, n, c0, s0, channels, S, stride_n, stride_c, stride_s, scale, shift,
                             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """One tile of the input and of the gradient through the ReLU (zero where the output was clipped), with
        the tile's offsets and mask."""
        offsets, mask = _offsets(n, c0, s0, channels, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        return x, tl.where(x * scale + shift > 0.0, dy, 0.0), offsets, mask

    @triton.jit
    def _store_input_grad(x, dy, mean, rstd, gamma, mean_g, mean_g_xhat, dx_ptr, d_total_ptr, offsets, mask,
                          ADD_GRAD: tl.constexpr):
        """dx of one tile (see `_backward_kernel`), plus with ADD_GRAD the tile's gradient from d_total_ptr."""
        xhat = (x - mean[:, None]) * rstd[:, None]
        dx = rstd[:, None] * (dy * gamma[:, None] - mean_g - xhat * mean_g_xhat)
        if ADD_GRAD:
            dx += tl.load(d_total_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(x_ptr, dy_ptr, d_total_ptr, dx_ptr, weight, bias, mean_ptr, rstd_ptr, partial_ptr, N, C, S,
                         stride_n, stride_c, stride_s, GROUP_CHANNELS: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, WHOLE: tl.constexpr, ADD_GRAD: tl.constexpr):
        """With xhat the normalised input and g = dy * relu'(y) * gamma, per group:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); the per-channel sums of dy*relu' and
        dy*relu'*xhat of this sample are stored for d bias and d weight (summed over samples outside).
        WHOLE: the block is one tile, read once; else each of the two passes reads it. ADD_GRAD: x was a
        residual sum used elsewhere too, and that use's gradient (d_total_ptr) is added to dx here."""
        n, c0, channels, c, cmask, stat = _program(C, GROUP_CHANNELS, GROUP_BLOCK, BLOCK_C)
        mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + stat, mask=cmask, other=0.0)
        gamma = tl.load(weight + c, mask=cmask, other=0.0).to(tl.float32)
        beta = tl.load(bias + c, mask=cmask, other=0.0).to(tl.float32)
        scale = (gamma * rstd)[:, None]
        shift = (beta - mean * gamma * rstd)[:, None]
        if WHOLE:
            x, dy, offsets, mask = _input_and_relu_grad(x_ptr, dy_ptr, n, c0, 0, channels, S, stride_n, stride_c,
                                                        stride_s, scale, shift, BLOCK_C, BLOCK_S)
            channel_dy = tl.sum(dy, axis=1)
            channel_dy_xhat = tl.sum(dy * (x - mean[:, None]) * rstd[:, None], axis=1)
        else:
            sum_dy = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            sum_dy_xhat = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                x, dy, _, _ = _input_and_relu_grad(x_ptr, dy_ptr, n, c0, s0, channels, S, stride_n, stride_c,
                                                   stride_s, scale, shift, BLOCK_C, BLOCK_S)
                sum_dy += dy
                sum_dy_xhat += dy * (x - mean[:, None]) * rstd[:, None]
            channel_dy = tl.sum(sum_dy, axis=1)
            channel_dy_xhat = tl.sum(sum_dy_xhat, axis=1)
        tl.store(partial_ptr + c * N + n, channel_dy_xhat, mask=cmask)
        tl.store(partial_ptr + (C + c) * N + n, channel_dy, mask=cmask)
        count = GROUP_CHANNELS * S
        mean_g = (_per_group(channel_dy * gamma, GROUP_BLOCK, BLOCK_C) / count)[:, None]
        mean_g_xhat = (_per_group(channel_dy_xhat * gamma, GROUP_BLOCK, BLOCK_C) / count)[:, None]
        if WHOLE:
            _store_input_grad(x, dy, mean, rstd, gamma, mean_g, mean_g_xhat, dx_ptr, d_total_ptr, offsets, mask,
                              ADD_GRAD)
        else:
            for s0 in range(0, S, BLOCK_S):
                x, dy, offsets, mask = _input_and_relu_grad(x_ptr, dy_ptr, n, c0, s0, channels, S, stride_n,
                                                            stride_c, stride_s, scale, shift, BLOCK_C, BLOCK_S)
                _store_input_grad(x, dy, mean, rstd, gamma, mean_g, mean_g_xhat, dx_ptr, d_total_ptr, offsets, mask,
                                  ADD_GRAD)
