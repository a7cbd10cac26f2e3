"""Batches as a pure function of (seed, step): resumable, batch-split- and process-count-invariant.

`StepSampler.batch(step)` says which items, with which augmentation seeds, make the global batch of
`step`, and which slice of it this process (DDP rank) loads. Nothing depends on how many batches
were drawn before, so a resumed run simply starts at its step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .sources import BadImageError, LabelledImages
from .transforms import HyperRuleTransform

log = logging.getLogger("bigtransfer")
SEED_STRIDE = 1_000_003  # seed * stride + epoch (or step): one stream of draws per seed, apart from the others


def process_share(global_batch: int, world_size: int) -> int:
    """Each process's part of the global batch, which must split evenly (the update is the same for any number
    of processes only then)."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} does not split over {world_size} processes")
    return global_batch // world_size


class StepSampler:
    """Global batch of `global_batch` items per step. Sets at least as large as the batch are walked
    in a fresh seeded permutation each epoch (every item once per epoch); smaller ones are drawn with
    replacement to fill the batch, as the authors' code does for few-shot sets."""

    def __init__(self, n_items: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n_items < 1:
            raise ValueError("no training items")
        self.n, self.batch_size, self.seed = n_items, global_batch, seed
        self.local = process_share(global_batch, world_size)
        self.rank = rank
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def global_items(self, step: int) -> list[int]:
        """All item indices of the global batch of `step`."""
        if self.n < self.batch_size:
            g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + step)
            return torch.randint(self.n, (self.batch_size,), generator=g).tolist()
        first, end = step * self.batch_size, (step + 1) * self.batch_size  # positions in the epochs' walk
        items: list[int] = []
        for epoch in range(first // self.n, (end - 1) // self.n + 1):  # a batch may span the end of an epoch
            start = epoch * self.n
            items += self._permutation(epoch)[max(first, start) - start:min(end, start + self.n) - start].tolist()
        return items

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This process's (item, augmentation seed) pairs for `step`."""
        lo = self.rank * self.local
        items = self.global_items(step)[lo:lo + self.local]
        first = step * self.batch_size + lo
        return [(item, (self.seed * SEED_STRIDE + first + j) % 2**62) for j, item in enumerate(items)]


class _Steps(Sampler[list[tuple[int, int]]]):
    def __init__(self, sampler: StepSampler, start: int, stop: int) -> None:
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return (self.sampler.batch(step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class AugmentedImages(Dataset):
    """(item, seed) -> (uint8 CHW image, label, '' or a bad-image report). A bad image becomes a
    zero image flagged with its report, so the engine can drop it from the batch and count it."""

    def __init__(self, source: LabelledImages, transform: HyperRuleTransform, with_keys: bool = False) -> None:
        self.source, self.transform, self.with_keys = source, transform, with_keys

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, seed = key
        label = target_tensor(self.source.targets[index], self.source)
        try:
            image, report = self.transform(self.source[index][0], seed), ""
        except BadImageError as e:
            image, report = torch.zeros(3, self.transform.crop, self.transform.crop, dtype=torch.uint8), str(e)
        return (image, label, report, str(index)) if self.with_keys else (image, label, report)


def target_tensor(target: int | tuple[int, ...], source) -> int | torch.Tensor:
    """A class index as it is; a multi-label tuple as a multi-hot float vector (for the sigmoid loss)."""
    if not source.multi_label:
        return target
    hot = torch.zeros(len(source.classes))
    hot[list(target)] = 1.0
    return hot


def train_loader(source: LabelledImages, transform: HyperRuleTransform, sampler: StepSampler, start: int,
                 stop: int, workers: int = 0, pin_memory: bool = False, with_keys: bool = False) -> DataLoader:
    """Batches of steps start..stop-1 for this process (with item indices as keys if asked)."""
    return DataLoader(AugmentedImages(source, transform, with_keys), batch_sampler=_Steps(sampler, start, stop),
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False)


def eval_loader(source: LabelledImages, transform: HyperRuleTransform, batch_size: int, workers: int = 0,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """Every item once, this process's share (items rank, rank + world_size, ...)."""
    keys = [(i, 0) for i in range(rank, len(source), world_size)]
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    return DataLoader(AugmentedImages(source, transform), batch_sampler=batches, num_workers=workers,
                      pin_memory=pin_memory)
