"""Few-shot sampling: exactly k examples of every class, reproducible from a seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_per_class(targets: Sequence[int], examples_per_class: int, seed: int,
                     classes: Sequence[str] | None = None) -> list[int]:
    """Indices of `examples_per_class` items of every class (of `classes` where given, else of those present
    in `targets`), drawn without replacement with `seed`. A class with fewer items, none included, is an error
    naming it (a silently smaller k, or a class left out, would change what the experiment measures)."""
    if examples_per_class < 1:
        raise ValueError(f"examples_per_class must be >= 1, got {examples_per_class}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(classes)) if classes is not None else np.unique(targets):
        members = np.flatnonzero(targets == label)
        if len(members) < examples_per_class:
            name = classes[label] if classes is not None else str(label)
            raise ValueError(f"class {name!r} has only {len(members)} examples, "
                             f"{examples_per_class} per class were asked for")
        chosen.extend(rng.choice(members, size=examples_per_class, replace=False).tolist())
    return sorted(chosen)
