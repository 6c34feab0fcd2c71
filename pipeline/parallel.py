"""Work over several processes: independent work items in order with a progress bar (`parallel_map`),
and what the processes of one machine share: file locks (`locked`, `in_use`) and its CPU cores
(`cpu_slots`), so that studies run side by side (`dvc queue start -j N`) never train on more cores than
the machine has."""

from __future__ import annotations

import contextlib
import fcntl
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm


def worker_count(requested: int) -> int:
    """`requested` workers, or one per CPU this process may use when it is 0."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _spawned_pool(workers: int) -> ProcessPoolExecutor:
    # Spawned, not forked: open3d and torch keep thread pools that a fork can leave locked.
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def parallel_map(
    fn: Callable[[Any], Any],
    items: list,
    workers: int,
    desc: str,
    progress: bool = True,
    pool: ProcessPoolExecutor | None = None,
) -> Iterator[Any]:
    """Yield fn(item) for every item, in order. Results never depend on `workers`: items carry their seeds.

    The items run in `pool` where one is given (`shared_pool`: several calls in a row start their processes
    once), else in a pool of `workers` spawned processes started for this call.
    """
    workers = min(worker_count(workers), max(len(items), 1))
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers == 1 and pool is None:
            results: Iterable = map(fn, items)
            for result in results:
                bar.update()
                yield result
            return
        chunksize = max(1, min(32, len(items) // (workers * 8)))
        with contextlib.nullcontext(pool) if pool is not None else _spawned_pool(workers) as running:
            for result in running.map(fn, items, chunksize=chunksize):
                bar.update()
                yield result


@contextlib.contextmanager
def shared_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `workers` spawned processes (0: one per core) for several `parallel_map` calls in a row:
    each spawned process imports torch and the models (seconds), once for all of them. None for one
    worker, where `parallel_map` runs in this process."""
    count = worker_count(workers)
    if count == 1:
        yield None
        return
    with _spawned_pool(count) as pool:
        yield pool


# --- what the processes of one machine share ------------------------------------------------------------


def _try_lock(handle: IO) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def locked(path: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block; while another process holds
    it, call `waiting()` once and wait. The kernel releases the lock when the holder exits, however it
    ends (a SIGKILLed driver leaves no stale lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        if not _try_lock(handle):
            if waiting is not None:
                waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def in_use(path: Path) -> bool:
    """Whether another process holds the lock on `path` right now."""
    if not path.exists():
        return False
    with open(path, "a") as handle:
        if _try_lock(handle):
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    return True


def slots_folder() -> Path:
    """This user's CPU slots on this machine: one lock file per core, shared by every study run here."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "perception-study" / "cpu-slots"


DEFER_S = 2.0  # how long a waiter leaves the cores to earlier waiters (more than their 0.5 s poll)


def _earlier_waiters(queue: Path, mine: Path) -> bool:
    """Whether a live holder of a ticket older than `mine` is still waiting (a ticket is live while its
    process holds its lock: a killed waiter's ticket is dead and removed)."""
    for ticket in sorted(queue.iterdir()):
        if ticket.name >= mine.name:
            return False
        if in_use(ticket):
            return True
        ticket.unlink(missing_ok=True)
    return False


@contextlib.contextmanager
def cpu_slots(cpus: float, folder: Path | None = None, poll_s: float = 0.5) -> Iterator[float]:
    """Hold ceil(cpus) of this machine's cores for the block, waiting while other processes hold them;
    yields the seconds waited.

    Each core is a lock file; a holder takes all its cores or none, so two holders never wait on each
    other's half. Ray in-process sizes itself to every core, so two studies side by side (a DVC queue
    with -j 2) would each train as many trials as there are cores; with every trial holding its cores
    here, the trials of all the studies on this machine together use no more cores than it has. The
    kernel frees a killed holder's cores.

    Waiters are served first come, first served, for up to `DEFER_S`: each takes a ticket (a lock file
    named by the time it came) and tries the cores only when no earlier ticket is still waiting, or once it
    has waited that long (a holder of some cores that asks for more must not wait forever on a waiter that
    wants the ones it holds). Otherwise a study whose trials follow one another in the same worker process
    (Ray reuses it) would take back the core it just freed before another study's waiting trial polled,
    and starve it.
    """
    folder = folder or slots_folder()
    queue = folder / "queue"
    queue.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    wanted = min(cores, max(1, math.ceil(cpus)))
    began = time.monotonic()
    first = os.getpid() % cores  # holders spread over the files instead of all trying core 0 first
    order = [(first + i) % cores for i in range(cores)]
    ticket = queue / f"{time.time_ns():020d}-{os.getpid()}-{threading.get_ident()}"
    with open(ticket, "a") as mine:
        fcntl.flock(mine, fcntl.LOCK_EX)  # live while this process waits
        while True:
            held: list[IO] = []
            deferring = time.monotonic() - began < DEFER_S and _earlier_waiters(queue, ticket)
            if not deferring:
                for index in order:
                    handle: IO = open(folder / f"core-{index}", "a")  # closed below, or when the block ends
                    if _try_lock(handle):
                        held.append(handle)
                        if len(held) == wanted:
                            break
                    else:
                        handle.close()
            if len(held) == wanted:
                break
            for handle in held:
                handle.close()  # closing releases the lock
            time.sleep(poll_s)
    ticket.unlink(missing_ok=True)
    try:
        yield time.monotonic() - began
    finally:
        for handle in held:
            handle.close()
