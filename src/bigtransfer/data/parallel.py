"""One place for "run these jobs in worker processes, with a progress bar": shard writing and
in-memory decoding both need it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def map_with_progress(fn: Callable[..., Any], jobs: Sequence[tuple], *, workers: int, description: str,
                      total: int, size: Callable[[Any], int], progress: bool = True,
                      transient: bool = False) -> list:
    """[fn(*job) for job in jobs], in `workers` processes when > 1, in order; the bar advances by
    size(result) items as each job finishes."""
    from rich.progress import Progress

    results = []
    with Progress(disable=not progress, transient=transient) as bar:
        task = bar.add_task(description, total=total)
        with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
            for result in pool.map(fn, *zip(*jobs, strict=True)):
                results.append(result)
                bar.advance(task, size(result))
    return results


class _Inline:
    """The executor interface, in this process (no pickling, no start-up cost)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[..., Any], *iterables):
        return map(fn, *iterables)
