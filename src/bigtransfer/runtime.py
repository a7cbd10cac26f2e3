"""Where the work runs: device, precision, and torchrun/DDP process groups."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def keep_freed_memory() -> bool:
    """Serve large CPU tensors from the heap and keep freed memory for the next one (glibc only).

    By default glibc serves large blocks (from 128 KiB, adapting up to 32 MiB) with mmap and returns
    them to the kernel on free, and trims the top of its heap once a few MiB there are free, so the
    next activation of that size page-faults in freshly zeroed pages: measured 180,000 page faults
    (700 MB) per R50x1 forward at batch 16, a third of CPU inference time (timm's model: 340,000).
    This is the cure jemalloc/tcmalloc setups apply to PyTorch on CPUs, done with glibc's own
    `mallopt`: no mmap for large blocks, and up to 1 GiB of free heap kept instead of trimmed.
    Called once when `bigtransfer` is imported; ``BIGTRANSFER_MALLOC=system`` leaves the allocator
    alone. Returns whether the setting was applied.
    """
    if os.environ.get("BIGTRANSFER_MALLOC", "").lower() == "system" or not _running_on_glibc():
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def _running_on_glibc() -> bool:
    """Ask the loaded C library itself (`platform.libc_ver` would scan the Python executable, which is
    tens of MB for statically linked builds, on every import)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (musl, macOS)
        return False


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the same command resumes the run. A KeyboardInterrupt,
    not an Exception: an ``except Exception`` around each run of a sweep in a notebook let the sweep go on."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint written, "
                         "run the same command again to resume")
        self.step, self.signum = step, signum


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The main process writes the run's files and prints progress (each rank keeps its own bad-image and
        sample logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None) -> torch.device:
    """`device` as a torch.device (None or "auto": CUDA where there is one), or a ValueError saying why not."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: not a device name (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU on this machine; "
                         "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def setup(device: str | None = None) -> Runtime:
    """Pick the device and, under torchrun (RANK/WORLD_SIZE set), join the process group:
    NCCL on GPUs, gloo on CPUs. On CUDA, cuDNN autotunes its convolutions (`autotune_convolutions`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
        autotune_convolutions(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world, local)


def autotune_convolutions(device: torch.device) -> bool:
    """Let cuDNN time its algorithms for each convolution shape once and keep the fastest
    (``torch.backends.cudnn.benchmark``), as timm's and torchvision's training scripts do: training and
    evaluation run a few fixed shapes for thousands of steps, so the one-off timing pays for itself, and
    without it cuDNN picks by heuristics. Not where deterministic algorithms were asked for (the choice
    can differ between runs) or with ``BIGTRANSFER_CUDNN_AUTOTUNE=0``. Returns whether it was turned on."""
    if (device.type != "cuda" or os.environ.get("BIGTRANSFER_CUDNN_AUTOTUNE", "1") == "0"
            or torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic):
        return False
    torch.backends.cudnn.benchmark = True
    return True


def autocast(device: torch.device, precision: str, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision by name; fp32 is a no-op. (GroupNorm's statistics stay fp32 under autocast.)"""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def upload(values: np.ndarray | list, device: torch.device) -> torch.Tensor:
    """A host array on `device` without making the CPU wait for the GPU.

    A copy from ordinary (pageable) memory waits for everything already queued on the stream, so the CPU
    could not prepare the next batch while the GPU trains on this one; a copy from pinned memory is queued
    like a kernel (PyTorch's pinned-memory cache keeps the buffer until the copy is done)."""
    tensor = torch.as_tensor(values)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def all_reduce_sum(t: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
