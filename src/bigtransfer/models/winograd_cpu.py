"""3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(4x4, 3x3), for inference on CPUs.

Why: a 3x3 convolution costs 9 multiply-adds per output and input channel; Winograd's F(4x4, 3x3) computes
each 4x4 block of outputs from a 6x6 block of inputs with 36 instead of 144, as 36 matrix products (torch's)
between transforms done in C (`winograd_cpu.c`, compiled on first use, see `native`). oneDNN's direct
convolutions already run at a CPU's matrix-multiply rate, so this is the one way left to do less work: R50x1's
stride-1 3x3 convolutions are 37% of its FLOPs. Measured on 2 cores of an AMD EPYC (Zen 4), batch 16 at
224 px, against oneDNN (`benchmarks/bench_winograd_cpu.py`): 1.4-1.7x per layer, the whole forward 1.14x.
Narrow layers and small inputs lose, so `worthwhile` keeps those direct.

Numerics: the transforms' coefficients (up to 8 and 1/24) make the rounding error about 10x that of a direct
convolution in fp32: about 1e-5 of the output's largest value per layer, against 1e-6 (R50x1's logits: 1e-5).
So it runs in fp32 inference only (no gradient: `resnetv2._cpu_inference`); training keeps oneDNN's
convolutions and their rounding, and ``BIGTRANSFER_WINOGRAD=0`` turns this off.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys

import torch

from .native import NativeLibrary

SOURCE = pathlib.Path(__file__).with_name("winograd_cpu.c")
ENABLED = os.environ.get("BIGTRANSFER_WINOGRAD", "1") != "0" and sys.platform != "win32"
CHANNEL_BLOCK = 16  # channels per vector in the C transforms: channel counts must be multiples of it
TILE = 4  # outputs per tile side; each tile reads (TILE + 2) x (TILE + 2) inputs
POSITIONS = (TILE + 2) ** 2
CHUNK_BYTES = 32 << 20  # bytes per buffer of transformed inputs/products, at least one sample (peak memory)

# G of F(4x4, 3x3) (Lavin & Gray 2015): the kernel's transform, applied once per kernel.
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


def library() -> ctypes.CDLL | None:
    return _LIBRARY.get()


def _declare(lib: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name in ("bit_winograd_input", "bit_winograd_output"):
        getattr(lib, name).argtypes = [pointer, pointer] + [size] * 4 + [ctypes.c_int]


_LIBRARY = NativeLibrary(SOURCE, _declare, "Winograd CPU convolution")


def tiles(x_shape: torch.Size | tuple[int, ...]) -> int:
    """Number of 4x4 output tiles of an (n, c, h, w) input."""
    n, _, h, w = x_shape
    return n * -(-h // TILE) * -(-w // TILE)


def worthwhile(x_shape: torch.Size | tuple[int, ...], out_channels: int) -> bool:
    """The layers where Winograd beat oneDNN on 2 cores (`bench_winograd_cpu.py`, results in
    results/cpu_amd_epyc_2026-11-28_winograd_*): 64 channels or more in and out, and 32 tiles or more --
    1.1-2.2x near the rule's edges, except in stretches of long runs that did not come back when rerun (RESULTS.md).
    Below either line the outcome swung from run to run -- 16 or 32 channels: 0.4-1.7x; under 32 tiles, where
    the transformed kernel (4x the kernel's size) is read for few products: 0.3-1.5x -- so those stay direct."""
    return min(x_shape[1], out_channels) >= 64 and tiles(x_shape) >= 32


def usable(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether `conv(x)` can run here: a worthwhile 3x3 convolution with stride, dilation and padding 1 of a
    4-d fp32 channels_last CPU tensor, channels multiples of 16. The caller checks that no gradient is asked for
    (`resnetv2._cpu_inference`)."""
    return (ENABLED and not _LIBRARY.failed and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and type(x) is torch.Tensor
            and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] % CHANNEL_BLOCK == 0
            and conv.out_channels % CHANNEL_BLOCK == 0 and worthwhile(x.shape, conv.out_channels)
            and library() is not None)


def transform_kernel(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T of each (out, in) 3x3 kernel g, as (36, in, out) fp32: the right-hand sides of the 36 matrix
    products. One matrix product, kron(G, G) (36 x 9) times the kernels as (9, in * out) columns, writes that
    layout directly: R50x1's 13 kernels in 33 ms, against 274 ms transformed in place and then permuted.
    Its own rounding (about 3e-8 of the largest value) is negligible beside the inputs' transform."""
    out_channels, in_channels = weight.shape[:2]
    g = torch.tensor(_G, dtype=torch.float32, device=weight.device)
    columns = weight.float().reshape(out_channels, in_channels, 9).permute(2, 1, 0).reshape(9, -1)
    return (torch.kron(g, g) @ columns).view(POSITIONS, in_channels, out_channels)


def conv3x3(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The convolution of `x` (one that passes `usable`) with the kernel that `transform_kernel` made, padding 1,
    channels_last. Runs a chunk of samples at a time so the transformed inputs stay under `CHUNK_BYTES`."""
    n, c, h, w = x.shape
    k = kernel.shape[-1]
    if not (x.dtype == kernel.dtype == torch.float32 and x.device.type == kernel.device.type == "cpu"
            and x.is_contiguous(memory_format=torch.channels_last) and kernel.is_contiguous()
            and kernel.shape == (POSITIONS, c, k) and c % CHANNEL_BLOCK == 0 and k % CHANNEL_BLOCK == 0):
        raise ValueError(f"winograd conv3x3: input {tuple(x.shape)} {x.dtype} (channels_last: "
                         f"{x.is_contiguous(memory_format=torch.channels_last)}), kernel {tuple(kernel.shape)} "
                         f"{kernel.dtype}: needs fp32 CPU tensors, a channels_last input, a ({POSITIONS}, in, out) "
                         f"kernel from transform_kernel, channels multiples of {CHANNEL_BLOCK}")
    lib = library()
    per_sample = tiles((1, c, h, w))
    step = max(1, min(n, CHUNK_BYTES // (POSITIONS * per_sample * max(c, k) * 4)))
    y = torch.empty((n, k, h, w), dtype=torch.float32, device="cpu", memory_format=torch.channels_last)
    v = torch.empty(POSITIONS * step * per_sample * c, dtype=torch.float32, device="cpu")
    m = torch.empty(POSITIONS * step * per_sample * k, dtype=torch.float32, device="cpu")
    threads = torch.get_num_threads()
    for first in range(0, n, step):
        count = min(step, n - first)
        rows = count * per_sample
        v_chunk = v[:POSITIONS * rows * c].view(POSITIONS, rows, c)
        m_chunk = m[:POSITIONS * rows * k].view(POSITIONS, rows, k)
        lib.bit_winograd_input(x[first].data_ptr(), v_chunk.data_ptr(), count, h, w, c, threads)
        torch.bmm(v_chunk, kernel, out=m_chunk)
        lib.bit_winograd_output(m_chunk.data_ptr(), y[first].data_ptr(), count, h, w, k, threads)
    return y
