"""The stem's max-pool (zero pad 1, 3x3 window, stride 2) as one Triton kernel each way, for CUDA.

Why: torch's max-pool saves the winner of every window as an int64 index -- four times the bytes of the bf16
output -- and its backward read them at a fraction of the memory's speed: on an H100 (R50x1, bf16, batch 512,
128 px) the stem's one pooling took 1.66 ms of a 33 ms training step, where moving the bytes these kernels
move takes 0.25 ms (benchmarks/RESULTS.md). Here the winner is the window's tap (0-8) in one byte, the zero padding is
read as zeros without a padded copy, and the backward gathers: each input position sums the gradients of the
at most four windows whose winner it was (no atomics; deterministic). Ties go to the first tap in row-major
order, as in torch; a NaN wins its window. Off by default until a GPU has measured it against torch's
(``BIGTRANSFER_FUSED_POOL=1`` turns it on); a backward with ``create_graph=True`` runs through torch's ops.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .fused_norm import _dense, _dense_format, plain_eager, triton

if triton is not None:
    import triton.language as tl

ENABLED = triton is not None and os.environ.get("BIGTRANSFER_FUSED_POOL", "0") == "1"
BLOCK_P, BLOCK_C = 64, 32  # positions x channels per program


def usable(x: torch.Tensor) -> bool:
    """Whether `x` (the stem convolution's output) goes through the kernels."""
    return ENABLED and x.is_cuda and x.dim() == 4 and plain_eager() and x.numel() > 0  # empty: torch's own


def reference(x: torch.Tensor) -> torch.Tensor:
    """What the kernels compute, in torch's ops: pad with zeros, then pool."""
    return F.max_pool2d(F.pad(x, (1, 1, 1, 1)), kernel_size=3, stride=2)


def zero_padded_max_pool(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(pad(x, 1), 3, stride=2)`` in x's dtype and memory layout."""
    return _ZeroPaddedMaxPool.apply(x)


def _grid(n: int, c: int, positions: int) -> tuple[int, int, int]:
    return triton.cdiv(positions, BLOCK_P), triton.cdiv(c, BLOCK_C), n


class _ZeroPaddedMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = _dense(x)
        n, c, h, w = x.shape
        out_h, out_w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        fmt = _dense_format(x)
        y = torch.empty((n, c, out_h, out_w), device=x.device, dtype=x.dtype, memory_format=fmt)
        tap = torch.empty_like(y, dtype=torch.int8)
        _max_pool_forward[_grid(n, c, out_h * out_w)](x, y, tap, c, h, w, out_h, out_w, *x.stride(), *y.stride(),
                                                      BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(x, tap)  # x only for a double backward (torch's max-pool saves it too)
        ctx.input_format = fmt
        return y

    @staticmethod
    def backward(ctx, dy):
        x, tap = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: through torch's differentiable ops
            with torch.enable_grad():
                x = x.detach().requires_grad_()
                (dx,) = torch.autograd.grad(reference(x), x, dy, create_graph=True)
            return dx
        dy = dy.contiguous(memory_format=ctx.input_format)
        n, c, h, w = x.shape
        dx = torch.empty(x.shape, device=dy.device, dtype=dy.dtype, memory_format=ctx.input_format)
        _max_pool_backward[_grid(n, c, h * w)](dy, tap, dx, c, h, w, tap.shape[2], tap.shape[3], *dy.stride(),
                                               *dx.stride(), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
        return dx


if triton is not None:

    @triton.jit
    def _max_pool_forward(x_ptr, y_ptr, tap_ptr, C, H, W, OH, OW, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """One [BLOCK_P output positions, BLOCK_C channels] tile: the 9 taps of each window, padding as 0."""
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = tl.program_id(2).to(tl.int64)
        i, j = p // OW, p % OW
        valid = (p < OH * OW)[:, None] & (c < C)[None, :]
        best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
        winner = tl.zeros([BLOCK_P, BLOCK_C], tl.int32)
        for t in tl.static_range(9):
            h = 2 * i - 1 + t // 3
            w = 2 * j - 1 + t % 3
            inside = ((h >= 0) & (h < H) & (w >= 0) & (w < W))[:, None] & valid
            ptrs = x_ptr + n * sxn + c[None, :] * sxc + (h * sxh + w * sxw)[:, None]
            v = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)  # the padding is zeros
            take = (v > best) | ((v != v) & (best == best))  # the first maximum, or the first NaN
            best = tl.where(take, v, best)
            winner = tl.where(take, t, winner)
        out = n * syn + c[None, :] * syc + (i * syh + j * syw)[:, None]
        tl.store(y_ptr + out, best.to(y_ptr.dtype.element_ty), mask=valid)
        tl.store(tap_ptr + out, winner.to(tl.int8), mask=valid)

    @triton.jit
    def _max_pool_backward(dy_ptr, tap_ptr, dx_ptr, C, H, W, OH, OW, syn, syc, syh, syw, sxn, sxc, sxh, sxw,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """One [BLOCK_P input positions, BLOCK_C channels] tile of dx. In padded coordinates (h + 1) window i
        covers rows 2i..2i+2, so a row belongs to window (h + 1) // 2 and, where h + 1 is even, to the one
        before; the same for columns: at most four windows, each adding its gradient if this was its tap."""
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = tl.program_id(2).to(tl.int64)
        h, w = p // W, p % W
        valid = (p < H * W)[:, None] & (c < C)[None, :]
        total = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for a in tl.static_range(2):
            for b in tl.static_range(2):
                i = (h + 1) // 2 - a
                j = (w + 1) // 2 - b
                di, dj = h + 1 - 2 * i, w + 1 - 2 * j  # this position's tap in window (i, j): row, column
                covered = (i >= 0) & (i < OH) & (di <= 2) & (j >= 0) & (j < OW) & (dj <= 2)
                mask = covered[:, None] & valid
                at = n * syn + c[None, :] * syc + (i * syh + j * syw)[:, None]
                won = tl.load(tap_ptr + at, mask=mask, other=-1).to(tl.int32) == (di * 3 + dj)[:, None]
                total += tl.where(won & mask, tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32), 0.0)
        out = n * sxn + c[None, :] * sxc + (h * sxh + w * sxw)[:, None]
        tl.store(dx_ptr + out, total.to(dx_ptr.dtype.element_ty), mask=valid)
