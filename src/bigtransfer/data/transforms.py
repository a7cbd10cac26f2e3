"""HyperRule image transforms with explicit randomness.

Every random choice (crop offset, flip) comes from a per-sample seed that the sampler derives from
(run seed, step, position in the global batch). So a resumed run, a run with another batch split
and a run on several processes see exactly the same augmented images. Output stays uint8: the
scaling to [-1, 1] happens on the device, where it is cheap and moves 4x fewer bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        """(top, left, flip) of the sample with this seed: shared by the PIL path and the batched
        on-device path, so both see the same crops and flips."""
        top = left = 0
        if self.cropping:
            top, left = torch.randint(0, self.resize - self.crop + 1, (2,),
                                      generator=torch.Generator().manual_seed(seed)).tolist()
        flip = self.train and self.flip and bool(torch.rand((), generator=torch.Generator().manual_seed(seed + 1))
                                                 < 0.5)
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
