"""Run independent work items over processes, in order, with a progress bar."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm import tqdm


def worker_count(requested: int) -> int:
    """`requested` workers, or one per CPU this process may use when it is 0."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_map(
    fn: Callable[[Any], Any], items: list, workers: int, desc: str, progress: bool = True
) -> Iterator[Any]:
    """Yield fn(item) for every item, in order. Results never depend on `workers`: items carry their seeds.

    Processes are spawned, not forked: open3d and torch keep thread pools that a fork can leave locked.
    """
    workers = min(worker_count(workers), max(len(items), 1))
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers == 1:
            results: Iterable = map(fn, items)
            for result in results:
                bar.update()
                yield result
            return
        chunksize = max(1, min(32, len(items) // (workers * 8)))
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for result in pool.map(fn, items, chunksize=chunksize):
                bar.update()
                yield result
