"""HyperRule image transforms with explicit randomness.

Every random choice (crop offset, flip) comes from a per-sample seed that the sampler derives from
(run seed, step, position in the global batch). So a resumed run, a run with another batch split
and a run on several processes see exactly the same augmented images. Output stays uint8: the
scaling to [-1, 1] happens on the device, where it is cheap and moves 4x fewer bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class HyperRuleTransform:
    """Train: resize to a `resize` square, random `crop` square (or, with random_crop off, straight to
    `crop`), optional horizontal flip. Eval (`train=False`): resize straight to `crop`."""

    resize: int
    crop: int
    train: bool = True
    flip: bool = True
    random_crop: bool = True

    @property
    def cropping(self) -> bool:
        return self.train and self.random_crop

    def params(self, seed: int) -> tuple[int, int, bool]:
        """(top, left, flip) of the sample with this seed (the PIL path)."""
        top, left, flip = self.batch_params([seed])
        return int(top[0]), int(left[0]), bool(flip[0])

    def batch_params(self, seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top, left, flip) arrays for many seeds in one vectorised call (the on-device path draws a
        whole batch at once); the same numbers as `params`, so both paths see the same crops and flips."""
        seeds = np.asarray(seeds, dtype=np.uint64)
        span = self.resize - self.crop + 1 if self.cropping else 1
        top = (uniform(seeds, 0) * span).astype(np.int64)
        left = (uniform(seeds, 1) * span).astype(np.int64)
        flip = (uniform(seeds, 2) < 0.5) & (self.train and self.flip)
        return top, left, flip

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        top, left, flip = self.params(seed)
        if self.cropping:
            image = TF.crop(TF.resize(image, [self.resize, self.resize]), top, left, self.crop, self.crop)
        else:
            image = TF.resize(image, [self.crop, self.crop])
        if flip:
            image = TF.horizontal_flip(image)
        return TF.pil_to_tensor(image)


def uniform(seeds: np.ndarray, stream: int) -> np.ndarray:
    """Counter-based uniform numbers in [0, 1): SplitMix64 of (seed, stream), vectorised over uint64
    seeds. A pure function of its inputs, so a sample's draws do not depend on what else is drawn."""
    z = seeds * np.uint64(4) + np.uint64(stream) + np.uint64(0x9E3779B97F4A7C15)  # wraps modulo 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1], as BiT was trained (x / 127.5 - 1)."""
    return images.float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class InceptionCropTransform:
    """Upstream pre-training augmentation: Inception-style random-resized crop (8-100% of the area,
    aspect 3/4-4/3, torchvision's sampling) to `crop` x `crop`, then a random horizontal flip."""

    crop: int = 224
    flip: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        from torchvision.transforms.v2 import RandomResizedCrop

        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG: seed it per sample
            torch.manual_seed(seed)
            top, left, h, w = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
            flip = self.flip and bool(torch.rand(()) < 0.5)
        image = TF.resized_crop(image, top, left, h, w, [self.crop, self.crop])
        if flip:
            image = TF.horizontal_flip(image)
        return TF.pil_to_tensor(image)
