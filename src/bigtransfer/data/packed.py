"""Per-item lists stored so that forked DataLoader workers share them with their parent instead of copying them.

A worker forked from the training process shares its pages until it writes to one, and in Python reading an
object writes to it (its reference count), as do the garbage collector's passes over lists and tuples. A list
of one Python string per image is therefore copied, page by page, into every worker that reads it: hundreds
of MiB per worker at ImageNet's 1.28M images (``benchmarks/bench_loader_memory.py``). Bytes in one buffer
and offsets in a NumPy array are two objects, whatever the number of items, and reading them writes nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


class PackedStrings(Sequence[str]):
    """An immutable sequence of strings held as one UTF-8 buffer and the items' end offsets. Every string comes
    back as it went in, surrogates too (those `os.fsdecode` leaves for names that are not UTF-8, and the lone
    ones of Windows names): they are stored as their code points, not turned back into bytes."""

    def __init__(self, strings: Iterable[str]) -> None:
        encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
        self._ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        self._blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):  # an int gives a str, a slice a list of them
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n, i = len(self), operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} strings")
        i %= n
        start = int(self._ends[i - 1]) if i else 0
        return self._blob[start:int(self._ends[i])].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        start = 0
        for end in self._ends.tolist():
            yield self._blob[start:end].decode("utf-8", "surrogatepass")
            start = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedStrings):
            return np.array_equal(self._ends, other._ends) and self._blob == other._blob
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # equal to a list, which has none

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self[:3])) + (", ..." if len(self) > 3 else "")
        return f"PackedStrings([{shown}], {len(self)} items)"


class PackedLabels(Sequence[tuple[int, ...]]):
    """The label tuples of multi-label data (ImageNet-21k: 14M of them, about 1 GB of tuples per loader worker
    copied as an epoch reads them), held as one array of class indices and the items' end offsets. Items read
    as tuples of ints, as a list of tuples would give them."""

    def __init__(self, labels: Iterable[Sequence[int]] = ()) -> None:
        labels = [tuple(map(int, t)) for t in labels]
        self._flat = np.fromiter((c for t in labels for c in t), np.int64)
        self._ends = np.cumsum(np.fromiter(map(len, labels), np.int64, len(labels)))

    @classmethod
    def from_arrays(cls, flat: np.ndarray, ends: np.ndarray) -> PackedLabels:
        """Item i is ``flat[ends[i - 1]:ends[i]]`` (from 0 for the first)."""
        packed = cls()
        packed._flat, packed._ends = np.asarray(flat, np.int64), np.asarray(ends, np.int64)
        return packed

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):  # an int gives a tuple, a slice a list of them
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n, i = len(self), operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} label tuples")
        i %= n
        return tuple(self._flat[int(self._ends[i - 1]) if i else 0:int(self._ends[i])].tolist())

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        for first in range(0, len(self), 65536):  # in blocks: a list of all 14M labels at once is 1 GB
            ends = self._ends[first:first + 65536]
            start = int(self._ends[first - 1]) if first else 0
            flat = self._flat[start:int(ends[-1])].tolist()
            offset = start
            for end in ends.tolist():
                yield tuple(flat[start - offset:end - offset])
                start = end

    def take(self, indices: np.ndarray) -> PackedLabels:
        """Items `indices` (an int array, as `index_array` gives), packed again without a tuple per item."""
        starts = np.concatenate([[0], self._ends[:-1]])[indices]
        lengths = self._ends[indices] - starts
        ends = np.cumsum(lengths)
        within = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - lengths, lengths)
        return PackedLabels.from_arrays(self._flat[np.repeat(starts, lengths) + within], ends)

    def relabel(self, index: np.ndarray) -> PackedLabels:
        """Every class c as ``index[c]`` (`match_classes`)."""
        return PackedLabels.from_arrays(np.asarray(index, np.int64)[self._flat], self._ends)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedLabels):
            return np.array_equal(self._ends, other._ends) and np.array_equal(self._flat, other._flat)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self[:3])) + (", ..." if len(self) > 3 else "")
        return f"PackedLabels([{shown}], {len(self)} items)"


def shared_labels(targets: Iterable[int]) -> list[int]:
    """Integer labels as a list in which equal labels are one object: reading one writes to (the reference count
    of) one of as many objects as there are classes, not one per item (Python keeps only -5..256 shared)."""
    pool: dict[int, int] = {}
    return [pool.setdefault(t, t) for t in map(int, targets)]


def index_array(indices: Iterable[int] | np.ndarray, n: int, name: str) -> np.ndarray:
    """`indices` (any iterable of integers: a list, range, generator, NumPy array, tensor) into `n` items as an
    int64 array, negative ones counted from the end; anything but integers (a boolean mask would pick items by
    position in error, a float would be cut) or an index out of range is refused, naming `name`."""
    if hasattr(indices, "cpu") and hasattr(indices, "numpy"):  # a tensor, on any device
        indices = indices.cpu().numpy()
    if isinstance(indices, np.ndarray) and indices.dtype != object:
        idx = indices if indices.size else indices.astype(np.int64)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TypeError(f"indices into {name} must be a list of integers, got {idx.dtype} of shape {idx.shape}")
    else:
        try:
            idx = np.fromiter(map(_integer, indices), np.int64)
        except TypeError as e:
            raise TypeError(f"indices into {name} must be a list of integers: {e}") from None
        except OverflowError:
            raise IndexError(f"an index beyond int64, out of range for {name} with {n} items") from None
    out = (idx < -n) | (idx >= n)  # before the cast: a uint64 beyond int64 would wrap round to a negative index
    if out.any():
        raise IndexError(f"index {idx[out][0]} out of range for {name} with {n} items")
    return idx.astype(np.int64) % max(n, 1)


def _integer(i: object) -> int:
    if isinstance(i, bool | np.bool_) or str(getattr(i, "dtype", "")) in ("bool", "torch.bool"):  # a mask's items
        raise TypeError(f"got {i!r} (a boolean mask? np.flatnonzero gives its items)")
    try:
        return operator.index(i)
    except TypeError:
        raise TypeError(f"got {i!r}") from None
