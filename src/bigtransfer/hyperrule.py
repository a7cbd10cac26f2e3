"""The BiT-HyperRule (the paper's transfer recipe; the authors' `bit_hyperrule.py`): every fine-tuning choice
from two facts about the data.

Pure functions, no torch. Two variants:

* ``release`` (default) -- the authors' released code (``bit_hyperrule.py``): resize 512 / crop 480
  for images of 96x96 pixels and more, linear warmup, then x0.1 decays at fixed step boundaries.
* ``paper`` -- the paper's text: resize 448 / crop 384, no warmup stated, x0.1 decays at 30%, 60%
  and 90% of the steps.

Both: 160/128 for images below 96x96 pixels; 500 / 10k / 20k steps for fewer than 20k / 500k /
more examples; MixUp alpha 0.1 from 20k examples on; SGD momentum 0.9, lr 0.003, batch 512, no
weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("release", "paper")
BASE_LR = 0.003
BATCH_SIZE = 512
MOMENTUM = 0.9
SMALL_IMAGE_AREA = 96 * 96
RELEASE_BOUNDARIES = {  # (warmup, decays..., end) by dataset size, from the authors' code
    20_000: (100, 200, 300, 400, 500),
    500_000: (500, 3000, 6000, 9000, 10_000),
    None: (500, 6000, 12_000, 18_000, 20_000),
}


@dataclass(frozen=True)
class Schedule:
    """Linear warmup over `warmup_steps`, x0.1 after each of `decay_steps`, stop at `total_steps`."""

    warmup_steps: int
    decay_steps: tuple[int, ...]
    total_steps: int

    def scaled(self, total_steps: int) -> Schedule:
        """The same shape stretched or shrunk to `total_steps` (an override of the step count)."""
        f = total_steps / self.total_steps
        return Schedule(round(self.warmup_steps * f), tuple(round(s * f) for s in self.decay_steps), total_steps)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown HyperRule variant {variant!r}; choose from {', '.join(VARIANTS)}")


def resolution(size: tuple[int, int], variant: str = "release") -> tuple[int, int]:
    """(resize, crop) for images of `size` = (height, width): train on a random crop of the resized
    square, evaluate on the image resized straight to the crop size."""
    _check_variant(variant)
    if size[0] * size[1] < SMALL_IMAGE_AREA:
        return 160, 128
    return (512, 480) if variant == "release" else (448, 384)


def schedule(n_examples: int, variant: str = "release") -> Schedule:
    """Steps, warmup and decay points for a training set of `n_examples`."""
    _check_variant(variant)
    if n_examples < 1:
        raise ValueError(f"a training set of {n_examples} examples has no schedule")
    limit = next(k for k in RELEASE_BOUNDARIES if k is None or n_examples < k)
    warmup, *decays, total = RELEASE_BOUNDARIES[limit]
    if variant == "release":
        return Schedule(warmup, tuple(decays), total)
    return Schedule(0, tuple(round(total * f) for f in (0.3, 0.6, 0.9)), total)


def mixup_alpha(n_examples: int) -> float:
    """MixUp only pays off with enough data: alpha 0.1 from 20,000 examples on, none below."""
    return 0.0 if n_examples < 20_000 else 0.1


def learning_rate(step: int, schedule: Schedule, base_lr: float = BASE_LR) -> float:
    """Learning rate of update `step` (0-based), exactly as the authors' ``get_lr``: warmup from 0,
    then base_lr / 10 for every decay boundary strictly before `step`."""
    if not 0 <= step < schedule.total_steps:
        raise ValueError(f"step {step} is outside the schedule's steps 0..{schedule.total_steps - 1}")
    if step < schedule.warmup_steps:
        return base_lr * step / schedule.warmup_steps
    return base_lr * 0.1 ** sum(1 for boundary in schedule.decay_steps if boundary < step)
