"""Batches made on the accelerator: for data sets that fit in memory (CIFAR, VTAB-1k, generated data)
the uint8 images live on the device, and resize / crop / flip run there in batch, so no CPU data
pipeline can stall a fast GPU. Crops and flips are the CPU path's (same per-sample seeds); only the
resampling differs (bilinear with antialias on tensors instead of PIL)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..runtime import upload
from .loader import StepSampler
from .memory import InMemoryImages
from .sources import LabelledImages
from .transforms import HyperRuleTransform


class DeviceImages:
    """A data set (decoded into memory first if it is not) moved to `device` as one (N, 3, H, W) uint8
    tensor; images of several sizes need an `InMemoryImages(source, size)` first."""

    def __init__(self, source: LabelledImages, device: torch.device) -> None:
        if source.multi_label:
            raise ValueError("the on-device data path takes single-label data")
        parent = getattr(source, "parent", None)  # a few-shot subset of an in-memory set
        if isinstance(parent, InMemoryImages):
            array = parent.images[source.indices]
            bad = {j: parent.bad[i] for j, i in enumerate(source.indices.tolist()) if i in parent.bad}
        else:
            memory = source if isinstance(source, InMemoryImages) else InMemoryImages(source)
            array, bad = memory.images, memory.bad
        self.images = torch.from_numpy(array).to(device).permute(0, 3, 1, 2).contiguous()
        self.bad = {i: str(e) for i, e in bad.items()}  # reported and left out by the training loop, as from files
        self.targets = torch.tensor(source.targets, device=device)
        self.device = device

    def batch(self, keys: list[tuple[int, int]], transform: HyperRuleTransform) -> torch.Tensor:
        """uint8 (n, 3, crop, crop) images of the (item, seed) keys, transformed as `transform` would."""
        x = self.images[upload([i for i, _ in keys], self.device)].float()
        side = transform.resize if transform.cropping else transform.crop
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        top, left, flip = (upload(a, self.device) for a in transform.batch_params([s for _, s in keys]))
        steps = torch.arange(transform.crop, device=self.device)
        rows = top[:, None] + steps
        cols = left[:, None] + steps
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        n = len(keys)
        x = x[torch.arange(n, device=self.device)[:, None, None, None],
              torch.arange(3, device=self.device)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        return x.round_().clamp_(0, 255).to(torch.uint8)


def device_batches(data: DeviceImages, transform: HyperRuleTransform, sampler: StepSampler, start: int,
                   stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """The engine's batch source for steps start..stop-1, made on the device."""
    for step in range(start, stop):
        keys = sampler.batch(step)
        yield (data.batch(keys, transform), data.targets[upload([i for i, _ in keys], data.device)],
               [data.bad.get(i, "") for i, _ in keys])
