"""One place for "run these jobs in worker processes, with a progress bar": shard writing and
in-memory decoding both need it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

_shared: Any = None  # in a worker process: what every job of the pool needs (set once, by the initializer)


def map_with_progress(fn: Callable[..., Any], shared: Any, jobs: Sequence[tuple], *, workers: int, description: str,
                      total: int, size: Callable[[Any], int], progress: bool = True,
                      transient: bool = False) -> list:
    """[fn(shared, *job) for job in jobs], in `workers` processes when > 1, in order; the bar advances by
    size(result) items as each job finishes. `shared` (a source of millions of paths) goes to each worker
    once, not with every job."""
    from rich.progress import Progress

    results = []
    with Progress(disable=not progress, transient=transient) as bar:
        task = bar.add_task(description, total=total)
        if workers > 1:
            pool = ProcessPoolExecutor(workers, initializer=_share, initargs=(shared,))
            call = functools.partial(_call, fn)
        else:
            pool, call = _Inline(), functools.partial(fn, shared)
        with pool:
            for result in pool.map(call, *zip(*jobs, strict=True)):
                results.append(result)
                bar.advance(task, size(result))
    return results


def _share(value: Any) -> None:
    global _shared
    _shared = value


def _call(fn: Callable[..., Any], *job: Any) -> Any:
    return fn(_shared, *job)


class _Inline:
    """The executor interface, in this process (no pickling, no start-up cost)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[..., Any], *iterables):
        return map(fn, *iterables)
