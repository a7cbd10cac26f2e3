"""Few-shot sampling: exactly k examples of every class, reproducible from a seed."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np

from .sources import BadImageError, LabelledImages

log = logging.getLogger("bigtransfer")


def sample_per_class(targets: Sequence[int], examples_per_class: int, seed: int,
                     classes: Sequence[str] | None = None, usable: Callable[[int], bool] | None = None) -> list[int]:
    """Indices of `examples_per_class` items of every class (of `classes` where given, else of those present
    in `targets`), drawn without replacement with `seed`. A class with fewer items, none included, is an error
    naming it (a silently smaller k, or a class left out, would change what the experiment measures). Items
    `usable` rejects (images that do not decode) are replaced by further draws from their class, so that k
    stays k; the draws of every other item are the same as without `usable`."""
    if examples_per_class < 1:
        raise ValueError(f"examples_per_class must be >= 1, got {examples_per_class}")
    if seed < 0:  # numpy's generators take no negative seed; its own error names no option
        raise ValueError(f"the few-shot seed must be >= 0, got {seed}")
    if any(isinstance(t, tuple | list) for t in targets):
        raise ValueError("examples per class need single-label data: these images have several classes each")
    targets = np.asarray(targets)
    order = np.argsort(targets, kind="stable")  # each class's items in index order, one sort for all classes
    labels = np.arange(len(classes)) if classes is not None else np.unique(targets)
    in_order = targets[order]  # with ImageNet-21k's 14M images, a pass over the targets per class took 200 s
    bounds = np.searchsorted(in_order, labels, side="left"), np.searchsorted(in_order, labels, side="right")
    rng = np.random.default_rng(seed)
    chosen = []
    for label, lo, hi in zip(labels, *bounds, strict=True):
        name = classes[label] if classes is not None else str(label)
        members = order[lo:hi]
        if len(members) < examples_per_class:
            raise ValueError(f"class {name!r} has only {len(members)} examples, "
                             f"{examples_per_class} per class were asked for")
        drawn = rng.choice(members, size=examples_per_class, replace=False).tolist()
        if usable is not None:
            good = [i for i in drawn if usable(i)]
            rest = np.random.default_rng([seed, int(label)]).permutation(np.setdiff1d(members, drawn)).tolist()
            good += itertools.islice((i for i in rest if usable(i)), examples_per_class - len(good))
            if len(good) < examples_per_class:
                raise ValueError(f"class {name!r} has only {len(good)} readable examples, "
                                 f"{examples_per_class} per class were asked for")
            drawn = good
        chosen.extend(drawn)
    return sorted(chosen)


def select_examples(source: LabelledImages, examples_per_class: int | None, seed: int = 0,
                    readable: bool = False) -> tuple[LabelledImages, list[int] | None]:
    """The few-shot training set (and the chosen indices), or the whole source when k is None. `readable`:
    decode the draws and replace those that do not decode (k examples means k images to learn from); without
    it, nothing is decoded, which is all a plan needs."""
    if examples_per_class is None:
        return source, None

    def decodes(i: int) -> bool:
        try:
            source[i]
            return True
        except BadImageError as e:
            log.warning("few-shot draw: %s; another example of its class is drawn instead", e)
            return False

    chosen = sample_per_class(source.targets, examples_per_class, seed, source.classes,
                              usable=decodes if readable else None)
    return source.subset(chosen), chosen
